"""Tiled VAE decode: tile plans, blend weights, error against the untiled decode, bounded memory."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import golden_dir
from safetensors.torch import load_file
from wanbench.wan_core.config import WAN21_VAE
from wanbench.wan_core.vae import WanVAE, load_vae
from wanbench.wan_core.vae_tiling import VAETiling, axis_weights, resolve_tiling

MANIFEST = "MANIFEST_VAE.json"
# Documented bound (docs/vae.md) for forced multi-tile decodes of the golden latents with 3-cell
# tiles overlapping by 1, on the random golden weights: mean |tiled - untiled| over the video
# (measured 0.115 for the Wan2.1 4x4 latent). Default tiles are 32 cells.
SMALL_TILE = VAETiling(tile_size=3, overlap=1)
SMALL_TILE_MEAN_ABS_BOUND = 0.2


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


@pytest.mark.skipif(not DECODE_CASES, reason="MANIFEST_VAE.json not found")
@pytest.mark.parametrize(("name", "case"), DECODE_CASES or [("none", "none")])
def test_tiled_decode_error_on_golden_cases(name: str, case: str) -> None:
    manifest = json.loads((golden_dir() / MANIFEST).read_text(encoding="utf-8"))
    entry, tol = manifest["vaes"][name], manifest["tolerance"]["float32"]
    vae = load_vae(golden_dir() / entry["weights_file"])
    tensors = load_file(str(golden_dir() / entry["cases_file"]))
    latent, untiled = tensors[f"{case}.latent"], tensors[f"{case}.video"]  # the official untiled decode
    # Default tiles are larger than these latents: a single tile, within the parity tolerance.
    assert len(VAETiling().tiles(*latent.shape[-2:])) == 1
    assert torch.allclose(
        vae.decode_latent(latent, tiling="auto"), untiled, atol=tol["atol"], rtol=tol["rtol"]
    )
    if len(SMALL_TILE.tiles(*latent.shape[-2:])) == 1:
        return  # too small to be cut by the forced small tiles as well
    tiled = vae.decode_latent(latent, tiling=SMALL_TILE)
    assert tiled.shape == untiled.shape and tiled.min() >= -1 and tiled.max() <= 1
    error = (tiled - untiled).abs().mean().item()
    assert error <= SMALL_TILE_MEAN_ABS_BOUND, f"{name}/{case}: mean abs error {error:.4f}"


def _max_upper_activation(vae: WanVAE, raw: torch.Tensor, plan: VAETiling) -> tuple[int, int]:
    """Largest (frames, H*W) any conv of the upsampling stages sees during a tiled decode."""
    seen = [(0, 0)]

    def hook(_m: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        x = inputs[0]
        frames = x.shape[2] if x.dim() == 5 else 1
        seen.append((frames, x.shape[-2] * x.shape[-1]))

    handles = [
        m.register_forward_hook(hook)
        for m in vae.decoder.upsamples.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))
    ]
    try:
        vae.decode(raw, tiling=plan)
    finally:
        for h in handles:
            h.remove()
    return max(f for f, _ in seen), max(a for _, a in seen)


def test_tiled_memory_bounded_by_tile_not_video() -> None:
    torch.manual_seed(3)
    vae = WanVAE(WAN21_VAE.tiny())
    plan = VAETiling(tile_size=2, overlap=1)
    small = _max_upper_activation(vae, torch.randn(1, 16, 2, 2, 2), plan)
    large = _max_upper_activation(vae, torch.randn(1, 16, 2, 4, 3), plan)
    assert small == large  # activations depend on the tile and the chunk, not on the video size
    s = vae.config.spatial_stride
    assert large[1] <= (plan.tile_size * s) ** 2
    assert large[0] <= 4 + 2  # one latent frame per chunk: 4 pixel frames + 2 cached


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
