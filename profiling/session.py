"""`ProfileSession`: records every stage of a run (time, memory, SM activity, CPU, FLOPs).

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

Consecutive top-level stages with the same name are one stage split across calls (ComfyUI runs
each loader as its own node, and each records a `Model_Initialization` piece): `close()` joins
them into one stage from the first piece's start to the last one's end, keeping every piece's
children. The time no top-level stage covers is recorded as `RunRecord.outside`, each interval
with the stages around it and whether profiled code was running (`activate()`), so the report
shows it instead of hiding it in a sum.

Device per stage: a stage that states `device=` (T5 on the CPU while the DiT runs on the GPU)
is recorded on that device; a CPU stage carries no CUDA memory and no GPU activity.

Bounded samples: the session keeps at most `max_samples` samples. When the buffer is full, the
samples between the first and the last are merged in pairs (`merge_sample_pairs`) and the sampling
interval doubles, so a run of any length keeps samples spread over all of it. Each halving is
recorded: `RunRecord.sample_interval_effective_s` is the interval at the end and a note in the
run (shown in the report) says when the interval changed and why.

The sampler thread holds only a weak reference to the session: a session dropped without
`close()` is collected as usual and its thread stops.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch

from ..wan_core.trace import STAGE_KINDS, use_tracer
from .memory import (
    AllocatorSnapshot,
    CpuDevice,
    CudaDevice,
    DeviceProbe,
    HostProbe,
    HostReading,
    ProcessProbe,
    host_memory_bytes,
    utc_now_iso,
)
from .nvml import GpuMonitor, open_gpu_monitor
from .records import (
    CONTEXT_FIELDS,
    TOTAL_STAGE,
    EventRecord,
    FactValue,
    MemoryFigures,
    OutsideInterval,
    RunContext,
    RunRecord,
    Sample,
    StageRecord,
    SystemInfo,
)
from .sampler_thread import SamplerThread
from .stats import stage_activity
from .timers import Clock, MonotonicClock

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")
_STEP_RE = re.compile(r"^Step_(\d+)_")
_INT_CONTEXT = ("width", "height", "frames", "steps", "seed")
DEFAULT_MAX_SAMPLES = 2048  # 3.4 min at 0.1 s before the first halving; about 0.5 MB of report JSON
MIN_MAX_SAMPLES = 4  # the first and last samples are kept as they are; at least one pair merges


@dataclass
class _OpenStage:
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
    first_sample: int = 0  # index of the stage's opening sample in the session's sample list
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ProfileSession:
    """Installs itself as the wan_core tracer and records stages, samples and events.

    Args:
        case_name: the case label used in the report.
        device: the device to measure; default CUDA when available, else CPU.
        sample_interval_s: background sampling period; None samples only at stage boundaries.
        max_samples: the most samples kept; when full, samples merge in pairs and the interval doubles.
        clock, gpu, device_probe, host: replace the real probes (tests pass fakes).
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
        self._interval_now_s = sample_interval_s  # doubles each time the sample buffer is halved
        self._halvings: list[float] = []  # session times at which the buffer was halved
        self._clock = clock or MonotonicClock()
        self._host = host or ProcessProbe()
        self._device = device_probe or _default_device(device)
        self._gpu = gpu
        self._owns_gpu = False
        self._gpu_reason: str | None = None
        self._context: dict[str, Any] = {}
        self._lock = threading.RLock()
        self._stack: list[_OpenStage] = []
        self._next_index = 0
        self._stages: list[StageRecord] = []
        self._samples: list[Sample] = []
        self._events: list[EventRecord] = []
        self._notes: list[str] = []
        self._t0: float | None = None
        self._last_sample: tuple[float, float | None] | None = None  # (t, cpu_time)
        self._session_peak: tuple[int | None, int | None] = (None, None)
        self._thread: SamplerThread | None = None
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
        if self._gpu is None and isinstance(self._device, CudaDevice):
            result = open_gpu_monitor(**_nvml_target(self._device))
            self._gpu, self._gpu_reason, self._owns_gpu = result.monitor, result.reason, True
        elif self._gpu is None:
            self._gpu_reason = (
                "no GPU: the run is on the CPU"
                if self._device.device == "cpu"
                else f"no NVML monitor was given for {self._device.device}"
            )
        self._device.synchronize()
        self._t0 = self._clock.now()
        self._alloc_start = self._device.snapshot()
        self._device.reset_peak()
        self._host_start = self._host.read()
        first = self._take_sample()
        self._used_start = first.device_used_bytes
        if self.sample_interval_s is not None:
            self._thread = SamplerThread(
                self._take_sample_quietly, interval_s=self.sample_interval_s, clock=self._clock
            )
            self._thread.start()
        return self

    def close(self, *, error: BaseException | None = None) -> RunRecord:
        """End Total_Execution, stop sampling and freeze the records (also returned as `.record`)."""
        if not self.is_open:
            raise RuntimeError(
                f"profile session {self.case_name!r} is not open (open() it first; close once)"
            )
        if self._thread is not None:
            note = self._thread.stop()
            if note:
                self._notes.append(note)
        while self._stack:
            frame = self._stack[-1]
            self._notes.append(f"stage {frame.name!r} was still open when the session closed")
            self._finish(frame, unfinished=True)
        self._device.synchronize()
        end = self._clock.now()
        last = self._take_sample()
        total = self._total_record(end, last)
        while self._active_since:
            self._activations.append((self._active_since.pop(), total.end_s))
        if self._owns_gpu and self._gpu is not None:
            self._gpu.close()
        status = "completed" if error is None else f"failed: {type(error).__name__}"
        stages = _join_split_stages(
            sorted(self._stages, key=lambda st: st.index), self._samples, self._device.device
        )
        self.record = RunRecord(
            created_utc=utc_now_iso(),
            status=status,
            system=self._system_info(),
            context=RunContext(case_name=self.case_name, **self._context),
            total=total,
            stages=tuple(stages),
            samples=tuple(self._samples),
            events=tuple(self._events),
            sample_interval_s=self.sample_interval_s,
            sample_interval_effective_s=self._interval_now_s,
            notes=tuple(self._notes + self._halving_notes()),
            outside=_outside_intervals(stages, total.end_s, self._activations),
            run_id=uuid.uuid4().hex,
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
        """Label the run: task, width, height, frames, steps, placement, dtypes, attention, compile, ..."""
        unknown = sorted(set(facts) - set(CONTEXT_FIELDS) - {"case_name"})
        if unknown:
            raise TypeError(f"unknown run facts {unknown}; expected any of {sorted(CONTEXT_FIELDS)}")
        for key in _INT_CONTEXT:
            value = facts.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"run fact {key} must be an int; got {value!r}")
        if "compile" in facts and facts["compile"] is not None and not isinstance(facts["compile"], bool):
            raise TypeError(f"run fact compile must be a bool; got {facts['compile']!r}")
        if "case_name" in facts:
            self.case_name = str(facts.pop("case_name"))
        self._context.update({k: (_dtype_name(v) if isinstance(v, torch.dtype) else v) for k, v in facts.items()})

    # ---------------------------------------------------------------- Tracer protocol
    def stage(self, name: str, kind: str, facts: dict[str, Any]) -> AbstractContextManager[None]:
        return self._stage_scope(name, kind, dict(facts))

    def event(self, name: str, facts: dict[str, Any]) -> None:
        self._require_open()
        with self._lock:
            self._events.append(
                EventRecord(t_s=self._clock.now() - self._t0, name=name, facts=_clean_facts(facts))
            )

    def record_cached(self, name: str, kind: str, **facts: Any) -> StageRecord:
        """Record a stage that did not run because its result came from a cache (e.g. ComfyUI's)."""
        self._require_open()
        _check_stage(name, kind)
        now = self._clock.now() - self._t0
        with self._lock:
            parent = self._stack[-1] if self._stack else None
            record = StageRecord(
                index=self._new_index(),
                name=name,
                kind=kind,
                parent=None if parent is None else parent.index,
                depth=0 if parent is None else parent.depth + 1,
                start_s=now,
                end_s=now,
                cached=True,
                device=_stage_device(facts.pop("device", None), self._device.device),
                step=_step_of(name, facts),
                facts=_clean_facts(facts),
            )
            self._stages.append(record)
        return record

    def sample_now(self) -> Sample:
        """Take one telemetry sample now (the thread does this every `sample_interval_s`)."""
        self._require_open()
        return self._take_sample()

    # ---------------------------------------------------------------- internals
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

    def _begin(self, name: str, kind: str, facts: dict[str, Any]) -> _OpenStage:
        self._require_open()
        _check_stage(name, kind)
        self._device.synchronize()
        with self._lock:
            snap = self._device.snapshot()
            self._fold_peak(snap)
            self._device.reset_peak()
            sample, host = self._sample_with_host()
            parent = self._stack[-1] if self._stack else None
            frame = _OpenStage(
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
                first_sample=len(self._samples) - 1,
            )
            self._stack.append(frame)
        return frame

    def _new_index(self) -> int:
        index, self._next_index = self._next_index, self._next_index + 1
        return index

    def _finish(self, frame: _OpenStage, *, unfinished: bool = False) -> None:
        self._device.synchronize()
        with self._lock:
            snap = self._device.snapshot()
            self._fold_peak(snap)
            self._device.reset_peak()
            sample, host = self._sample_with_host()
            frame.extra["done"] = True
            if self._stack and self._stack[-1] is frame:
                self._stack.pop()
            else:
                raise RuntimeError(f"stage {frame.name!r} ended out of order; stages must nest")
            facts = _clean_facts(frame.facts)
            if unfinished:
                facts["unfinished"] = True
            if "error" in frame.extra and frame.extra["error"] is not None:
                facts["error"] = frame.extra["error"]
            record = self._make_record(frame, sample.t_s, snap, host, sample.device_used_bytes, facts)
            self._stages.append(record)

    def _make_record(
        self,
        frame: _OpenStage,
        end: float,
        snap: AllocatorSnapshot | None,
        host: HostReading,
        used_end: int | None,
        facts: dict[str, FactValue],
    ) -> StageRecord:
        window = self._samples[frame.first_sample :]  # samples from the stage's opening one onwards
        device = _stage_device(facts.pop("device", None), self._device.device)
        on_session_device = device == self._device.device
        activity = stage_activity(window if on_session_device else (), frame.start, end)
        used = [s.device_used_bytes for s in window if s.device_used_bytes is not None]
        rss = [s.rss_bytes for s in window if s.rss_bytes is not None]
        start = frame.alloc_start
        if on_session_device:
            memory = MemoryFigures(
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
        else:  # a stage on another device (T5 on the CPU): the GPU's figures are not its own
            memory = MemoryFigures()
        flops = facts.pop("flops", None)
        if flops is not None and (
            isinstance(flops, bool) or not isinstance(flops, (int, float)) or flops < 0
        ):
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
            step=_step_of(frame.name, facts),
            expert=None if expert is None else str(expert),
            cfg_mode=None if cfg_mode is None else str(cfg_mode),
            flops=None if flops is None else float(flops),
            facts=facts,
            memory=memory,
            activity_mean_pct=activity.mean_pct,
            activity_max_pct=activity.max_pct,
            occupancy_mean_pct=activity.occupancy_mean_pct,
            num_samples=activity.num_samples,
            cpu_pct=_cpu_pct(frame.host_start, host, end - frame.start),
            rss_end_bytes=host.rss_bytes,
            rss_max_bytes=max(rss) if rss else host.rss_bytes,
        )

    def _total_record(self, end_abs: float, last: Sample) -> StageRecord:
        end = end_abs - self._t0
        snap = self._device.snapshot()
        self._fold_peak(snap)
        frame = _OpenStage(
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
        flops = _outermost_flops(sorted(self._stages, key=lambda st: st.index))
        facts: dict[str, FactValue] = {} if flops is None else {"flops": flops}
        return self._make_record(
            frame, max(end, last.t_s), snap, self._host.read(), last.device_used_bytes, facts
        )

    def _fold_peak(self, snap: AllocatorSnapshot | None) -> None:
        if snap is None:
            return
        for frame in self._stack:
            frame.peak_allocated = max(frame.peak_allocated or 0, snap.peak_allocated)
            frame.peak_reserved = max(frame.peak_reserved or 0, snap.peak_reserved)
        a, r = self._session_peak
        self._session_peak = (max(a or 0, snap.peak_allocated), max(r or 0, snap.peak_reserved))

    def _take_sample(self) -> Sample:
        return self._sample_with_host()[0]

    def _sample_with_host(self) -> tuple[Sample, HostReading]:
        with self._lock:
            t = self._clock.now() - self._t0
            reading = self._gpu.read() if self._gpu is not None else None
            snap = self._device.snapshot()
            host = self._host.read()
            cpu = None
            if self._last_sample is not None:
                t_prev, cpu_prev = self._last_sample
                cpu = _cpu_pct(HostReading(cpu_time_s=cpu_prev, rss_bytes=None), host, t - t_prev)
            self._last_sample = (t, host.cpu_time_s)
            sample = Sample(
                t_s=t,
                activity_pct=None if reading is None else reading.activity_pct,
                occupancy_pct=None if reading is None else reading.occupancy_pct,
                device_used_bytes=None if reading is None else reading.used_bytes,
                cuda_allocated_bytes=None if snap is None else snap.allocated,
                cuda_reserved_bytes=None if snap is None else snap.reserved,
                cpu_pct=cpu,
                rss_bytes=host.rss_bytes,
            )
            self._samples.append(sample)
            if len(self._samples) > self.max_samples:
                self._halve_samples()
            return sample, host

    def _halve_samples(self) -> None:
        """Merge the samples between the first and the last in pairs; double the sampling interval.

        Open stages keep pointing at the (merged) sample that holds their opening sample.
        """
        n = len(self._samples)
        self._samples = merge_sample_pairs(self._samples)
        for frame in self._stack:
            i = frame.first_sample
            frame.first_sample = 0 if i == 0 else len(self._samples) - 1 if i == n - 1 else 1 + (i - 1) // 2
        self._halvings.append(self._samples[-1].t_s)
        if self._interval_now_s is not None:
            self._interval_now_s *= 2
            if self._thread is not None:
                self._thread.interval_s = self._interval_now_s

    def _halving_notes(self) -> list[str]:
        if not self._halvings:
            return []
        times = ", ".join(f"{t:.1f} s" for t in self._halvings)
        if self.sample_interval_s is None:
            change = "samples (taken at stage boundaries only) were thinned"
        else:
            change = (
                f"the sampling interval went from {self.sample_interval_s:g} s to "
                f"{self._interval_now_s:g} s (doubled at {times})"
            )
        return [
            f"the sample buffer ({self.max_samples} samples) filled {len(self._halvings)} time(s): {change}; "
            "earlier samples were merged in pairs (activity and CPU % averaged over the pair's time, "
            "memory as the pair's maximum)"
        ]

    def _take_sample_quietly(self) -> None:
        self._take_sample()

    def _system_info(self) -> SystemInfo:
        gpu = self._gpu
        name = gpu.name if gpu is not None else None
        total = gpu.memory_total_bytes if gpu is not None else None
        if isinstance(self._device, CudaDevice):
            props = torch.cuda.get_device_properties(self._device.torch_device)
            name = name or props.name
            total = total or props.total_memory
        return SystemInfo(
            device=self._device.device,
            gpu_name=name,
            gpu_memory_bytes=total,
            driver_version=None if gpu is None else gpu.driver_version,
            cuda_version=torch.version.cuda
            if isinstance(self._device, CudaDevice)
            else (None if gpu is None else gpu.cuda_driver_version),
            torch_version=torch.__version__,
            activity_metric=None if gpu is None else gpu.activity_metric,
            activity_unavailable_reason=self._gpu_reason if gpu is None else None,
            cpu_name=_cpu_name(),
            host_memory_bytes=host_memory_bytes(),
        )


def merge_sample_pairs(samples: list[Sample]) -> list[Sample]:
    """Halve a sample list: keep the first and the last sample, merge the ones between in pairs.

    A merged sample sits at the later one's time and covers both intervals: activity, occupancy
    and CPU % are their time-weighted mean (each sample covers the time since the previous one),
    memory figures the larger of the two (so peaks survive). An unpaired sample stays as it is.
    """
    if len(samples) < 3:
        return list(samples)
    out = [samples[0]]
    middle = samples[1:-1]
    for k in range(0, len(middle) - 1, 2):
        a, b = middle[k], middle[k + 1]
        t_before = samples[k].t_s  # the sample just before `a` in the original list
        out.append(_merged(a, b, a.t_s - t_before, b.t_s - a.t_s))
    if len(middle) % 2:
        out.append(middle[-1])
    out.append(samples[-1])
    return out


def _merged(a: Sample, b: Sample, dt_a: float, dt_b: float) -> Sample:
    def mean(x: float | None, y: float | None) -> float | None:
        if x is None or y is None:
            return y if x is None else x
        if dt_a + dt_b <= 0:
            return 0.5 * (x + y)
        return (x * dt_a + y * dt_b) / (dt_a + dt_b)

    def peak(x: int | None, y: int | None) -> int | None:
        return y if x is None else x if y is None else max(x, y)

    return Sample(
        t_s=b.t_s,
        activity_pct=mean(a.activity_pct, b.activity_pct),
        occupancy_pct=mean(a.occupancy_pct, b.occupancy_pct),
        device_used_bytes=peak(a.device_used_bytes, b.device_used_bytes),
        cuda_allocated_bytes=peak(a.cuda_allocated_bytes, b.cuda_allocated_bytes),
        cuda_reserved_bytes=peak(a.cuda_reserved_bytes, b.cuda_reserved_bytes),
        cpu_pct=mean(a.cpu_pct, b.cpu_pct),
        rss_bytes=peak(a.rss_bytes, b.rss_bytes),
    )


def _stage_device(stated: Any, session_device: str) -> str:
    """The device a stage ran on: what it states (`device=` fact), else the session's device.

    "cuda" without an index means the session's CUDA device when the session measures one.
    """
    if stated is None:
        return session_device
    text = str(stated)
    if text == "cuda" and session_device.startswith("cuda"):
        return session_device
    return text


def _join_split_stages(
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
    busy = [p for p in pieces if p.duration_s > 0]
    cpu = (
        sum(p.cpu_pct * p.duration_s for p in busy) / sum(p.duration_s for p in busy)  # type: ignore[operator]
        if busy and all(p.cpu_pct is not None for p in busy)
        else None
    )
    flops = [p.flops for p in pieces if p.flops is not None]
    m = [p.memory for p in pieces]
    facts: dict[str, FactValue] = {}
    for p in pieces:
        facts.update(p.facts)
    facts.pop("component", None)  # each piece's component is named by its child stage
    facts["pieces"] = len(pieces)
    return dataclasses.replace(
        first,
        end_s=last.end_s,
        flops=sum(flops) if flops else None,
        facts=facts,
        memory=MemoryFigures(
            allocated_start=m[0].allocated_start,
            allocated_end=m[-1].allocated_end,
            allocated_peak=_max_known([x.allocated_peak for x in m]),
            reserved_start=m[0].reserved_start,
            reserved_end=m[-1].reserved_end,
            reserved_peak=_max_known([x.reserved_peak for x in m]),
            device_used_start=m[0].device_used_start,
            device_used_end=m[-1].device_used_end,
            device_used_max=_max_known([x.device_used_max for x in m]),
        ),
        activity_mean_pct=activity.mean_pct,
        activity_max_pct=activity.max_pct,
        occupancy_mean_pct=activity.occupancy_mean_pct,
        num_samples=activity.num_samples,
        cpu_pct=cpu,
        rss_end_bytes=last.rss_end_bytes,
        rss_max_bytes=_max_known([p.rss_max_bytes for p in pieces]),
    )


def _max_known(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _outside_intervals(
    stages: list[StageRecord], total_end: float, activations: list[tuple[float, float]]
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


def _outermost_flops(stages: list[StageRecord]) -> float | None:
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


def _default_device(device: str | torch.device | None) -> DeviceProbe:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"profiling device {dev} requested but CUDA is not available; use device='cpu'")
        return CudaDevice(dev)
    if dev.type == "cpu":
        return CpuDevice()
    raise ValueError(f"profiling supports 'cuda' and 'cpu' devices; got {dev}")


def _nvml_target(device: CudaDevice) -> dict[str, Any]:
    """How NVML finds the torch device: its UUID when torch reports one, else its index."""
    props = torch.cuda.get_device_properties(device.torch_device)
    uuid = getattr(props, "uuid", None)
    if uuid is None:
        logger.info(
            "torch reports no device UUID; NVML uses index %s (wrong if CUDA_VISIBLE_DEVICES "
            "renumbers devices)",
            device.torch_device.index,
        )
        return {"index": device.torch_device.index or 0}
    text = str(uuid)
    return {"uuid": text if text.startswith("GPU-") else f"GPU-{text}"}


def _check_stage(name: str, kind: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.lower() == "unknown":
        raise ValueError(f"stage name must be a identifier-like label such as 'T5_Encoding'; got {name!r}")
    if kind == "total" or name == TOTAL_STAGE:
        raise ValueError("Total_Execution is measured by the session itself from open() to close()")
    if kind not in STAGE_KINDS:
        raise ValueError(f"unknown stage kind {kind!r}; expected one of {STAGE_KINDS}")


def _step_of(name: str, facts: dict[str, Any]) -> int | None:
    step = facts.pop("step", None)
    if step is not None:
        return int(step)
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


def _clean_facts(facts: dict[str, Any]) -> dict[str, FactValue]:
    """JSON-ready facts: primitives stay, dtypes/devices and other objects become their str()."""
    out: dict[str, FactValue] = {}
    for key, value in facts.items():
        if isinstance(value, torch.dtype):
            out[str(key)] = _dtype_name(value)
        else:
            out[str(key)] = value if value is None or isinstance(value, (str, int, float, bool)) else str(value)
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    """ "float32", not "torch.float32": the report prints dtypes by their bare names."""
    return str(dtype).removeprefix("torch.")


def _cpu_pct(start: HostReading, end: HostReading, wall_s: float) -> float | None:
    if start.cpu_time_s is None or end.cpu_time_s is None or wall_s <= 0:
        return None
    return 100.0 * (end.cpu_time_s - start.cpu_time_s) / wall_s


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None
