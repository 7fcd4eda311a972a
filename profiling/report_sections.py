"""Report sections about what the figures rest on: unmeasured figures with their reasons, and the
memory planner's estimates next to the measured peaks.

Pure functions from a `RunRecord` to Markdown lines; `report.py` places them in each case section.

- `unmeasured_lines`: stages whose activity or CPU % reads `n/a`, grouped by reason (a stage too
  short for the activity readings around it, an interval too short to measure CPU time, a CPU
  reading above what the logical cores allow).
- `memory_plan_lines`: the planner's decisions (events `memory_plan`) and, per stage that carries
  an estimate (fact `memory_estimate_bytes`), the estimate beside the measured peak: the CUDA
  allocator peak for a stage on the GPU, the process RSS maximum for a stage on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

from .assembly import ACTIVITY_REASON_FACT, CPU_REASON_FACT
from .formatting import fmt_gb
from .records import EventRecord, RunRecord, StageRecord

ESTIMATE_FACT = "memory_estimate_bytes"
ESTIMATE_DEVICE_FACT = "memory_estimate_device"
PLAN_EVENT = "memory_plan"
MAX_NAMES = 6


def _names(stages: Sequence[StageRecord]) -> str:
    names = [s.name for s in stages[:MAX_NAMES]]
    more = len(stages) - len(names)
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def unmeasured_lines(run: RunRecord) -> list[str]:
    """One line per kind of unmeasured figure: how many stages, an example reason, which stages."""
    lines = []
    for fact, what in ((ACTIVITY_REASON_FACT, "activity"), (CPU_REASON_FACT, "CPU %")):
        stages = [s for s in run.stages if isinstance(s.facts.get(fact), str)]
        if stages:
            lines.append(f"- Unmeasured {what} (`n/a`) in {len(stages)} stage(s), e.g. {stages[0].name}: "
                         f"{stages[0].facts[fact]} ({_names(stages)})")
    return lines


def _plan_line(event: EventRecord) -> str:
    f = event.facts
    hidden = ("what", "estimate_bytes", "free_bytes", "margin_bytes", "free_source")
    parts = [f"{k} {v}" for k, v in f.items() if k not in hidden]
    if f.get("checked") is False and f.get("free_source"):
        parts.append(f"not checked: {f['free_source']}")
    budget = (f"estimate {fmt_gb(_int(f.get('estimate_bytes')))} GB, free {fmt_gb(_int(f.get('free_bytes')))} GB, "
              f"margin {fmt_gb(_int(f.get('margin_bytes')))} GB")
    return f"- {f.get('what', 'plan')}: {'; '.join(parts)} ({budget})"


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _measured(stage: StageRecord, device: str) -> tuple[int | None, str]:
    if device.startswith("cuda"):
        return stage.memory.allocated_peak, "CUDA allocator peak"
    return stage.rss_max_bytes, "process RSS max"


def _rows(stages: Sequence[StageRecord]) -> list[tuple[str, list[StageRecord]]]:
    """One row per stage, the denoising steps together (their estimate is one; the row shows the
    largest measured peak among them)."""
    steps = [s for s in stages if s.kind == "step-inference"]
    rows: list[tuple[str, list[StageRecord]]] = []
    for s in stages:
        if s.kind != "step-inference":
            rows.append((s.name, [s]))
        elif s is steps[0]:
            rows.append((f"{s.name} .. {steps[-1].name} ({len(steps)} steps)" if len(steps) > 1 else s.name,
                         steps))
    return rows


def memory_plan_lines(run: RunRecord) -> list[str]:
    """The memory plan section (empty when the run carries no plan and no estimate)."""
    plans = [e for e in run.events if e.name == PLAN_EVENT]
    stages = [s for s in run.stages if _int(s.facts.get(ESTIMATE_FACT)) is not None and not s.cached]
    if not plans and not stages:
        return []
    lines = ["### Memory Plan", ""]
    lines += [_plan_line(e) for e in plans]
    if stages:
        lines += ["", "| Stage | Device | Estimated peak (GB) | Measured peak (GB) | Measured as |",
                  "| :--- | :--- | :--- | :--- | :--- |"]
        for label, group in _rows(stages):
            device = str(group[0].facts.get(ESTIMATE_DEVICE_FACT) or group[0].device)
            measured = [m for m in (_measured(s, device)[0] for s in group) if m is not None]
            estimate = max(_int(s.facts.get(ESTIMATE_FACT)) or 0 for s in group)
            lines.append(f"| {label} | {device} | {fmt_gb(estimate)} | "
                         f"{fmt_gb(max(measured) if measured else None)} | {_measured(group[0], device)[1]} |")
        lines += ["", "The estimate counts the bytes the job holds at the stage's peak (weights resident on "
                  "the device plus the working set); the process RSS also holds the Python runtime and "
                  "libraries, so on the CPU it reads higher by that base."]
    return lines + [""]
