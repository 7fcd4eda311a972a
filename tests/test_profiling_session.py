"""ProfileSession with a fake clock, fake NVML and a fake CUDA allocator: what each stage records."""

from __future__ import annotations

import math
import time

import pytest
import torch
from wanbench.profiling import (
    FakeClock,
    FakeDevice,
    FakeHost,
    FakeNvml,
    ProfileSession,
    lookup_gpu,
    open_gpu_monitor,
)
from wanbench.profiling.memory import CpuDevice, ProcessProbe
from wanbench.profiling.records import ACTIVITY_BUSY
from wanbench.wan_core import trace

GB = 10**9


def _rig(metric: str = "sm_activity") -> tuple[ProfileSession, FakeClock, FakeNvml, FakeDevice, FakeHost]:
    clock, gpu, dev, host = FakeClock(), FakeNvml(activity_metric=metric), FakeDevice(), FakeHost()
    session = ProfileSession(
        case_name="case", sample_interval_s=None, clock=clock, gpu=gpu, device_probe=dev, host=host
    )
    return session, clock, gpu, dev, host


def test_outside_a_session_stage_is_a_shared_no_op() -> None:
    assert trace.current_tracer() is None
    a = trace.stage("Step_0_Inference", kind="step-inference", flops=1.0)
    b = trace.stage("T5_Encoding", kind="encode")
    assert a is b  # one shared null context: nothing allocated, nothing measured
    with a:
        pass


def test_stage_time_memory_activity_cpu_and_facts() -> None:
    session, clock, gpu, dev, host = _rig()
    dev.set(allocated=10 * GB)
    with session:
        assert trace.current_tracer() is session
        with trace.stage(
            "Step_0_Inference", kind="step-inference", flops=4e12, expert="high", cfg_mode="batched"
        ):
            gpu.set(activity_pct=80.0, used_bytes=20 * GB)
            clock.advance(1.0)
            host.set(cpu_time_s=0.5)
            session.sample_now()
            gpu.set(activity_pct=100.0)
            dev.spike(allocated=25 * GB)
            clock.advance(3.0)
            host.set(cpu_time_s=4.0)
            session.sample_now()  # activity is read by the sampler thread (here: by hand), never at boundaries
        clock.advance(0.5)
    assert trace.current_tracer() is None
    run = session.record
    (s,) = run.stages
    assert (s.name, s.kind, s.step, s.expert, s.cfg_mode, s.flops) == (
        "Step_0_Inference",
        "step-inference",
        0,
        "high",
        "batched",
        4e12,
    )
    assert s.duration_s == pytest.approx(4.0)
    assert s.activity_mean_pct == pytest.approx((80.0 * 1 + 100.0 * 3) / 4)  # time weighted
    assert s.activity_max_pct == 100.0
    assert s.memory.allocated_start == 10 * GB and s.memory.allocated_end == 10 * GB
    assert s.memory.allocated_peak == 25 * GB
    assert s.memory.device_used_max == 20 * GB
    assert s.cpu_pct == pytest.approx(100.0)
    assert run.total.duration_s == pytest.approx(4.5)
    assert run.status == "completed" and run.context.case_name == "case"
    assert dev.num_syncs >= 4  # synchronised at open, close and both stage boundaries


def test_peak_is_reset_per_stage_and_folded_into_parents() -> None:
    session, clock, gpu, dev, host = _rig()
    with session:
        with trace.stage("Model_Initialization", kind="init"):
            with trace.stage("DiT_Load", kind="init"):
                dev.spike(allocated=7 * GB)
                clock.advance(1.0)
            with trace.stage("VAE_Load", kind="init"):
                dev.set(allocated=1 * GB)
                clock.advance(1.0)
        with trace.stage("T5_Encoding", kind="encode"):
            clock.advance(1.0)
    parent, dit, vae, t5 = session.record.stages
    assert (dit.parent, dit.depth, vae.parent, parent.parent) == (parent.index, 1, parent.index, None)
    assert dit.memory.allocated_peak == 7 * GB
    assert vae.memory.allocated_peak == 1 * GB  # reset after the child before it
    assert parent.memory.allocated_peak == 7 * GB  # child peaks reach the parent
    assert t5.memory.allocated_peak == 1 * GB
    assert session.record.total.memory.allocated_peak == 7 * GB
    assert [s.name for s in session.record.top_level] == ["Model_Initialization", "T5_Encoding"]


def test_gpu_busy_metric_cached_stage_events_and_context() -> None:
    session, clock, gpu, dev, host = _rig(ACTIVITY_BUSY)
    session.open()
    with session.activate():
        session.set_context(
            task="t2v-A14B",
            width=832,
            height=480,
            frames=81,
            steps=1,
            placement="model",
            dit_dtype=torch.bfloat16,
            compile=False,
        )
        trace.event("expert_switch", step=0, expert="low")
        session.record_cached("T5_Encoding", "encode", measured_s=3.0)
        with trace.stage("Step_0_Loading", kind="step-loading", flops=0.0):
            gpu.set(activity_pct=5.0)
            clock.advance(2.0)
            session.sample_now()
    assert trace.current_tracer() is None  # activate() only installs for the block
    run = session.close()
    cached, loading = run.stages
    assert cached.cached and cached.duration_s == 0 and cached.facts == {"measured_s": 3.0}
    assert cached.activity_mean_pct is None and cached.memory.allocated_peak is None
    assert loading.activity_mean_pct == 5.0
    assert run.system.activity_metric == ACTIVITY_BUSY
    assert run.events[0].name == "expert_switch" and run.events[0].facts == {"step": 0, "expert": "low"}
    assert run.context.dit_dtype == "bfloat16" and run.context.offload is True  # bare dtype names
    assert run.context.resolution == "832*480"


def test_cpu_run_has_no_gpu_figures() -> None:
    clock, host = FakeClock(), FakeHost()
    session = ProfileSession(
        case_name="cpu", sample_interval_s=None, clock=clock, device_probe=CpuDevice(), host=host
    )
    with session:
        with trace.stage("VAE_Decoding", kind="decode"):
            clock.advance(1.0)
    run = session.record
    (s,) = run.stages
    assert (
        s.activity_mean_pct is None and s.memory.allocated_peak is None and s.memory.device_used_max is None
    )
    assert run.system.gpu_name is None and run.system.activity_metric is None
    assert "CPU" in run.system.activity_unavailable_reason
    assert all(x.activity_pct is None for x in run.samples)


def test_bad_use_raises_readable_errors() -> None:
    session, clock, *_ = _rig()
    with pytest.raises(RuntimeError, match="not open"):
        with session.activate():
            pass
    session.open()
    with pytest.raises(TypeError, match="unknown run facts"):
        session.set_context(resolution="1280*704")
    with pytest.raises(TypeError, match="steps must be an int"):
        session.set_context(steps="30")
    with session.activate():
        with pytest.raises(ValueError, match="measured by the session"):
            with trace.stage("Total_Execution", kind="init"):
                pass
        with pytest.raises(ValueError, match="stage name"):
            session.record_cached("Unknown", "init")
        with pytest.raises(ValueError, match="flops"):
            with trace.stage("Step_0_Inference", kind="step-inference", flops=-1.0):
                pass
    with pytest.raises(RuntimeError, match="already opened"):
        session.open()
    session.close()
    with pytest.raises(RuntimeError, match="not open"):
        session.close()


def test_error_inside_session_is_recorded_and_tracer_removed() -> None:
    session, clock, *_ = _rig()
    with pytest.raises(KeyError):
        with session:
            with trace.stage("T5_Encoding", kind="encode"):
                clock.advance(1.0)
                raise KeyError("boom")
    assert trace.current_tracer() is None
    assert session.record.status == "failed: KeyError"
    assert session.record.stages[0].facts["error"] == "KeyError"


def test_stage_left_open_is_closed_with_a_note() -> None:
    session, clock, *_ = _rig()
    session.open()
    scope = session.stage("VAE_Decoding", "decode", {})
    scope.__enter__()
    clock.advance(1.0)
    run = session.close()
    assert run.stages[0].facts["unfinished"] is True
    assert any("still open" in n for n in run.notes)


def test_real_clock_thread_and_process_probe() -> None:
    session = ProfileSession(case_name="real", device="cpu", sample_interval_s=0.005)
    with session:
        with trace.stage("Step_0_Inference", kind="step-inference"):
            deadline = time.perf_counter() + 0.25
            while time.perf_counter() < deadline:
                pass
        with trace.stage("Step_1_Inference", kind="step-inference"):
            pass
    run = session.record
    assert len(run.samples) >= 4  # boundaries plus thread samples
    assert all(b.t_s >= a.t_s for a, b in zip(run.samples, run.samples[1:], strict=False))
    long, short = run.stages
    assert long.duration_s >= 0.25
    if ProcessProbe().rss_unavailable_reason is None:
        assert run.total.rss_max_bytes > 0
    cores = run.system.cpu_logical_cores
    assert cores is not None and cores >= 1
    # busy loop: the process used CPU, and never more than its cores allow
    assert long.cpu_pct is not None and 0.0 < long.cpu_pct <= 100.0 * cores
    assert short.cpu_pct is None and "too short to measure CPU time" in short.facts["cpu_unmeasured"]
    known = [x.cpu_pct for x in run.samples if x.cpu_pct is not None]
    assert known and all(0.0 <= v <= 100.0 * cores for v in known)


def test_profiling_does_not_change_results() -> None:
    def work() -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 64, generator=g)
        for i in range(3):
            with trace.stage(f"Step_{i}_Inference", kind="step-inference", flops=2 * 64**3):
                x = torch.tanh(x @ x.T / 8)
        return x

    plain = work()
    with ProfileSession(case_name="bits", device="cpu", sample_interval_s=0.001):
        profiled = work()
    assert torch.equal(plain, profiled)


def test_open_gpu_monitor_without_driver_says_why() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; covered by the gpu-marked test")
    result = open_gpu_monitor()
    assert result.monitor is None and result.reason


@pytest.mark.gpu
def test_real_nvml_monitor_reads_the_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    result = open_gpu_monitor()
    assert result.monitor is not None, result.reason
    reading = result.monitor.read()
    assert reading.used_bytes > 0 and 0.0 <= reading.activity_pct <= 100.0
    result.monitor.close()
    session = ProfileSession(case_name="gpu", sample_interval_s=0.01)
    x = torch.randn(2048, 2048, device="cuda")
    with session:
        with trace.stage("Step_0_Inference", kind="step-inference", flops=2 * 2048**3 * 50):
            for _ in range(50):
                x = x @ x / 2048
    s = session.record.stages[0]
    assert s.memory.allocated_peak >= 3 * 2048 * 2048 * 4 and s.activity_mean_pct is not None


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", "RTX PRO 6000 Blackwell"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA GH200 480GB", "GH200"),  # contains "h200": the longer, whole-word match wins
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA L40", "L40"),
    ],
)
def test_gpu_table_lookup(name: str, key: str) -> None:
    spec = lookup_gpu(name)
    assert spec is not None and spec.key == key and math.isfinite(spec.dense_bf16_tflops)


def test_unknown_gpu_has_no_peak() -> None:
    assert lookup_gpu("NVIDIA GeForce GTX 1080") is None and lookup_gpu(None) is None


class _FakePynvml:
    """Enough of the pynvml module for PynvmlMonitor, built on its real ctypes structures."""

    def __init__(self, *, metric_ok: bool = True) -> None:
        import pynvml

        self.c_nvmlGpmMetricsGet_t = pynvml.c_nvmlGpmMetricsGet_t
        self.NVML_GPM_METRICS_GET_VERSION = pynvml.NVML_GPM_METRICS_GET_VERSION
        self.NVML_GPM_METRIC_SM_UTIL = pynvml.NVML_GPM_METRIC_SM_UTIL
        self.NVML_GPM_METRIC_SM_OCCUPANCY = pynvml.NVML_GPM_METRIC_SM_OCCUPANCY
        self.NVML_SUCCESS = pynvml.NVML_SUCCESS
        self._sample_type = pynvml.c_nvmlGpmSample_t
        self.metric_ok = metric_ok
        self.requested: list[int] = []
        self.freed = 0
        self.shutdown = False

    def nvmlDeviceGetName(self, handle: object) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> object:
        return type("Mem", (), {"total": 80 * GB, "used": 12 * GB})()

    def nvmlSystemGetDriverVersion(self) -> str:
        return "570.86.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12080

    def nvmlGpmSampleAlloc(self) -> object:
        return self._sample_type()

    def nvmlGpmSampleGet(self, handle: object, sample: object) -> object:
        return sample

    def nvmlGpmMetricsGet(self, request: object) -> object:
        self.requested = [request.metrics[i].metricId for i in range(request.numMetrics)]
        request.metrics[0].value, request.metrics[1].value = 87.5, 41.0
        request.metrics[0].nvmlReturn = 0 if self.metric_ok else 3
        request.metrics[1].nvmlReturn = 0
        return request

    def nvmlDeviceGetUtilizationRates(self, handle: object) -> object:
        return type("Util", (), {"gpu": 64})()

    def nvmlGpmSampleFree(self, sample: object) -> None:
        self.freed += 1

    def nvmlShutdown(self) -> None:
        self.shutdown = True


def test_pynvml_monitor_reads_gpm_and_utilization() -> None:
    from wanbench.profiling.nvml import PynvmlMonitor

    fake = _FakePynvml()
    gpm = PynvmlMonitor(fake, handle=object(), use_gpm=True)
    reading = gpm.read()
    assert (reading.activity_pct, reading.occupancy_pct, reading.used_bytes) == (87.5, 41.0, 12 * GB)
    assert fake.requested == [fake.NVML_GPM_METRIC_SM_UTIL, fake.NVML_GPM_METRIC_SM_OCCUPANCY]
    assert gpm.activity_metric == "sm_activity" and gpm.cuda_driver_version == "12.8"
    assert gpm.name == "NVIDIA H100 80GB HBM3"
    gpm.close()
    assert fake.freed == 2 and fake.shutdown
    failing = _FakePynvml(metric_ok=False)
    assert PynvmlMonitor(failing, handle=object(), use_gpm=True).read().activity_pct is None
    busy = PynvmlMonitor(_FakePynvml(), handle=object(), use_gpm=False).read()
    assert (busy.activity_pct, busy.occupancy_pct) == (64.0, None)


def test_profiling_does_not_change_sampler_latents() -> None:
    """The tiny A14B DiT pair through the real sampler (expert switch, batched CFG): the latents
    with a ProfileSession (sampler thread running) are bit-identical to those without."""
    from wanbench.wan_core.config import GuideScale, preset
    from wanbench.wan_core.dit import WanDiT
    from wanbench.wan_core.sampler import SamplerOptions, sample

    task = preset("t2v-A14B", tiny=True)
    torch.manual_seed(0)
    high, low = WanDiT(task.dit).eval(), WanDiT(task.dit).eval()
    g = torch.Generator().manual_seed(7)
    contexts = {
        "context": torch.randn(5, task.dit.text_dim, generator=g),
        "context_null": torch.randn(9, task.dit.text_dim, generator=g),
    }
    opts = SamplerOptions(steps=4, shift=5.0, guide_scale=GuideScale(high=4.0, low=3.0), boundary=0.875, seed=3)

    def run() -> torch.Tensor:
        return sample([high, low], task, opts, latent_shape=(16, 2, 4, 4), device="cpu", **contexts)

    plain = run()
    with ProfileSession(case_name="bits", device="cpu", sample_interval_s=0.001) as session:
        profiled = run()
    assert torch.equal(plain, profiled)
    inference = [s for s in session.record.stages if s.kind == "step-inference"]
    assert len(inference) == 4 and {s.expert for s in inference} == {"high", "low"}


def test_stage_device_comes_from_its_facts() -> None:
    """T5 on the CPU inside a CUDA session: recorded on the CPU, without the GPU's memory or
    activity, and without MFU; a stage stating plain "cuda" is the session's CUDA device."""
    from wanbench.profiling import render_markdown, summarize_run
    from wanbench.profiling.figures import stage_mfu_pct

    session, clock, gpu, dev, host = _rig()
    with session:
        with trace.stage("T5_Encoding", kind="encode", flops=1e12, device="cpu"):
            gpu.set(activity_pct=50.0, used_bytes=5 * GB)
            dev.spike(allocated=3 * GB)
            clock.advance(2.0)
            session.sample_now()
        dev.set(allocated=1 * GB)
        with trace.stage("VAE_Decoding", kind="decode", device="cuda"):
            dev.spike(allocated=4 * GB)
            gpu.set(activity_pct=90.0)
            clock.advance(1.0)
            session.sample_now()
    t5, vae = session.record.stages
    assert t5.device == "cpu" and vae.device == "cuda:0"
    assert t5.memory.allocated_peak is None and t5.memory.device_used_max is None
    assert t5.activity_mean_pct is None and t5.num_samples == 0
    assert stage_mfu_pct(t5, 989.4) is None and t5.flops == 1e12
    assert vae.memory.allocated_peak == 4 * GB and vae.activity_mean_pct == 90.0
    sm = summarize_run(session.record)
    assert sm.t5_peak_bytes is None and sm.vae_activation_bytes == 3 * GB
    md = render_markdown([session.record])
    assert "| T5_Encoding (cpu) | 2.00 | n/a | n/a |" in md
    assert "- **T5 encoding**: ran on the cpu; no GPU memory figures" in md
    assert "- **VAE decoding**: activation growth 3.00 GB" in md


def test_split_stage_pieces_are_joined_and_gaps_recorded() -> None:
    """Three loader nodes each record a Model_Initialization piece (with its loader as child):
    consecutive pieces become one stage covering all three; time between nodes is recorded as
    outside time, with where it happened."""
    session, clock, gpu, dev, host = _rig()
    session.open()
    for child, seconds, alloc in (("DiT_Initialization", 3.0, 10), ("Text_Encoder_Initialization", 2.0, 15)):
        with session.activate():
            with trace.stage("Model_Initialization", kind="init"), trace.stage(child, kind="init"):
                dev.set(allocated=alloc * GB)
                clock.advance(seconds)
            clock.advance(0.1)  # node code after its stage
        clock.advance(0.2)  # between nodes
    with session.activate(), trace.stage("T5_Encoding", kind="encode"):
        clock.advance(1.0)
    with session.activate(), trace.stage("Model_Initialization", kind="init"):
        with trace.stage("VAE_Initialization", kind="init"):
            clock.advance(0.5)
    run = session.close()
    names = [(s.index, s.name, s.parent) for s in run.stages]
    assert names == [
        (0, "Model_Initialization", None),
        (1, "DiT_Initialization", 0),
        (2, "Text_Encoder_Initialization", 0),
        (3, "T5_Encoding", None),
        (4, "Model_Initialization", None),  # not consecutive: a second piece, not hidden
        (5, "VAE_Initialization", 4),
    ]
    init = run.stages[0]
    assert (init.start_s, init.end_s) == (0.0, pytest.approx(5.3))  # 3 + 0.1 + 0.2 + 2
    assert init.memory.allocated_start == 0 and init.memory.allocated_end == 15 * GB
    assert init.facts["pieces"] == 2
    gaps = [(o.after, o.before, o.in_node, round(o.duration_s, 6)) for o in run.outside]
    assert gaps == [
        ("Model_Initialization", "T5_Encoding", True, 0.1),  # the loader node's own code
        ("Model_Initialization", "T5_Encoding", False, 0.2),  # no profiled code ran
    ]


def test_run_ids_are_unique() -> None:
    a, b = ProfileSession(case_name="a", device="cpu", sample_interval_s=None), ProfileSession(
        case_name="a", device="cpu", sample_interval_s=None
    )
    with a:
        pass
    with b:
        pass
    assert a.record.run_id and a.record.run_id != b.record.run_id


# ------------------------------------------------------------------------------------------------
# Sampler thread lifetime and the bounded sample buffer
# ------------------------------------------------------------------------------------------------
def test_a_session_dropped_without_close_stops_its_thread_after_gc(caplog) -> None:
    import gc
    import weakref

    session = ProfileSession(case_name="dropped", device="cpu", sample_interval_s=0.002).open()
    thread = session._thread
    assert thread is not None and thread.is_alive
    ref = weakref.ref(session)
    del session
    deadline = time.perf_counter() + 5.0
    while ref() is not None and time.perf_counter() < deadline:  # the thread may be mid-sample
        gc.collect()
        time.sleep(0.005)
    assert ref() is None, "the sampler thread kept its session alive"
    thread._thread.join(timeout=5.0)
    assert not thread.is_alive
    assert "garbage-collected without being closed" in caplog.text


def test_a_closed_session_is_collected_and_its_thread_ended() -> None:
    import gc
    import weakref

    session = ProfileSession(case_name="closed", device="cpu", sample_interval_s=0.002)
    with session:
        time.sleep(0.01)
    thread = session._thread
    assert thread is not None and not thread.is_alive
    ref = weakref.ref(session)
    del session
    gc.collect()
    assert ref() is None


def test_merge_sample_pairs_weights_by_time_and_keeps_peaks() -> None:
    from wanbench.profiling.records import Sample
    from wanbench.profiling.telemetry import merge_sample_pairs

    samples = [
        Sample(t_s=0.0, activity_pct=0.0, device_used_bytes=1),
        Sample(t_s=1.0, activity_pct=10.0, cpu_pct=50.0, device_used_bytes=5, rss_bytes=7),
        Sample(t_s=4.0, activity_pct=50.0, cpu_pct=100.0, device_used_bytes=3, rss_bytes=9),
        Sample(t_s=5.0, activity_pct=20.0, device_used_bytes=2),
        Sample(t_s=6.0, activity_pct=30.0, device_used_bytes=4),
    ]
    out = merge_sample_pairs(samples)
    assert [s.t_s for s in out] == [0.0, 4.0, 5.0, 6.0]  # first and last kept; (1, 4) merged; 5 unpaired
    merged = out[1]
    assert merged.activity_pct == pytest.approx((10.0 * 1 + 50.0 * 3) / 4)  # covers (0, 4]
    assert merged.cpu_pct == pytest.approx((50.0 * 1 + 100.0 * 3) / 4)
    assert (merged.device_used_bytes, merged.rss_bytes) == (5, 9)  # memory: the pair's peak
    assert out[0] == samples[0] and out[2] == samples[3] and out[3] == samples[4]
    assert merge_sample_pairs(samples[:2]) == samples[:2]


def test_a_long_run_keeps_at_most_max_samples_and_states_the_interval() -> None:
    from wanbench.profiling import render_markdown

    clock, gpu, dev, host = FakeClock(), FakeNvml(), FakeDevice(), FakeHost()
    # The thread waits 10 s of real time: the test drives the samples itself, one per fake 10 s.
    session = ProfileSession(
        case_name="long", sample_interval_s=10.0, max_samples=8, clock=clock, gpu=gpu, device_probe=dev, host=host
    )
    with session:
        with trace.stage("Step_0_Inference", kind="step-inference"):
            for i in range(40):  # 400 s: about 5x the buffer at the requested interval
                gpu.set(activity_pct=100.0 if i % 2 else 50.0, used_bytes=(i + 1) * GB)
                clock.advance(10.0)
                session.sample_now()
                assert len(session._samples) <= 8
            interval_during = session._thread.interval_s
        clock.advance(1.0)
    run = session.record
    assert len(run.samples) <= 8
    ts = [s.t_s for s in run.samples]
    assert ts == sorted(ts) and ts[0] == 0.0 and ts[-1] == pytest.approx(run.total.end_s)  # spread over the run
    halvings = round(math.log2(run.sample_interval_effective_s / 10.0))
    assert halvings >= 3 and run.sample_interval_effective_s == pytest.approx(10.0 * 2**halvings)
    assert interval_during == pytest.approx(run.sample_interval_effective_s)  # the thread slowed down too
    assert run.sample_interval_s == 10.0  # as requested
    (note,) = [n for n in run.notes if "sample buffer" in n]
    assert f"went from 10 s to {run.sample_interval_effective_s:g} s" in note
    assert f"filled {halvings} time(s)" in note
    assert note in render_markdown([run])
    (step,) = run.stages
    assert step.activity_mean_pct == pytest.approx(75.0)  # alternating 50/100 %, equal intervals
    assert step.activity_max_pct == 100.0
    assert step.memory.device_used_max == 40 * GB  # the peak survives the merging


def test_real_thread_halves_its_buffer_and_slows_down() -> None:
    session = ProfileSession(case_name="real-long", device="cpu", sample_interval_s=0.001, max_samples=8)
    with session:
        deadline = time.perf_counter() + 5.0
        while session._interval_now_s == 0.001 and time.perf_counter() < deadline:
            time.sleep(0.002)
        assert len(session._samples) <= 8
    run = session.record
    assert len(run.samples) <= 8
    assert run.sample_interval_effective_s >= 0.002
    assert any("went from 0.001 s to" in n for n in run.notes)


def test_stages_opened_from_outside_may_overlap_be_renamed_and_discarded() -> None:
    """`open_stage` / `close_stage`: what an observer of graph nodes uses (a node's start and finish
    are two events): such stages may overlap, nest by `parent`, take their name and facts when they
    close, see the memory peak inside them, and are closed as unfinished with the session."""
    session, clock, gpu, dev, host = _rig()
    session.open()
    outer = session.open_stage("Model_Initialization", "init")
    child = session.open_stage("DiT_Initialization", "init", parent=outer, node_id="2")
    clock.advance(1.0)
    step = session.open_stage("Step_0_Inference", "step-inference")  # provisional name
    dev.spike(allocated=7 * GB)  # while both are open
    clock.advance(0.5)
    session.close_stage(child)
    session.close_stage(outer)
    clock.advance(0.5)
    session.close_stage(step, name="Step_3_Inference", cfg_mode="batched", flops=2e9)
    dropped = session.open_stage("Step_4_Inference", "step-inference")
    session.discard_stage(dropped)
    session.add_activation(0.0, 2.0)
    session.add_note("seen from outside")
    left = session.open_stage("VAE_Decoding", "decode")
    clock.advance(0.25)
    run = session.close()
    by_name = {s.name: s for s in run.stages}
    assert set(by_name) == {"Model_Initialization", "DiT_Initialization", "Step_3_Inference", "VAE_Decoding"}
    assert by_name["DiT_Initialization"].parent == by_name["Model_Initialization"].index
    assert by_name["DiT_Initialization"].facts["node_id"] == "2"
    assert by_name["Model_Initialization"].memory.allocated_peak == 7 * GB
    s = by_name["Step_3_Inference"]
    assert (s.step, s.cfg_mode, s.flops) == (3, "batched", 2e9) and s.duration_s == pytest.approx(1.0)
    assert s.memory.allocated_peak == 7 * GB  # it was open when the peak happened
    assert by_name["VAE_Decoding"].facts["unfinished"] is True
    assert "seen from outside" in run.notes
    with pytest.raises(RuntimeError, match="is not open"):
        session.close_stage(left)
    with pytest.raises(ValueError, match="unknown stage kind"):
        ProfileSession(case_name="x", sample_interval_s=None).open().open_stage("A", "bogus")
