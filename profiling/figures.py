"""Derived figures of one run: a pure function of its records.

`summarize_run` turns a `RunRecord` into a `RunSummary`: totals, step statistics (first step
separated from the steady state), memory telemetry, activity, Load, achieved TFLOP/s, MFU and
the FLOP time floor. The per-stage figures (`stage_load`, `stage_tflops`, `stage_mfu_pct`) are
the ones the report's stage table prints. `findings` states what these figures show.

Definitions (also in docs/report_schema.md):
- Load = seconds x activity % (SM-%-seconds), per stage; the case Load is the Total_Execution one.
- s/step = mean over recorded steps of (Step_i_Loading + Step_i_Inference). Steps that reused a
  prediction from the step cache (`step_reuse.py`) did no model work: the step statistics,
  throughput and MFU cover the computed steps only, and reused steps are counted apart.
- MFU = FLOPs / seconds / dense bf16 peak of the measured GPU; floor = FLOPs / peak. Stages on
  the CPU (a stage's `device`) have no MFU.
- Outside stages = the part of Total_Execution that no top-level stage covers (the union of their
  intervals, so overlapping stages cannot hide time). Within `sum_margin_s` the stages account for
  the run; above it the time is shown as its own figure, interval by interval.
- Free memory = capacity - max(NVML device used, CUDA reserved peak): NVML sees every process and
  the CUDA context, the allocator only this process's tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .gpus import lookup_gpu
from .records import RunRecord, StageRecord
from .stats import max_known, mean, percentile, time_weighted_mean
from .step_reuse import ExpertReuse, expert_reuse, is_reused

# Top-level stages account for the run when the time they leave uncovered is at most
# max(SUM_MARGIN_PCT % of the total, SUM_MARGIN_ABS_S); above that it is reported as its own figure.
SUM_MARGIN_PCT = 1.0
SUM_MARGIN_ABS_S = 0.01
NOISY_IQR_PCT = 10.0  # steady step times whose IQR exceeds this share of the median are flagged


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """Every figure the Markdown shows for one case. None means not measured (`n/a`)."""

    case_name: str
    group: str  # hardware group label (GPU name, or "CPU: <model>")
    activity_metric: str | None
    total_s: float
    stage_sum_s: float  # top-level stages
    outside_s: float  # time of the total that no top-level stage covers
    outside_recorded_s: float  # the same time as the session recorded it (`RunRecord.outside`)
    sum_margin_s: float  # max(SUM_MARGIN_PCT % of total, SUM_MARGIN_ABS_S)
    outside_within_margin: bool  # outside_s <= sum_margin_s: the stages account for the total
    num_steps_recorded: int  # steps measured in this run (computed and reused)
    num_steps_cached: int  # steps whose stages were served from a cache (not run now)
    num_steps_planned: int | None
    num_steps_reused: int  # steps that reused a prediction from the step cache (no model work)
    reused_total_s: float  # loading + inference time of those steps
    reuse_saved_estimate_s: float | None  # estimated time they saved (step_reuse.expert_reuse)
    s_per_step: float | None
    first_step_s: float | None  # inference time of the first step
    steady_mean_s: float | None
    steady_median_s: float | None
    steady_p90_s: float | None
    steady_iqr_s: float | None  # interquartile range of the steady steps (3 or more steps)
    steady_max_s: float | None
    steps_noisy: bool  # steady IQR above NOISY_IQR_PCT % of the median
    loading_total_s: float
    inference_total_s: float
    loading_share_pct: float | None
    step_activity_pct: float | None
    step_activity_max_pct: float | None
    total_activity_pct: float | None
    load: float | None  # case Load (SM-%-s) = Total_Execution
    inference_load: float | None
    peak_allocated_bytes: int | None
    peak_reserved_bytes: int | None
    device_used_max_bytes: int | None
    gpu_memory_bytes: int | None
    rss_max_bytes: int | None
    resident_at_first_step_bytes: int | None
    step_activation_peak_bytes: int | None
    t5_peak_bytes: int | None  # CUDA allocator peak during T5_Encoding (weights included)
    t5_activation_bytes: int | None  # that peak minus the allocation at the stage's start
    vae_peak_bytes: int | None  # CUDA allocator peak during VAE_Decoding (weights included)
    vae_activation_bytes: int | None
    free_bytes: int | None  # capacity - max(NVML used, reserved peak)
    free_source: str | None  # "nvml" or "allocator": which figure free_bytes subtracts
    flops_total: float | None
    flops_steps: float | None
    steps_tflops: float | None
    peak_tflops: float | None
    mfu_pct: float | None
    steps_floor_s: float | None
    total_floor_s: float | None
    experts: dict[str, list[int]] = field(default_factory=dict)
    cfg_modes: list[str] = field(default_factory=list)


# -------------------------------------------------------------------------------------------- per stage
def group_label(run: RunRecord) -> str:
    if run.system.gpu_name:
        return run.system.gpu_name
    return f"CPU (no GPU): {run.system.cpu_name or 'unknown CPU'}"


def stage_load(stage: StageRecord) -> float | None:
    if stage.activity_mean_pct is None or stage.cached:
        return None
    return stage.duration_s * stage.activity_mean_pct


def stage_tflops(stage: StageRecord) -> float | None:
    """Achieved TFLOP/s of a stage; None when it was not counted, was cached or does no arithmetic
    (a step's weight loading has 0 FLOPs: a rate of 0 would read as a measurement)."""
    if stage.flops is None or stage.flops <= 0 or stage.cached or stage.duration_s <= 0:
        return None
    return stage.flops / stage.duration_s / 1e12


def on_gpu(stage: StageRecord) -> bool:
    return stage.device.startswith("cuda")


def stage_mfu_pct(stage: StageRecord, peak_tflops: float | None) -> float | None:
    """MFU against the GPU's peak; None for a stage that ran on the CPU."""
    if not on_gpu(stage):
        return None
    achieved = stage_tflops(stage)
    if achieved is None or peak_tflops is None:
        return None
    return 100.0 * achieved / peak_tflops


def peak_tflops_of(run: RunRecord) -> float | None:
    spec = lookup_gpu(run.system.gpu_name)
    return None if spec is None else spec.dense_bf16_tflops


def covered_s(stages: list[StageRecord], total_s: float) -> float:
    """Seconds of [0, total_s] inside at least one of `stages` (the union of their intervals)."""
    covered, cursor = 0.0, 0.0
    for s in sorted(stages, key=lambda st: st.start_s):
        lo, hi = max(s.start_s, cursor), min(s.end_s, total_s)
        if hi > lo:
            covered += hi - lo
        cursor = max(cursor, min(s.end_s, total_s))
    return covered


def sum_margin_s(total_s: float) -> float:
    return max(SUM_MARGIN_PCT / 100.0 * total_s, SUM_MARGIN_ABS_S)


# -------------------------------------------------------------------------------------------- the run
def summarize_run(run: RunRecord) -> RunSummary:
    """All derived figures of one run."""
    total = run.total
    top = [s for s in run.top_level if not s.cached]
    outside = total.duration_s - covered_s(top, total.duration_s)
    margin = sum_margin_s(total.duration_s)
    recorded = _steps(run, "step-inference")  # the steps run now, by step
    inference = {i: s for i, s in recorded.items() if not is_reused(s)}  # the ones that ran the model
    loading = {i: s.duration_s for i, s in _steps(run, "step-loading").items()}
    reused = sorted(set(recorded) - set(inference))
    reuse = expert_reuse(run) if reused else []
    order = sorted(inference)
    steps = [inference[i] for i in order]
    inf_times = [s.duration_s for s in steps]
    loading_total = sum(v for i, v in loading.items() if i not in reused)  # reused steps counted apart
    inference_total = sum(inf_times)
    per_step = [inference[i].duration_s + loading.get(i, 0.0) for i in order]
    steady = inf_times[1:]
    steady_iqr = percentile(steady, 75) - percentile(steady, 25) if len(steady) >= 3 else None
    steady_median = percentile(steady, 50) if steady else None
    noisy = bool(steady_iqr is not None and steady_median and 100.0 * steady_iqr / steady_median > NOISY_IQR_PCT)
    flops_steps = _steps_flops(steps)
    achieved = flops_steps / inference_total / 1e12 if flops_steps is not None and inference_total > 0 else None
    peak = peak_tflops_of(run)
    gpu_steps = all(on_gpu(s) for s in steps)  # MFU only for steps on the GPU
    inf_loads = [stage_load(s) for s in steps]
    free, free_source = _free(run)
    return RunSummary(
        case_name=run.context.case_name,
        group=group_label(run),
        activity_metric=run.system.activity_metric,
        total_s=total.duration_s,
        stage_sum_s=sum(s.duration_s for s in top),
        outside_s=outside,
        outside_recorded_s=sum(o.duration_s for o in run.outside),
        sum_margin_s=margin,
        outside_within_margin=outside <= margin,
        num_steps_recorded=len(recorded),
        num_steps_cached=len({s.step for s in run.stages if s.kind == "step-inference" and s.cached}),
        num_steps_planned=run.context.steps,
        num_steps_reused=len(reused),
        reused_total_s=sum(recorded[i].duration_s + loading.get(i, 0.0) for i in reused),
        reuse_saved_estimate_s=_saved(reuse) if reused else 0.0,
        s_per_step=mean(per_step) if per_step else None,
        first_step_s=inf_times[0] if inf_times else None,
        steady_mean_s=mean(steady) if steady else None,
        steady_median_s=steady_median,
        steady_p90_s=percentile(steady, 90) if steady else None,
        steady_iqr_s=steady_iqr,
        steady_max_s=max(steady) if steady else None,
        steps_noisy=noisy,
        loading_total_s=loading_total,
        inference_total_s=inference_total,
        loading_share_pct=100.0 * loading_total / (loading_total + inference_total)
        if loading_total + inference_total > 0
        else None,
        step_activity_pct=time_weighted_mean((s.activity_mean_pct, s.duration_s) for s in steps),
        step_activity_max_pct=max((s.activity_max_pct for s in steps if s.activity_max_pct is not None), default=None),
        total_activity_pct=total.activity_mean_pct,
        load=stage_load(total),
        inference_load=sum(v for v in inf_loads if v is not None) if inf_loads and None not in inf_loads else None,
        peak_allocated_bytes=total.memory.allocated_peak,
        peak_reserved_bytes=total.memory.reserved_peak,
        device_used_max_bytes=total.memory.device_used_max,
        gpu_memory_bytes=run.system.gpu_memory_bytes,
        rss_max_bytes=total.rss_max_bytes,
        resident_at_first_step_bytes=steps[0].memory.allocated_start if steps else None,
        step_activation_peak_bytes=_activation_peak(steps),
        t5_peak_bytes=_kind_peak(run, "encode"),
        t5_activation_bytes=_activation_peak(_of_kind(run, "encode")),
        vae_peak_bytes=_kind_peak(run, "decode"),
        vae_activation_bytes=_activation_peak(_of_kind(run, "decode")),
        free_bytes=free,
        free_source=free_source,
        flops_total=total.flops,
        flops_steps=flops_steps,
        steps_tflops=achieved,
        peak_tflops=peak,
        mfu_pct=100.0 * achieved / peak if achieved is not None and peak is not None and gpu_steps else None,
        steps_floor_s=_floor_s(flops_steps, peak),
        total_floor_s=_floor_s(total.flops, peak),
        experts=_experts([recorded[i] for i in sorted(recorded)]),
        cfg_modes=sorted({s.cfg_mode for s in steps if s.cfg_mode is not None}),
    )


def _steps(run: RunRecord, kind: str) -> dict[int, StageRecord]:
    out: dict[int, StageRecord] = {}
    for s in run.stages:
        if s.kind == kind and s.step is not None and not s.cached:
            out[s.step] = s
    return out


def _saved(reuse: list[ExpertReuse]) -> float | None:
    """Estimated seconds the reused steps saved, summed over experts (None if any is unknown)."""
    figures = [r.saved_estimate_s for r in reuse]
    return None if None in figures else sum(f for f in figures if f is not None)


def _steps_flops(steps: list[StageRecord]) -> float | None:
    """FLOPs of the steps; None unless every step stated its FLOPs."""
    stated = [s.flops for s in steps if s.flops is not None]
    return sum(stated) if stated and len(stated) == len(steps) else None


def _floor_s(flops: float | None, peak_tflops: float | None) -> float | None:
    """The FLOP time floor: the seconds `flops` take at the GPU's dense peak."""
    return flops / (peak_tflops * 1e12) if flops is not None and peak_tflops is not None else None


def _experts(steps: list[StageRecord]) -> dict[str, list[int]]:
    """Expert name -> the steps it ran, in order."""
    experts: dict[str, list[int]] = {}
    for s in steps:
        if s.expert is not None and s.step is not None:
            experts.setdefault(s.expert, []).append(s.step)
    return experts


def _of_kind(run: RunRecord, kind: str) -> list[StageRecord]:
    return [s for s in run.top_level if s.kind == kind and not s.cached]


def _kind_peak(run: RunRecord, kind: str) -> int | None:
    return max_known(s.memory.allocated_peak for s in _of_kind(run, kind))


def _activation_peak(stages: Sequence[StageRecord]) -> int | None:
    """The largest allocator growth within a stage: peak minus the allocation at its start."""
    return max_known(
        s.memory.allocated_peak - s.memory.allocated_start
        for s in stages
        if s.memory.allocated_peak is not None and s.memory.allocated_start is not None
    )


def _free(run: RunRecord) -> tuple[int | None, str | None]:
    capacity = run.system.gpu_memory_bytes
    used, reserved = run.total.memory.device_used_max, run.total.memory.reserved_peak
    if capacity is None:
        return None, None
    if used is not None:
        return capacity - max(used, reserved or 0), "nvml"
    if reserved is not None:
        return capacity - reserved, "allocator"
    return None, None


def offloaded_bytes(run: RunRecord, summary: RunSummary) -> int | None:
    """Bytes that placement `none` would keep resident on top of what the run held at its peak.

    From a step-loading fact `offloaded_bytes` when the placement states it; else, for a model
    swap between experts (placement `model`), every expert but the largest one, each measured as
    the allocation at the start of its first inference step (weights + latents, so an upper
    bound). None when the run shows neither.
    """
    stated = [
        int(v)
        for s in run.stages
        if s.kind == "step-loading"
        for v in [s.facts.get("offloaded_bytes")]
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    if stated:
        return max(stated)
    if run.context.placement != "model" or len(summary.experts) < 2:
        return None
    firsts = {s.expert: s for s in sorted(run.stages, key=lambda st: -st.start_s) if s.kind == "step-inference"}
    resident = [s.memory.allocated_start for s in firsts.values()]
    if None in resident or len(resident) < 2:
        return None
    known = [int(r) for r in resident if r is not None]
    return sum(known) - max(known)


def step_cpu_pct(run: RunRecord) -> float | None:
    """Process CPU % during the denoising steps, weighted by their time."""
    return time_weighted_mean((s.cpu_pct, s.duration_s) for s in run.stages if s.kind == "step-inference")
