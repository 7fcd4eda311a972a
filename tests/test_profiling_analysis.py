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
    assert any(e.name == "expert_switch" for e in run.events)
    assert all("SM activity" not in f.text for f in analyze_run(run, sm).findings)


def test_placement_none_only_when_the_offloaded_expert_fits() -> None:
    """L40S: 6.70 GB free (NVML saw 41 GB used of 47.70 GB), the other expert needs ~28.6 GB: no
    recommendation, a finding that says by how much it does not fit. On a bigger GPU it fits."""
    run = run_t2v_l40s()
    sm = summarize_run(run)
    assert sm.free_bytes == 47_697_362_944 - 41 * 10**9 and sm.free_source == "nvml"
    analysis = analyze_run(run, sm)
    assert not any(r.rule == "placement_none" for r in analysis.recommendations)
    miss = next(f for f in analysis.findings if f.rule == "placement_none_does_not_fit")
    assert miss.figures["needed_bytes"] == int(28.6e9)
    assert "about 28.60 GB more weights" in miss.text and "only 6.70 GB was free" in miss.text
    assert "does not fit by 21.90 GB" in miss.text
    big = dataclasses.replace(
        run, system=dataclasses.replace(run.system, gpu_name="NVIDIA H200", gpu_memory_bytes=141 * 10**9)
    )
    rec = next(r for r in analyze_run(big, summarize_run(big)).recommendations if r.rule == "placement_none")
    assert rec.gain_s == pytest.approx(sm.loading_total_s)
    assert "about 28.60 GB more weights would stay on the GPU and 100.00 GB was free, so they fit" in rec.text
    assert f"{sm.loading_share_pct:.1f} %" in rec.text


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


def _scripted(step_times: list[float], *, outside: float = 0.003):
    """A GPU run (fake clock) whose inference steps take `step_times` seconds."""
    from make_golden_report import Rig
    from wanbench.profiling import FakeDevice, FakeNvml
    from wanbench.wan_core import trace

    rig = Rig(gpu=FakeNvml(name="NVIDIA H100 80GB HBM3", activity_metric="sm_activity"), device=FakeDevice(), rss=10**9)
    s = rig.open("tiny_steps")
    with s.activate():
        s.set_context(steps=len(step_times), placement="none")
        with trace.stage("Model_Initialization", kind="init"):
            rig.work(0.004, activity=(10.0,), allocated=10**8)
        for i, seconds in enumerate(step_times):
            with trace.stage(f"Step_{i}_Loading", kind="step-loading", flops=0.0, step=i):
                rig.work(0.0002, activity=(5.0,))
            with trace.stage(f"Step_{i}_Inference", kind="step-inference", flops=1e12, step=i):
                rig.work(seconds, activity=(95.0,), peak=2 * 10**8)
        rig.work(outside, activity=(0.0,))
    return s.close()


def test_millisecond_steps_never_print_as_zero() -> None:
    """Steps of ~5 ms: every time in findings and recommendations keeps its digits, and a
    statement never says 0.00 s next to a gain of 0.0021 s."""
    from wanbench.profiling import check_report, render_markdown, report_document

    run = _scripted([0.0071, 0.0050, 0.0050, 0.0051, 0.0050])
    sm = summarize_run(run)
    analysis = analyze_run(run, sm)
    warm = next(r for r in analysis.recommendations if r.rule == "warmup")
    assert "costs 0.0021 s more than a steady one (0.0071 s vs 0.0050 s)" in warm.text
    md = render_markdown([run])
    assert "0.00 s" not in md and "(estimated gain 0.0021 s)" in md
    for st in [*analysis.findings, *analysis.recommendations]:
        assert "0.00 s" not in st.text, st.text
    assert check_report(report_document([run])) == []


@pytest.mark.parametrize(
    ("steps", "flagged"),
    [
        ([0.30, 0.20, 0.20, 0.21, 0.20], True),  # slower than every steady step, quiet steps
        ([0.21, 0.15, 0.59, 0.15, 0.16, 0.30], False),  # another step took 0.59 s (and noisy)
        ([0.50, 0.20, 0.30, 0.20, 0.40], False),  # slowest, but the steady steps are noisy
        ([0.23, 0.20, 0.22, 0.20, 0.20], False),  # not 1.2x the median
    ],
)
def test_warmup_only_when_the_data_says_so(steps: list[float], flagged: bool) -> None:
    run = _scripted(steps)
    analysis = analyze_run(run, summarize_run(run))
    assert ("warmup" in [f.rule for f in analysis.findings]) is flagged
    assert ("warmup" in [r.rule for r in analysis.recommendations]) is flagged
