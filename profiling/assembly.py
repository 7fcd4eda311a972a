"""Assembly: what a session measured, turned into records.

The session keeps a `StageFrame` per open stage (where it started, the allocator and host
readings then, the peaks seen inside it) and a list of samples. This module makes the records of
them, as pure functions:

- `stage_record`: one finished stage: wall time, CUDA memory at start, end and peak, NVML device
  use and activity over the stage's samples, CPU % and RSS, FLOPs, expert and CFG mode. A stage
  that states `device=` (T5 on the CPU while the DiT runs on the GPU) is recorded on that device
  and carries no CUDA memory and no GPU activity; `cached_record` is a stage served from a cache.
- `join_split_stages`: consecutive top-level stages with the same name are one stage split across
  calls (ComfyUI runs each loader as its own node, and each records a `Model_Initialization`
  piece); they become one stage from the first piece's start to the last one's end, keeping every
  piece's children.
- `outside_intervals`: the time no top-level stage covers, each interval with the stages around
  it and whether profiled code was running (`ProfileSession.activate()`), so the report shows it
  instead of hiding it in a sum.
- `outermost_flops`: the run's FLOPs, counting no stage inside one that already states its FLOPs.
- `attribute_activity`: a stage's activity from every reading of the run that overlaps it (the
  reading after a stage's end covers its tail), with the reason when the stage is too short.
- `assemble_run`: the `RunRecord` of a closed session.

Unmeasured figures keep their reason in the stage's facts: `activity_unmeasured` (a stage too short
for the activity readings around it) and `cpu_unmeasured` (an interval too short for CPU time, or
a reading above the cores' maximum).
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .memory import AllocatorSnapshot, HostReading
from .records import (
    EventRecord,
    FactValue,
    MemoryFigures,
    OutsideInterval,
    RunContext,
    RunRecord,
    Sample,
    SamplerGap,
    StageRecord,
    SystemInfo,
)
from .stats import max_known, stage_activity, time_weighted_mean
from .telemetry import cpu_figure
from .timers import utc_now_iso

_STEP_RE = re.compile(r"^Step_(\d+)_")
ACTIVITY_REASON_FACT = "activity_unmeasured"
CPU_REASON_FACT = "cpu_unmeasured"
JOINED_CPU_COVERAGE = 0.9  # share of a joined stage's pieces that must have a CPU figure


@dataclass
class StageFrame:
    """A stage while it is open: what the session read when it began, and the peaks seen since."""

    index: int
    name: str
    kind: str
    parent: int | None
    depth: int
    start: float
    facts: dict[str, Any]
    alloc_start: AllocatorSnapshot | None
    host_start: HostReading
    used_start: int | None
    mark: int | None = None  # the telemetry mark at the stage's opening sample
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# -------------------------------------------------------------------------------------------- stages
def stage_record(
    frame: StageFrame,
    *,
    end: float,
    snap: AllocatorSnapshot | None,
    host: HostReading,
    used_end: int | None,
    facts: dict[str, FactValue],
    window: Sequence[Sample],
    session_device: str,
    max_cpu_pct: float | None = None,
) -> StageRecord:
    """The record of a finished stage. `window`: the samples from the stage's opening one onwards;
    `facts` loses the entries that become fields (device, flops, expert, cfg_mode, step).
    `max_cpu_pct`: 100 x the logical cores (a CPU figure above it is refused), None if unknown."""
    device = stage_device(facts.pop("device", None), session_device)
    on_session_device = device == session_device
    activity = stage_activity(window if on_session_device else (), frame.start, end)
    cpu, cpu_reason = cpu_figure(frame.host_start, host, end - frame.start, max_pct=max_cpu_pct)
    if cpu_reason is not None:
        facts[CPU_REASON_FACT] = cpu_reason
    rss = [s.rss_bytes for s in window if s.rss_bytes is not None]
    flops = facts.pop("flops", None)
    if flops is not None and (isinstance(flops, bool) or not isinstance(flops, (int, float)) or flops < 0):
        raise ValueError(f"stage {frame.name!r}: fact flops must be a number >= 0; got {flops!r}")
    expert, cfg_mode = facts.pop("expert", None), facts.pop("cfg_mode", None)
    return StageRecord(
        index=frame.index,
        name=frame.name,
        kind=frame.kind,
        parent=frame.parent,
        depth=frame.depth,
        start_s=frame.start,
        end_s=end,
        device=device,
        step=step_of(frame.name, facts),
        expert=None if expert is None else str(expert),
        cfg_mode=None if cfg_mode is None else str(cfg_mode),
        flops=None if flops is None else float(flops),
        facts=facts,
        # a stage on another device (T5 on the CPU): the GPU's figures are not its own
        memory=_stage_memory(frame, snap, used_end, window) if on_session_device else MemoryFigures(),
        activity_mean_pct=activity.mean_pct,
        activity_max_pct=activity.max_pct,
        occupancy_mean_pct=activity.occupancy_mean_pct,
        num_samples=activity.num_samples,
        cpu_pct=cpu,
        rss_end_bytes=host.rss_bytes,
        rss_max_bytes=max(rss) if rss else host.rss_bytes,
    )


def _stage_memory(
    frame: StageFrame, snap: AllocatorSnapshot | None, used_end: int | None, window: Sequence[Sample]
) -> MemoryFigures:
    start = frame.alloc_start
    used = [s.device_used_bytes for s in window if s.device_used_bytes is not None]
    return MemoryFigures(
        allocated_start=None if start is None else start.allocated,
        allocated_end=None if snap is None else snap.allocated,
        allocated_peak=frame.peak_allocated,
        reserved_start=None if start is None else start.reserved,
        reserved_end=None if snap is None else snap.reserved,
        reserved_peak=frame.peak_reserved,
        device_used_start=frame.used_start,
        device_used_end=used_end,
        device_used_max=max(used) if used else None,
    )


def cached_record(
    name: str, kind: str, facts: dict[str, Any], *, index: int, parent: StageFrame | None, t: float, session_device: str
) -> StageRecord:
    """A stage that did not run now because its result came from a cache: no time, no figures."""
    return StageRecord(
        index=index,
        name=name,
        kind=kind,
        parent=None if parent is None else parent.index,
        depth=0 if parent is None else parent.depth + 1,
        start_s=t,
        end_s=t,
        cached=True,
        device=stage_device(facts.pop("device", None), session_device),
        step=step_of(name, facts),
        facts=clean_facts(facts),
    )


def attribute_activity(stage: StageRecord, samples: Sequence[Sample], session_device: str) -> StageRecord:
    """`stage` with its activity figures from all of the run's readings that overlap it.

    A stage on another device than the session's, or served from a cache, has none. When the
    readings describe mostly other time the figures are None and the fact `activity_unmeasured`
    says why.
    """
    facts = {k: v for k, v in stage.facts.items() if k != ACTIVITY_REASON_FACT}
    if stage.cached or stage.device != session_device:
        return dataclasses.replace(stage, facts=facts)
    activity = stage_activity(samples, stage.start_s, stage.end_s)
    if activity.unmeasured_reason is not None:
        facts[ACTIVITY_REASON_FACT] = activity.unmeasured_reason
    return dataclasses.replace(
        stage,
        facts=facts,
        activity_mean_pct=activity.mean_pct,
        activity_max_pct=activity.max_pct,
        occupancy_mean_pct=activity.occupancy_mean_pct,
        num_samples=activity.num_samples,
    )


def stage_device(stated: Any, session_device: str) -> str:
    """The device a stage ran on: what it states (`device=` fact), else the session's device.

    "cuda" without an index means the session's CUDA device when the session measures one.
    """
    if stated is None:
        return session_device
    text = str(stated)
    if text == "cuda" and session_device.startswith("cuda"):
        return session_device
    return text


def step_of(name: str, facts: dict[str, Any]) -> int | None:
    """The step index: the `step` fact (removed from `facts`), else the number in `Step_<i>_...`."""
    step = facts.pop("step", None)
    if step is not None:
        return int(step)
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


def clean_facts(facts: dict[str, Any]) -> dict[str, FactValue]:
    """JSON-ready facts: primitives stay, dtypes/devices and other objects become their str()."""
    out: dict[str, FactValue] = {}
    for key, value in facts.items():
        if isinstance(value, torch.dtype):
            out[str(key)] = dtype_name(value)
        else:
            out[str(key)] = value if value is None or isinstance(value, (str, int, float, bool)) else str(value)
    return out


def dtype_name(dtype: torch.dtype) -> str:
    """ "float32", not "torch.float32": the report prints dtypes by their bare names."""
    return str(dtype).removeprefix("torch.")


# -------------------------------------------------------------------------------------------- the run
def assemble_run(
    *,
    status: str,
    system: SystemInfo,
    context: RunContext,
    total: StageRecord,
    stages: Sequence[StageRecord],
    samples: Sequence[Sample],
    events: Sequence[EventRecord],
    sample_interval_s: float | None,
    sample_interval_effective_s: float | None,
    notes: Sequence[str],
    activations: Sequence[tuple[float, float]],
    sampler_gaps: Sequence[SamplerGap] = (),
) -> RunRecord:
    """The record of a closed session: stages in order with split ones joined, the time outside
    them, and every stage's activity from all of the run's readings."""
    samples = list(samples)
    joined = join_split_stages(sorted(stages, key=lambda st: st.index), samples, system.device)
    joined = [attribute_activity(s, samples, system.device) for s in joined]
    total = attribute_activity(total, samples, system.device)
    return RunRecord(
        run_id=uuid.uuid4().hex,
        created_utc=utc_now_iso(),
        status=status,
        system=system,
        context=context,
        total=total,
        stages=tuple(joined),
        outside=outside_intervals(joined, total.end_s, activations),
        events=tuple(events),
        samples=tuple(samples),
        sample_interval_s=sample_interval_s,
        sample_interval_effective_s=sample_interval_effective_s,
        notes=tuple(notes),
        sampler_gaps=tuple(sampler_gaps),
    )


def join_split_stages(
    stages: list[StageRecord], samples: list[Sample], session_device: str
) -> list[StageRecord]:
    """Join consecutive top-level stages of the same name (one stage split across node calls).

    The joined stage runs from the first piece's start to the last piece's end (time between the
    pieces belongs to it: no other stage ran there); its children are every piece's children.
    Indices are renumbered in order and parents remapped.
    """
    top = [s for s in stages if s.parent is None]
    top.sort(key=lambda s: (s.start_s, s.index))
    groups: list[list[StageRecord]] = []
    for s in top:
        last = groups[-1][-1] if groups else None
        if (
            last is not None
            and last.name == s.name
            and last.kind == s.kind
            and last.device == s.device
            and not last.cached
            and not s.cached
        ):
            groups[-1].append(s)
        else:
            groups.append([s])
    if all(len(g) == 1 for g in groups):
        return stages
    replace: dict[int, StageRecord] = {}
    alias: dict[int, int] = {}
    for group in groups:
        if len(group) == 1:
            continue
        joined = _joined(group, samples if group[0].device == session_device else [])
        replace[group[0].index] = joined
        for piece in group[1:]:
            alias[piece.index] = group[0].index
    kept = [replace.get(s.index, s) for s in stages if s.index not in alias]
    new_index = {s.index: i for i, s in enumerate(kept)}
    out = []
    for s in kept:
        parent = None if s.parent is None else new_index[alias.get(s.parent, s.parent)]
        out.append(dataclasses.replace(s, index=new_index[s.index], parent=parent))
    return out


def _joined(pieces: list[StageRecord], samples: list[Sample]) -> StageRecord:
    first, last = pieces[0], pieces[-1]
    activity = stage_activity(samples, first.start_s, last.end_s)  # no samples: another device
    # CPU %: the pieces' time-weighted mean when the measured pieces cover nearly all of their time
    # (a piece too short to measure CPU time leaves a little out); else unmeasured
    piece_s = sum(p.duration_s for p in pieces)
    measured_s = sum(p.duration_s for p in pieces if p.cpu_pct is not None)
    cpu = None
    if piece_s > 0 and measured_s >= JOINED_CPU_COVERAGE * piece_s:
        cpu = time_weighted_mean((p.cpu_pct, p.duration_s) for p in pieces)
    flops = [p.flops for p in pieces if p.flops is not None]
    m = [p.memory for p in pieces]
    facts: dict[str, FactValue] = {}
    for p in pieces:
        facts.update(p.facts)
    facts.pop("component", None)  # each piece's component is named by its child stage
    if cpu is not None:
        facts.pop(CPU_REASON_FACT, None)
    facts["pieces"] = len(pieces)
    return dataclasses.replace(
        first,
        end_s=last.end_s,
        flops=sum(flops) if flops else None,
        facts=facts,
        memory=MemoryFigures(
            allocated_start=m[0].allocated_start,
            allocated_end=m[-1].allocated_end,
            allocated_peak=max_known(x.allocated_peak for x in m),
            reserved_start=m[0].reserved_start,
            reserved_end=m[-1].reserved_end,
            reserved_peak=max_known(x.reserved_peak for x in m),
            device_used_start=m[0].device_used_start,
            device_used_end=m[-1].device_used_end,
            device_used_max=max_known(x.device_used_max for x in m),
        ),
        activity_mean_pct=activity.mean_pct,
        activity_max_pct=activity.max_pct,
        occupancy_mean_pct=activity.occupancy_mean_pct,
        num_samples=activity.num_samples,
        cpu_pct=cpu,
        rss_end_bytes=last.rss_end_bytes,
        rss_max_bytes=max_known(p.rss_max_bytes for p in pieces),
    )


def outside_intervals(
    stages: Sequence[StageRecord], total_end: float, activations: Sequence[tuple[float, float]]
) -> tuple[OutsideInterval, ...]:
    """The parts of [0, total_end] that no top-level stage covers, in time order."""
    top = sorted((s for s in stages if s.parent is None and not s.cached), key=lambda s: s.start_s)
    out: list[OutsideInterval] = []
    cursor, previous = 0.0, None
    for s in [*top, None]:
        start = total_end if s is None else s.start_s
        if start > cursor:
            # split where profiled code starts or stops, so each piece says where it went
            cuts = sorted({cursor, start} | {t for a, b in activations for t in (a, b) if cursor < t < start})
            for lo, hi in zip(cuts, cuts[1:], strict=False):
                mid = 0.5 * (lo + hi)
                in_node = any(a <= mid <= b for a, b in activations)
                if out and out[-1].end_s == lo and out[-1].in_node == in_node:
                    lo = out.pop().start_s
                out.append(
                    OutsideInterval(
                        start_s=lo,
                        end_s=hi,
                        after=previous,
                        before=None if s is None else s.name,
                        in_node=in_node,
                    )
                )
        if s is not None and s.end_s > cursor:
            cursor, previous = s.end_s, s.name
    return tuple(out)


def outermost_flops(stages: Sequence[StageRecord]) -> float | None:
    """FLOPs of the run: stages that state FLOPs, not counting those inside one that already does."""
    by_index = {s.index: s for s in stages}
    total, found = 0.0, False
    for s in stages:
        if s.flops is None or s.cached:
            continue
        parent = s.parent
        while parent is not None and by_index[parent].flops is None:
            parent = by_index[parent].parent
        if parent is None:
            total, found = total + s.flops, True
    return total if found else None
