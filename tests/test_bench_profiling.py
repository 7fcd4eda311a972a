"""Profiling-overhead benchmark: CPU-time A/B with session open/close, and the cost model."""

from __future__ import annotations

import json

import pytest

from bench.bench_profiling import main, overhead_by_clock
from bench.common import CLOCKS


def test_overhead_by_clock_is_the_median_of_pairs():
    off = {clock: [1.0, 2.0, 1.0] for clock in CLOCKS}
    on = {clock: [1.01, 2.04, 0.99] for clock in CLOCKS}
    got = overhead_by_clock(off, on)["process_cpu_s"]
    assert got["pairs_pct"] == pytest.approx([1.0, 2.0, -1.0])
    assert got["median_pct"] == pytest.approx(1.0)
    assert got["spread_pct"] == pytest.approx([-1.0, 2.0])


def test_main_judges_the_target_on_process_cpu_time(tmp_path):
    assert main(["--latent", "1x4x4", "--steps", "2", "--repeats", "2", "--threads", "1",
                 "--results-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "profiling_overhead.json").read_text())
    assert data["judged_on"] == "process_cpu_s"
    assert data["meets_target"] == (data["ab_overhead"]["process_cpu_s"]["median_pct"] < 1.0)
    assert all(len(data["clocks_on"][clock]) == 2 for clock in CLOCKS)
    model = data["cost_model"]
    assert model["session_open_close_cpu_s"]["process_cpu_s"] > 0  # open/close is part of the cost
    cpu = {part: model[part]["process_cpu_s"] for part in ("session_open_close_cpu_s", "stage_cpu_s", "sample_cpu_s")}
    expected = 100 * (cpu["session_open_close_cpu_s"] + 4 * cpu["stage_cpu_s"]
                      + model["samples_per_run"] * cpu["sample_cpu_s"]) / model["run_process_cpu_s_off"]
    assert model["overhead_pct"] == pytest.approx(expected)
    assert data["bit_identical"] is True and data["stages_in_last_profiled_run"] >= 4
