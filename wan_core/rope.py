"""3-D rotary position embedding of the Wan DiT (spec section 3.5).

The head dim `Dh` is split into three groups of real channels for the (f, h, w) axes:
`Dh - 4*(Dh//6)`, `2*(Dh//6)`, `2*(Dh//6)` (44/42/42 for 128). Each group of real size P has
`P/2` frequencies `1 / theta^(2j/P)`; channels are rotated in adjacent pairs
(`x[2j] + i*x[2j+1]` times `exp(i*angle_j)`). Angles, cos and sin are computed in float64.

Two ways to apply it, equal within ~1e-7 relative (measured in the golden tests):
- `apply_rope_fp64`: the reference, all arithmetic in float64 as the official code does.
- `RopeCache.cos_sin` + `apply_rope`: cos/sin computed in float64 once per (grid, device), stored
  in float32 and laid out per channel on request (cos repeated for both channels of a pair, sin with
  the sign of each channel) so that the rotation is `x * cos + swap_pairs(x) * sin`: three kernels.
- `RopeCache.freqs` + `apply_rope_complex`: the same rotation as one complex64 multiply per pair
  (`(x0 + i*x1) * (cos + i*sin)`), equal to `apply_rope` within float32 rounding (~1 ulp) and one
  kernel instead of three plus a copy. This is what `WanDiT` uses.
All return float32 (whatever the input dtype) and pass rows beyond the true token count through.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import torch

ROPE_THETA = 10000.0
ROPE_CACHE_ENTRIES = 4  # grids kept per model: a run uses one; a server may alternate a few

Grid = tuple[int, int, int]


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs given to the (f, h, w) axes: (22, 21, 21) for head dim 128."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim must be even and >= 6 for 3-D RoPE; got {head_dim}")
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


@functools.lru_cache(maxsize=16)
def _inv_freqs(head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = []
    for num_pairs in rope_split(head_dim):
        real = 2 * num_pairs
        exponent = torch.arange(0, real, 2, dtype=torch.float64) / real
        out.append(1.0 / torch.pow(torch.tensor(theta, dtype=torch.float64), exponent))
    return out[0], out[1], out[2]


def rope_table(head_dim: int, num_positions: int, *, theta: float = ROPE_THETA) -> torch.Tensor:
    """Angles of the concatenated (f | h | w) table: angle[p, j] = p * inv_freq_j, float64.

    Shapes: returns (num_positions, head_dim // 2).
    """
    positions = torch.arange(num_positions, dtype=torch.float64)
    return torch.cat([torch.outer(positions, f) for f in _inv_freqs(head_dim, theta)], dim=1)


def grid_angles(grid: Grid, head_dim: int, *, theta: float = ROPE_THETA) -> torch.Tensor:
    """Angle of every token of an (f, h, w) grid, tokens in row-major (f, h, w) order, float64.

    Shapes: returns (f*h*w, head_dim // 2).
    """
    f, h, w = grid
    inv_t, inv_h, inv_w = _inv_freqs(head_dim, theta)
    ang_t = torch.outer(torch.arange(f, dtype=torch.float64), inv_t)  # (f, Pt)
    ang_h = torch.outer(torch.arange(h, dtype=torch.float64), inv_h)  # (h, Ph)
    ang_w = torch.outer(torch.arange(w, dtype=torch.float64), inv_w)  # (w, Pw)
    full = torch.cat([
        ang_t[:, None, None, :].expand(f, h, w, -1),
        ang_h[None, :, None, :].expand(f, h, w, -1),
        ang_w[None, None, :, :].expand(f, h, w, -1),
    ], dim=-1)  # (f, h, w, Dh/2)
    return full.reshape(f * h * w, -1)


class RopeTables(NamedTuple):
    """The rotation of one grid, stored once: float32 (cos, sin) per pair and its complex64 view.

    `rotate` multiplies by `freqs` in eager mode and expands `pairs` to the per-channel tables of
    `apply_rope` (see `per_channel_cos_sin`) while torch.compile traces; no other copy is kept.
    Shapes: pairs (L, 1, Dh/2, 2) float32; freqs (L, 1, Dh/2) complex64 sharing the memory of pairs.
    """

    pairs: torch.Tensor
    freqs: torch.Tensor


def per_channel_cos_sin(pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel tables for `apply_rope` from a (cos, sin) pair table (bit-equal to float64 -> float32).

    Shapes: pairs (L, 1, Dh/2, 2) -> cos, sin, each (L, 1, Dh); for pair j, cos[..., 2j] = cos[..., 2j+1]
    = cos(angle_j), sin[..., 2j] = -sin(angle_j), sin[..., 2j+1] = sin(angle_j).
    """
    cos, sin = pairs[..., 0], pairs[..., 1]  # (L, 1, Dh/2)
    return (torch.stack((cos, cos), dim=-1).flatten(-2),
            torch.stack((-sin, sin), dim=-1).flatten(-2))


class RopeCache:
    """float32 rotation tables per (grid, device), computed in float64. Owned by one model.

    Holds at most `max_entries` grids (least recently used dropped first), so that a long-running
    server that sees many sizes does not keep every table; one entry is one (L, Dh/2) complex64
    table. The per-channel cos/sin tables of `cos_sin` are built from it only when asked for.
    """

    def __init__(self, head_dim: int, *, theta: float = ROPE_THETA,
                 max_entries: int = ROPE_CACHE_ENTRIES) -> None:
        rope_split(head_dim)
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1; got {max_entries}")
        self.head_dim = head_dim
        self.theta = theta
        self.max_entries = max_entries
        self._tables: OrderedDict[tuple[Grid, torch.device], RopeTables] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tables)

    def tables(self, grid: Grid, device: torch.device) -> RopeTables:
        """The rotation tables of one grid on `device`, for `rotate` (cached, LRU)."""
        key = (tuple(int(g) for g in grid), torch.device(device))
        found = self._tables.get(key)
        if found is not None:
            self._tables.move_to_end(key)
            return found
        angles = grid_angles(key[0], self.head_dim, theta=self.theta)[:, None, :]  # (L, 1, Dh/2)
        pairs = torch.stack((angles.cos(), angles.sin()), dim=-1).float().to(device)  # (L, 1, Dh/2, 2)
        found = RopeTables(pairs, torch.view_as_complex(pairs))
        self._tables[key] = found
        while len(self._tables) > self.max_entries:
            self._tables.popitem(last=False)
        return found

    def freqs(self, grid: Grid, device: torch.device) -> torch.Tensor:
        """Unit complex rotations `exp(i*angle_j)` per token and pair for `apply_rope_complex`.

        Shapes: returns (f*h*w, 1, head_dim // 2) complex64 on `device` (angles and cos/sin in float64).
        """
        return self.tables(grid, device).freqs

    def cos_sin(self, grid: Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel tables for `apply_rope`, built on each call from the cached pair table.

        Shapes: returns cos, sin, each (f*h*w, 1, head_dim) float32 on `device` (see `per_channel_cos_sin`).
        """
        return per_channel_cos_sin(self.tables(grid, device).pairs)

    def clear(self) -> None:
        self._tables.clear()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[0]` rows of `x` in float32; later rows pass through.

    Shapes: x (B, L, N, Dh), cos/sin (L_true, 1, Dh) from `RopeCache.cos_sin`, L_true <= L;
    returns (B, L, N, Dh) float32.
    """
    num_true = cos.shape[0]
    xf = x.float()
    head = xf[:, :num_true]
    swapped = head.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) in each pair
    rotated = torch.addcmul(head * cos, swapped, sin)
    if num_true == x.shape[1]:
        return rotated
    return torch.cat((rotated, xf[:, num_true:]), dim=1)


def apply_rope_complex(x: torch.Tensor, freqs: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Rotate the first `freqs.shape[0]` rows of `x` in float32 with one complex multiply.

    `inplace=True` (the caller owns x and needs no gradient) rotates a float32 x in its own
    memory when its layout allows, instead of allocating the result.
    Shapes: x (B, L, N, Dh), freqs (L_true, 1, Dh/2) complex64 from `RopeCache.freqs`, L_true <= L;
    returns (B, L, N, Dh) float32, a new tensor unless `inplace`.
    """
    num_true = freqs.shape[0]
    xf = x.float()
    if num_true != x.shape[1]:
        head = apply_rope_complex(xf[:, :num_true], freqs)
        return torch.cat((head, xf[:, num_true:]), dim=1)
    if xf.stride(-1) != 1 or xf.stride(-2) != 2 or xf.storage_offset() % 2:
        xf = xf.contiguous()
    pairs = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))  # (B, L, N, Dh/2) complex64
    if inplace:
        return torch.view_as_real(pairs.mul_(freqs)).flatten(-2)
    return torch.view_as_real(pairs * freqs).flatten(-2)


def rotate(x: torch.Tensor, rope: RopeTables | tuple[torch.Tensor, torch.Tensor], *,
           inplace: bool = False) -> torch.Tensor:
    """Apply RoPE with the fastest available form: the complex multiply of `RopeTables.freqs` in
    eager mode; the real form (`apply_rope`) for a (cos, sin) tuple and while torch.compile traces
    (Inductor fuses the real form, including the expansion of `RopeTables.pairs`; complex tensors
    are not supported by every compiler backend).

    `inplace=True` lets the complex form overwrite x (see `apply_rope_complex`).

    Shapes: x (B, L, N, Dh), rope tables of L_true <= L rows -> (B, L, N, Dh) float32.
    """
    if not isinstance(rope, RopeTables):
        return apply_rope(x, rope[0], rope[1])
    if not torch.compiler.is_compiling():
        return apply_rope_complex(x, rope.freqs, inplace=inplace)
    return apply_rope(x, *per_channel_cos_sin(rope.pairs))


def apply_rope_fp64(x: torch.Tensor, grid_sizes: Sequence[Grid], *,
                    theta: float = ROPE_THETA) -> torch.Tensor:
    """Reference: per-sample grids, float64 arithmetic, float32 result (spec section 3.5).

    Shapes: x (B, L, N, Dh), grid_sizes B tuples (f, h, w) with f*h*w <= L; returns (B, L, N, Dh) float32.
    """
    if len(grid_sizes) != x.shape[0]:
        raise ValueError(f"need one grid per sample: got {len(grid_sizes)} grids for batch {x.shape[0]}")
    out = x.float().clone()
    for b, grid in enumerate(grid_sizes):
        angles = grid_angles(tuple(int(g) for g in grid), x.shape[-1], theta=theta).to(x.device)
        n = angles.shape[0]
        if n > x.shape[1]:
            raise ValueError(f"grid {tuple(grid)} has {n} tokens but x has only {x.shape[1]} rows")
        pairs = x[b, :n].double().unflatten(-1, (-1, 2))  # (n, N, Dh/2, 2)
        rot = torch.polar(torch.ones_like(angles), angles)[:, None, :]  # (n, 1, Dh/2) complex128
        out[b, :n] = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * rot).flatten(-2).float()
    return out
