"""Derived figures and statements of the scripted runs, recomputed by hand."""

from __future__ import annotations

import dataclasses
import statistics

import pytest
from make_golden_report import (
    T2V_A14B_STEP_FLOPS,
    TI2V_5B_STEP_FLOPS,
    run_cpu_tiny,
    run_t2v_l40s,
    run_ti2v_h100,
)
from wanbench.profiling import analyze_run, summarize_run
from wanbench.profiling.stats import percentile


@pytest.fixture(scope="module")
def h100():
    run = run_ti2v_h100()
    return run, summarize_run(run)


def test_step_statistics_separate_the_first_step(h100) -> None:
    run, sm = h100
    inference = [2.95, 2.61, 2.62, 2.63, 2.64]
    assert sm.num_steps_recorded == 5 and sm.num_steps_planned == 5
    assert sm.first_step_s == pytest.approx(2.95)
    assert sm.steady_mean_s == pytest.approx(statistics.mean(inference[1:]))
    assert sm.steady_median_s == pytest.approx(statistics.median(inference[1:]))
    assert sm.steady_p90_s == pytest.approx(2.637)
    assert sm.s_per_step == pytest.approx(statistics.mean(inference) + 0.002)
    assert sm.loading_share_pct == pytest.approx(100 * 0.01 / (0.01 + sum(inference)))


def test_mfu_floor_and_load(h100) -> None:
    run, sm = h100
    flops = TI2V_5B_STEP_FLOPS
    seconds = 2.95 + 2.61 + 2.62 + 2.63 + 2.64
    assert sm.peak_tflops == 989.4
    assert sm.steps_tflops == pytest.approx(5 * flops / seconds / 1e12)
    assert sm.mfu_pct == pytest.approx(100 * 5 * flops / seconds / 989.4e12)
    assert sm.steps_floor_s == pytest.approx(5 * flops / 989.4e12)
    assert sm.load == pytest.approx(run.total.duration_s * run.total.activity_mean_pct)
    assert sm.inference_load == pytest.approx(
        sum(s.duration_s * s.activity_mean_pct for s in run.stages if s.kind == "step-inference")
    )
    assert sm.stage_sum_s + sm.outside_s == pytest.approx(sm.total_s)
    assert sm.outside_s == pytest.approx(0.05)  # nested loader stages are not counted twice


def test_memory_telemetry(h100) -> None:
    _, sm = h100
    assert sm.resident_at_first_step_bytes == int(10.9e9)
    assert sm.step_activation_peak_bytes == int(31.1e9) - int(10.9e9)
    assert sm.vae_peak_bytes == int(23.5e9) and sm.t5_peak_bytes == int(23.0e9)
    assert sm.peak_allocated_bytes == int(31.1e9)


def test_statements_cite_their_figures(h100) -> None:
    run, sm = h100
    analysis = analyze_run(run, sm)
    rules = [f.rule for f in analysis.findings]
    assert "activity_high" in rules and "activity_low" not in rules
    high = next(f for f in analysis.findings if f.rule == "activity_high")
    assert (
        high.figures["step_activity_pct"] == sm.step_activity_pct
        and f"{sm.step_activity_pct:.1f} %" in high.text
    )
    gains = [r.gain_s for r in analysis.recommendations]
    assert gains == sorted(gains, reverse=True) and all(g > 0 for g in gains)


def test_a14b_offload_recommendation() -> None:
    run = run_t2v_l40s()
    sm = summarize_run(run)
    assert sm.experts == {"high_noise_model": [0, 1], "low_noise_model": [2, 3, 4, 5]}
    assert sm.loading_total_s == pytest.approx(9.6 + 5 * 0.003)
    assert sm.activity_metric == "gpu_busy"
    assert sm.steps_tflops == pytest.approx(6 * T2V_A14B_STEP_FLOPS / sm.inference_total_s / 1e12)
    analysis = analyze_run(run, sm)
    rec = next(r for r in analysis.recommendations if r.rule == "placement_none")
    assert rec.gain_s == pytest.approx(sm.loading_total_s)
    assert f"{sm.loading_share_pct:.1f} %" in rec.text and "9.70 GB free" in rec.text
    assert any(e.name == "expert_switch" for e in run.events)
    assert all("SM activity" not in f.text for f in analysis.findings)


def test_cpu_run_makes_no_gpu_claims() -> None:
    run = run_cpu_tiny()
    sm = summarize_run(run)
    assert sm.step_activity_pct is None and sm.load is None and sm.mfu_pct is None
    assert sm.peak_allocated_bytes is None and sm.rss_max_bytes is not None
    assert sm.num_steps_cached == 0
    analysis = analyze_run(run, sm)
    assert [f.rule for f in analysis.findings if f.rule.startswith("activity")] == ["activity_unavailable"]
    assert not any(r.rule in ("placement_none", "kernel_headroom") for r in analysis.recommendations)


def test_percentile() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 90) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_noisy_steady_steps_are_flagged(h100) -> None:
    run, sm = h100
    assert sm.steady_iqr_s == pytest.approx(percentile([2.61, 2.62, 2.63, 2.64], 75) - 2.6175)
    assert "noisy_steps" not in [f.rule for f in analysis_rules(run)]
    stretched = []
    for s in run.stages:  # make steps 2 and 4 take 1.5x longer
        if s.kind == "step-inference" and s.step in (2, 4):
            s = dataclasses.replace(s, end_s=s.start_s + 1.5 * s.duration_s)
        stretched.append(s)
    noisy = dataclasses.replace(run, stages=tuple(stretched))
    finding = next(f for f in analyze_run(noisy, summarize_run(noisy)).findings if f.rule == "noisy_steps")
    assert finding.figures["steady_iqr_s"] > 0.1 * finding.figures["steady_median_s"]


def analysis_rules(run):
    return analyze_run(run, summarize_run(run)).findings
