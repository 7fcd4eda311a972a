"""Per-operator profile of one DiT block: matmul FLOPs from shapes, the gap to the ceiling."""

from __future__ import annotations

import json

import pytest

from bench.bench_dit_block import main, matmul_flops, summarize_ops


def test_matmul_flops_from_recorded_shapes():
    assert matmul_flops("aten::addmm", [[8], [4, 16], [16, 8]]) == 2 * 4 * 16 * 8
    assert matmul_flops("aten::mm", [[4, 16], [16, 8]]) == 2 * 4 * 16 * 8
    assert matmul_flops("aten::bmm", [[3, 4, 16], [3, 16, 8]]) == 2 * 3 * 4 * 16 * 8
    q, k = [2, 4, 10, 16], [2, 4, 7, 16]
    assert matmul_flops("aten::_scaled_dot_product_flash_attention_for_cpu", [q, k, k]) == 4 * 2 * 4 * 10 * 7 * 16
    assert matmul_flops("aten::gelu_", [[4, 16]]) is None
    assert matmul_flops("aten::mm", [[]]) is None  # shapes not recorded


def test_summarize_ops_splits_time_at_the_ceiling_from_the_gap():
    groups = [{"op": "aten::mm", "shapes": [[10, 10], [10, 10]], "calls": 2.0, "self_s": 1e-3},
              {"op": "aten::gelu_", "shapes": [[10, 10]], "calls": 1.0, "self_s": 5e-4}]
    mm, gelu = summarize_ops(groups, ceiling_gflops=8.0)
    assert mm["flops"] == 4000.0 and mm["at_ceiling_s"] == pytest.approx(4000 / 8e9)
    assert mm["gap_s"] == pytest.approx(1e-3 - 4000 / 8e9)
    assert gelu["gap_s"] == gelu["self_s"] and gelu["gflops"] is None
    assert mm["share"] == pytest.approx(2 / 3)


def test_main_profiles_a_block_whose_matmuls_match_the_analytic_count(tmp_path):
    main(["--case", "tiny", "--runs", "1", "--ceiling-sizes", "64", "--results-dir", str(tmp_path)])
    data = json.loads((tmp_path / "dit_block_profile.json").read_text())
    summary = data["summary"]
    assert summary["profiled_flops_vs_analytic"] == pytest.approx(1.0)
    assert summary["block_self_s"] == pytest.approx(sum(op["self_s"] for op in data["ops"]))
    assert summary["gap_s"] == pytest.approx(summary["block_self_s"] - summary["at_ceiling_s"])
