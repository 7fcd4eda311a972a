"""The raw records a profiling session produces, and their JSON form.

Everything here is a frozen dataclass of measured figures. A figure that was not measured is
`None` (rendered `n/a`), never 0. Units are SI: seconds, bytes, percent (0-100), FLOPs.

Schema: `docs/report_schema.md` (version `SCHEMA_VERSION`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = "wanbench.profile/1"
REPORT_SCHEMA_VERSION = "wanbench.report/1"

# Where SM activity comes from: NVML GPU performance metrics, NVML utilization, or nothing.
ACTIVITY_SM = "sm_activity"
ACTIVITY_BUSY = "gpu_busy"
ACTIVITY_METRICS = (ACTIVITY_SM, ACTIVITY_BUSY)
TOTAL_STAGE = "Total_Execution"

FactValue = str | int | float | bool | None


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One telemetry sample. Activity covers the interval since the previous sample."""

    t_s: float  # seconds since the session opened
    activity_pct: float | None = None  # covers (activity_since_s, t_s]
    occupancy_pct: float | None = None
    device_used_bytes: int | None = None  # NVML: memory used on the whole device
    cuda_allocated_bytes: int | None = None
    cuda_reserved_bytes: int | None = None
    cpu_pct: float | None = None  # process CPU time / wall time since the previous sample (100 = 1 core)
    rss_bytes: int | None = None
    # Start of the interval the activity reading covers: the previous activity reading (taken by
    # the sampler thread), not the previous sample of any kind. None in files written before it
    # was recorded (then the previous sample's time is used).
    activity_since_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class SamplerGap:
    """Time the sampler thread did not sample although it should have (starved under load).

    `expected_s` is the interval it was set to; the activity reading that ended the gap covers all
    of it, so stages inside a gap get that average (or `n/a` when they are too short for it).
    """

    start_s: float
    end_s: float
    expected_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True, kw_only=True)
class MemoryFigures:
    """Device memory of one stage: CUDA caching allocator (start/end/peak) and NVML device use."""

    allocated_start: int | None = None
    allocated_end: int | None = None
    allocated_peak: int | None = None
    reserved_start: int | None = None
    reserved_end: int | None = None
    reserved_peak: int | None = None
    device_used_start: int | None = None
    device_used_end: int | None = None
    device_used_max: int | None = None


@dataclass(frozen=True, kw_only=True)
class StageRecord:
    """One measured (or cache-served) stage.

    `parent` is the index of the enclosing stage (None for top-level stages); only top-level
    stages count toward the sum that is compared with `Total_Execution`.
    """

    index: int
    name: str
    kind: str
    parent: int | None
    depth: int
    start_s: float
    end_s: float
    cached: bool = False
    device: str = "cpu"
    step: int | None = None
    expert: str | None = None
    cfg_mode: str | None = None
    flops: float | None = None
    facts: dict[str, FactValue] = field(default_factory=dict)
    memory: MemoryFigures = field(default_factory=MemoryFigures)
    activity_mean_pct: float | None = None
    activity_max_pct: float | None = None
    occupancy_mean_pct: float | None = None
    num_samples: int = 0
    cpu_pct: float | None = None
    rss_end_bytes: int | None = None
    rss_max_bytes: int | None = None

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True, kw_only=True)
class SystemInfo:
    """What the run ran on."""

    device: str  # "cuda:0" or "cpu"
    gpu_name: str | None = None
    gpu_memory_bytes: int | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    torch_version: str | None = None
    activity_metric: str | None = None  # ACTIVITY_SM, ACTIVITY_BUSY or None
    activity_unavailable_reason: str | None = None
    cpu_name: str | None = None
    host_memory_bytes: int | None = None
    cpu_logical_cores: int | None = None  # CPU % can reach at most 100 x this


@dataclass(frozen=True, kw_only=True)
class RunContext:
    """Case-level facts a run is labelled with (set by the nodes / CLI via `set_context`)."""

    case_name: str
    task: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    steps: int | None = None
    placement: str | None = None  # "none" | "model" | "blocks"
    dit_dtype: str | None = None
    t5_dtype: str | None = None
    vae_dtype: str | None = None
    attention_backend: str | None = None
    compile: bool | None = None
    weight_dtype: str | None = None  # how the DiT's block matrices are stored (fp8, GGUF, ...)
    tf32: bool | None = None
    cfg_mode: str | None = None
    solver: str | None = None
    seed: int | None = None
    loras: tuple[str, ...] | None = None  # one line per LoRA: file, strength per expert, layout, matched keys
    step_cache: str | None = None  # the step-cache settings of the sampler (None: no cache)
    # One rank of a parallel run (`ranks.label_ranks` fills these from the rank's plan event):
    rank: int | None = None
    world_size: int | None = None
    parallel: str | None = None  # the plan, e.g. "cfg 2 x ulysses 2, sharded weights"
    run_group: str | None = None  # the same id on every rank of one run

    @property
    def offload(self) -> bool | None:
        """Whether weights move between host and device during the run (placement other than none)."""
        return None if self.placement is None else self.placement != "none"

    @property
    def resolution(self) -> str | None:
        return None if self.width is None or self.height is None else f"{self.width}*{self.height}"


CONTEXT_FIELDS = tuple(f.name for f in dataclasses.fields(RunContext))


@dataclass(frozen=True, kw_only=True)
class EventRecord:
    t_s: float
    name: str
    facts: dict[str, FactValue] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class OutsideInterval:
    """Time of the run that no top-level stage covers, with where it happened.

    `after` / `before` name the top-level stages around it (None at the run's start or end);
    `in_node` is True when the session was activated (a profiled node or the profiled block was
    running its own code outside any stage), False when no profiled code ran (ComfyUI moving
    between nodes, or the report confirming that the prompt is done).
    """

    start_s: float
    end_s: float
    after: str | None
    before: str | None
    in_node: bool

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """Everything one session measured. `total` is `Total_Execution`, timed from open to close."""

    schema: str = SCHEMA_VERSION
    created_utc: str
    status: str  # "completed" or "failed: <error type>"
    system: SystemInfo
    context: RunContext
    total: StageRecord
    stages: tuple[StageRecord, ...]
    samples: tuple[Sample, ...]
    events: tuple[EventRecord, ...] = ()
    sample_interval_s: float | None = None  # as requested
    sample_interval_effective_s: float | None = None  # at the end: doubled each time the buffer halved
    notes: tuple[str, ...] = ()
    outside: tuple[OutsideInterval, ...] = ()  # the time no top-level stage covers, as recorded
    run_id: str | None = None  # unique per session; merging the same run twice keeps it once
    sampler_gaps: tuple[SamplerGap, ...] = ()  # the sampler thread's late readings, in time order

    @property
    def top_level(self) -> tuple[StageRecord, ...]:
        return tuple(s for s in self.stages if s.parent is None)


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------
def run_to_dict(run: RunRecord) -> dict[str, Any]:
    """A JSON-ready dict (every raw figure and sample)."""
    data = dataclasses.asdict(run)
    data["stages"] = list(data["stages"])
    data["samples"] = list(data["samples"])
    data["events"] = list(data["events"])
    data["notes"] = list(data["notes"])
    data["outside"] = list(data["outside"])
    data["sampler_gaps"] = list(data["sampler_gaps"])
    return data


def _build(cls: type, data: dict[str, Any], what: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(
            f"{what}: unknown fields {sorted(unknown)}; expected a subset of {sorted(names)} "
            f"(schema {SCHEMA_VERSION})"
        )
    return cls(**data)


def _stage_from_dict(data: dict[str, Any]) -> StageRecord:
    d = dict(data)
    d["memory"] = _build(MemoryFigures, d.get("memory", {}), "stage.memory")
    d["facts"] = dict(d.get("facts", {}))
    return _build(StageRecord, d, f"stage {data.get('name')!r}")


def run_from_dict(data: dict[str, Any]) -> RunRecord:
    """Inverse of `run_to_dict`; raises ValueError on another schema version or unknown fields."""
    schema = data.get("schema")
    if schema != SCHEMA_VERSION:
        raise ValueError(
            f"run record schema is {schema!r}; expected {SCHEMA_VERSION!r} "
            "(re-run the benchmark with this version of wanbench)"
        )
    d = {k: v for k, v in data.items() if k not in ("summary", "analysis")}
    d["system"] = _build(SystemInfo, d["system"], "system")
    context = dict(d["context"])
    if context.get("loras") is not None:
        context["loras"] = tuple(context["loras"])
    d["context"] = _build(RunContext, context, "context")
    d["total"] = _stage_from_dict(d["total"])
    d["stages"] = tuple(_stage_from_dict(s) for s in d["stages"])
    d["samples"] = tuple(_build(Sample, s, "sample") for s in d["samples"])
    d["events"] = tuple(_build(EventRecord, e, "event") for e in d.get("events", ()))
    d["notes"] = tuple(d.get("notes", ()))
    d["outside"] = tuple(_build(OutsideInterval, o, "outside interval") for o in d.get("outside", ()))
    d["sampler_gaps"] = tuple(_build(SamplerGap, g, "sampler gap") for g in d.get("sampler_gaps", ()))
    return _build(RunRecord, d, "run")
