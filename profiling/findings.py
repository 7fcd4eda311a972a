"""Findings of one run: the bottleneck analysis and ranked recommendations, each citing its figures.

`analyze_run(run, summary)` states only what the figures of `figures.summarize_run` show. Each
`Statement` carries the figures it rests on, so `checker.check_report` can verify every one: a
verdict fits its threshold, "low utilization" never stands next to high activity, memory is
judged against the measured GPU only, and NVML utilization is never called SM activity.
Recommendations are ranked by their estimated gain in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from .figures import RunSummary, offloaded_bytes, step_cpu_pct
from .formatting import activity_label, gbs, pcts, secs
from .records import ACTIVITY_SM, RunRecord

ACTIVITY_HIGH_PCT = 90.0
ACTIVITY_LOW_PCT = 50.0
LOADING_FLAG_PCT = 5.0
WARMUP_FLAG_RATIO = 1.2

Figure = float | int | str | None

_PHASE_NAMES = {
    "init": "Initialization",
    "preprocess": "Preprocessing",
    "encode": "Text encoding",
    "step-loading": "Denoising steps",
    "step-inference": "Denoising steps",
    "decode": "VAE decoding",
}


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


def analyze_run(run: RunRecord, summary: RunSummary) -> RunAnalysis:
    """Findings and recommendations that only state what the figures show, citing them."""
    findings = [
        *_largest_phase_finding(run, summary),
        _activity_finding(run, summary),
        *_loading_finding(summary),
        _memory_finding(run, summary),
        _mfu_finding(run, summary),
        *_warmup_finding(summary),
        *_noisy_steps_finding(summary),
        *_placement_misfit_finding(run, summary),
    ]
    recommendations = [
        *_placement_recommendation(run, summary),
        *_kernel_recommendation(summary),
        *_reuse_recommendation(run),
        *_warmup_recommendation(summary),
    ]
    return RunAnalysis(findings=findings, recommendations=sorted(recommendations, key=lambda r: -(r.gain_s or 0.0)))


def _cite(summary: RunSummary, *names: str) -> dict[str, Figure]:
    """The summary figures a statement rests on, by their names in `RunSummary`."""
    return {name: getattr(summary, name) for name in names}


def is_warmup(summary: RunSummary) -> bool:
    """The first step is a warm-up only when it is slower than every steady step (by the ratio
    over the median too) and the steady steps are not noisy: otherwise the data does not say so."""
    first, median, slowest = summary.first_step_s, summary.steady_median_s, summary.steady_max_s
    if first is None or not median or slowest is None or summary.steps_noisy:
        return False
    return first > slowest and first > WARMUP_FLAG_RATIO * median


# -------------------------------------------------------------------------------------------- findings
def _phases(run: RunRecord, summary: RunSummary) -> list[tuple[str, float]]:
    """(label, seconds) per phase, largest first. A phase made of several differently named stages
    (e.g. the three loaders) names them, so its time is not mistaken for one row of the table."""
    acc: dict[str, float] = {}
    members: dict[str, list[str]] = {}
    for s in run.top_level:
        label = _PHASE_NAMES.get(s.kind, s.name)
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


def _largest_phase_finding(run: RunRecord, summary: RunSummary) -> list[Statement]:
    total = summary.total_s
    phases = _phases(run, summary)
    if not phases or total <= 0:
        return []
    label, seconds = phases[0]
    return [
        Statement(
            rule="largest_phase",
            figures={"phase": label, "seconds": seconds, "total_s": total, "share_pct": 100.0 * seconds / total},
            text=f"Largest part of the run: {label}, {secs(seconds)} of {secs(total)} "
            f"({100.0 * seconds / total:.1f} %).",
        )
    ]


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
        cpu = step_cpu_pct(run)
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


def _loading_finding(summary: RunSummary) -> list[Statement]:
    if summary.loading_share_pct is None or summary.loading_share_pct < LOADING_FLAG_PCT:
        return []
    return [
        Statement(
            rule="loading_share",
            figures=_cite(summary, "loading_total_s", "loading_share_pct"),
            text=f"Step loading (moving weights before a step) takes {secs(summary.loading_total_s)}, "
            f"{summary.loading_share_pct:.1f} % of the step time.",
        )
    ]


def _memory_finding(run: RunRecord, summary: RunSummary) -> Statement:
    gpu, capacity, peak = run.system.gpu_name, summary.gpu_memory_bytes, summary.peak_reserved_bytes
    if gpu is None:
        host = run.system.host_memory_bytes
        share = (
            ""
            if host is None or summary.rss_max_bytes is None
            else f" of {gbs(host)} host memory ({100.0 * summary.rss_max_bytes / host:.1f} %)"
        )
        return Statement(
            rule="memory",
            figures={"gpu_name": None, "rss_max_bytes": summary.rss_max_bytes, "host_memory_bytes": host},
            text=f"No GPU memory to judge (CPU run); peak process RSS {gbs(summary.rss_max_bytes)}{share}.",
        )
    figures: dict[str, Figure] = {
        "gpu_name": gpu,
        **_cite(summary, "peak_reserved_bytes", "gpu_memory_bytes", "peak_allocated_bytes"),
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
        else f"; the device (NVML, all processes) used up to {gbs(summary.device_used_max_bytes)}"
    )
    return Statement(
        rule="memory",
        figures=figures,
        text=f"Peak memory on {gpu}: {gbs(summary.peak_allocated_bytes)} allocated, {gbs(peak)} "
        f"reserved of {gbs(capacity)} ({share:.1f} %){used}; {gbs(summary.free_bytes)} stayed free.",
    )


def _mfu_finding(run: RunRecord, summary: RunSummary) -> Statement:
    figures = _cite(summary, "steps_tflops", "peak_tflops", "mfu_pct", "steps_floor_s", "inference_total_s")
    if summary.num_steps_recorded == 0:
        text = "No denoising steps were recorded in this run, so there is no step throughput."
    elif summary.steps_tflops is None:
        text = "Achieved TFLOP/s is unavailable: the steps did not state their FLOPs."
    elif summary.mfu_pct is None:
        text = (
            f"The steps achieve {summary.steps_tflops:.3g} TFLOP/s; MFU is unavailable because "
            f"{run.system.gpu_name or 'a CPU'} has no dense bf16 peak in the GPU table."
        )
    else:
        return Statement(
            rule="mfu",
            figures=figures,
            text=f"The steps achieve {summary.steps_tflops:.1f} TFLOP/s, {summary.mfu_pct:.1f} % MFU "
            f"of the {summary.peak_tflops:.0f} TFLOP/s dense bf16 peak; at that peak they would take "
            f"{secs(summary.steps_floor_s)} instead of {secs(summary.inference_total_s)}.",
        )
    return Statement(rule="mfu_unavailable", figures=figures, text=text)


def _warmup_finding(summary: RunSummary) -> list[Statement]:
    if not is_warmup(summary):
        return []
    return [
        Statement(
            rule="warmup",
            figures=_cite(summary, "first_step_s", "steady_median_s", "steady_max_s"),
            text=f"The first step took {secs(summary.first_step_s)}, more than every later step "
            f"(steady median {secs(summary.steady_median_s)}, slowest {secs(summary.steady_max_s)}): "
            "warm-up (allocations, kernel selection or compile).",
        )
    ]


def _noisy_steps_finding(summary: RunSummary) -> list[Statement]:
    if not (summary.steps_noisy and summary.steady_iqr_s is not None and summary.steady_median_s):
        return []
    spread = 100.0 * summary.steady_iqr_s / summary.steady_median_s
    return [
        Statement(
            rule="noisy_steps",
            figures=_cite(summary, "steady_iqr_s", "steady_median_s"),
            text=f"Steady step times are noisy: IQR {secs(summary.steady_iqr_s)} is "
            f"{spread:.0f} % of the median {secs(summary.steady_median_s)} (other load on the "
            "machine, clock changes or data-dependent work); compare runs with care.",
        )
    ]


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


def _placement_misfit_finding(run: RunRecord, summary: RunSummary) -> list[Statement]:
    fit = _placement_fit(run, summary)
    if fit is None or fit[0] is None or fit[1] is None or fit[0] <= fit[1]:
        return []
    needed, free = fit
    return [
        Statement(
            rule="placement_none_does_not_fit",
            figures={"needed_bytes": needed, "free_bytes": free, "short_bytes": needed - free},
            text=f"Placement `none` would keep about {gbs(needed)} more weights on the GPU, but only "
            f"{gbs(free)} was free: it does not fit by {gbs(needed - free)}, so the step loading "
            f"({secs(summary.loading_total_s)}) stays.",
        )
    ]


# -------------------------------------------------------------------------------------------- recommendations
def _placement_recommendation(run: RunRecord, summary: RunSummary) -> list[Statement]:
    fit = _placement_fit(run, summary)
    if fit is None or (fit[0] is not None and fit[1] is not None and fit[0] > fit[1]):
        return []
    needed, free = fit
    if needed is not None and free is not None:
        fits = f"about {gbs(needed)} more weights would stay on the GPU and {gbs(free)} was free, so they fit"
    elif needed is None:
        fits = (
            f"{'free GPU memory is unavailable' if free is None else f'{gbs(free)} was free'}; the size "
            "of the offloaded weights was not measured, so check that they fit"
        )
    else:
        fits = f"about {gbs(needed)} more weights would stay on the GPU; free memory was not measured"
    placement = run.context.placement
    return [
        Statement(
            rule="placement_none",
            gain_s=summary.loading_total_s,
            figures={
                "placement": placement,
                **_cite(summary, "loading_total_s", "loading_share_pct"),
                "needed_bytes": needed,
                "free_bytes": free,
            },
            text=f"Step loading is {pcts(summary.loading_share_pct)} of step time "
            f"({secs(summary.loading_total_s)}) with placement `{placement}`: placement `none` "
            f"would save about {secs(summary.loading_total_s)}; {fits}.",
        )
    ]


def _kernel_recommendation(summary: RunSummary) -> list[Statement]:
    if summary.steps_floor_s is None or summary.inference_total_s <= summary.steps_floor_s:
        return []
    gain = summary.inference_total_s - summary.steps_floor_s
    return [
        Statement(
            rule="kernel_headroom",
            gain_s=gain,
            figures=_cite(summary, "inference_total_s", "steps_floor_s", "mfu_pct"),
            text=f"Steps run at {summary.mfu_pct:.1f} % MFU ({secs(summary.inference_total_s)} against a "
            f"FLOP floor of {secs(summary.steps_floor_s)}): faster kernels (attention backend, fp8, "
            f"compile) can save at most {secs(gain)}; fewer steps or fewer tokens are the only way "
            "past the floor.",
        )
    ]


def _reuse_recommendation(run: RunRecord) -> list[Statement]:
    reusable = [s for s in run.top_level if s.kind in ("init", "encode") and not s.cached]
    if not reusable:
        return []
    seconds = sum(s.duration_s for s in reusable)
    names = ", ".join(f"{s.name} {secs(s.duration_s)}" for s in reusable)
    return [
        Statement(
            rule="reuse_cache",
            gain_s=seconds,
            figures={"reusable_s": seconds},
            text=f"In a running ComfyUI server, a later run with the same models and prompt reuses "
            f"the cached outputs of {names}: about {secs(seconds)} saved per later run "
            "(an in-process `wanbench run` starts fresh every time).",
        )
    ]


def _warmup_recommendation(summary: RunSummary) -> list[Statement]:
    if not is_warmup(summary):
        return []
    assert summary.first_step_s is not None and summary.steady_median_s is not None
    gain = summary.first_step_s - summary.steady_median_s
    return [
        Statement(
            rule="warmup",
            gain_s=gain,
            figures=_cite(summary, "first_step_s", "steady_median_s"),
            text=f"The first step costs {secs(gain)} more than a steady one "
            f"({secs(summary.first_step_s)} vs {secs(summary.steady_median_s)}); a kept-alive "
            "process pays this once, not per run.",
        )
    ]
