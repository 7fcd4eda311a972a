"""Tiled VAE decode: tile plans, blend weights, error against the untiled decode, bounded memory."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import golden_dir
from safetensors.torch import load_file
from wanbench.wan_core.checkpoints.vae import load_vae
from wanbench.wan_core.config import WAN21_VAE
from wanbench.wan_core.vae import WanVAE
from wanbench.wan_core.vae_blocks import AttentionBlock
from wanbench.wan_core.vae_tiling import VAETiling, axis_weights, resolve_tiling

MANIFEST = "MANIFEST_VAE.json"
# Documented bounds (docs/vae.md), |tiled - untiled| over the video in [-1, 1], golden (random,
# untrained) weights. Default tiles on a latent they cut (overlap 8): measured mean <= 0.0030 and
# max <= 0.18 over both VAEs, several seeds and shapes.
DEFAULT_TILE_MEAN_ABS_BOUND = 0.005
DEFAULT_TILE_MAX_ABS_BOUND = 0.25
# Forced 3-cell tiles overlapping by 1 on the tiny golden latents: measured mean <= 0.17,
# max <= 1.59 (the clamped video differs by at most 2 anywhere).
SMALL_TILE = VAETiling(tile_size=3, overlap=1)
SMALL_TILE_MEAN_ABS_BOUND = 0.2
SMALL_TILE_MAX_ABS_BOUND = 1.75
# One latent frame, 16 x 56 cells: the defaults cut it into two 16 x 32 tiles overlapping by
# exactly the default overlap of 8 cells (a real seam), and it decodes in about a second.
MULTI_TILE_LATENT_THW = (1, 16, 56)


def _golden_decode_cases() -> list[tuple[str, str]]:
    path = golden_dir() / MANIFEST
    if not path.is_file():
        return []
    vaes = json.loads(path.read_text(encoding="utf-8"))["vaes"]
    return [
        (name, key.split(".")[0])
        for name, vae in vaes.items()
        for key in vae["tensors"]
        if key.endswith(".video_raw")
    ]


DECODE_CASES = _golden_decode_cases()


def test_axis_tiles_cover_and_weights_sum_to_one() -> None:
    plan = VAETiling(tile_size=5, overlap=2)
    for length in (3, 5, 6, 9, 12, 13):
        tiles = plan.axis_tiles(length)
        assert tiles[0][0] == 0 and tiles[-1][1] == length
        assert all(b - a == min(5, length) for a, b in tiles)
        overlaps = [b0 - a1 for (_, b0), (a1, _) in zip(tiles, tiles[1:], strict=False)]
        assert all(o >= 2 for o in overlaps)  # at least the requested overlap
        total, cover = torch.zeros(length * 8), torch.zeros(length * 8)
        for i, (a, b) in enumerate(tiles):
            w = axis_weights(tiles, i, 8)
            assert w.shape == ((b - a) * 8,) and w.min() > 0 and w.max() <= 1
            total[a * 8 : b * 8] += w
            cover[a * 8 : b * 8] += 1
        assert cover.min() >= 1
        double = cover <= 2  # where at most two tiles meet, the ramps sum to exactly 1
        assert torch.allclose(total[double], torch.ones_like(total[double])), length
    assert plan.tiles(6, 3) == [(0, 5, 0, 3), (1, 6, 0, 3)]
    assert VAETiling(tile_size=32, overlap=8).axis_tiles(80) == [(0, 32), (24, 56), (48, 80)]


def test_tiling_options() -> None:
    assert resolve_tiling(None) is None and resolve_tiling("none") is None
    assert resolve_tiling("auto") == VAETiling()
    with pytest.raises(ValueError, match="overlap must be in"):
        VAETiling(tile_size=4, overlap=4)
    with pytest.raises(ValueError, match="tile_size must be >= 2"):
        VAETiling(tile_size=1, overlap=0)
    with pytest.raises(TypeError, match="tiling must be None"):
        resolve_tiling("big")


def _assert_within(tiled: torch.Tensor, untiled: torch.Tensor, mean_bound: float, max_bound: float,
                   what: str) -> None:
    assert tiled.shape == untiled.shape and tiled.min() >= -1 and tiled.max() <= 1
    error = (tiled - untiled).abs()
    mean, worst = error.mean().item(), error.max().item()
    assert mean <= mean_bound and worst <= max_bound, (
        f"{what}: mean abs error {mean:.4f} (bound {mean_bound}), max {worst:.4f} (bound {max_bound})")


@pytest.mark.skipif(not DECODE_CASES, reason="MANIFEST_VAE.json not found")
@pytest.mark.parametrize(("name", "case"), DECODE_CASES or [("none", "none")])
def test_tiled_decode_error_on_golden_cases(name: str, case: str) -> None:
    manifest = json.loads((golden_dir() / MANIFEST).read_text(encoding="utf-8"))
    entry, tol = manifest["vaes"][name], manifest["tolerance"]["float32"]
    vae = load_vae(golden_dir() / entry["weights_file"])
    tensors = load_file(str(golden_dir() / entry["cases_file"]))
    latent, untiled = tensors[f"{case}.latent"], tensors[f"{case}.video"]  # the official untiled decode
    auto = vae.decode_latent(latent, tiling="auto")
    if len(VAETiling().tiles(*latent.shape[-2:])) == 1:  # one default tile: the untiled decode itself
        assert torch.allclose(auto, untiled, atol=tol["atol"], rtol=tol["rtol"])
    else:  # a larger golden latent that the defaults cut: the documented default-tiling bound
        _assert_within(auto, untiled, DEFAULT_TILE_MEAN_ABS_BOUND, DEFAULT_TILE_MAX_ABS_BOUND,
                       f"{name}/{case} default tiles")
    if len(SMALL_TILE.tiles(*latent.shape[-2:])) == 1:
        return  # too small to be cut by the forced small tiles as well
    tiled = vae.decode_latent(latent, tiling=SMALL_TILE)
    _assert_within(tiled, untiled, SMALL_TILE_MEAN_ABS_BOUND, SMALL_TILE_MAX_ABS_BOUND,
                   f"{name}/{case} 3-cell tiles")


def _golden_vaes() -> list[str]:
    path = golden_dir() / MANIFEST
    return list(json.loads(path.read_text(encoding="utf-8"))["vaes"]) if path.is_file() else []


@pytest.mark.skipif(not _golden_vaes(), reason="MANIFEST_VAE.json not found")
@pytest.mark.parametrize("name", _golden_vaes() or ["none"])
def test_default_tiling_error_on_a_multi_tile_latent(name: str) -> None:
    """The default tiles against the untiled decode where they really cut: the documented bound."""
    entry = json.loads((golden_dir() / MANIFEST).read_text(encoding="utf-8"))["vaes"][name]
    vae = load_vae(golden_dir() / entry["weights_file"])
    plan = VAETiling()
    t, h, w = MULTI_TILE_LATENT_THW
    assert plan.tiles(h, w) == [(0, h, 0, 32), (0, h, 24, 56)]  # two tiles, overlap exactly 8
    latent = torch.randn(1, vae.config.z_dim, t, h, w, generator=torch.Generator().manual_seed(5))
    untiled = vae.decode_latent(latent)
    tiled = vae.decode_latent(latent, tiling="auto")
    _assert_within(tiled, untiled, DEFAULT_TILE_MEAN_ABS_BOUND, DEFAULT_TILE_MAX_ABS_BOUND,
                   f"{name} {MULTI_TILE_LATENT_THW} default tiles")
    seam = (tiled - untiled).abs()[..., 24 * vae.config.spatial_stride : 32 * vae.config.spatial_stride]
    assert seam.max() > 0  # the tiles really differ from the untiled decode near the seam


def _tiled_footprint(vae: WanVAE, raw: torch.Tensor, plan: VAETiling) -> dict[str, tuple[int, ...]]:
    """What one tiled decode holds and sees: the shape of the lower-part features it keeps, and the
    largest (frames, H*W) any conv or attention input of the lower part and of the upsampling
    stages has."""
    seen: dict[str, list[tuple[int, int]]] = {"lower": [(0, 0)], "upper": [(0, 0)]}

    def hook_for(part: str):  # noqa: ANN202
        def hook(_m: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inputs[0]
            frames = x.shape[2] if x.dim() == 5 else 1
            seen[part].append((frames, x.shape[-2] * x.shape[-1]))
        return hook

    lower = [vae.decoder.conv1, *vae.decoder.middle.modules()]
    kinds = (torch.nn.Conv2d, torch.nn.Conv3d, AttentionBlock)
    handles = [m.register_forward_hook(hook_for("lower")) for m in lower if isinstance(m, kinds)]
    handles += [m.register_forward_hook(hook_for("upper")) for m in vae.decoder.upsamples.modules()
                if isinstance(m, kinds)]
    kept: list[tuple[int, ...]] = []
    decode_lower = vae.decode_lower

    def recording_decode_lower(x: torch.Tensor, *, chunk_frames: int | None) -> torch.Tensor:
        feats = decode_lower(x, chunk_frames=chunk_frames)
        kept.append(tuple(feats.shape))
        return feats

    vae.decode_lower = recording_decode_lower  # instance attribute, removed below
    try:
        vae.decode(raw, tiling=plan)
    finally:
        del vae.decode_lower
        for h in handles:
            h.remove()
    assert len(kept) == 1
    return {"features": kept[0], "lower": max(seen["lower"]), "upper": max(seen["upper"])}


def test_tiled_memory_bounded_by_tile_not_video() -> None:
    """The upsampling stages (most of the work and memory) see one tile and one temporal chunk,
    whatever the video size. The untiled part, honestly: the lower part (conv1 and the middle
    section with its frame-global attention) sees whole latent frames, one at a time, and the tiled
    decode keeps its features for the whole clip, (B, 4*dec_dim, T, h, w): that grows with the
    video, at latent resolution (docs/vae.md gives the sizes at 720p)."""
    torch.manual_seed(3)
    vae = WanVAE(WAN21_VAE.tiny())
    plan = VAETiling(tile_size=2, overlap=1)
    shapes = {"small": (2, 2, 2), "wider": (2, 4, 3), "longer": (4, 4, 3)}
    got = {k: _tiled_footprint(vae, torch.randn(1, 16, *thw), plan) for k, thw in shapes.items()}
    assert got["small"]["upper"] == got["wider"]["upper"] == got["longer"]["upper"]
    s = vae.config.spatial_stride
    frames, area = got["longer"]["upper"]
    assert area <= (plan.tile_size * s) ** 2
    assert frames <= vae.config.temporal_stride  # one latent frame per chunk: at most 4 pixel frames
    width = vae.decoder.conv1.out_channels
    assert width == 4 * vae.config.dec_dim
    for key, (t, h, w) in shapes.items():
        assert got[key]["features"] == (1, width, t, h, w), key  # kept for the whole clip
        assert got[key]["lower"] == (1, h * w), key  # one latent frame, the whole frame


def test_tiled_callback_counts_every_tile_and_chunk() -> None:
    torch.manual_seed(4)
    vae = WanVAE(WAN21_VAE.tiny())
    seen: list[tuple[int, int]] = []
    vae.decode(
        torch.randn(1, 16, 2, 3, 3),
        tiling=VAETiling(tile_size=2, overlap=1),
        callback=lambda d, n: seen.append((d, n)),
    )
    assert seen == [(i, 8) for i in range(1, 9)]  # 2 x 2 tiles x 2 latent frames
