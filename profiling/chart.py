"""Timeline chart (PNG): activity and memory over time with stage bands.

matplotlib is optional: without it `draw_timeline` returns the reason and the report says the
chart was skipped. Only measured series are drawn; a CPU-only run shows CPU % and RSS and says
that the GPU series are unavailable (they are never drawn as zeros).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .analysis import GB, activity_label
from .records import RunRecord, Sample

_BAND_COLOURS = {
    "init": "#d9d9d9",
    "preprocess": "#f2e6ff",
    "encode": "#ffe9c7",
    "step-loading": "#ffc7c7",
    "step-inference": "#cfe8ff",
    "decode": "#d4f5d4",
}


@dataclass(frozen=True, kw_only=True)
class ChartResult:
    path: Path | None
    skipped_reason: str | None
    series: tuple[str, ...] = ()


def _values(samples: tuple[Sample, ...], attr: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for s in samples:
        v = getattr(s, attr)
        if v is not None:
            xs.append(s.t_s)
            ys.append(v / scale)
    return xs, ys


def draw_timeline(run: RunRecord, path: Path) -> ChartResult:
    """Draw the run's timeline to `path` (written atomically)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return ChartResult(path=None, skipped_reason="matplotlib is not installed (pip install matplotlib)")
    samples = run.samples
    act_x, act_y = _values(samples, "activity_pct")
    gpu_measured = bool(act_x)
    label = activity_label(run.system.activity_metric)
    fig, (ax_top, ax_mem) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    drawn: list[str] = []
    try:
        for stage in run.top_level:
            colour = _BAND_COLOURS.get(stage.kind, "#eeeeee")
            for ax in (ax_top, ax_mem):
                ax.axvspan(
                    stage.start_s, max(stage.end_s, stage.start_s + 1e-9), color=colour, alpha=0.6, lw=0
                )
        if gpu_measured:
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
        ax_top.legend(loc="upper right", fontsize=8)
        for attr, name, colour in (
            ("cuda_allocated_bytes", "CUDA allocated", "#1f8f3f"),
            ("cuda_reserved_bytes", "CUDA reserved", "#8fbf3f"),
            ("device_used_bytes", "device used (NVML)", "#3f3f3f"),
            ("rss_bytes", "process RSS", "#bf5f1f"),
        ):
            xs, ys = _values(samples, attr, GB)
            if xs:
                ax_mem.plot(xs, ys, label=name, color=colour, lw=1.0)
                drawn.append(name)
        ax_mem.set_ylabel("GB")
        ax_mem.set_xlabel("time since session start (s)")
        ax_mem.legend(loc="upper right", fontsize=8)
        title = f"{run.context.case_name} on {run.system.gpu_name or 'CPU'}"
        if not gpu_measured:
            reason = run.system.activity_unavailable_reason or "no NVML samples"
            title += f"\nGPU series unavailable: {reason}"
        fig.suptitle(title, fontsize=10)
        kinds = list(dict.fromkeys(stage.kind for stage in run.top_level))
        if kinds:
            patches = [Patch(color=_BAND_COLOURS.get(k, "#eeeeee"), alpha=0.6, label=k) for k in kinds]
            fig.legend(handles=patches, loc="lower center", ncol=len(patches), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        tmp = path.with_name(path.name + ".tmp")
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return ChartResult(path=path, skipped_reason=None, series=tuple(drawn))
