"""Scripted profiling runs (fake clock, fake NVML, fake CUDA allocator) and the golden report.

The three runs follow the reference reports' stage sequence:
- `ti2v_5b_h100`: TI2V-5B 1280*704, 121 frames, 5 steps on an H100 (GPM SM activity), placement
  none, Model_Initialization with nested loader stages, batched CFG;
- `t2v_a14b_l40s`: T2V-A14B 832*480, 81 frames, 6 steps on an L40S (no GPM: "GPU busy"),
  placement `model`: T5 on the CPU, the high-noise expert for steps 0-1, then an expert switch
  whose Step_2_Loading moves the low-noise expert onto the GPU;
- `cpu_tiny`: a tiny TI2V run on a machine with no GPU at all, T5_Encoding served from a cache.

Run `python tests/make_golden_report.py` to rewrite `tests/golden_report/` after an intended
change of the report format; the tests compare against those files byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from wanbench.profiling import (
    FakeClock,
    FakeDevice,
    FakeHost,
    FakeNvml,
    ProfileSession,
    RunRecord,
    render_markdown,
    report_document,
)
from wanbench.profiling.memory import CpuDevice
from wanbench.profiling.records import ACTIVITY_BUSY, ACTIVITY_SM
from wanbench.wan_core import trace

GOLDEN_DIR = Path(__file__).resolve().parent / "golden_report"
GB = 10**9
# Analytic FLOPs the scripted stages state, as wan_core.config computed them (fixed here so that the
# golden report changes only when the report changes):
TI2V_5B_STEP_FLOPS = 1041309565452288.0  # TI2V_5B.dit.flops_forward(27280 tokens, batch=2, per-token time)
T2V_A14B_STEP_FLOPS = 3356740566384640.0  # T2V_A14B.flops_per_step(832, 480, 81)
UMT5_XXL_FLOPS = 9689446219776.0  # UMT5_XXL.flops_forward(512, batch=2)
GOLDEN_LOGICAL_CORES = 64  # the scripted machines' core count (CPU % is judged against it)
TINY_STEP_FLOPS = 118407168.0  # TI2V_5B.tiny() DiT, 128*96, 17 frames, batch 2


class Rig:
    """The fakes of one scripted run and a `work` helper that spends simulated time."""

    def __init__(self, *, gpu: FakeNvml | None, device: FakeDevice | CpuDevice, rss: int) -> None:
        self.clock = FakeClock()
        self.host = FakeHost()
        self.host.set(rss_bytes=rss)
        self.gpu = gpu
        self.device = device
        self.session: ProfileSession | None = None

    def open(self, case_name: str) -> ProfileSession:
        self.session = ProfileSession(
            case_name=case_name,
            sample_interval_s=None,
            clock=self.clock,
            gpu=self.gpu,
            device_probe=self.device,
            host=self.host,
            logical_cores=GOLDEN_LOGICAL_CORES,
        )
        return self.session.open()

    def work(
        self,
        seconds: float,
        *,
        activity: tuple[float, ...] = (0.0,),
        cpu_pct: float = 100.0,
        allocated: int | None = None,
        peak: int | None = None,
        used: int | None = None,
        rss: int | None = None,
    ) -> None:
        """Spend `seconds` split evenly over the activity values, sampling after each part."""
        if peak is not None and isinstance(self.device, FakeDevice):
            self.device.spike(allocated=peak)
        if allocated is not None and isinstance(self.device, FakeDevice):
            self.device.set(allocated=allocated, reserved=max(self.device.reserved, allocated))
        if rss is not None:
            self.host.set(rss_bytes=rss)
        part = seconds / len(activity)
        for value in activity:
            if self.gpu is not None:
                self.gpu.set(
                    activity_pct=value,
                    used_bytes=used if used is not None else self.gpu.used_bytes,
                    occupancy_pct=value * 0.4 if self.gpu.activity_metric == ACTIVITY_SM else None,
                )
            self.clock.advance(part)
            self.host.set(cpu_time_s=self.host.cpu_time_s + part * cpu_pct / 100.0)
            assert self.session is not None
            self.session.sample_now()  # the sampler thread's reading (activity is never read at boundaries)


def pin_environment(run: RunRecord) -> RunRecord:
    """Fix the facts that depend on the machine running the tests."""
    system = dataclasses.replace(
        run.system,
        torch_version="2.13.0",
        cpu_name="Test CPU @ 3.0GHz",
        host_memory_bytes=512 * GB,
        cuda_version=None if run.system.gpu_name is None else "12.8",
    )
    return dataclasses.replace(
        run, created_utc="2026-01-01T00:00:00Z", system=system, run_id=f"golden-{run.context.case_name}"
    )


def run_ti2v_h100() -> RunRecord:
    rig = Rig(
        gpu=FakeNvml(
            name="NVIDIA H100 80GB HBM3", memory_total_bytes=85_520_809_984, activity_metric=ACTIVITY_SM
        ),
        device=FakeDevice(),
        rss=3 * GB,
    )
    s = rig.open("01_ti2v_5b_704p")
    w, h, f, steps = 1280, 704, 121, 5
    flops = TI2V_5B_STEP_FLOPS
    with s.activate():
        s.set_context(
            task="ti2v-5B",
            width=w,
            height=h,
            frames=f,
            steps=steps,
            placement="none",
            dit_dtype="bfloat16",
            t5_dtype="bfloat16",
            vae_dtype="float32",
            attention_backend="auto",
            compile=False,
            weight_dtype="default",
            tf32=False,
            cfg_mode="batched",
            solver="unipc",
            seed=42,
        )
        trace.event(  # what `auto` attention reports after measuring (attention_choice.py)
            "attention_choice",
            shape="B2 Lq<=32768 Lk<=32768 N24 Dh128 bfloat16 cuda:0",
            kernel="sdpa_cudnn",
            ms=512.0,
            tflops=480.5,
            candidates="sdpa_flash: 701 ms, rel. error 0.0031; sdpa_cudnn: 512 ms, rel. error 0.0031",
            cached=False,
        )
        with trace.stage("Model_Initialization", kind="init"):
            with trace.stage("DiT_Load", kind="init"):
                rig.work(
                    30.0, activity=(0.0, 1.0), cpu_pct=95.0, allocated=10 * GB, used=11 * GB, rss=14 * GB
                )
            with trace.stage("VAE_Load", kind="init"):
                rig.work(2.5, activity=(0.0,), cpu_pct=90.0, allocated=int(10.8 * GB), used=12 * GB)
        with trace.stage("TI2V_Preprocess", kind="preprocess"):
            rig.work(0.004, activity=(3.0,), cpu_pct=50.0)
        with trace.stage("T5_Encoding", kind="encode", flops=UMT5_XXL_FLOPS):
            rig.work(
                4.2,
                activity=(35.0, 60.0),
                cpu_pct=100.0,
                allocated=int(22.2 * GB),
                peak=int(23.0 * GB),
                used=24 * GB,
            )
            rig.device.set(allocated=int(10.9 * GB))
        for i in range(steps):
            facts = dict(step=i, expert="model", cfg_mode="batched")
            with trace.stage(f"Step_{i}_Loading", kind="step-loading", flops=0.0, **facts):
                rig.work(0.002, activity=(0.0,), cpu_pct=100.0)
            with trace.stage(f"Step_{i}_Inference", kind="step-inference", flops=flops, **facts):
                seconds = 2.95 if i == 0 else 2.60 + 0.01 * i
                rig.work(
                    seconds,
                    activity=(96.0, 100.0) if i else (88.0, 99.0),
                    cpu_pct=101.0,
                    peak=int(31.1 * GB),
                    used=33 * GB,
                )
        with trace.stage("VAE_Decoding", kind="decode"):
            rig.work(11.4, activity=(99.0, 100.0, 98.0), cpu_pct=100.0, peak=int(23.5 * GB), used=33 * GB)
        rig.work(0.05, activity=(0.0,))
    return pin_environment(s.close())


def run_t2v_l40s() -> RunRecord:
    rig = Rig(
        gpu=FakeNvml(
            name="NVIDIA L40S",
            memory_total_bytes=47_697_362_944,
            activity_metric=ACTIVITY_BUSY,
            driver_version="550.54.15",
            cuda_driver_version="12.4",
        ),
        device=FakeDevice(),
        rss=4 * GB,
    )
    s = rig.open("02_t2v_a14b_480p")
    w, h, f, steps = 832, 480, 81, 6
    flops = T2V_A14B_STEP_FLOPS
    expert_bytes = int(28.6 * GB)
    with s.activate():
        s.set_context(
            task="t2v-A14B",
            width=w,
            height=h,
            frames=f,
            steps=steps,
            placement="model",
            dit_dtype="bfloat16",
            t5_dtype="bfloat16",
            vae_dtype="bfloat16",
            attention_backend="sdpa",
            compile=True,
            weight_dtype="fp8_e4m3fn_scaled",
            tf32=False,
            cfg_mode="batched",
        )
        with trace.stage("Model_Initialization", kind="init"):
            rig.work(61.0, activity=(0.0,), cpu_pct=97.0, allocated=expert_bytes, used=30 * GB, rss=60 * GB)
        with trace.stage("TI2V_Preprocess", kind="preprocess"):
            rig.work(0.01, activity=(0.0,), cpu_pct=40.0)
        with trace.stage("T5_Encoding", kind="encode", flops=UMT5_XXL_FLOPS, device="cpu"):
            rig.work(9.8, activity=(0.0, 0.0), cpu_pct=780.0, rss=71 * GB)
        for i in range(steps):
            expert = "high_noise_model" if i < 2 else "low_noise_model"
            facts = dict(step=i, expert=expert, cfg_mode="batched")
            if i == 2:
                trace.event("expert_switch", step=i, expert=expert)
            with trace.stage(f"Step_{i}_Loading", kind="step-loading", flops=0.0, **facts):
                if i == 2:
                    rig.work(
                        9.6,
                        activity=(4.0, 2.0),
                        cpu_pct=100.0,
                        allocated=expert_bytes + int(0.2 * GB),
                        peak=expert_bytes + int(2.1 * GB),
                        used=33 * GB,
                    )
                else:
                    rig.work(0.003, activity=(0.0,), cpu_pct=100.0)
            with trace.stage(f"Step_{i}_Inference", kind="step-inference", flops=flops, **facts):
                seconds = 27.9 if i == 0 else 26.0 + 0.05 * (i % 3)
                rig.work(
                    seconds,
                    activity=(97.0, 100.0),
                    cpu_pct=100.0,
                    peak=expert_bytes + int(9.4 * GB),
                    used=41 * GB,
                )
        trace.event("compile_summary", num_regions=80, compile_s=48.2, num_compiles=3, num_recompiles=1)
        with trace.stage("VAE_Decoding", kind="decode"):
            rig.work(
                24.5, activity=(99.0, 100.0), cpu_pct=100.0, allocated=int(1.2 * GB), peak=int(14.8 * GB)
            )
        rig.work(0.3, activity=(0.0,))
    return pin_environment(s.close())


def run_cpu_tiny() -> RunRecord:
    rig = Rig(gpu=None, device=CpuDevice(), rss=int(0.4 * GB))
    s = rig.open("03_cpu_tiny")
    w, h, f, steps = 128, 96, 17, 4
    flops = TINY_STEP_FLOPS
    with s.activate():
        s.set_context(
            task="ti2v-5B-tiny",
            width=w,
            height=h,
            frames=f,
            steps=steps,
            placement="none",
            dit_dtype="float32",
            t5_dtype="float32",
            vae_dtype="float32",
            attention_backend="sdpa",
            compile=False,
            cfg_mode="batched",
        )
        with trace.stage("Model_Initialization", kind="init"):
            rig.work(0.42, cpu_pct=100.0, rss=int(0.9 * GB))
        s.record_cached("T5_Encoding", "encode", measured_s=0.31)
        with trace.stage("TI2V_Preprocess", kind="preprocess"):
            rig.work(0.02, cpu_pct=100.0)
        for i in range(steps):
            facts = dict(step=i, expert="model", cfg_mode="batched")
            with trace.stage(f"Step_{i}_Loading", kind="step-loading", flops=0.0, **facts):
                rig.work(0.0005, cpu_pct=100.0)
            with trace.stage(f"Step_{i}_Inference", kind="step-inference", flops=flops, **facts):
                rig.work(0.060 if i == 0 else 0.041, activity=(0.0, 0.0), cpu_pct=198.0, rss=int(1.1 * GB))
        with trace.stage("VAE_Decoding", kind="decode"):
            rig.work(0.35, cpu_pct=190.0, rss=int(1.3 * GB))
        rig.work(0.01)
    return pin_environment(s.close())


def golden_runs() -> list[RunRecord]:
    return [run_ti2v_h100(), run_t2v_l40s(), run_cpu_tiny()]


def golden_texts() -> tuple[str, str]:
    """(Markdown, JSON) of the golden report."""
    runs = golden_runs()
    notes = {r.context.case_name: "Chart skipped: charts are not part of the golden report." for r in runs}
    markdown = render_markdown(runs, chart_notes=notes)
    document = json.dumps(report_document(runs), indent=1, ensure_ascii=False) + "\n"
    return markdown, document


def main() -> int:
    GOLDEN_DIR.mkdir(exist_ok=True)
    markdown, document = golden_texts()
    (GOLDEN_DIR / "report.md").write_text(markdown, encoding="utf-8")
    (GOLDEN_DIR / "report.json").write_text(document, encoding="utf-8")
    sys.stdout.write(f"wrote {GOLDEN_DIR / 'report.md'} and report.json\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
