"""Image conditioning of I2V / TI2V against the pipeline fixtures, sizes and errors."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_manifest, golden_dir, manifest_fixtures
from safetensors.torch import load_file
from wanbench.wan_core import conditioning as cond
from wanbench.wan_core.config import preset
from wanbench.wan_core.latents import denormalize_latent


def _fixture(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    entries = [f for f in manifest_fixtures(kind_prefix="pipeline") if f["name"] == name]
    if not entries:
        pytest.skip(f"fixture {name} not in the manifest")
    return entries[0], load_file(golden_dir() / f"{name}.io.safetensors")


def _tol(fixture: dict) -> dict:
    return fixture["tolerance"]["per_step"]


def test_i2v_vae_input_and_y_match_fixture() -> None:
    fixture, io = _fixture("pipeline_i2v_tiny")
    cfg, tol = fixture["config"], _tol(fixture)
    task = preset("i2v-A14B", tiny=True)
    image = io["image_uint8_hwc"]
    lat_h, lat_w = cond.i2v_latent_size(tuple(image.shape[:2]), cfg["max_area"],
                                        spatial_stride=task.vae.spatial_stride, patch=2)
    assert (lat_h, lat_w) == tuple(cfg["latent_shape"][2:])
    resized = cond.i2v_resize(image, lat_h * 8, lat_w * 8)
    video = cond.i2v_vae_input(resized, cfg["frames"])
    assert_close_manifest(video, io["inter.vae_encode_input"], atol=tol["atol"], rtol=tol["rtol"],
                          what="vae input")
    mask = cond.i2v_mask(cfg["frames"], lat_h, lat_w, temporal_stride=task.vae.temporal_stride)
    assert_close_manifest(cond.i2v_y(mask, io["vae_latent"]), io["inter.y"], atol=0, rtol=0, what="y")


def test_i2v_condition_end_to_end_with_a_stub_encoder() -> None:
    fixture, io = _fixture("pipeline_i2v_tiny")
    cfg, tol = fixture["config"], _tol(fixture)
    task = preset("i2v-A14B", tiny=True)
    seen: list[torch.Tensor] = []

    def encode(video: torch.Tensor) -> torch.Tensor:
        seen.append(video)
        return denormalize_latent(io["vae_latent"], task.vae)[None]

    result = cond.i2v_condition(io["image_uint8_hwc"], num_frames=cfg["frames"], max_area=cfg["max_area"],
                                task=task, encode=encode)
    assert seen[0].shape == (1, *io["inter.vae_encode_input"].shape)
    assert result.latent_shape == tuple(cfg["latent_shape"])
    assert result.pixel_size == (io["inter.vae_encode_input"].shape[3], io["inter.vae_encode_input"].shape[2])
    assert_close_manifest(result.y, io["inter.y"], atol=tol["atol"], rtol=tol["rtol"], what="y via encode")


def test_ti2v_preprocess_and_token_timesteps_match_fixture() -> None:
    fixture, io = _fixture("pipeline_ti2v_tiny_i2v")
    cfg, tol = fixture["config"], _tol(fixture)
    task = preset("ti2v-5B", tiny=True)
    image = io["image_uint8_hwc"]
    ow, oh = cond.best_output_size(image.shape[1], image.shape[0], task.size_multiple, task.size_multiple,
                                   cfg["max_area"])
    pixels = cond.ti2v_resize(image, ow, oh)
    assert_close_manifest(pixels, io["inter.vae_encode_input"], atol=tol["atol"], rtol=tol["rtol"],
                          what="ti2v vae input")
    mask = cond.first_frame_mask(tuple(cfg["latent_shape"]))
    for step, t in enumerate(io["timesteps"]):
        got = cond.token_timesteps(t, mask, patch_size=(1, 2, 2), seq_len=cfg["seq_len"])
        assert torch.equal(got, io[f"inter.step{step}.t_model"])


def test_ti2v_condition_with_a_stub_encoder() -> None:
    fixture, io = _fixture("pipeline_ti2v_tiny_i2v")
    cfg = fixture["config"]
    task = preset("ti2v-5B", tiny=True)
    raw = denormalize_latent(io["z_latent"], task.vae)[None]
    result = cond.ti2v_condition(io["image_uint8_hwc"], num_frames=cfg["frames"], max_area=cfg["max_area"],
                                 task=task, encode=lambda video: raw)
    assert result.latent_shape == tuple(cfg["latent_shape"])
    torch.testing.assert_close(result.z, io["z_latent"], atol=1e-5, rtol=1e-5)


def test_pin_first_frame_replaces_only_frame_zero() -> None:
    latent = torch.randn(4, 3, 2, 2)
    z = torch.randn(4, 1, 2, 2)
    pinned = cond.pin_first_frame(latent, z, cond.first_frame_mask(tuple(latent.shape)))
    assert torch.equal(pinned[:, :1], z) and torch.equal(pinned[:, 1:], latent[:, 1:])


def test_token_timesteps_pad_with_t() -> None:
    mask = cond.first_frame_mask((2, 2, 4, 4))
    got = cond.token_timesteps(torch.tensor(500), mask, patch_size=(1, 2, 2), seq_len=10)
    assert got.tolist() == [[0.0] * 4 + [500.0] * 6]
    with pytest.raises(ValueError, match="seq_len 3"):
        cond.token_timesteps(500, mask, patch_size=(1, 2, 2), seq_len=3)


@pytest.mark.parametrize(("hw", "area", "expected"), [
    ((720, 1280), 1280 * 720, (90, 160)),
    ((1280, 720), 1280 * 720, (160, 90)),
])
def test_i2v_latent_size_official_sizes(hw: tuple[int, int], area: int, expected: tuple[int, int]) -> None:
    assert cond.i2v_latent_size(hw, area, spatial_stride=8, patch=2) == expected


def test_best_output_size_keeps_default_ti2v_size() -> None:
    assert cond.best_output_size(1280, 704, 32, 32, 1280 * 704) == (1280, 704)
    assert cond.best_output_size(704, 1280, 32, 32, 1280 * 704) == (704, 1280)


def test_i2v_mask_layout() -> None:
    mask = cond.i2v_mask(9, 2, 3, temporal_stride=4)
    assert mask.shape == (4, 3, 2, 3)
    assert bool((mask[:, 0] == 1).all()) and bool((mask[:, 1:] == 0).all())


def test_conditioning_errors() -> None:
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        cond.image_to_tensor(torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8 or floating"):
        cond.image_to_tensor(torch.zeros(8, 8, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="4k\\+1"):
        cond.i2v_mask(8, 2, 2, temporal_stride=4)
    with pytest.raises(ValueError, match="too small"):
        cond.i2v_latent_size((50, 70), 16, spatial_stride=8, patch=2)
    with pytest.raises(ValueError, match="must return a raw latent"):
        cond.ti2v_condition(torch.zeros(64, 96, 3, dtype=torch.uint8), num_frames=9, max_area=96 * 64,
                            task=preset("ti2v-5B", tiny=True), encode=lambda v: torch.zeros(1, 3, 1, 4, 6))


def test_float_image_equals_uint8_image() -> None:
    image = torch.randint(0, 256, (10, 12, 3), dtype=torch.uint8)
    torch.testing.assert_close(cond.image_to_tensor(image), cond.image_to_tensor(image.float() / 255),
                               atol=1e-6, rtol=0)
