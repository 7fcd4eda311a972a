"""Benchmark timing: three clocks per call, interleaved rounds, speed-ups with their spread."""

from __future__ import annotations

import time

import pytest

from bench.common import CLOCKS, compare, describe_speedup, interleaved_clocks, ratio_spread, time_call


def _clocks(values: list[float]) -> dict[str, list[float]]:
    return {clock: list(values) for clock in CLOCKS}


def test_time_call_reads_all_clocks_and_cpu_time_excludes_sleeping():
    times = time_call(lambda: time.sleep(0.05))
    assert set(times) == set(CLOCKS)
    assert times["wall_s"] >= 0.045
    assert times["thread_cpu_s"] < 0.02  # sleeping costs no CPU


def test_interleaved_clocks_runs_every_variant_once_per_round():
    order: list[str] = []
    out = interleaved_clocks({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert all(len(out[name][clock]) == 3 for name in ("a", "b") for clock in CLOCKS)


def test_ratio_spread_is_the_middle_half_or_the_range():
    assert ratio_spread([1.0, 2.0, 3.0]) == (1.0, 3.0)
    low, high = ratio_spread([0.9, 1.0, 1.1, 1.2, 1.3])
    assert (low, high) == pytest.approx((1.0, 1.2))


def test_compare_calls_a_win_only_when_the_spread_excludes_one():
    ours = _clocks([1.0, 1.0, 1.0, 1.0, 1.0])
    faster = compare(ours, _clocks([1.2, 1.25, 1.3, 1.2, 1.22]))["thread_cpu_s"]
    assert faster["verdict"] == "faster" and faster["speedup"] == pytest.approx(1.22)  # median of the rounds
    assert faster["ratio_of_medians"] == pytest.approx(1.22)
    assert faster["round_ratios"] == pytest.approx([1.2, 1.25, 1.3, 1.2, 1.22])
    noisy = compare(ours, _clocks([0.8, 1.4, 0.9, 1.3, 1.05]))["wall_s"]
    assert noisy["verdict"] == "on par" and noisy["spread"][0] < 1.0 < noisy["spread"][1]
    slower = compare(ours, _clocks([0.8, 0.85, 0.9, 0.8, 0.82]))["process_cpu_s"]
    assert slower["verdict"] == "slower"
    assert describe_speedup(faster).startswith("1.22x [1.20-1.25] faster")


def test_compare_refuses_unequal_rounds_and_reports_unresolved_clocks():
    with pytest.raises(ValueError, match="same number of rounds"):
        compare(_clocks([1.0, 1.0]), _clocks([1.0]))
    zero = compare(_clocks([0.0, 1.0]), _clocks([1.0, 1.0]))["wall_s"]
    assert zero["speedup"] is None and zero["verdict"].startswith("n/a")
