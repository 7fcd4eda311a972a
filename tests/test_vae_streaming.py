"""VAE temporal streaming: chunked == whole sequence, frame rules, callbacks, errors, FLOPs, trace."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
from wanbench.wan_core import flops as flops_module
from wanbench.wan_core.checkpoints.vae import save_vae
from wanbench.wan_core.config import WAN21_VAE, WAN22_VAE, VAEConfig
from wanbench.wan_core.errors import SamplingInterrupted
from wanbench.wan_core.flops import vae_flops
from wanbench.wan_core.latents import normalize_latent
from wanbench.wan_core.trace import use_tracer
from wanbench.wan_core.vae import WanVAE
from wanbench.wan_core.vae_blocks import CausalConv3d, chunk_ranges, pixel_range
from wanbench.wan_core.vae_stages import decode_video, encode_video, load_vae_for_stages

TINY = {"wan2.1": WAN21_VAE.tiny(), "wan2.2": WAN22_VAE.tiny()}
_MODELS: dict[str, WanVAE] = {}


def _model(variant: str) -> WanVAE:
    if variant not in _MODELS:
        torch.manual_seed(11)
        model = WanVAE(TINY[variant])
        with torch.no_grad():  # random norms and a non-zero attention output, like trained weights
            for name, p in model.named_parameters():
                if name.endswith("gamma"):
                    p.copy_(1 + 0.2 * torch.randn_like(p))
        _MODELS[variant] = model
    return _MODELS[variant]


def _video(cfg: VAEConfig, frames: int, batch: int = 1) -> torch.Tensor:
    s = cfg.spatial_stride
    return torch.rand(batch, 3, frames, s, 2 * s) * 2 - 1


def _latent(cfg: VAEConfig, t: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, cfg.z_dim, t, 1, 2)


def _caches(model: WanVAE) -> list[Any]:
    return [m.cache for m in model.modules() if isinstance(m, CausalConv3d)]


@pytest.mark.parametrize("variant", sorted(TINY))
def test_chunked_encode_equals_whole_sequence(variant: str) -> None:
    model = _model(variant)
    video = _video(model.config, 13)
    full = model.encode(video, chunk_frames=None)
    assert full.shape == (1, model.config.z_dim, 4, 1, 2)
    for chunk in (1, 3):
        got = model.encode(video, chunk_frames=chunk)
        assert (got - full).abs().max().item() < 1e-5, f"chunk_frames={chunk}"
    latent = model.encode_latent(video)
    assert (latent - normalize_latent(full, model.config)).abs().max().item() < 1e-5


@pytest.mark.parametrize("variant", sorted(TINY))
def test_chunked_decode_equals_whole_sequence(variant: str) -> None:
    model = _model(variant)
    raw = _latent(model.config, 3, batch=2)
    full = model.decode(raw, chunk_frames=None, clamp=False)
    s = model.config.spatial_stride
    assert full.shape == (2, 3, 9, s, 2 * s)
    got = model.decode(raw, chunk_frames=2, clamp=False)
    assert (got - full).abs().max().item() < 1e-5, "chunk_frames=2"
    one = model.decode_latent(normalize_latent(raw[1:], model.config), clamp=False)  # batch 1, chunks of 1
    assert (one - full[1:]).abs().max().item() < 1e-5, "chunk_frames=1, one sample of the batch"
    assert all(c.history is None and not c.active for c in _caches(model))


def test_frame_rules_and_clamp() -> None:
    model = _model("wan2.1")
    cfg = model.config
    for t in (1, 2):
        out = model.decode(_latent(cfg, t) * 3)
        assert out.shape[2] == 1 + 4 * (t - 1)
        assert out.dtype == torch.float32 and out.min() >= -1 and out.max() <= 1
    assert chunk_ranges(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert [pixel_range(cfg, a, b) for a, b in chunk_ranges(5, 2)] == [(0, 5), (5, 13), (13, 17)]


def test_trailing_frames_error_and_drop() -> None:
    model = _model("wan2.1")
    video = _video(model.config, 11)
    with pytest.raises(ValueError, match=r"11 frames.*silently drops the last 2 frame.*drop_trailing_frames"):
        model.encode(video)
    dropped = model.encode(video, drop_trailing_frames=True)
    assert dropped.shape[2] == 3
    assert torch.equal(dropped, model.encode(video[:, :, :9]))


@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        ((1, 4, 1, 16, 16), "3 \\(RGB\\) channels.*got 4"),
        ((1, 3, 1, 12, 16), "multiples of 8.*got 12x16"),
        ((3, 1, 16, 16), "\\(B, 3, F, H, W\\)"),
    ],
)
def test_bad_videos(shape: tuple[int, ...], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        _model("wan2.1").encode(torch.zeros(shape))


def test_bad_latents() -> None:
    model = _model("wan2.2")
    with pytest.raises(ValueError, match="takes 48-channel latents; got 16"):
        model.decode(torch.zeros(1, 16, 1, 2, 2))
    with pytest.raises(ValueError, match="B, 48, T, h, w"):
        model.decode(torch.zeros(48, 1, 2, 2))
    with pytest.raises(ValueError, match="chunk_frames must be >= 1"):
        model.decode(torch.zeros(1, 48, 1, 2, 2), chunk_frames=0)


def test_callback_progress_and_interrupt() -> None:
    model = _model("wan2.1")
    seen: list[tuple[int, int]] = []
    model.decode(_latent(model.config, 3), callback=lambda d, n: seen.append((d, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]

    def stop(done: int, total: int) -> None:
        if done == 2:
            raise SamplingInterrupted("stop")

    with pytest.raises(SamplingInterrupted):
        model.decode(_latent(model.config, 3), callback=stop)
    assert all(c.history is None and not c.active for c in _caches(model))


@pytest.mark.parametrize(
    ("cfg", "mode", "shape", "tflop"),
    [
        (WAN21_VAE, "decode", (1, 16, 21, 60, 104), 275),
        (WAN21_VAE, "encode", (1, 3, 81, 480, 832), 164),
        (WAN22_VAE, "decode", (1, 48, 31, 44, 80), 2011),
        (WAN22_VAE, "encode", (1, 3, 1, 704, 1280), 4.2),
    ],
)
def test_flops_match_spec_totals(cfg: VAEConfig, mode: str, shape: tuple[int, ...], tflop: float) -> None:
    got = vae_flops(cfg, mode, shape) / 1e12
    assert got == pytest.approx(tflop, rel=0.02)


@pytest.mark.parametrize("variant", ["wan2.1", "wan2.2"])
@pytest.mark.parametrize(
    ("mode", "cells"),
    [("decode", (1, 3, 2, 3)), ("decode", (2, 5, 4, 1)), ("encode", (1, 9, 3, 2)), ("encode", (2, 1, 1, 2))],
)
def test_flops_formula_equals_a_meta_run_at_full_shape(variant: str, mode: str, cells: tuple[int, ...]) -> None:
    # vae_flops extrapolates from one-cell meta runs; it must equal counting the real shape
    cfg = TINY[variant]
    b, frames, h, w = cells
    s = cfg.spatial_stride
    shape = (b, 3, frames, h * s, w * s) if mode == "encode" else (b, cfg.z_dim, frames, h, w)
    assert vae_flops(cfg, mode, shape) == sum(flops_module._meta_flops(cfg, mode, shape)) > 0


def test_loading_under_a_profiler_counts_flops_inside_the_load(tmp_path: Any) -> None:
    # the one-off meta runs happen while loading (inside the caller's stage), not at decode time
    path = save_vae(_model("wan2.2"), tmp_path / "vae.safetensors", dtype=torch.float32)
    flops_module._unit_flops.cache_clear()
    with use_tracer(_Recorder()):
        load_vae_for_stages(path)
    assert flops_module._unit_flops.cache_info().currsize == 4
    flops_module._unit_flops.cache_clear()
    load_vae_for_stages(path)  # no profiler: nothing is counted
    assert flops_module._unit_flops.cache_info().currsize == 0


class _Recorder:
    def __init__(self) -> None:
        self.stages: list[tuple[str, str, dict[str, Any]]] = []
        self.plans: list[dict[str, Any]] = []

    def stage(self, name: str, kind: str, facts: dict[str, Any]) -> contextlib.AbstractContextManager[Any]:
        self.stages.append((name, kind, facts))
        return contextlib.nullcontext()

    def event(self, name: str, facts: dict[str, Any]) -> None:
        if name != "memory_plan":  # the decode's memory plan; nothing else is expected
            raise AssertionError(f"unexpected event {name}")
        self.plans.append(facts)


def test_trace_stages_with_flops() -> None:
    model = _model("wan2.1")
    recorder = _Recorder()
    raw = _latent(model.config, 2)
    with use_tracer(recorder):
        encode_video(model, _video(model.config, 5))
        decode_video(model, raw)
    (enc_name, enc_kind, enc), (dec_name, dec_kind, dec) = recorder.stages
    assert (enc_name, enc_kind, dec_name, dec_kind) == (
        "VAE_Encoding",
        "preprocess",
        "VAE_Decoding",
        "decode",
    )
    assert enc["flops"] == vae_flops(model.config, "encode", (1, 3, 5, 8, 16)) > 0
    assert dec["flops"] == vae_flops(model.config, "decode", tuple(raw.shape)) > 0
    assert dec["output_shape"] == (1, 3, 5, 8, 16) and dec["tiling"] == "none"
    assert dec["memory_estimate_bytes"] > 0 and dec["memory_estimate_device"] == "cpu"
    (plan,) = recorder.plans
    assert (plan["what"], plan["tiling_requested"], plan["tiling"]) == ("VAE decode", "none", "none")


@pytest.mark.parametrize(
    ("shape", "channels"),
    [((1, 8, 6, 24, 24), 8), ((1, 16, 3, 4, 4), 16), ((2, 8, 4, 5, 7), 4)],  # oneDNN / im2col / batch 2
)
def test_cpu_kernel_choice_equals_the_default_convolution(shape: tuple[int, ...], channels: int) -> None:
    conv = CausalConv3d(shape[1], channels, 3, padding=1)
    x = torch.randn(*shape)
    with torch.no_grad():
        got = conv(x)
        padded = torch.nn.functional.pad(x, (0, 0, 0, 0, 2, 0))
        expected = torch.nn.functional.conv3d(padded, conv.weight, conv.bias, padding=(0, 1, 1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.shape == expected.shape
