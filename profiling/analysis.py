"""Derived figures of one run (a pure function of its records) and the analysis that cites them.

`summarize_run` turns a `RunRecord` into a `RunSummary`: totals, step statistics (first step
separated from the steady state), memory telemetry, activity, Load, achieved TFLOP/s, MFU and
the FLOP time floor. `analyze_run` states findings and ranked recommendations; each carries the
figures it rests on, so `checker.check_report` can verify every statement.

Definitions (also in docs/report_schema.md):
- Load = seconds x activity % (SM-%-seconds), per stage; the case Load is the Total_Execution one.
- s/step = mean over recorded steps of (Step_i_Loading + Step_i_Inference).
- MFU = FLOPs / seconds / dense bf16 peak of the measured GPU; floor = FLOPs / peak. Stages on
  the CPU (a stage's `device`) have no MFU.
- Outside stages = the part of Total_Execution that no top-level stage covers (the union of their
  intervals, so overlapping stages cannot hide time). Within `sum_margin_s` the stages account for
  the run; above it the time is shown as its own figure, interval by interval.
- Free memory = capacity - max(NVML device used, CUDA reserved peak): NVML sees every process and
  the CUDA context, the allocator only this process's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .formatting import gbs, secs
from .gpus import lookup_gpu
from .records import ACTIVITY_BUSY, ACTIVITY_SM, RunRecord, StageRecord
from .stats import mean, percentile

# Top-level stages account for the run when the time they leave uncovered is at most
# max(SUM_MARGIN_PCT % of the total, SUM_MARGIN_ABS_S); above that it is reported as its own figure.
SUM_MARGIN_PCT = 1.0
SUM_MARGIN_ABS_S = 0.01
ACTIVITY_HIGH_PCT = 90.0
ACTIVITY_LOW_PCT = 50.0
LOADING_FLAG_PCT = 5.0
WARMUP_FLAG_RATIO = 1.2
NOISY_IQR_PCT = 10.0  # steady step times whose IQR exceeds this share of the median are flagged

Figure = float | int | str | None


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
    num_steps_recorded: int  # steps measured in this run
    num_steps_cached: int  # steps whose stages were served from a cache (not run now)
    num_steps_planned: int | None
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


@dataclass(frozen=True, kw_only=True)
class Statement:
    """One finding or recommendation, with the figures it cites."""

    rule: str
    text: str
    figures: dict[str, Figure]
    gain_s: float | None = None  # recommendations: estimated saving


@dataclass(frozen=True, kw_only=True)
class RunAnalysis:
    findings: list[Statement]
    recommendations: list[Statement]  # ranked by gain_s, largest first


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


def _steps(run: RunRecord, kind: str) -> dict[int, StageRecord]:
    out: dict[int, StageRecord] = {}
    for s in run.stages:
        if s.kind == kind and s.step is not None and not s.cached:
            out[s.step] = s
    return out


def _time_weighted(stages: list[StageRecord]) -> float | None:
    measured = [s for s in stages if s.activity_mean_pct is not None and s.duration_s > 0]
    if not measured:
        return None
    seconds = sum(s.duration_s for s in measured)
    return sum(s.activity_mean_pct * s.duration_s for s in measured) / seconds  # type: ignore[operator]


def _max_opt(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _kind_peak(run: RunRecord, kind: str) -> int | None:
    return _max_opt([s.memory.allocated_peak for s in run.top_level if s.kind == kind and not s.cached])


def _kind_activation(run: RunRecord, kind: str) -> int | None:
    return _max_opt(
        [
            s.memory.allocated_peak - s.memory.allocated_start
            for s in run.top_level
            if s.kind == kind
            and not s.cached
            and s.memory.allocated_peak is not None
            and s.memory.allocated_start is not None
        ]
    )


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


def summarize_run(run: RunRecord) -> RunSummary:
    """All derived figures of one run."""
    total = run.total
    top = [s for s in run.top_level if not s.cached]
    stage_sum = sum(s.duration_s for s in top)
    outside = total.duration_s - covered_s(top, total.duration_s)
    margin = sum_margin_s(total.duration_s)
    inference = _steps(run, "step-inference")
    loading = _steps(run, "step-loading")
    order = sorted(inference)
    inf_times = [inference[i].duration_s for i in order]
    load_times = {i: loading[i].duration_s for i in loading}
    per_step = [inference[i].duration_s + load_times.get(i, 0.0) for i in order]
    steady = inf_times[1:]
    loading_total = sum(load_times.values())
    inference_total = sum(inf_times)
    step_time = loading_total + inference_total
    inf_stages = [inference[i] for i in order]
    step_act = _time_weighted(inf_stages)
    peak = peak_tflops_of(run)
    flops_steps_list = [s.flops for s in inf_stages if s.flops is not None]
    flops_steps = (
        sum(flops_steps_list) if flops_steps_list and len(flops_steps_list) == len(inf_stages) else None
    )
    steps_tflops = (
        flops_steps / inference_total / 1e12 if flops_steps is not None and inference_total > 0 else None
    )
    flops_total = total.flops
    experts: dict[str, list[int]] = {}
    for i in order:
        if inference[i].expert is not None:
            experts.setdefault(inference[i].expert, []).append(i)
    inf_loads = [stage_load(s) for s in inf_stages]
    first = inf_stages[0] if inf_stages else None
    steady_iqr = percentile(steady, 75) - percentile(steady, 25) if len(steady) >= 3 else None
    steady_median = percentile(steady, 50) if steady else None
    free, free_source = _free(run)
    act_peaks = [
        s.memory.allocated_peak - s.memory.allocated_start
        for s in inf_stages
        if s.memory.allocated_peak is not None and s.memory.allocated_start is not None
    ]
    return RunSummary(
        case_name=run.context.case_name,
        group=group_label(run),
        activity_metric=run.system.activity_metric,
        total_s=total.duration_s,
        stage_sum_s=stage_sum,
        outside_s=outside,
        outside_recorded_s=sum(o.duration_s for o in run.outside),
        sum_margin_s=margin,
        outside_within_margin=outside <= margin,
        num_steps_recorded=len(order),
        num_steps_cached=len({s.step for s in run.stages if s.kind == "step-inference" and s.cached}),
        num_steps_planned=run.context.steps,
        s_per_step=mean(per_step) if per_step else None,
        first_step_s=inf_times[0] if inf_times else None,
        steady_mean_s=mean(steady) if steady else None,
        steady_median_s=steady_median,
        steady_p90_s=percentile(steady, 90) if steady else None,
        steady_iqr_s=steady_iqr,
        steady_max_s=max(steady) if steady else None,
        steps_noisy=bool(
            steady_iqr is not None and steady_median and 100.0 * steady_iqr / steady_median > NOISY_IQR_PCT
        ),
        loading_total_s=loading_total,
        inference_total_s=inference_total,
        loading_share_pct=100.0 * loading_total / step_time if step_time > 0 else None,
        step_activity_pct=step_act,
        step_activity_max_pct=max(
            (s.activity_max_pct for s in inf_stages if s.activity_max_pct is not None), default=None
        ),
        total_activity_pct=total.activity_mean_pct,
        load=stage_load(total),
        inference_load=sum(v for v in inf_loads if v is not None)
        if inf_loads and None not in inf_loads
        else None,
        peak_allocated_bytes=total.memory.allocated_peak,
        peak_reserved_bytes=total.memory.reserved_peak,
        device_used_max_bytes=total.memory.device_used_max,
        gpu_memory_bytes=run.system.gpu_memory_bytes,
        rss_max_bytes=total.rss_max_bytes,
        resident_at_first_step_bytes=None if first is None else first.memory.allocated_start,
        step_activation_peak_bytes=max(act_peaks) if act_peaks else None,
        t5_peak_bytes=_kind_peak(run, "encode"),
        t5_activation_bytes=_kind_activation(run, "encode"),
        vae_peak_bytes=_kind_peak(run, "decode"),
        vae_activation_bytes=_kind_activation(run, "decode"),
        free_bytes=free,
        free_source=free_source,
        flops_total=flops_total,
        flops_steps=flops_steps,
        steps_tflops=steps_tflops,
        peak_tflops=peak,
        mfu_pct=100.0 * steps_tflops / peak
        if steps_tflops is not None and peak is not None and all(on_gpu(s) for s in inf_stages)
        else None,
        steps_floor_s=flops_steps / (peak * 1e12) if flops_steps is not None and peak is not None else None,
        total_floor_s=flops_total / (peak * 1e12) if flops_total is not None and peak is not None else None,
        experts=experts,
        cfg_modes=sorted({s.cfg_mode for s in inf_stages if s.cfg_mode is not None}),
    )


def activity_label(metric: str | None) -> str:
    """How the activity column is named: never "SM activity" unless it is GPM SM activity."""
    return "GPU busy" if metric == ACTIVITY_BUSY else "SM activity"


def _gb(value: int | float | None) -> str:
    return gbs(value)


def _phases(run: RunRecord, summary: RunSummary) -> list[tuple[str, float]]:
    """(label, seconds) per phase, largest first. A phase made of several differently named stages
    (e.g. the three loaders) names them, so its time is not mistaken for one row of the table."""
    names = {
        "init": "Initialization",
        "preprocess": "Preprocessing",
        "encode": "Text encoding",
        "step-loading": "Denoising steps",
        "step-inference": "Denoising steps",
        "decode": "VAE decoding",
    }
    acc: dict[str, float] = {}
    members: dict[str, list[str]] = {}
    for s in run.top_level:
        label = names.get(s.kind, s.name)
        acc[label] = acc.get(label, 0.0) + s.duration_s
        if not s.kind.startswith("step-") and s.name not in members.setdefault(label, []):
            members[label].append(s.name)
    if summary.outside_s > 0:
        acc["Outside stages"] = summary.outside_s
    labelled = {
        label: (f"{label} ({' + '.join(members[label])})" if len(members.get(label, [])) > 1 else label)
        for label in acc
    }
    return sorted(((labelled[k], v) for k, v in acc.items()), key=lambda kv: -kv[1])


def analyze_run(run: RunRecord, summary: RunSummary) -> RunAnalysis:
    """Findings and recommendations that only state what the figures show, citing them."""
    findings: list[Statement] = []
    total = summary.total_s
    phases = _phases(run, summary)
    if phases and total > 0:
        label, seconds = phases[0]
        findings.append(
            Statement(
                rule="largest_phase",
                figures={
                    "phase": label,
                    "seconds": seconds,
                    "total_s": total,
                    "share_pct": 100.0 * seconds / total,
                },
                text=f"Largest part of the run: {label}, {secs(seconds)} of {secs(total)} "
                f"({100.0 * seconds / total:.1f} %).",
            )
        )
    findings.append(_activity_finding(run, summary))
    if summary.loading_share_pct is not None and summary.loading_share_pct >= LOADING_FLAG_PCT:
        findings.append(
            Statement(
                rule="loading_share",
                figures={
                    "loading_total_s": summary.loading_total_s,
                    "loading_share_pct": summary.loading_share_pct,
                },
                text=f"Step loading (moving weights before a step) takes {secs(summary.loading_total_s)}, "
                f"{summary.loading_share_pct:.1f} % of the step time.",
            )
        )
    findings.append(_memory_finding(run, summary))
    findings.append(_mfu_finding(run, summary))
    if is_warmup(summary):
        findings.append(
            Statement(
                rule="warmup",
                figures={
                    "first_step_s": summary.first_step_s,
                    "steady_median_s": summary.steady_median_s,
                    "steady_max_s": summary.steady_max_s,
                },
                text=f"The first step took {secs(summary.first_step_s)}, more than every later step "
                f"(steady median {secs(summary.steady_median_s)}, slowest {secs(summary.steady_max_s)}): "
                "warm-up (allocations, kernel selection or compile).",
            )
        )
    if summary.steps_noisy and summary.steady_iqr_s is not None and summary.steady_median_s:
        spread = 100.0 * summary.steady_iqr_s / summary.steady_median_s
        findings.append(
            Statement(
                rule="noisy_steps",
                figures={
                    "steady_iqr_s": summary.steady_iqr_s,
                    "steady_median_s": summary.steady_median_s,
                },
                text=f"Steady step times are noisy: IQR {secs(summary.steady_iqr_s)} is "
                f"{spread:.0f} % of the median {secs(summary.steady_median_s)} (other load on the "
                "machine, clock changes or data-dependent work); compare runs with care.",
            )
        )
    fit = _placement_fit(run, summary)
    if fit is not None and fit[0] is not None and fit[1] is not None and fit[0] > fit[1]:
        needed, free = fit
        findings.append(
            Statement(
                rule="placement_none_does_not_fit",
                figures={"needed_bytes": needed, "free_bytes": free, "short_bytes": needed - free},
                text=f"Placement `none` would keep about {_gb(needed)} more weights on the GPU, but only "
                f"{_gb(free)} was free: it does not fit by {_gb(needed - free)}, so the step loading "
                f"({secs(summary.loading_total_s)}) stays.",
            )
        )
    return RunAnalysis(findings=findings, recommendations=_recommendations(run, summary))


def is_warmup(summary: RunSummary) -> bool:
    """The first step is a warm-up only when it is slower than every steady step (by the ratio
    over the median too) and the steady steps are not noisy: otherwise the data does not say so."""
    first, median, slowest = summary.first_step_s, summary.steady_median_s, summary.steady_max_s
    if first is None or not median or slowest is None or summary.steps_noisy:
        return False
    return first > slowest and first > WARMUP_FLAG_RATIO * median


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


def _placement_fit(run: RunRecord, summary: RunSummary) -> tuple[int | None, int | None] | None:
    """(bytes needed, bytes free) when the placement-none question arises (offload with a
    loading share worth flagging), else None."""
    if not (
        run.context.offload
        and summary.loading_total_s > 0
        and summary.loading_share_pct is not None
        and summary.loading_share_pct >= LOADING_FLAG_PCT
    ):
        return None
    return offloaded_bytes(run, summary), summary.free_bytes


def _activity_finding(run: RunRecord, summary: RunSummary) -> Statement:
    metric = summary.activity_metric
    value, top = summary.step_activity_pct, summary.step_activity_max_pct
    if value is None:
        reason = run.system.activity_unavailable_reason or "no activity samples covered the steps"
        return Statement(
            rule="activity_unavailable",
            figures={"step_activity_pct": None},
            text=f"GPU activity was not measured ({reason}); no statement about GPU utilization is made.",
        )
    label = activity_label(metric)
    note = (
        ""
        if metric == ACTIVITY_SM
        else (
            " (NVML utilization: the share of time any kernel ran; it does not show how many SMs were busy)"
        )
    )
    figures: dict[str, Figure] = {"step_activity_pct": value, "step_activity_max_pct": top, "metric": metric}
    if value >= ACTIVITY_HIGH_PCT:
        return Statement(
            rule="activity_high",
            figures=figures,
            text=f"The GPU is saturated during the steps: {label} averages {value:.1f} % "
            f"(max {top:.1f} %){note}; speed-ups must come from doing less work or "
            "faster kernels, not from feeding the GPU better.",
        )
    if value < ACTIVITY_LOW_PCT:
        cpu = _time_weighted_cpu(run)
        cpu_text = "" if cpu is None else f"; process CPU use during the steps is {cpu:.0f} % of one core"
        figures["step_cpu_pct"] = cpu
        return Statement(
            rule="activity_low",
            figures=figures,
            text=f"Low {label} during the steps: {value:.1f} % (max {top:.1f} %){note}{cpu_text}. "
            "The GPU waits between kernels (host overhead, transfers or small shapes).",
        )
    return Statement(
        rule="activity_moderate",
        figures=figures,
        text=f"{label} during the steps averages {value:.1f} % (max {top:.1f} %){note}.",
    )


def _time_weighted_cpu(run: RunRecord) -> float | None:
    stages = [
        s for s in run.stages if s.kind == "step-inference" and s.cpu_pct is not None and s.duration_s > 0
    ]
    if not stages:
        return None
    return sum(s.cpu_pct * s.duration_s for s in stages) / sum(s.duration_s for s in stages)  # type: ignore[operator]


def _memory_finding(run: RunRecord, summary: RunSummary) -> Statement:
    gpu, capacity, peak = run.system.gpu_name, summary.gpu_memory_bytes, summary.peak_reserved_bytes
    if gpu is None:
        host = run.system.host_memory_bytes
        share = (
            ""
            if host is None or summary.rss_max_bytes is None
            else f" of {_gb(host)} host memory ({100.0 * summary.rss_max_bytes / host:.1f} %)"
        )
        return Statement(
            rule="memory",
            figures={"gpu_name": None, "rss_max_bytes": summary.rss_max_bytes, "host_memory_bytes": host},
            text=f"No GPU memory to judge (CPU run); peak process RSS {_gb(summary.rss_max_bytes)}{share}.",
        )
    figures: dict[str, Figure] = {
        "gpu_name": gpu,
        "peak_reserved_bytes": peak,
        "gpu_memory_bytes": capacity,
        "peak_allocated_bytes": summary.peak_allocated_bytes,
    }
    if peak is None or capacity is None:
        return Statement(
            rule="memory",
            figures=figures,
            text=f"Peak memory on {gpu} is unavailable (the CUDA allocator figures were not recorded).",
        )
    share = 100.0 * peak / capacity
    figures["share_pct"] = share
    figures["free_bytes"] = summary.free_bytes
    figures["device_used_max_bytes"] = summary.device_used_max_bytes
    used = (
        ""
        if summary.device_used_max_bytes is None
        else f"; the device (NVML, all processes) used up to {_gb(summary.device_used_max_bytes)}"
    )
    return Statement(
        rule="memory",
        figures=figures,
        text=f"Peak memory on {gpu}: {_gb(summary.peak_allocated_bytes)} allocated, {_gb(peak)} "
        f"reserved of {_gb(capacity)} ({share:.1f} %){used}; {_gb(summary.free_bytes)} stayed free.",
    )


def _mfu_finding(run: RunRecord, summary: RunSummary) -> Statement:
    figures: dict[str, Figure] = {
        "steps_tflops": summary.steps_tflops,
        "peak_tflops": summary.peak_tflops,
        "mfu_pct": summary.mfu_pct,
        "steps_floor_s": summary.steps_floor_s,
        "inference_total_s": summary.inference_total_s,
    }
    if summary.num_steps_recorded == 0:
        return Statement(
            rule="mfu_unavailable",
            figures=figures,
            text="No denoising steps were recorded in this run, so there is no step throughput.",
        )
    if summary.steps_tflops is None:
        return Statement(
            rule="mfu_unavailable",
            figures=figures,
            text="Achieved TFLOP/s is unavailable: the steps did not state their FLOPs.",
        )
    if summary.mfu_pct is None:
        what = run.system.gpu_name or "a CPU"
        return Statement(
            rule="mfu_unavailable",
            figures=figures,
            text=f"The steps achieve {summary.steps_tflops:.3g} TFLOP/s; MFU is unavailable because "
            f"{what} has no dense bf16 peak in the GPU table.",
        )
    return Statement(
        rule="mfu",
        figures=figures,
        text=f"The steps achieve {summary.steps_tflops:.1f} TFLOP/s, {summary.mfu_pct:.1f} % MFU "
        f"of the {summary.peak_tflops:.0f} TFLOP/s dense bf16 peak; at that peak they would take "
        f"{secs(summary.steps_floor_s)} instead of {secs(summary.inference_total_s)}.",
    )


def _recommendations(run: RunRecord, summary: RunSummary) -> list[Statement]:
    recs: list[Statement] = []
    placement = run.context.placement
    fit = _placement_fit(run, summary)
    if fit is not None and not (fit[0] is not None and fit[1] is not None and fit[0] > fit[1]):
        needed, free = fit
        if needed is not None and free is not None:
            fits = f"about {_gb(needed)} more weights would stay on the GPU and {_gb(free)} was free, so they fit"
        elif needed is None:
            fits = (
                f"{'free GPU memory is unavailable' if free is None else f'{_gb(free)} was free'}; the size "
                "of the offloaded weights was not measured, so check that they fit"
            )
        else:
            fits = f"about {_gb(needed)} more weights would stay on the GPU; free memory was not measured"
        recs.append(
            Statement(
                rule="placement_none",
                gain_s=summary.loading_total_s,
                figures={
                    "placement": placement,
                    "loading_total_s": summary.loading_total_s,
                    "loading_share_pct": summary.loading_share_pct,
                    "needed_bytes": needed,
                    "free_bytes": free,
                },
                text=f"Step loading is {_pct(summary.loading_share_pct)} of step time "
                f"({secs(summary.loading_total_s)}) with placement `{placement}`: placement `none` "
                f"would save about {secs(summary.loading_total_s)}; {fits}.",
            )
        )
    if summary.steps_floor_s is not None and summary.inference_total_s > summary.steps_floor_s:
        gain = summary.inference_total_s - summary.steps_floor_s
        recs.append(
            Statement(
                rule="kernel_headroom",
                gain_s=gain,
                figures={
                    "inference_total_s": summary.inference_total_s,
                    "steps_floor_s": summary.steps_floor_s,
                    "mfu_pct": summary.mfu_pct,
                },
                text=f"Steps run at {summary.mfu_pct:.1f} % MFU ({secs(summary.inference_total_s)} against a "
                f"FLOP floor of {secs(summary.steps_floor_s)}): faster kernels (attention backend, fp8, "
                f"compile) can save at most {secs(gain)}; fewer steps or fewer tokens are the only way "
                "past the floor.",
            )
        )
    reusable = [s for s in run.top_level if s.kind in ("init", "encode") and not s.cached]
    if reusable:
        seconds = sum(s.duration_s for s in reusable)
        names = ", ".join(f"{s.name} {secs(s.duration_s)}" for s in reusable)
        recs.append(
            Statement(
                rule="reuse_cache",
                gain_s=seconds,
                figures={"reusable_s": seconds},
                text=f"In a running ComfyUI server, a later run with the same models and prompt reuses "
                f"the cached outputs of {names}: about {secs(seconds)} saved per later run "
                "(an in-process `wanbench run` starts fresh every time).",
            )
        )
    if is_warmup(summary):
        assert summary.first_step_s is not None and summary.steady_median_s is not None
        gain = summary.first_step_s - summary.steady_median_s
        recs.append(
            Statement(
                rule="warmup",
                gain_s=gain,
                figures={"first_step_s": summary.first_step_s, "steady_median_s": summary.steady_median_s},
                text=f"The first step costs {secs(gain)} more than a steady one "
                f"({secs(summary.first_step_s)} vs {secs(summary.steady_median_s)}); a kept-alive "
                "process pays this once, not per run.",
            )
        )
    return sorted(recs, key=lambda r: -(r.gain_s or 0.0))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} %"
