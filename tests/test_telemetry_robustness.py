"""Telemetry never hurts a run: failing probes, activity attribution from the sampler's readings,
CPU % within what the cores allow, and sampler gaps reported."""

from __future__ import annotations

import copy
import json
import os
import sys
import time

import pytest
import torch
from wanbench.profiling import FakeClock, FakeDevice, FakeHost, FakeNvml, ProfileSession, check_report
from wanbench.profiling.memory import CpuDevice
from wanbench.profiling.output import write_report
from wanbench.profiling.records import Sample
from wanbench.profiling.stats import stage_activity
from wanbench.profiling.telemetry import MIN_CPU_INTERVAL_S, Telemetry
from wanbench.wan_core import trace

GB = 10**9


class FailingHost(FakeHost):
    """A host probe whose reads raise (an unreadable /proc, say) once `failing` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False

    def read(self):  # noqa: ANN201 - same contract as FakeHost.read
        if self.failing:
            raise OSError("/proc/self/statm: Input/output error")
        return super().read()


def _work(steps: int = 3, first: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 96, generator=g)
    for i in range(first, first + steps):
        with trace.stage(f"Step_{i}_Inference", kind="step-inference", flops=2 * 96**3):
            for _ in range(20):
                x = torch.tanh(x @ x.T / 96)
            time.sleep(0.01)  # give the sampler thread its turns
    return x


def _wait_until(condition, timeout_s: float = 10.0) -> None:  # noqa: ANN001 - a zero-argument callable
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the sampler thread did not take its readings in time"
        time.sleep(0.005)


def test_nvml_errors_at_boundaries_and_in_the_thread_never_stop_or_change_the_run() -> None:
    expected = _work()
    gpu, host = FakeNvml(), FailingHost()
    gpu.set(activity_pct=70.0, used_bytes=3 * GB)
    session = ProfileSession(case_name="nvml-fails", sample_interval_s=0.002, gpu=gpu,
                             device_probe=FakeDevice(), host=host)
    with session:
        gpu.fail(RuntimeError("NVML_ERROR_GPU_IS_LOST"), on="memory")  # every stage boundary
        first = _work(1, first=3)
        _wait_until(lambda: gpu.num_activity_reads >= 3)  # the thread has read activity
        gpu.fail(RuntimeError("NVML_ERROR_UNKNOWN"), on="activity")  # every thread reading
        host.failing = True
        reads = gpu.num_reads
        rest = _work()
        _wait_until(lambda: gpu.num_reads >= reads + 3)  # the thread went on reading (and failing)
        gpu.fail(None)
        host.failing = False
    run = session.record
    torch.testing.assert_close(rest, expected, rtol=0, atol=0)  # the same numbers as without profiling
    assert first.shape == expected.shape
    assert run.status == "completed" and len(run.stages) == 4
    assert session._thread is not None and not session._thread.is_alive
    notes = " ".join(run.notes)
    assert "NVML memory reading failed" in notes and "NVML_ERROR_GPU_IS_LOST" in notes
    assert "NVML activity reading failed" in notes and "NVML_ERROR_UNKNOWN" in notes
    assert "host probe (CPU time, RSS) failed" in notes
    assert "stopped early" not in notes  # the thread kept sampling through the failures
    failing = [s for s in run.samples if s.rss_bytes is None]
    assert failing and all(s.cpu_pct is None for s in failing)
    assert gpu.num_activity_reads >= 3


def test_a_probe_failing_while_the_session_opens_and_closes_is_noted() -> None:
    gpu, host = FakeNvml(), FailingHost()
    gpu.fail(RuntimeError("NVML not ready"))
    host.failing = True
    session = ProfileSession(case_name="fails-early", sample_interval_s=None, clock=FakeClock(), gpu=gpu,
                             device_probe=FakeDevice(), host=host)
    with session:
        with trace.stage("VAE_Decoding", kind="decode"):
            pass
    assert session.record.status == "completed"
    assert session.record.total.rss_max_bytes is None and session.record.total.cpu_pct is None


def test_short_stage_reads_na_with_the_reason_long_stage_uses_the_reading_after_it(tmp_path) -> None:
    clock, gpu = FakeClock(), FakeNvml()
    session = ProfileSession(case_name="attr", sample_interval_s=None, clock=clock, gpu=gpu,
                             device_probe=FakeDevice(), host=FakeHost())
    with session:
        gpu.set(activity_pct=20.0)
        clock.advance(1.0)
        session.sample_now()  # (0, 1]: 20 %
        with trace.stage("Step_0_Loading", kind="step-loading"):
            clock.advance(0.004)
        with trace.stage("Step_0_Inference", kind="step-inference"):
            gpu.set(activity_pct=90.0)
            clock.advance(0.996)
            session.sample_now()  # (1, 2]: 90 %, of which 0.004 s belong to the loading stage
            clock.advance(1.0)
        gpu.set(activity_pct=90.0)
        session.sample_now()  # (2, 3]: taken after the stage ended; covers its last second
    loading, inference = session.record.stages
    assert loading.activity_mean_pct is None and loading.num_samples == 1
    assert "too short for the activity readings" in loading.facts["activity_unmeasured"]
    assert inference.activity_mean_pct == pytest.approx(90.0) and inference.num_samples == 2
    assert "activity_unmeasured" not in inference.facts
    path = write_report(session.record, tmp_path, basename="r")["json"]
    text = path.with_suffix(".md").read_text(encoding="utf-8")
    assert "Unmeasured activity (`n/a`) in 1 stage(s), e.g. Step_0_Loading: too short" in text
    assert check_report(path) == []


def test_stage_activity_weighs_each_reading_by_its_own_interval() -> None:
    samples = [
        Sample(t_s=0.0),
        Sample(t_s=0.5, rss_bytes=1),  # a boundary reading: no activity, does not cut the interval
        Sample(t_s=1.0, activity_pct=40.0, activity_since_s=0.0),
        Sample(t_s=3.0, activity_pct=100.0, activity_since_s=1.0),
    ]
    whole = stage_activity(samples, 0.0, 3.0)
    assert whole.mean_pct == pytest.approx((40.0 * 1 + 100.0 * 2) / 3) and whole.max_pct == 100.0
    tail = stage_activity(samples, 0.5, 3.0)  # half of the first reading lies inside
    assert tail.mean_pct == pytest.approx((40.0 * 0.5 + 100.0 * 2) / 2.5)
    short = stage_activity(samples, 2.0, 2.2)  # 0.2 s of a 2 s reading
    assert short.mean_pct is None and short.unmeasured_reason is not None


def test_cpu_percent_never_exceeds_the_cores_and_short_intervals_read_na() -> None:
    cores = os.cpu_count() or 1
    clock, host = FakeClock(), FakeHost()
    session = ProfileSession(case_name="cpu", sample_interval_s=None, clock=clock, device_probe=CpuDevice(),
                             host=host)
    with session:
        with trace.stage("Step_0_Inference", kind="step-inference"):
            clock.advance(1.0)
            host.set(cpu_time_s=(cores + 1) * 1.0)  # an accounting error: more than every core
        with trace.stage("Step_1_Inference", kind="step-inference"):
            clock.advance(MIN_CPU_INTERVAL_S / 2)
            host.set(cpu_time_s=host.cpu_time_s + 0.01)
        with trace.stage("Step_2_Inference", kind="step-inference"):
            clock.advance(1.0)
            host.set(cpu_time_s=host.cpu_time_s + 0.5)
    run = session.record
    over, short, fine = run.stages
    assert run.system.cpu_logical_cores == cores
    assert over.cpu_pct is None and "above the" in over.facts["cpu_unmeasured"]
    assert short.cpu_pct is None and "too short to measure CPU time" in short.facts["cpu_unmeasured"]
    assert fine.cpu_pct == pytest.approx(50.0)
    assert all(s.cpu_pct is None or s.cpu_pct <= 100.0 * cores for s in (*run.stages, run.total, *run.samples))


def test_checker_refuses_cpu_above_the_cores_maximum(tmp_path) -> None:
    clock, host = FakeClock(), FakeHost()
    session = ProfileSession(case_name="cpu-check", sample_interval_s=None, clock=clock,
                             device_probe=CpuDevice(), host=host, logical_cores=2)
    with session:
        with trace.stage("Step_0_Inference", kind="step-inference"):
            clock.advance(1.0)
            host.set(cpu_time_s=1.5)
    path = write_report(session.record, tmp_path, basename="r")["json"]
    assert check_report(path) == []
    doc = json.loads(path.read_text(encoding="utf-8"))
    forged = copy.deepcopy(doc)
    forged["runs"][0]["stages"][0]["cpu_pct"] = 242.0  # what the demo once showed on a 2-core machine
    problems = check_report(forged)
    assert any("CPU 242.0 % exceeds the 200 % that 2 logical cores allow" in p for p in problems)


def test_sampler_gaps_are_recorded_by_the_telemetry() -> None:
    telemetry = Telemetry(device=FakeDevice(), host=FakeHost(), gpu=FakeNvml(), max_samples=64, interval_s=0.1)
    telemetry.take(0.0, activity=False)
    for t in (0.1, 0.2, 3.2, 3.3):
        telemetry.take(t, activity=True, from_thread=True)
    (gap,) = telemetry.gaps
    assert (gap.start_s, gap.end_s, gap.expected_s) == (0.2, 3.2, 0.1)
    assert any("sampler thread was starved 1 time(s) (longest 3.00 s" in n for n in telemetry.notes())
    assert telemetry.samples[3].activity_since_s == 0.2  # the late reading covers the whole gap


def test_a_starved_sampler_thread_shows_up_as_a_gap() -> None:
    """Hold the GIL for 0.3 s (a long switch interval and a pure-Python loop): the thread starves."""
    session = ProfileSession(case_name="starved", device="cpu", sample_interval_s=0.01)
    previous = sys.getswitchinterval()
    with session:
        time.sleep(0.05)
        sys.setswitchinterval(1.0)
        try:
            deadline = time.perf_counter() + 0.3
            while time.perf_counter() < deadline:
                pass
        finally:
            sys.setswitchinterval(previous)
        time.sleep(0.05)
    run = session.record
    assert run.sampler_gaps and max(g.duration_s for g in run.sampler_gaps) >= 0.2
    assert any("sampler thread was starved" in n for n in run.notes)


def test_memory_plan_section_shows_estimates_beside_measured_peaks(tmp_path) -> None:
    clock, dev = FakeClock(), FakeDevice()
    session = ProfileSession(case_name="plan", sample_interval_s=None, clock=clock, gpu=FakeNvml(),
                             device_probe=dev, host=FakeHost())
    estimate = {"memory_estimate_bytes": 30 * GB, "memory_estimate_device": "cuda:0"}
    with session:
        trace.event("memory_plan", what="DiT sampling", placement_requested="auto", placement="model",
                    resident_blocks=0, device="cuda:0", estimate_bytes=30 * GB, margin_bytes=6 * GB,
                    free_bytes=79 * GB, checked=True)
        for i, peak in enumerate((20, 25)):
            with trace.stage(f"Step_{i}_Inference", kind="step-inference", **estimate):
                dev.spike(allocated=peak * GB)
                clock.advance(1.0)
    path = write_report(session.record, tmp_path, basename="r")["json"]
    text = path.with_suffix(".md").read_text(encoding="utf-8")
    assert "### Memory Plan" in text
    assert ("- DiT sampling: placement_requested auto; placement model; resident_blocks 0; device cuda:0; "
            "checked True (estimate 30.00 GB, free 79.00 GB, margin 6.00 GB)") in text
    assert ("| Step_0_Inference .. Step_1_Inference (2 steps) | cuda:0 | 30.00 | 25.00 | CUDA allocator peak |"
            in text)
    assert check_report(path) == []
