"""`ProfileSession`: the lifetime of one profiled run, and the tracer that records its stages.

Usage in one process call:

    with ProfileSession(case_name="01_ti2v_720p") as session:
        session.set_context(task="ti2v-5B", width=1280, height=704, frames=121, steps=30)
        run_pipeline()            # wan_core's `trace.stage(...)` calls are recorded
    write_report(session, "out/", basename="01_ti2v_720p")

Across ComfyUI nodes (one node opens, each node activates it for its call, the report node
closes): `session.open()`, then `with session.activate(): ...` per node, then `session.close()`.

Nesting: a stage opened inside another is kept as its child (`parent`, `depth`); only top-level
stages are compared with `Total_Execution`, which the session times itself from open to close.
Peak memory is reset at each stage boundary; the peak seen by a child is folded into its parents.

The session does the bookkeeping of a run and leaves each job to its module: the samples and the
sampler thread to `telemetry`, the records (joined split stages, time outside stages, totals) to
`assembly`, the device probe, NVML monitor and machine facts to `system`. The time each
`activate()` call covered is kept so that `assembly` can say where the time outside stages went.

The sampler thread holds only a weak reference to the session: a session dropped without
`close()` is collected as usual and its thread stops.

Measuring never changes the run: every probe read goes through `Telemetry`, which turns a failing
NVML, allocator or host read into an unmeasured figure and a note (the device synchronisation at
stage boundaries is the run's own work and is not guarded).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import Any

import torch

from ..wan_core.trace import STAGE_KINDS, use_tracer
from .assembly import (
    StageFrame,
    assemble_run,
    cached_record,
    clean_facts,
    dtype_name,
    outermost_flops,
    stage_record,
)
from .memory import AllocatorSnapshot, DeviceProbe, HostProbe, HostReading, ProcessProbe
from .nvml import GpuMonitor
from .records import CONTEXT_FIELDS, TOTAL_STAGE, EventRecord, FactValue, RunContext, RunRecord, Sample, StageRecord
from .sampler_thread import SamplerThread
from .system import default_device, monitor_for, system_info
from .system import logical_cores as machine_logical_cores
from .telemetry import Telemetry
from .timers import Clock, MonotonicClock

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")
_INT_CONTEXT = ("width", "height", "frames", "steps", "seed")
DEFAULT_MAX_SAMPLES = 2048  # 3.4 min at 0.1 s before the first halving; about 0.5 MB of report JSON
MIN_MAX_SAMPLES = 4  # the first and last samples are kept as they are; at least one pair merges


class ProfileSession:
    """Installs itself as the wan_core tracer and records stages, samples and events.

    Args:
        case_name: the case label used in the report.
        device: the device to measure; default CUDA when available, else CPU.
        sample_interval_s: background sampling period; None samples only at stage boundaries.
        max_samples: the most samples kept; when full, samples merge in pairs and the interval doubles.
        clock, gpu, device_probe, host: replace the real probes (tests pass fakes).
        logical_cores: the machine's logical CPU count (CPU % is refused above 100 x this); default:
            read from the machine (tests scripting another machine pass its count).
    """

    def __init__(
        self,
        *,
        case_name: str,
        device: str | torch.device | None = None,
        sample_interval_s: float | None = 0.1,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        clock: Clock | None = None,
        gpu: GpuMonitor | None = None,
        device_probe: DeviceProbe | None = None,
        host: HostProbe | None = None,
        logical_cores: int | None = None,
    ) -> None:
        if not case_name or not case_name.strip():
            raise ValueError("case_name must be a non-empty label (e.g. '01_ti2v_720p')")
        if sample_interval_s is not None and not sample_interval_s > 0:
            raise ValueError(f"sample_interval_s must be > 0 or None; got {sample_interval_s}")
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < MIN_MAX_SAMPLES:
            raise ValueError(f"max_samples must be an int >= {MIN_MAX_SAMPLES} (e.g. 2048); got {max_samples!r}")
        self.case_name = case_name
        self.sample_interval_s = sample_interval_s
        self.max_samples = max_samples
        self._clock = clock or MonotonicClock()
        self._device = device_probe or default_device(device)
        self._logical_cores = logical_cores if logical_cores is not None else machine_logical_cores()
        self._telemetry = Telemetry(
            device=self._device,
            host=host or ProcessProbe(),
            gpu=gpu,
            max_samples=max_samples,
            interval_s=sample_interval_s,
            logical_cores=self._logical_cores,
        )
        self._owns_gpu = False
        self._gpu_reason: str | None = None
        self._context: dict[str, Any] = {}
        self._lock = threading.RLock()
        self._stack: list[StageFrame] = []
        self._detached: list[StageFrame] = []  # stages opened with open_stage(), closed in any order
        self._next_index = 0
        self._stages: list[StageRecord] = []
        self._events: list[EventRecord] = []
        self._notes: list[str] = []
        self._t0: float | None = None
        self._session_peak: tuple[int | None, int | None] = (None, None)
        self._tracer_scope: AbstractContextManager[None] | None = None
        self._host_start: HostReading | None = None
        self._alloc_start: AllocatorSnapshot | None = None
        self._used_start: int | None = None
        self._active_since: list[float] = []  # open activate() calls (start times)
        self._activations: list[tuple[float, float]] = []  # closed ones (start, end), session time
        self.record: RunRecord | None = None

    # ---------------------------------------------------------------- lifecycle
    @property
    def is_open(self) -> bool:
        return self._t0 is not None and self.record is None

    def open(self) -> ProfileSession:
        """Start the session: Total_Execution begins now, the sampler thread starts."""
        if self._t0 is not None:
            raise RuntimeError(
                f"profile session {self.case_name!r} was already opened; make a new one per run"
            )
        if self._telemetry.gpu is None:
            result = monitor_for(self._device)
            self._telemetry.gpu, self._gpu_reason = result.monitor, result.reason
            self._owns_gpu = result.monitor is not None
        self._device.synchronize()
        self._t0 = self._clock.now()
        self._alloc_start = self._telemetry.allocator(0.0)
        self._telemetry.reset_peak(0.0)
        self._host_start = self._telemetry.host_reading(0.0)
        first = self._take_sample()
        self._used_start = first.device_used_bytes
        self._telemetry.start(self._take_thread_sample, self._clock)
        return self

    def close(self, *, error: BaseException | None = None) -> RunRecord:
        """End Total_Execution, stop sampling and freeze the records (also returned as `.record`)."""
        if not self.is_open:
            raise RuntimeError(
                f"profile session {self.case_name!r} is not open (open() it first; close once)"
            )
        note = self._telemetry.stop()
        if note:
            self._notes.append(note)
        while self._stack:
            frame = self._stack[-1]
            self._notes.append(f"stage {frame.name!r} was still open when the session closed")
            self._finish(frame, unfinished=True)
        for frame in list(self._detached):
            self._notes.append(f"stage {frame.name!r} was still open when the session closed")
            self.close_stage(frame, unfinished=True)
        self._device.synchronize()
        end = self._clock.now()
        self._final_activity_reading(end - self._t0)
        last = self._take_sample()
        total = self._total_record(end, last)
        while self._active_since:
            self._activations.append((self._active_since.pop(), total.end_s))
        gpu = self._telemetry.gpu
        if self._owns_gpu:
            self._telemetry.close_gpu(total.end_s)
        telemetry = self._telemetry
        self.record = assemble_run(
            status="completed" if error is None else f"failed: {type(error).__name__}",
            system=system_info(self._device, gpu, self._gpu_reason, cores=self._logical_cores),
            context=RunContext(case_name=self.case_name, **self._context),
            total=total,
            stages=self._stages,
            samples=telemetry.samples,
            events=self._events,
            sample_interval_s=self.sample_interval_s,
            sample_interval_effective_s=telemetry.interval_now_s,
            notes=self._notes + telemetry.notes(),
            activations=self._activations,
            sampler_gaps=telemetry.gaps,
        )
        return self.record

    def __enter__(self) -> ProfileSession:
        self.open()
        self._tracer_scope = use_tracer(self)
        self._tracer_scope.__enter__()
        self._active_since.append(0.0)  # the whole block is profiled code
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        scope, self._tracer_scope = self._tracer_scope, None
        try:
            if scope is not None:
                scope.__exit__(exc_type, exc, tb)
        finally:
            self.close(error=exc)

    @contextmanager
    def activate(self) -> Iterator[ProfileSession]:
        """Install this session as the tracer for one call (e.g. one ComfyUI node's execution)."""
        if not self.is_open:
            raise RuntimeError(f"profile session {self.case_name!r} is not open; call open() first")
        assert self._t0 is not None
        self._active_since.append(self._clock.now() - self._t0)
        try:
            with use_tracer(self):
                yield self
        finally:
            if self._active_since and self.is_open:
                self._activations.append((self._active_since.pop(), self._clock.now() - self._t0))

    # ---------------------------------------------------------------- facts
    def set_context(self, **facts: Any) -> None:
        """Label the run: task, width, height, frames, steps, placement, dtypes, attention, compile, tf32, ..."""
        unknown = sorted(set(facts) - set(CONTEXT_FIELDS) - {"case_name"})
        if unknown:
            raise TypeError(f"unknown run facts {unknown}; expected any of {sorted(CONTEXT_FIELDS)}")
        for key in _INT_CONTEXT:
            value = facts.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"run fact {key} must be an int; got {value!r}")
        for key in ("compile", "tf32"):
            if facts.get(key) is not None and not isinstance(facts[key], bool):
                raise TypeError(f"run fact {key} must be a bool; got {facts[key]!r}")
        if "loras" in facts and facts["loras"] is not None:
            loras = facts["loras"]
            if isinstance(loras, str) or not all(isinstance(item, str) for item in loras):
                raise TypeError(f"run fact loras must be a list of strings (one per LoRA); got {loras!r}")
            facts["loras"] = tuple(loras)
        if "case_name" in facts:
            self.case_name = str(facts.pop("case_name"))
        self._context.update({k: (dtype_name(v) if isinstance(v, torch.dtype) else v) for k, v in facts.items()})

    # ---------------------------------------------------------------- Tracer protocol
    def stage(self, name: str, kind: str, facts: dict[str, Any]) -> AbstractContextManager[None]:
        return self._stage_scope(name, kind, dict(facts))

    def event(self, name: str, facts: dict[str, Any]) -> None:
        self._require_open()
        with self._lock:
            self._events.append(
                EventRecord(t_s=self._clock.now() - self._t0, name=name, facts=clean_facts(facts))
            )

    def record_cached(self, name: str, kind: str, **facts: Any) -> StageRecord:
        """Record a stage that did not run because its result came from a cache (e.g. ComfyUI's)."""
        self._require_open()
        _check_stage(name, kind)
        now = self._clock.now() - self._t0
        with self._lock:
            record = cached_record(
                name,
                kind,
                facts,
                index=self._new_index(),
                parent=self._stack[-1] if self._stack else None,
                t=now,
                session_device=self._device.device,
            )
            self._stages.append(record)
        return record

    # ---------------------------------------------------------------- stages opened from outside
    def elapsed_s(self) -> float:
        """Seconds since the session opened (the time base of every record)."""
        self._require_open()
        assert self._t0 is not None
        return self._clock.now() - self._t0

    def add_activation(self, start_s: float, end_s: float) -> None:
        """Mark [start_s, end_s] (session time) as time profiled code ran, e.g. one graph node an
        observer watched: time there outside every stage is then reported as inside a node."""
        self._require_open()
        if end_s < start_s:
            raise ValueError(f"activation ends before it starts ({start_s} > {end_s})")
        with self._lock:
            self._activations.append((float(start_s), float(end_s)))

    def add_note(self, text: str) -> None:
        """A remark about the run for the report (e.g. what an observer could not measure)."""
        with self._lock:
            if text not in self._notes:
                self._notes.append(text)

    def open_stage(self, name: str, kind: str, *, parent: StageFrame | None = None, **facts: Any) -> StageFrame:
        """Open a stage that is closed with `close_stage`, in any order relative to other stages.

        For callers that see a stage begin and end as two events (a node starting and finishing,
        a sampler step boundary) rather than as one block: such stages may overlap and are not
        parents of the tracer's stages. `parent` makes it a child of another open stage of this
        kind. The name and facts can still be completed when it closes.
        """
        self._require_open()
        _check_stage(name, kind)
        if parent is not None and parent not in self._detached:
            raise RuntimeError(f"parent stage {parent.name!r} is not open")
        self._device.synchronize()
        with self._lock:
            snap, sample, host = self._boundary()
            frame = StageFrame(
                index=self._new_index(),
                name=name,
                kind=kind,
                parent=None if parent is None else parent.index,
                depth=0 if parent is None else parent.depth + 1,
                start=sample.t_s,
                facts=dict(facts),
                alloc_start=snap,
                host_start=host,
                used_start=sample.device_used_bytes,
                mark=self._telemetry.mark(),
            )
            self._detached.append(frame)
        return frame

    def close_stage(
        self, frame: StageFrame, *, name: str | None = None, unfinished: bool = False, **facts: Any
    ) -> StageRecord:
        """Close a stage opened with `open_stage`; `name` renames it (e.g. once a step count is known),
        `facts` are added (facts known only at the end: CFG mode, FLOPs, an error)."""
        self._require_open()
        if frame not in self._detached:
            raise RuntimeError(f"stage {frame.name!r} is not open (opened with open_stage and closed once?)")
        if name is not None:
            _check_stage(name, frame.kind)
            frame.name = name
        frame.facts.update(facts)
        self._device.synchronize()
        with self._lock:
            boundary = self._boundary()  # while the frame is open: its peak includes the last reading
            self._detached.remove(frame)
            frame.extra["done"] = True
            return self._record(frame, boundary, unfinished=unfinished)

    def discard_stage(self, frame: StageFrame) -> None:
        """Forget a stage opened with `open_stage` without recording it (it turned out to be
        measured another way, e.g. a sampler's steps timed from its callbacks)."""
        with self._lock:
            if frame in self._detached:
                self._detached.remove(frame)
                assert frame.mark is not None
                self._telemetry.release(frame.mark)

    def sample_now(self) -> Sample:
        """Take one activity reading now, as the sampler thread does every `sample_interval_s`."""
        self._require_open()
        with self._lock:
            assert self._t0 is not None
            return self._telemetry.take(self._clock.now() - self._t0, activity=True)[0]

    # ---------------------------------------------------------------- stages
    def _require_open(self) -> None:
        if not self.is_open:
            raise RuntimeError(f"profile session {self.case_name!r} is not open")

    @contextmanager
    def _stage_scope(self, name: str, kind: str, facts: dict[str, Any]) -> Iterator[None]:
        frame = self._begin(name, kind, facts)
        try:
            yield
        except BaseException as err:
            frame.extra["error"] = type(err).__name__
            raise
        finally:
            if "done" not in frame.extra:  # close() ends stages left open
                self._finish(frame)

    def _begin(self, name: str, kind: str, facts: dict[str, Any]) -> StageFrame:
        self._require_open()
        _check_stage(name, kind)
        self._device.synchronize()
        with self._lock:
            snap, sample, host = self._boundary()
            parent = self._stack[-1] if self._stack else None
            frame = StageFrame(
                index=self._new_index(),
                name=name,
                kind=kind,
                parent=None if parent is None else parent.index,
                depth=0 if parent is None else parent.depth + 1,
                start=sample.t_s,
                facts=facts,
                alloc_start=snap,
                host_start=host,
                used_start=sample.device_used_bytes,
                mark=self._telemetry.mark(),
            )
            self._stack.append(frame)
        return frame

    def _new_index(self) -> int:
        index, self._next_index = self._next_index, self._next_index + 1
        return index

    def _finish(self, frame: StageFrame, *, unfinished: bool = False) -> None:
        self._device.synchronize()
        with self._lock:
            boundary = self._boundary()  # while the frame is open: its peak includes the last reading
            frame.extra["done"] = True
            if self._stack and self._stack[-1] is frame:
                self._stack.pop()
            else:
                raise RuntimeError(f"stage {frame.name!r} ended out of order; stages must nest")
            self._record(frame, boundary, unfinished=unfinished)

    def _record(
        self,
        frame: StageFrame,
        boundary: tuple[AllocatorSnapshot | None, Sample, HostReading],
        *,
        unfinished: bool,
    ) -> StageRecord:
        """The record of a frame that just ended (lock held), from the boundary readings at its end."""
        snap, sample, host = boundary
        facts = clean_facts(frame.facts)
        if unfinished:
            facts["unfinished"] = True
        if "error" in frame.extra and frame.extra["error"] is not None:
            facts["error"] = frame.extra["error"]
        assert frame.mark is not None
        window = self._telemetry.window(frame.mark)  # from the stage's opening sample onwards
        self._telemetry.release(frame.mark)
        record = stage_record(
            frame,
            end=sample.t_s,
            snap=snap,
            host=host,
            used_end=sample.device_used_bytes,
            facts=facts,
            window=window,
            session_device=self._device.device,
            max_cpu_pct=self._telemetry.max_cpu_pct,
        )
        self._stages.append(record)
        return record

    def _total_record(self, end_abs: float, last: Sample) -> StageRecord:
        assert self._t0 is not None and self._host_start is not None
        end = end_abs - self._t0
        snap = self._telemetry.allocator(end)
        self._fold_peak(snap)
        frame = StageFrame(
            index=-1,
            name=TOTAL_STAGE,
            kind="total",
            parent=None,
            depth=0,
            start=0.0,
            facts={},
            alloc_start=self._alloc_start,
            host_start=self._host_start,
            used_start=self._used_start,
            peak_allocated=self._session_peak[0],
            peak_reserved=self._session_peak[1],
        )
        flops = outermost_flops(sorted(self._stages, key=lambda st: st.index))
        facts: dict[str, FactValue] = {} if flops is None else {"flops": flops}
        return stage_record(
            frame,
            end=max(end, last.t_s),
            snap=snap,
            host=self._telemetry.host_reading(end),
            used_end=last.device_used_bytes,
            facts=facts,
            window=self._telemetry.samples,
            session_device=self._device.device,
            max_cpu_pct=self._telemetry.max_cpu_pct,
        )

    def _boundary(self) -> tuple[AllocatorSnapshot | None, Sample, HostReading]:
        """At a stage boundary (device synchronised): the allocator snapshot, whose peak is folded
        into the open stages and then reset, and a sample."""
        with self._lock:
            assert self._t0 is not None
            t = self._clock.now() - self._t0
            snap = self._telemetry.allocator(t)
            self._fold_peak(snap)
            self._telemetry.reset_peak(t)
            return (snap, *self._sample_with_host())

    def _fold_peak(self, snap: AllocatorSnapshot | None) -> None:
        if snap is None:
            return
        for frame in (*self._stack, *self._detached):
            frame.peak_allocated = max(frame.peak_allocated or 0, snap.peak_allocated)
            frame.peak_reserved = max(frame.peak_reserved or 0, snap.peak_reserved)
        a, r = self._session_peak
        self._session_peak = (max(a or 0, snap.peak_allocated), max(r or 0, snap.peak_reserved))

    # ---------------------------------------------------------------- samples
    def _take_sample(self) -> Sample:
        return self._sample_with_host()[0]

    def _final_activity_reading(self, t: float) -> None:
        """At close, one more activity reading when the thread's last one is at least half an
        interval old, so the last stage's tail is covered (a shorter one would not be meaningful)."""
        interval = self._telemetry.interval_now_s
        readings = [s.t_s for s in self._telemetry.samples if s.activity_since_s is not None]
        last = readings[-1] if readings else 0.0  # the session's opening sample starts the first one
        if interval is not None and t - last >= 0.5 * interval:
            with self._lock:
                self._telemetry.take(t, activity=True)

    def _take_thread_sample(self) -> None:
        """The sampler thread's reading: activity included, its timing checked for gaps."""
        with self._lock:
            assert self._t0 is not None
            self._telemetry.take(self._clock.now() - self._t0, activity=True, from_thread=True)

    def _sample_with_host(self) -> tuple[Sample, HostReading]:
        """A boundary reading (memory and host; no activity: GPM samples must stay far apart)."""
        with self._lock:
            assert self._t0 is not None
            return self._telemetry.take(self._clock.now() - self._t0, activity=False)

    # read-only views of the telemetry, for inspection while the session runs
    @property
    def _samples(self) -> list[Sample]:
        return self._telemetry.samples

    @property
    def _thread(self) -> SamplerThread | None:
        return self._telemetry.thread

    @property
    def _interval_now_s(self) -> float | None:
        return self._telemetry.interval_now_s


def _check_stage(name: str, kind: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.lower() == "unknown":
        raise ValueError(f"stage name must be a identifier-like label such as 'T5_Encoding'; got {name!r}")
    if kind == "total" or name == TOTAL_STAGE:
        raise ValueError("Total_Execution is measured by the session itself from open() to close()")
    if kind not in STAGE_KINDS:
        raise ValueError(f"unknown stage kind {kind!r}; expected one of {STAGE_KINDS}")
