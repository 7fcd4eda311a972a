"""Compile benchmark: compile time separated from steady state, recompiles counted per phase."""

from __future__ import annotations

import json

import torch

from bench.bench_compile import main


def test_compile_bench_counts_one_graph_and_one_recompile_on_a_new_shape(tmp_path):
    torch._dynamo.reset()
    try:
        main(["--case", "tiny", "--backend", "eager", "--repeats", "2", "--name", "c", "--results-dir",
              str(tmp_path)])
    finally:
        torch._dynamo.reset()
    result = json.loads((tmp_path / "c.json").read_text())["result"]
    assert result["graphs_compiled_in_warmup"] == 1  # one graph serves both blocks
    assert result["compile_time_s"] > 0
    assert result["recompiles_in_steady_state"] == 0
    assert result["recompiles_after_new_shape"] == 1
    assert result["max_abs_diff_vs_eager"] < 1e-4  # the eager backend replays the same ops
    assert len(result["times_s"]["eager"]) == len(result["times_s"]["compiled"]) == 2
