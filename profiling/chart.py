"""Timeline chart (PNG): activity and memory over time with stage bands.

matplotlib is optional: without it `draw_timeline` returns the reason and the report says the
chart was skipped. Only measured series are drawn; a CPU-only run shows CPU % and RSS and says
that the GPU series are unavailable (they are never drawn as zeros).

Stage bands alternate in shade so that neighbouring steps stay apart; stages other than the
steps are labelled in the band; an expert switch is a dashed vertical line. Both y axes start
at 0 and print plain numbers (no offset such as `1e-6+4.3565e-1`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..util.atomic import atomic_output
from .formatting import GB, activity_label
from .records import RunRecord, Sample

_BAND_COLOURS = {
    "init": "#d9d9d9",
    "preprocess": "#f2e6ff",
    "encode": "#ffe9c7",
    "step-loading": "#ffc7c7",
    "step-inference": "#cfe8ff",
    "decode": "#d4f5d4",
}
_BAND_ALPHA = (0.75, 0.4)  # alternating shades of neighbouring bands


@dataclass(frozen=True, kw_only=True)
class ChartResult:
    path: Path | None
    skipped_reason: str | None
    series: tuple[str, ...] = ()
    band_labels: tuple[str, ...] = ()  # stage names written in their bands (non-step stages)
    markers: tuple[float, ...] = ()  # times of the expert-switch lines
    y_offsets: tuple[str, ...] = ()  # axis offset texts as drawn (top, memory): "" = none
    y_bottoms: tuple[float, ...] = ()


def _values(samples: tuple[Sample, ...], attr: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for s in samples:
        v = getattr(s, attr)
        if v is not None:
            xs.append(s.t_s)
            ys.append(v / scale)
    return xs, ys


def plain_text(value: object) -> str:
    """Text drawn as written: matplotlib reads `$...$` as maths, so `$` is escaped; line breaks in
    user text become spaces (the title keeps its own line break)."""
    return " ".join(str(value).splitlines()).replace("$", r"\$")


def draw_timeline(run: RunRecord, path: Path) -> ChartResult:
    """Draw the run's timeline to `path` (written atomically)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return ChartResult(path=None, skipped_reason="matplotlib is not installed (pip install matplotlib)")
    fig, (ax_top, ax_mem) = plt.subplots(2, 1, figsize=(13, 6), sharex=True)
    try:
        labels = _draw_bands(run, ax_top, ax_mem)
        markers = _draw_expert_switches(run, ax_top, ax_mem)
        drawn = _draw_activity(run, ax_top)
        drawn += _draw_memory(run, ax_mem)
        for ax in (ax_top, ax_mem):
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        ax_mem.set_xlabel("time since session start (s)")
        ax_mem.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)
        title = f"{plain_text(run.context.case_name)} on {plain_text(run.system.gpu_name or 'CPU')}"
        if not _values(run.samples, "activity_pct")[0]:
            reason = run.system.activity_unavailable_reason or "no NVML samples"
            title += f"\nGPU series unavailable: {plain_text(reason)}"
        fig.suptitle(title, fontsize=10, usetex=False)
        kinds = list(dict.fromkeys(stage.kind for stage in run.top_level))
        if kinds:
            patches = [Patch(color=_BAND_COLOURS.get(k, "#eeeeee"), alpha=0.6, label=k) for k in kinds]
            fig.legend(handles=patches, loc="lower center", ncol=len(patches), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        offsets = tuple(ax.yaxis.get_major_formatter().get_offset() for ax in (ax_top, ax_mem))
        bottoms = tuple(float(ax.get_ylim()[0]) for ax in (ax_top, ax_mem))
    finally:
        plt.close(fig)
    return ChartResult(
        path=path,
        skipped_reason=None,
        series=tuple(drawn),
        band_labels=tuple(labels),
        markers=tuple(markers),
        y_offsets=offsets,
        y_bottoms=bottoms,
    )


def _draw_bands(run: RunRecord, ax_top: Any, ax_mem: Any) -> list[str]:
    """A band per top-level stage on both axes, in alternating shades; returns the stage names
    written in their band (every stage but the steps)."""
    labels: list[str] = []
    for i, stage in enumerate(s for s in run.top_level if not s.cached):
        colour = _BAND_COLOURS.get(stage.kind, "#eeeeee")
        for ax in (ax_top, ax_mem):
            ax.axvspan(
                stage.start_s,
                max(stage.end_s, stage.start_s + 1e-9),
                color=colour,
                alpha=_BAND_ALPHA[i % 2],
                lw=0,
            )
        if not stage.kind.startswith("step-"):
            labels.append(stage.name)
            ax_top.text(
                0.5 * (stage.start_s + stage.end_s),
                0.98,
                stage.name,
                transform=ax_top.get_xaxis_transform(),
                rotation=90,
                ha="center",
                va="top",
                fontsize=7,
                color="#333333",
                clip_on=True,
            )
    return labels


def _draw_expert_switches(run: RunRecord, ax_top: Any, ax_mem: Any) -> list[float]:
    """A dashed line at each expert switch; returns their times."""
    markers: list[float] = []
    for event in run.events:
        if event.name != "expert_switch":
            continue
        markers.append(event.t_s)
        for ax in (ax_top, ax_mem):
            ax.axvline(event.t_s, color="#aa2222", ls="--", lw=1.0)
        ax_top.text(
            event.t_s,
            0.02,
            f" expert switch -> {event.facts.get('expert', '?')}",
            transform=ax_top.get_xaxis_transform(),
            fontsize=7,
            color="#aa2222",
            va="bottom",
        )
    return markers


def _draw_activity(run: RunRecord, ax_top: Any) -> list[str]:
    """GPU activity (and occupancy) when measured, else the process CPU %; returns the series drawn."""
    samples = run.samples
    act_x, act_y = _values(samples, "activity_pct")
    drawn: list[str] = []
    if act_x:
        label = activity_label(run.system.activity_metric)
        ax_top.step(act_x, act_y, where="pre", color="#1f5fbf", label=f"{label} (%)")
        drawn.append(label)
        occ_x, occ_y = _values(samples, "occupancy_pct")
        if occ_x:
            ax_top.step(occ_x, occ_y, where="pre", color="#7f3fbf", lw=0.8, label="SM occupancy (%)")
            drawn.append("SM occupancy")
        ax_top.set_ylabel("%")
        ax_top.set_ylim(0, 105)
    else:
        cpu_x, cpu_y = _values(samples, "cpu_pct")
        ax_top.step(cpu_x, cpu_y, where="pre", color="#bf5f1f", label="process CPU (% of one core)")
        drawn.append("CPU %")
        ax_top.set_ylabel("CPU %")
        ax_top.set_ylim(bottom=0)
    ax_top.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)
    return drawn


def _draw_memory(run: RunRecord, ax_mem: Any) -> list[str]:
    """Every measured memory series in GB; returns the series drawn."""
    drawn: list[str] = []
    for attr, name, colour in (
        ("cuda_allocated_bytes", "CUDA allocated", "#1f8f3f"),
        ("cuda_reserved_bytes", "CUDA reserved", "#8fbf3f"),
        ("device_used_bytes", "device used (NVML)", "#3f3f3f"),
        ("rss_bytes", "process RSS", "#bf5f1f"),
    ):
        xs, ys = _values(run.samples, attr, GB)
        if xs:
            ax_mem.plot(xs, ys, label=name, color=colour, lw=1.0)
            drawn.append(name)
    ax_mem.set_ylabel("GB")
    ax_mem.set_ylim(bottom=0)
    return drawn
