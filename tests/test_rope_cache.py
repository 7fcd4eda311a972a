"""RopeCache: bounded (LRU), one stored table per grid, cos/sin built only on request, values unchanged."""

from __future__ import annotations

import pytest
import torch
from wanbench.wan_core.rope import (
    ROPE_CACHE_ENTRIES,
    RopeCache,
    RopeTables,
    apply_rope,
    apply_rope_fp64,
    grid_angles,
    rotate,
)

CPU = torch.device("cpu")


def test_cache_keeps_at_most_max_entries_least_recently_used_first() -> None:
    cache = RopeCache(16)
    assert cache.max_entries == ROPE_CACHE_ENTRIES == 4
    grids = [(1, 2, k) for k in range(1, 7)]
    first = cache.tables(grids[0], CPU)
    for grid in grids[1:4]:
        cache.tables(grid, CPU)
    assert cache.tables(grids[0], CPU) is first  # a hit, and now the most recently used
    cache.tables(grids[4], CPU)  # evicts grids[1], the least recently used
    assert len(cache) == 4
    assert cache.tables(grids[0], CPU) is first
    cache.tables(grids[5], CPU)
    assert len(cache) == 4
    small = RopeCache(16, max_entries=1)
    a = small.tables(grids[0], CPU)
    small.tables(grids[1], CPU)
    assert len(small) == 1 and small.tables(grids[0], CPU) is not a


def test_tables_store_one_table_and_no_cos_sin() -> None:
    cache = RopeCache(16)
    tables = cache.tables((2, 3, 4), CPU)
    assert isinstance(tables, RopeTables) and tables._fields == ("pairs", "freqs")
    assert tables.pairs.shape == (24, 1, 8, 2) and tables.pairs.dtype == torch.float32
    assert tables.freqs.shape == (24, 1, 8) and tables.freqs.dtype == torch.complex64
    # the complex table is a view of the pair table: one allocation per grid
    assert tables.freqs.untyped_storage().data_ptr() == tables.pairs.untyped_storage().data_ptr()
    assert cache.freqs((2, 3, 4), CPU) is tables.freqs
    cache.cos_sin((2, 3, 4), CPU)
    assert len(cache) == 1  # cos_sin adds nothing to the cache


def test_tables_are_bit_equal_to_float64_angles_rounded_once() -> None:
    cache = RopeCache(16)
    angles = grid_angles((2, 3, 4), 16)[:, None, :]  # float64
    cos, sin = cache.cos_sin((2, 3, 4), CPU)
    assert torch.equal(cos, torch.stack((angles.cos(), angles.cos()), dim=-1).flatten(-2).float())
    assert torch.equal(sin, torch.stack((-angles.sin(), angles.sin()), dim=-1).flatten(-2).float())
    freqs = cache.freqs((2, 3, 4), CPU)
    assert torch.equal(freqs, torch.complex(angles.cos().float(), angles.sin().float()))


def test_rotate_forms_agree_with_the_float64_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 30, 2, 16, generator=g)  # 24 tokens of the grid + 6 padding rows
    grid = (2, 3, 4)
    cache = RopeCache(16)
    ref = apply_rope_fp64(x, [grid])
    complex_form = rotate(x, cache.tables(grid, CPU))
    real_form = rotate(x, cache.cos_sin(grid, CPU))
    torch.testing.assert_close(complex_form, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(real_form, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(real_form, apply_rope(x, *cache.cos_sin(grid, CPU)))
    assert torch.equal(complex_form[:, 24:], x[:, 24:])


def test_rotate_while_compiling_uses_the_real_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.compile `rotate` expands the pair table to cos/sin in-graph (no complex tensors)."""
    x = torch.randn(2, 24, 2, 16)
    cache = RopeCache(16)
    expected = apply_rope(x, *cache.cos_sin((2, 3, 4), CPU))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(rotate(x, cache.tables((2, 3, 4), CPU)), expected)
