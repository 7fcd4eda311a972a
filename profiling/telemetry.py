"""Telemetry: the samples of a session, read from NVML, the CUDA allocator and the host process.

Two kinds of readings make `Sample`s:

- **Activity readings** (the sampler thread every interval, and `ProfileSession.sample_now()`):
  NVML activity and occupancy plus everything below. Each covers the time since the previous
  activity reading (`Sample.activity_since_s`): NVML GPM needs its two samples far enough apart to
  be meaningful, so activity is never read at stage boundaries, which can be milliseconds apart.
  Stages get their activity from the readings overlapping them (`stats.stage_activity`).
- **Boundary readings** (every stage boundary): device memory used (NVML), CUDA allocated and
  reserved, the process RSS and CPU time; no activity.

Telemetry never stops or changes a run: a probe that raises (an NVML error, an unreadable /proc
file, a fake that fails on purpose) leaves that figure of that sample unmeasured (None); the
failures are counted per probe and `notes()` reports the first error of each. The probes are read
again at the next sample.

CPU %: process CPU seconds over wall seconds (100 = one core), only over intervals of at least
`MIN_CPU_INTERVAL_S`: the kernel adds up other threads' CPU time at scheduler ticks (up to 10 ms
each), so shorter intervals can read far off, even above what the cores allow. A sample's CPU %
covers the time since the last sample that carried one; a figure above 100 x the logical cores
is an accounting error and is left unmeasured, with the reason (`cpu_figure`).

Sampler gaps: a thread reading that comes more than `GAP_FACTOR` intervals (and `GAP_MIN_S`)
after the previous one means the thread was starved (a busy machine, a long GIL hold); each gap is
recorded (`SamplerGap`) and reported, never hidden behind the configured interval.

Bounded samples: at most `max_samples` are kept. When the buffer is full, the samples between the
first and the last are merged in pairs (`merge_sample_pairs`) and the sampling interval doubles,
so a run of any length keeps samples spread over all of it. Each halving is recorded; `notes()`
says when the interval changed and why.

Marks: a stage remembers where its samples begin with `mark()` and reads them back with
`window(mark)`; a mark follows its sample into the merged one, whatever halvings happen between.

A `Telemetry` is not thread-safe by itself: the session calls it under its own lock, the sampler
thread included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .memory import AllocatorSnapshot, DeviceProbe, HostProbe, HostReading
from .nvml import GpuMonitor, GpuReading
from .records import Sample, SamplerGap
from .sampler_thread import SamplerThread
from .timers import Clock

logger = logging.getLogger(__name__)

MIN_CPU_INTERVAL_S = 0.2  # 20 scheduler ticks at 100 Hz: CPU time is then within ~10 %
GAP_FACTOR = 2.0  # a thread reading this many intervals after the previous one ends a gap ...
GAP_MIN_S = 0.05  # ... when it is also this much later than planned
NO_HOST = HostReading(cpu_time_s=None, rss_bytes=None)

_T = TypeVar("_T")


@dataclass
class _ProbeFailures:
    """How often one probe failed, and the first failure (for the run's notes)."""

    count: int
    first_t: float
    first_error: str


class Telemetry:
    """The sample buffer of one session and the probes that fill it.

    Args:
        device: the compute device (allocator figures).
        host: the host process (CPU time, RSS).
        gpu: the NVML monitor, or None (no activity, no device memory figures).
        max_samples: the most samples kept; when full, samples merge in pairs and the interval doubles.
        interval_s: the sampler thread's period as requested; None samples only at stage boundaries
            (and when `sample_now()` is called).
        logical_cores: the machine's logical CPU count (CPU % can reach at most 100 x this); None
            when unknown (then no upper bound is applied).
    """

    def __init__(
        self,
        *,
        device: DeviceProbe,
        host: HostProbe,
        gpu: GpuMonitor | None,
        max_samples: int,
        interval_s: float | None,
        logical_cores: int | None = None,
    ) -> None:
        self.device = device
        self.host = host
        self.gpu = gpu
        self.max_samples = max_samples
        self.interval_s = interval_s  # as requested
        self.interval_now_s = interval_s  # doubles each time the buffer is halved
        self.max_cpu_pct = None if not logical_cores else 100.0 * logical_cores
        self.samples: list[Sample] = []
        self.halvings: list[float] = []  # session times at which the buffer was halved
        self.gaps: list[SamplerGap] = []
        self.thread: SamplerThread | None = None
        self._cpu_anchor: tuple[float, float] | None = None  # (t, cpu_time) the next CPU % starts from
        self._last_activity_t: float | None = None  # the previous activity reading (or the first sample)
        self._last_thread_t: float | None = None
        self._cpu_rejected: list[str] = []
        self._failures: dict[str, _ProbeFailures] = {}
        self._marks: dict[int, int] = {}  # mark -> index of its sample
        self._next_mark = 0

    # ---------------------------------------------------------------- sampler thread
    def start(self, sample: Callable[[], None], clock: Clock) -> None:
        """Start the sampler thread calling `sample` (a bound method of the session) every interval."""
        if self.interval_s is None:
            return
        self.thread = SamplerThread(sample, interval_s=self.interval_s, clock=clock)
        self.thread.start()

    def stop(self) -> str | None:
        """Stop the sampler thread; returns the error it hit (a note for the run), if any."""
        return None if self.thread is None else self.thread.stop()

    # ---------------------------------------------------------------- guarded probes
    def guarded(self, probe: str, t: float, read: Callable[[], _T]) -> _T | None:
        """`read()`, or None when it raises: the failure is counted and noted, never raised.

        Telemetry must not stop or change a run, whatever a probe raises (NVML errors are their
        own exception types, /proc reads raise OSError, fakes raise what a test asks).
        """
        try:
            return read()
        except Exception as err:  # noqa: BLE001 - any probe failure becomes an unmeasured figure
            failures = self._failures.get(probe)
            if failures is None:
                self._failures[probe] = _ProbeFailures(1, t, f"{type(err).__name__}: {err}")
                logger.warning("profiler: %s failed at %.3f s (%s); the figure is left unmeasured", probe, t, err)
            else:
                failures.count += 1
            return None

    def allocator(self, t: float) -> AllocatorSnapshot | None:
        """The CUDA allocator figures now (None without an allocator or when the read failed)."""
        return self.guarded("CUDA allocator statistics", t, self.device.snapshot)

    def reset_peak(self, t: float) -> None:
        self.guarded("CUDA allocator peak reset", t, self.device.reset_peak)

    def host_reading(self, t: float) -> HostReading:
        return self.guarded("host probe (CPU time, RSS)", t, self.host.read) or NO_HOST

    def close_gpu(self, t: float) -> None:
        if self.gpu is not None:
            self.guarded("NVML shutdown", t, self.gpu.close)

    # ---------------------------------------------------------------- readings
    def take(self, t: float, *, activity: bool, from_thread: bool = False) -> tuple[Sample, HostReading]:
        """Read the probes now (`t`: seconds since the session opened) and keep the sample.

        `activity`: also read NVML activity (the sampler thread and `sample_now()`); boundary
        readings leave it out. `from_thread`: the reading is the sampler thread's (gap detection).
        """
        reading: GpuReading | None = None
        if self.gpu is not None:
            gpu = self.gpu
            reading = self.guarded("NVML activity reading" if activity else "NVML memory reading", t,
                                   lambda: gpu.read(activity=activity))
        snap = self.allocator(t)
        host = self.host_reading(t)
        if from_thread:
            self._note_gap(t)
        since = None
        has_activity = reading is not None and reading.activity_pct is not None
        if activity and has_activity:
            since = self._last_activity_t
        if self._last_activity_t is None or (activity and reading is not None):
            self._last_activity_t = t  # the first sample starts the first reading's interval
        sample = Sample(
            t_s=t,
            activity_pct=reading.activity_pct if has_activity and since is not None else None,
            occupancy_pct=None if reading is None or since is None else reading.occupancy_pct,
            activity_since_s=since,
            device_used_bytes=None if reading is None else reading.used_bytes,
            cuda_allocated_bytes=None if snap is None else snap.allocated,
            cuda_reserved_bytes=None if snap is None else snap.reserved,
            cpu_pct=self._sample_cpu(t, host),
            rss_bytes=host.rss_bytes,
        )
        self.samples.append(sample)
        if len(self.samples) > self.max_samples:
            self._halve()
        return sample, host

    def _sample_cpu(self, t: float, host: HostReading) -> float | None:
        """CPU % since the anchor once at least `MIN_CPU_INTERVAL_S` has passed (then re-anchored)."""
        if host.cpu_time_s is None:
            self._cpu_anchor = None
            return None
        if self._cpu_anchor is None:
            self._cpu_anchor = (t, host.cpu_time_s)
            return None
        t0, cpu0 = self._cpu_anchor
        if t - t0 < MIN_CPU_INTERVAL_S:
            return None
        self._cpu_anchor = (t, host.cpu_time_s)
        value, reason = cpu_figure(HostReading(cpu_time_s=cpu0, rss_bytes=None), host, t - t0,
                                   max_pct=self.max_cpu_pct)
        if reason is not None:
            self._cpu_rejected.append(f"{t0:.2f}-{t:.2f} s: {reason}")
        return value

    def _note_gap(self, t: float) -> None:
        previous, self._last_thread_t = self._last_thread_t, t
        expected = self.interval_now_s
        if previous is None or expected is None:
            return
        late = t - previous
        if late > GAP_FACTOR * expected and late - expected > GAP_MIN_S:
            self.gaps.append(SamplerGap(start_s=previous, end_s=t, expected_s=expected))

    # ---------------------------------------------------------------- marks
    def mark(self) -> int:
        """A mark at the newest sample (a stage's opening one)."""
        mark, self._next_mark = self._next_mark, self._next_mark + 1
        self._marks[mark] = len(self.samples) - 1
        return mark

    def window(self, mark: int) -> list[Sample]:
        """The marked sample (or the merged one that holds it) and every later one."""
        return self.samples[self._marks[mark] :]

    def release(self, mark: int) -> None:
        del self._marks[mark]

    # ---------------------------------------------------------------- the bounded buffer
    def _halve(self) -> None:
        """Merge the samples between the first and the last in pairs; double the sampling interval."""
        n = len(self.samples)
        self.samples = merge_sample_pairs(self.samples)
        last = len(self.samples) - 1
        # a mark follows its sample: the first and the last stay, one between moves to its pair's merge
        self._marks = {m: 0 if i == 0 else last if i == n - 1 else 1 + (i - 1) // 2 for m, i in self._marks.items()}
        self.halvings.append(self.samples[-1].t_s)
        if self.interval_now_s is not None:
            self.interval_now_s *= 2
            if self.thread is not None:
                self.thread.interval_s = self.interval_now_s

    def notes(self) -> list[str]:
        """What the run's readers must know about the samples: halvings, probe failures, rejected
        CPU figures and sampler gaps (none of them: no note)."""
        out = [
            f"{probe} failed {f.count} time(s), first at {f.first_t:.2f} s ({f.first_error}); those "
            "figures are unmeasured and the run went on unchanged"
            for probe, f in self._failures.items()
        ]
        if self._cpu_rejected:
            out.append(f"{len(self._cpu_rejected)} CPU % sample(s) left unmeasured: {self._cpu_rejected[0]}")
        if self.gaps:
            worst = max(self.gaps, key=lambda g: g.duration_s)
            out.append(
                f"the sampler thread was starved {len(self.gaps)} time(s) (longest {worst.duration_s:.2f} s at "
                f"{worst.start_s:.2f}-{worst.end_s:.2f} s, interval {worst.expected_s:g} s): activity there "
                "is the average over the whole gap, and stages inside a gap read n/a"
            )
        if not self.halvings:
            return out
        times = ", ".join(f"{t:.1f} s" for t in self.halvings)
        if self.interval_s is None:
            change = "samples (taken at stage boundaries only) were thinned"
        else:
            change = (
                f"the sampling interval went from {self.interval_s:g} s to "
                f"{self.interval_now_s:g} s (doubled at {times})"
            )
        return out + [
            f"the sample buffer ({self.max_samples} samples) filled {len(self.halvings)} time(s): {change}; "
            "earlier samples were merged in pairs (activity and CPU % averaged over the pair's time, "
            "memory as the pair's maximum)"
        ]


def cpu_figure(
    start: HostReading, end: HostReading, wall_s: float, *, max_pct: float | None
) -> tuple[float | None, str | None]:
    """Process CPU % between two host readings (100 = one core), or None with the reason.

    None when either CPU time is unknown, when the interval is shorter than `MIN_CPU_INTERVAL_S`
    (too short to measure), and when the figure exceeds `max_pct` (100 x the logical cores: an
    accounting error, never a real figure).
    """
    if start.cpu_time_s is None or end.cpu_time_s is None:
        return None, "the process CPU time could not be read"
    if wall_s < MIN_CPU_INTERVAL_S:
        return None, (f"{wall_s:.3g} s is too short to measure CPU time (at least {MIN_CPU_INTERVAL_S:g} s: the "
                      "kernel adds up other threads' CPU time per scheduler tick)")
    value = 100.0 * (end.cpu_time_s - start.cpu_time_s) / wall_s
    if max_pct is not None and value > max_pct:
        return None, (f"read {value:.0f} %, above the {max_pct:.0f} % the logical cores allow "
                      "(a CPU-time accounting error)")
    return value, None


def merge_sample_pairs(samples: list[Sample]) -> list[Sample]:
    """Halve a sample list: keep the first and the last sample, merge the ones between in pairs.

    A merged sample sits at the later one's time and covers both intervals: activity and
    occupancy are the mean of the two readings weighted by the time each covers (the merged
    reading covers from the earlier one's start), CPU % the mean weighted by the time since the
    previous sample, memory figures the larger of the two (so peaks survive). An unpaired sample
    stays as it is.
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
    def mean(x: float | None, y: float | None, wx: float, wy: float) -> float | None:
        if x is None or y is None:
            return y if x is None else x
        if wx + wy <= 0:
            return 0.5 * (x + y)
        return (x * wx + y * wy) / (wx + wy)

    def peak(x: int | None, y: int | None) -> int | None:
        return y if x is None else x if y is None else max(x, y)

    # activity: each reading weighs with the time it covers (since its own start)
    span_a = a.t_s - a.activity_since_s if a.activity_since_s is not None else dt_a
    span_b = b.t_s - b.activity_since_s if b.activity_since_s is not None else dt_b
    since = a.activity_since_s if a.activity_pct is not None else b.activity_since_s
    return Sample(
        t_s=b.t_s,
        activity_pct=mean(a.activity_pct, b.activity_pct, span_a, span_b),
        occupancy_pct=mean(a.occupancy_pct, b.occupancy_pct, span_a, span_b),
        activity_since_s=since,
        device_used_bytes=peak(a.device_used_bytes, b.device_used_bytes),
        cuda_allocated_bytes=peak(a.cuda_allocated_bytes, b.cuda_allocated_bytes),
        cuda_reserved_bytes=peak(a.cuda_reserved_bytes, b.cuda_reserved_bytes),
        cpu_pct=mean(a.cpu_pct, b.cpu_pct, dt_a, dt_b),
        rss_bytes=peak(a.rss_bytes, b.rss_bytes),
    )
