"""Spatially tiled VAE decode: memory bounded by the tile size, not the frame size.

The latent is cut into overlapping (h, w) tiles; each tile is decoded on its own, streamed over
time with the exact causal cache (so there is no temporal tiling error), and added into the
output with a separable weight that ramps linearly across every overlap with a neighbour; the
sum is divided by the summed weights. The tile decodes see a cut receptive field, so pixels near
seams differ slightly from the untiled decode (see docs/vae.md for measured errors); tiling is
opt-in and the untiled decode stays the reference.

Peak memory: output buffer + the decoder's lower-part features for the whole clip
((B, 4*dec_dim, T, h, w) at latent resolution; they feed the tiles and grow with the video) + the
lower part's working set on one whole latent frame + the caches and working set of one tile and
one temporal chunk of the upsampling stages. docs/vae.md gives the sizes and why the lower
features are not streamed per chunk instead.

Shapes: latent (B, z, T, h, w); output (B, 3, 1 + 4(T-1), h*s, w*s).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .config import AUTO_TILING, NO_TILING, VAEConfig
from .vae_blocks import PIXEL_CHANNELS, chunk_ranges


@dataclass(frozen=True, kw_only=True)
class VAETiling:
    """Tile plan in latent cells: square tiles of `tile_size`, neighbours overlapping by `overlap`.

    Defaults (32 cells = 256 px for Wan2.1, 512 px for Wan2.2; overlap 8 cells) keep the error
    against the untiled decode within the bound stated in docs/vae.md (on a latent the tiles cut,
    golden weights: mean abs <= 0.005, max abs <= 0.25).
    """

    tile_size: int = 32
    overlap: int = 8

    def __post_init__(self) -> None:
        if self.tile_size < 2:
            raise ValueError(f"tile_size must be >= 2 latent cells; got {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap must be in [0, tile_size) = [0, {self.tile_size}); got {self.overlap}")

    def axis_tiles(self, length: int) -> list[tuple[int, int]]:
        """[start, stop) latent ranges along one axis, spread evenly, overlapping by >= `overlap`."""
        if length <= self.tile_size:
            return [(0, length)]
        span = length - self.tile_size
        num = -(-span // (self.tile_size - self.overlap)) + 1
        starts = [(2 * i * span + num - 1) // (2 * (num - 1)) for i in range(num)]  # rounded i*span/(num-1)
        return [(s, s + self.tile_size) for s in starts]

    def tiles(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """(y0, y1, x0, x1) latent boxes covering an h x w latent."""
        return [(y0, y1, x0, x1) for y0, y1 in self.axis_tiles(h) for x0, x1 in self.axis_tiles(w)]

    def describe(self) -> str:
        return f"tiles {self.tile_size}x{self.tile_size} latent, overlap {self.overlap}"


def resolve_tiling(tiling: object) -> VAETiling | None:
    """None / "none" -> untiled; "auto" -> default `VAETiling()`; a `VAETiling` is used as is."""
    if tiling is None or tiling == NO_TILING:
        return None
    if tiling == AUTO_TILING:
        return VAETiling()
    if isinstance(tiling, VAETiling):
        return tiling
    raise TypeError(f"tiling must be None, {NO_TILING!r}, {AUTO_TILING!r} or a VAETiling; got {tiling!r}")


def axis_weights(tiles: list[tuple[int, int]], index: int, scale: int) -> torch.Tensor:
    """Pixel blend weights of tile `index` along one axis: linear ramps over its overlaps.

    Inside an overlap of n pixels the weight runs (1..n)/(n+1) up (and the neighbour's down), so
    two ramps sum to 1; elsewhere it is 1. Shapes: -> ((stop - start) * scale,).
    """
    start, stop = tiles[index]
    weight = torch.ones((stop - start) * scale, dtype=torch.float32)
    if index > 0:
        n = (tiles[index - 1][1] - start) * scale
        if n > 0:
            weight[:n] *= torch.arange(1, n + 1, dtype=torch.float32) / (n + 1)
    if index + 1 < len(tiles):
        n = (stop - tiles[index + 1][0]) * scale
        if n > 0:
            weight[-n:] *= torch.arange(n, 0, -1, dtype=torch.float32) / (n + 1)
    return weight


class TileDecoder(Protocol):
    """What `decode_tiled` needs of the VAE (`vae.WanVAE` implements it)."""

    config: VAEConfig

    def decode_lower(self, x: torch.Tensor, *, chunk_frames: int | None) -> torch.Tensor: ...

    def decode_into(self, x: torch.Tensor, out: torch.Tensor, *, chunk_frames: int | None,
                    callback: Callable[[int, int], None] | None = None, weight: torch.Tensor | None = None,
                    progress: tuple[int, int] | None = None, upper_only: bool = False) -> None: ...


def decode_tiled(
    vae: TileDecoder,
    x: torch.Tensor,
    plan: VAETiling,
    *,
    chunk_frames: int | None,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Decode `x` (a latent already through `conv2`) tile by tile; returns the unclamped video.

    `callback(done, total)` counts chunks over all tiles (total = tiles x temporal chunks).
    Shapes: x (B, z, T, h, w) -> (B, 3, 1 + 4(T-1), h*s, w*s), float32.
    """
    cfg = vae.config
    b, _, t, h, w = x.shape
    s = cfg.spatial_stride
    out = torch.zeros(
        (b, PIXEL_CHANNELS, cfg.pixel_frames(t), h * s, w * s), dtype=torch.float32, device=x.device
    )
    weight_sum = torch.zeros((h * s, w * s), dtype=torch.float32, device=x.device)
    rows, cols = plan.axis_tiles(h), plan.axis_tiles(w)
    # Attention sees whole frames, so the lower part runs untiled, once, and its features for the
    # whole clip are kept: each tile then streams over time with one set of causal caches.
    feats = vae.decode_lower(x, chunk_frames=chunk_frames)  # (B, 4*dec_dim, T, h, w)
    per_tile = len(chunk_ranges(t, chunk_frames))
    total = len(rows) * len(cols) * per_tile
    done = 0
    for i, (y0, y1) in enumerate(rows):
        wy = axis_weights(rows, i, s).to(x.device)
        for j, (x0, x1) in enumerate(cols):
            weight = wy[:, None] * axis_weights(cols, j, s).to(x.device)[None, :]  # (tile H, tile W)
            region = out[:, :, :, y0 * s : y1 * s, x0 * s : x1 * s]
            vae.decode_into(
                feats[:, :, :, y0:y1, x0:x1],
                region,
                chunk_frames=chunk_frames,
                callback=callback,
                weight=weight,
                progress=(done, total),
                upper_only=True,
            )
            weight_sum[y0 * s : y1 * s, x0 * s : x1 * s] += weight
            done += per_tile
    return out.div_(weight_sum)
