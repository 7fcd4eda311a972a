"""The benchmark report in Markdown: a pure function of run records.

Layout (the shape of the reports users already compare across GPUs, extended): title and
legend; per hardware group (one GPU model) its system context and a summary table with one row
per case; then per case the run facts, totals, the stage breakdown, inference statistics,
memory telemetry, bottleneck analysis, ranked recommendations and the timeline chart; last, per
parallel run, its ranks side by side (`ranks.py`: critical path, communication, scaling).
Every value that was not measured reads `n/a`.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence

from .figures import (
    SUM_MARGIN_ABS_S,
    SUM_MARGIN_PCT,
    RunSummary,
    peak_tflops_of,
    stage_load,
    stage_mfu_pct,
    stage_tflops,
    summarize_run,
)
from .findings import RunAnalysis, analyze_run
from .formatting import NA, activity_label, fmt_gb, fmt_load, fmt_pct, fmt_s, fmt_tflops, gbs, pcts, secs, with_unit
from .gpus import lookup_gpu
from .ranks import parallel_sections
from .records import ACTIVITY_BUSY, ACTIVITY_SM, OutsideInterval, RunRecord, StageRecord
from .report_sections import memory_plan_lines, unmeasured_lines
from .step_reuse import step_cache_lines

TITLE = "# Wan2.2 Benchmark Report"


def legend(runs: Sequence[RunRecord]) -> str:
    """The units and column definitions, naming only the activity metrics the runs used."""
    metrics = {r.system.activity_metric for r in runs}
    parts = ["Units: time in seconds, memory in GB (10^9 bytes)."]
    if ACTIVITY_SM in metrics:
        parts.append("**SM(%)** is SM activity from NVML GPU performance metrics (Hopper and newer).")
    if None in metrics:
        parts.append(
            "Runs without a GPU (or without NVML) have no activity figures: their SM(%) reads `n/a`."
        )
    if ACTIVITY_BUSY in metrics:
        parts.append(
            "**Busy(%)** is NVML utilization, the share of time any kernel ran (GPUs without "
            "performance metrics; it does not count busy SMs)."
        )
    parts += [
        "Summary columns: **Time(s)**, **Mem(GB)** (CUDA allocator peak) and **Load** cover the whole run "
        "(Total_Execution); **s/step**, the activity column and **MFU(%)** cover the denoising steps only.",
        "**Load** = seconds x activity % (%-seconds).",
        "**s/step** = mean of Step_i_Loading + Step_i_Inference (steps that reused a prediction from the step "
        "cache are counted apart: they did no model work).",
        "**MFU** = achieved FLOP/s / dense bf16 peak of the measured GPU (steps on the GPU only).",
        "`n/a` = not measured.",
    ]
    return " ".join(parts)


def _yes_no(value: bool | None) -> str:
    return NA if value is None else ("yes" if value else "no")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(":---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def activity_header(metric: str | None) -> str:
    return "Busy(%)" if metric == ACTIVITY_BUSY else "SM(%)"


def _group_metric(runs: Sequence[RunRecord]) -> str | None:
    metrics = {r.system.activity_metric for r in runs}
    if ACTIVITY_BUSY in metrics and ACTIVITY_SM in metrics:  # group_runs keeps them apart
        raise ValueError("runs of one hardware group mix SM activity and GPU busy; report them separately")
    if metrics == {ACTIVITY_BUSY}:
        return ACTIVITY_BUSY
    return ACTIVITY_SM if ACTIVITY_SM in metrics else None


_METRIC_NAMES = {ACTIVITY_SM: "SM activity", ACTIVITY_BUSY: "GPU busy", None: "no activity metric"}


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------
def group_runs(runs: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs by hardware group (GPU name, or CPU), in first-seen order; cases sorted by name.

    Runs of one GPU model measured with different activity metrics (GPM SM activity on one
    machine, NVML utilization on another) form separate groups, labelled with their metric, so
    a column never mixes the two.
    """
    keyed: dict[tuple[str, str | None], list[RunRecord]] = {}
    for run in runs:
        keyed.setdefault((summarize_run(run).group, run.system.activity_metric), []).append(run)
    names = [name for name, _ in keyed]
    groups: dict[str, list[RunRecord]] = {}
    for (name, metric), members in keyed.items():
        label = f"{name} ({_METRIC_NAMES[metric]})" if names.count(name) > 1 else name
        groups[label] = sorted(members, key=lambda r: r.context.case_name)
    return groups


def render_markdown(
    runs: Sequence[RunRecord],
    *,
    chart_notes: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The whole report. `chart_notes` maps a case name to its chart line (image link or skip
    reason); `notes` are report-level remarks (e.g. duplicate runs dropped by a merge)."""
    if not runs:
        raise ValueError("render_markdown needs at least one run record")
    groups = group_runs(runs)
    lines = [TITLE, "", legend(runs), ""]
    lines += [f"- Note: {n}" for n in notes] + ([""] if notes else [])
    for i, (group, members) in enumerate(groups.items()):
        letter = string.ascii_uppercase[i] if i < len(string.ascii_uppercase) else str(i + 1)
        lines += _group_summary(letter, group, members)
    for group, members in groups.items():
        lines += [f"# Detailed Breakdown ({_short(group)})", ""]
        for run in members:
            note = None if chart_notes is None else chart_notes.get(run.context.case_name)
            lines += _case_section(run, group, note)
    lines += parallel_sections(runs)
    return "\n".join(lines).rstrip() + "\n"


def _short(group: str) -> str:
    spec = lookup_gpu(group)
    if spec is None:
        return group
    suffix = group[group.rindex(" (") :] if group.endswith(")") and " (" in group else ""
    return spec.key + (suffix if any(v in suffix for v in _METRIC_NAMES.values()) else "")


def _versions(runs: Sequence[RunRecord], attr: str) -> str:
    """One version, or every differing one with the cases that ran it (never hidden by runs[0])."""
    seen: dict[str, list[str]] = {}
    for run in runs:
        seen.setdefault(getattr(run.system, attr) or NA, []).append(run.context.case_name)
    if len(seen) == 1:
        return next(iter(seen))
    return "differs: " + ", ".join(f"{v} ({', '.join(cases)})" for v, cases in seen.items())


def _system_lines(runs: Sequence[RunRecord]) -> list[str]:
    s = runs[0].system
    gpu = NA if s.gpu_name is None else f"{s.gpu_name} ({gbs(s.gpu_memory_bytes)})"
    if s.activity_metric == ACTIVITY_SM:
        activity = "SM activity from NVML GPU performance metrics"
    elif s.activity_metric == ACTIVITY_BUSY:
        activity = (
            "GPU busy from NVML utilization (no performance metrics on this GPU; it does not count busy SMs)"
        )
    else:
        activity = f"unavailable ({s.activity_unavailable_reason or 'no NVML'})"
    return [
        f"- **GPU**: {gpu}; driver {_versions(runs, 'driver_version')}; CUDA {_versions(runs, 'cuda_version')}; "
        f"torch {_versions(runs, 'torch_version')}",
        f"- **CPU**: {_versions(runs, 'cpu_name')}; host memory {gbs(s.host_memory_bytes)}",
        f"- **Activity metric**: {activity}",
    ]


def _group_summary(letter: str, group: str, runs: list[RunRecord]) -> list[str]:
    metric = _group_metric(runs)
    lines = [f"## Hardware Group {letter}: {group}", ""]
    lines += _system_lines(runs) + [""]
    rows = []
    for run in runs:
        sm = summarize_run(run)
        c = run.context
        rows.append(
            [
                c.case_name,
                c.resolution or NA,
                NA if c.frames is None else str(c.frames),
                _steps_cell(sm),
                _offload_cell(run),
                fmt_s(sm.total_s),
                fmt_s(sm.s_per_step),
                fmt_gb(sm.peak_allocated_bytes),
                fmt_pct(sm.step_activity_pct),
                fmt_load(sm.load),
                fmt_pct(sm.mfu_pct),
            ]
        )
    lines += _table(
        [
            "Case",
            "Res",
            "Frames",
            "Steps",
            "Offload",
            "Time(s)",
            "s/step",
            "Mem(GB)",
            activity_header(metric),
            "Load",
            "MFU(%)",
        ],
        rows,
    )
    return lines + [""]


def _steps_cell(sm: RunSummary) -> str:
    cached = f" + {sm.num_steps_cached} cached" if sm.num_steps_cached else ""
    cached += f" ({sm.num_steps_reused} reused)" if sm.num_steps_reused else ""
    if sm.num_steps_planned is None or sm.num_steps_planned == sm.num_steps_recorded + sm.num_steps_cached:
        return f"{sm.num_steps_recorded}{cached}"
    return f"{sm.num_steps_recorded}{cached} of {sm.num_steps_planned}"


def _offload_cell(run: RunRecord) -> str:
    placement = run.context.placement
    if placement is None:
        return NA
    return f"{_yes_no(run.context.offload).capitalize()} ({placement})"


def _case_section(run: RunRecord, group: str, chart_note: str | None) -> list[str]:
    sm = summarize_run(run)
    analysis = analyze_run(run, sm)
    c = run.context
    lines = [f"## Case: {c.case_name} ({_short(group)})", ""]
    facts = [
        f"task {c.task or NA}",
        f"{c.resolution or NA}",
        f"{NA if c.frames is None else c.frames} frames",
        f"{_steps_cell(sm)} steps",
        f"placement {c.placement or NA}",
        f"attention {c.attention_backend or NA}",
        f"dtypes DiT {c.dit_dtype or NA} / T5 {c.t5_dtype or NA} / VAE {c.vae_dtype or NA}",
        f"DiT weights {c.weight_dtype or NA}",
        f"TF32 {_yes_no(c.tf32)}",
        f"compile {_compile_cell(run)}",
        f"CFG {c.cfg_mode or ', '.join(sm.cfg_modes) or NA}",
    ]
    if c.solver:
        facts.append(f"solver {c.solver}")
    if c.loras:
        facts.append(f"LoRAs {' + '.join(c.loras)}")
    if c.step_cache:
        facts.append(f"step cache {c.step_cache}")
    lines += [
        f"- **Run facts**: {'; '.join(facts)}",
        f"- **Status**: {run.status}",
        f"- **Total Duration**: {fmt_s(sm.total_s)} s",
        _peak_memory_line(run, sm),
        f"- **Total Compute Load**: {fmt_load(sm.load)}",
    ]
    lines += _kernel_lines(run)
    lines += [f"- Note: {n}" for n in run.notes] + unmeasured_lines(run)
    lines += ["", "### Stage Breakdown", ""] + _stage_table(run, sm) + [""]
    lines += _inference_stats(run, sm) + _memory_telemetry(run, sm) + memory_plan_lines(run)
    lines += _analysis_lines(analysis)
    lines += [
        "### Timeline",
        "",
        chart_note or "Chart: written per run by `write_report` (not part of a merged report).",
        "",
        "---",
        "",
    ]
    return lines


# Event names written by wan_core (config.py): the measured `auto` attention choices, the compile summary.
ATTENTION_CHOICE_EVENT = "attention_choice"
COMPILE_SUMMARY_EVENT = "compile_summary"


def _compile_cell(run: RunRecord) -> str:
    """'yes (3 compiles, 0 recompiles, 41.2 s)' from the run's compile summary, or yes/no/n/a."""
    summaries = [e.facts for e in run.events if e.name == COMPILE_SUMMARY_EVENT]
    if not summaries:
        return _yes_no(run.context.compile)
    compiles = sum(int(f.get("num_compiles") or 0) for f in summaries)
    recompiles = sum(int(f.get("num_recompiles") or 0) for f in summaries)
    seconds = sum(float(f.get("compile_s") or 0.0) for f in summaries)
    return f"yes ({compiles} compiles, {recompiles} recompiles, first forwards {fmt_s(seconds)} s)"


def _kernel_lines(run: RunRecord) -> list[str]:
    """One line per attention shape whose kernel `auto` chose by measurement."""
    lines = []
    for e in run.events:
        if e.name != ATTENTION_CHOICE_EVENT:
            continue
        f = e.facts
        tflops = f.get("tflops")
        speed = NA if not isinstance(tflops, (int, float)) else f"{tflops:.3g} TFLOP/s"
        when = "measured earlier in this process" if f.get("cached") else "measured"
        lines.append(f"- **Attention kernel** ({f.get('shape', NA)}): {f.get('kernel', NA)}, {speed} "
                     f"({when}; candidates: {f.get('candidates', NA)})")
    return lines


def _peak_memory_line(run: RunRecord, sm: RunSummary) -> str:
    rss = f"process RSS {gbs(sm.rss_max_bytes)}"
    if run.system.gpu_name is None and sm.peak_allocated_bytes is None:
        return f"- **Peak Memory**: GPU memory not measured (CPU run); {rss}"
    nvml = (
        "device use not measured (no NVML)"
        if sm.device_used_max_bytes is None
        else f"{gbs(sm.device_used_max_bytes)} used on the device (NVML, all processes)"
    )
    return (
        f"- **Peak Memory**: {gbs(sm.peak_allocated_bytes)} allocated, "
        f"{gbs(sm.peak_reserved_bytes)} reserved (CUDA allocator); {nvml}; {rss}"
    )


def _stage_row(stage: StageRecord, peak: float | None, label: str) -> list[str]:
    if stage.cached:
        return [label, "cached", NA, NA, NA, NA, NA, NA, NA]
    return [
        label,
        fmt_s(stage.duration_s),
        fmt_gb(stage.memory.allocated_peak),
        fmt_pct(stage.activity_mean_pct),
        fmt_pct(stage.cpu_pct),
        fmt_gb(stage.rss_max_bytes),
        fmt_load(stage_load(stage)),
        fmt_tflops(stage_tflops(stage)),
        fmt_pct(stage_mfu_pct(stage, peak)),
    ]


def _stage_table(run: RunRecord, sm: RunSummary) -> list[str]:
    peak = peak_tflops_of(run)
    rows = []
    for stage in run.stages:
        label = stage.name if stage.depth == 0 else "&nbsp;&nbsp;" * stage.depth + "└ " + stage.name
        if stage.kind == "step-inference" and stage.expert:
            label += f" [{stage.expert}]"
        previous = stage.facts.get("measured_s")
        if stage.cached and isinstance(previous, (int, float)) and not isinstance(previous, bool):
            label += f" (took {fmt_s(float(previous))} s when it last ran)"
        if stage.device != run.system.device and not stage.cached:
            label += f" ({stage.device})"
        rows.append(_stage_row(stage, peak, label))
    rows.append(["(outside stages)", fmt_s(sm.outside_s)] + [NA] * 7)
    rows.append(_stage_row(run.total, peak, run.total.name))
    header = [
        "Stage",
        "Time (s)",
        "Peak Mem (GB)",
        "SM Act (%)" if run.system.activity_metric != ACTIVITY_BUSY else "GPU Busy (%)",
        "CPU (%)",
        "Sys Mem (GB)",
        "Comp Load",
        "TFLOP/s",
        "MFU (%)",
    ]
    lines = _table(header, rows)
    if sm.outside_within_margin:
        cover = (
            f"Top-level stages sum to {fmt_s(sm.stage_sum_s)} s of the {fmt_s(sm.total_s)} s total; the "
            f"{fmt_s(sm.outside_s)} s outside them is within the {fmt_s(sm.sum_margin_s)} s margin "
            f"(max of {SUM_MARGIN_PCT:g} % of the total and {fmt_s(SUM_MARGIN_ABS_S)} s)."
        )
    else:
        share = 100.0 * sm.outside_s / sm.total_s if sm.total_s > 0 else 0.0
        cover = (
            f"Top-level stages sum to {fmt_s(sm.stage_sum_s)} s of the {fmt_s(sm.total_s)} s total: "
            f"**{fmt_s(sm.outside_s)} s ({share:.1f} %) lies outside every stage**, more than the "
            f"{fmt_s(sm.sum_margin_s)} s margin; it is listed below."
        )
    lines += [
        "",
        cover + " Indented rows run inside the row above and are not added again. Peak Mem is the CUDA "
        "allocator peak within the stage (weights included); a stage on another device than the run's "
        "is marked with it and carries no GPU figures.",
    ]
    if not sm.outside_within_margin:
        lines += [""] + _outside_lines(run.outside, sm.sum_margin_s)
    return lines


def _outside_lines(outside: Sequence[OutsideInterval], margin: float) -> list[str]:
    """The uncovered intervals: each one above the margin by itself, the short ones summed."""
    lines = ["Time outside stages:", ""]
    short = [o for o in outside if o.duration_s < margin]
    for o in outside:
        if o.duration_s < margin:
            continue
        where = (
            "profiled code outside any stage"
            if o.in_node
            else "no node was being measured (ComfyUI between nodes; at the end, the report confirming "
            "the prompt is done)"
        )
        lines.append(
            f"- {fmt_s(o.duration_s)} s at {fmt_s(o.start_s)}-{fmt_s(o.end_s)} s, "
            f"after {o.after or 'the start'}, before {o.before or 'the end'}: {where}"
        )
    if short:
        lines.append(
            f"- {fmt_s(sum(o.duration_s for o in short))} s in {len(short)} shorter gap(s) between stages"
        )
    return lines + [""]


def _inference_stats(run: RunRecord, sm: RunSummary) -> list[str]:
    label = activity_label(sm.activity_metric)
    lines = ["### Inference Statistics", ""]
    if sm.num_steps_recorded == 0:
        return lines + ["No denoising steps were recorded in this run.", ""]
    experts = "; ".join(f"{name}: steps {_ranges(steps)}" for name, steps in sm.experts.items()) or NA
    lines += [
        f"- **Steps recorded**: {_steps_cell(sm)} (experts: {experts}; CFG: {', '.join(sm.cfg_modes) or NA})",
        *step_cache_lines(run, num_recorded=sm.num_steps_recorded, reused_total_s=sm.reused_total_s,
                          saved_estimate_s=sm.reuse_saved_estimate_s),
        f"- **First step (warm-up)**: {secs(sm.first_step_s)}",
        f"- **Steady state** (steps after the first): mean {secs(sm.steady_mean_s)}, median "
        f"{secs(sm.steady_median_s)}, p90 {secs(sm.steady_p90_s)}, "
        f"IQR {secs(sm.steady_iqr_s)}",
        f"- **Avg Time per Step** (loading + inference): {secs(sm.s_per_step)}",
        f"- **Step loading**: {fmt_s(sm.loading_total_s)} s in total "
        f"({pcts(sm.loading_share_pct)} of step time)",
        f"- **Avg {label}** (steps): {pcts(sm.step_activity_pct)} "
        f"(max {pcts(sm.step_activity_max_pct)})",
        f"- **Total Inference Load**: {fmt_load(sm.inference_load)}",
        f"- **Throughput**: {with_unit(fmt_tflops(sm.steps_tflops), 'TFLOP/s')}; "
        + (
            f"MFU {pcts(sm.mfu_pct)} of a "
            f"{with_unit(fmt_tflops(sm.peak_tflops), 'TFLOP/s')} peak; "
            f"FLOP floor {secs(sm.steps_floor_s)} for the steps (measured "
            f"{fmt_s(sm.inference_total_s)} s), {secs(sm.total_floor_s)} for the run"
            if sm.peak_tflops is not None
            else f"MFU and FLOP floor n/a (no dense bf16 peak is known for this device); "
            f"steps measured {fmt_s(sm.inference_total_s)} s"
        ),
        "",
    ]
    return lines


def _ranges(steps: list[int]) -> str:
    parts: list[str] = []
    start = prev = steps[0]
    for s in steps[1:] + [None]:  # type: ignore[list-item]
        if s is not None and s == prev + 1:
            prev = s
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if s is not None:
            start = prev = s
    return ", ".join(parts)


def _memory_trace(run: RunRecord) -> list[str]:
    """Per top-level stage: CUDA allocated at start/end, peak, activation (peak - start), NVML max."""
    rows = []
    for stage in run.top_level:
        m = stage.memory
        if stage.cached or m.allocated_peak is None:
            continue
        activation = None if m.allocated_start is None else m.allocated_peak - m.allocated_start
        rows.append(
            [
                stage.name,
                fmt_gb(m.allocated_start),
                fmt_gb(m.allocated_end),
                fmt_gb(m.allocated_peak),
                fmt_gb(activation),
                fmt_gb(m.reserved_peak),
                fmt_gb(m.device_used_max),
            ]
        )
    if not rows:
        return ["CUDA memory per stage: unavailable (no CUDA device was measured).", ""]
    header = [
        "Stage",
        "Start (GB)",
        "End (GB)",
        "Peak (GB)",
        "Activation (GB)",
        "Reserved peak (GB)",
        "Device used (GB)",
    ]
    return _table(header, rows) + [
        "",
        "Activation = peak - start (CUDA allocator); device used is NVML's "
        "maximum over the stage's samples (all processes).",
        "",
    ]


def _memory_telemetry(run: RunRecord, sm: RunSummary) -> list[str]:
    capacity = sm.gpu_memory_bytes

    def on_device(kind: str, what: str) -> str:
        stages = [s for s in run.top_level if s.kind == kind and not s.cached]
        if not stages:
            return f"- **{what}**: not run in this run"
        devices = sorted({s.device for s in stages})
        if all(not d.startswith("cuda") for d in devices):
            return f"- **{what}**: ran on the {', '.join(devices)}; no GPU memory figures"
        peak = sm.t5_peak_bytes if kind == "encode" else sm.vae_peak_bytes
        growth = sm.t5_activation_bytes if kind == "encode" else sm.vae_activation_bytes
        return (
            f"- **{what}**: activation growth {gbs(growth)} (allocator peak minus the allocation at the "
            f"stage's start); allocator peak during the stage {gbs(peak)} (weights and everything else "
            "resident included)"
        )

    if run.system.gpu_name is None and sm.peak_allocated_bytes is None:
        return [
            "### Memory Telemetry",
            "",
            f"- **GPU memory**: not measured (CPU run); peak process RSS {gbs(sm.rss_max_bytes)}",
            "",
        ]
    free_what = {
        "nvml": "capacity minus NVML's device-wide maximum",
        "allocator": "capacity minus the CUDA reserved peak (NVML not available)",
        None: "",
    }[sm.free_source]
    return [
        "### Memory Telemetry",
        "",
        f"- **Resident at the first step** (weights + latents): {gbs(sm.resident_at_first_step_bytes)}",
        f"- **DiT activation peak** (step peak above its start): {gbs(sm.step_activation_peak_bytes)}",
        on_device("encode", "T5 encoding"),
        on_device("decode", "VAE decoding"),
        f"- **Device capacity**: {gbs(capacity)}; free at the peak: {gbs(sm.free_bytes)}"
        + (f" ({free_what})" if free_what and sm.free_bytes is not None else ""),
        "",
    ] + _memory_trace(run)


def _analysis_lines(analysis: RunAnalysis) -> list[str]:
    lines = ["### Bottleneck Analysis", ""]
    lines += [f"- {f.text}" for f in analysis.findings] + [""]
    lines += ["### Recommendations (ranked by estimated gain)", ""]
    if not analysis.recommendations:
        lines += ["None: no measured figure points to a saving.", ""]
    for i, rec in enumerate(analysis.recommendations, 1):
        lines.append(f"{i}. {rec.text} (estimated gain {fmt_s(rec.gain_s)} s)")
    return lines + [""]

