"""Telemetry: the samples of a session, read from NVML, the CUDA allocator and the host process.

One reading makes one `Sample`: NVML activity, occupancy and device memory used (when a monitor
is open), CUDA allocated and reserved (when the device has an allocator), the process RSS, and
the process CPU % since the previous sample (CPU seconds over wall seconds; 100 = one core).
Samples are taken at every stage boundary and, between them, by the sampler thread
(`sampler_thread.SamplerThread`, which calls back into the session).

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

from collections.abc import Callable

from .memory import DeviceProbe, HostProbe, HostReading
from .nvml import GpuMonitor
from .records import Sample
from .sampler_thread import SamplerThread
from .timers import Clock


class Telemetry:
    """The sample buffer of one session and the probes that fill it.

    Args:
        device: the compute device (allocator figures).
        host: the host process (CPU time, RSS).
        gpu: the NVML monitor, or None (no activity, no device memory figures).
        max_samples: the most samples kept; when full, samples merge in pairs and the interval doubles.
        interval_s: the sampler thread's period as requested; None samples only at stage boundaries.
    """

    def __init__(
        self,
        *,
        device: DeviceProbe,
        host: HostProbe,
        gpu: GpuMonitor | None,
        max_samples: int,
        interval_s: float | None,
    ) -> None:
        self.device = device
        self.host = host
        self.gpu = gpu
        self.max_samples = max_samples
        self.interval_s = interval_s  # as requested
        self.interval_now_s = interval_s  # doubles each time the buffer is halved
        self.samples: list[Sample] = []
        self.halvings: list[float] = []  # session times at which the buffer was halved
        self.thread: SamplerThread | None = None
        self._last: tuple[float, float | None] | None = None  # (t, cpu_time) of the previous sample
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

    # ---------------------------------------------------------------- readings
    def take(self, t: float) -> tuple[Sample, HostReading]:
        """Read every probe now (`t`: seconds since the session opened) and keep the sample."""
        reading = self.gpu.read() if self.gpu is not None else None
        snap = self.device.snapshot()
        host = self.host.read()
        cpu = None
        if self._last is not None:
            t_prev, cpu_prev = self._last
            cpu = cpu_pct(HostReading(cpu_time_s=cpu_prev, rss_bytes=None), host, t - t_prev)
        self._last = (t, host.cpu_time_s)
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
        self.samples.append(sample)
        if len(self.samples) > self.max_samples:
            self._halve()
        return sample, host

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
        """What the halvings did to the samples (none: no note)."""
        if not self.halvings:
            return []
        times = ", ".join(f"{t:.1f} s" for t in self.halvings)
        if self.interval_s is None:
            change = "samples (taken at stage boundaries only) were thinned"
        else:
            change = (
                f"the sampling interval went from {self.interval_s:g} s to "
                f"{self.interval_now_s:g} s (doubled at {times})"
            )
        return [
            f"the sample buffer ({self.max_samples} samples) filled {len(self.halvings)} time(s): {change}; "
            "earlier samples were merged in pairs (activity and CPU % averaged over the pair's time, "
            "memory as the pair's maximum)"
        ]


def cpu_pct(start: HostReading, end: HostReading, wall_s: float) -> float | None:
    """Process CPU % between two host readings (100 = one core); None when it cannot be known."""
    if start.cpu_time_s is None or end.cpu_time_s is None or wall_s <= 0:
        return None
    return 100.0 * (end.cpu_time_s - start.cpu_time_s) / wall_s


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
