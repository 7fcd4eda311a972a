"""Clocks for stage timing: the real monotonic clock and a fake one that tests advance by hand;
`utc_now_iso` stamps the wall-clock time a run was recorded.

Stage wall time is read from the clock after the device has been synchronised (see
`memory.DeviceProbe.synchronize`), so queued GPU work is counted in the stage that issued it.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""

    def sleep(self, seconds: float) -> None:
        """Wait (used by the sampler thread between samples)."""


class MonotonicClock:
    """`time.perf_counter`."""

    def now(self) -> float:
        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class FakeClock:
    """A clock that moves only when told to: `advance(seconds)`."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back; got advance({seconds})")
        with self._lock:
            self._now += seconds

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, 0.001))


def utc_now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
