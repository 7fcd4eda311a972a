"""A background thread that calls a sampling function at a fixed interval until stopped."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .timers import Clock

logger = logging.getLogger(__name__)


class SamplerThread:
    """Calls `sample()` every `interval_s` seconds (daemon thread; `stop()` joins it)."""

    def __init__(self, sample: Callable[[], None], *, interval_s: float, clock: Clock) -> None:
        if not interval_s > 0:
            raise ValueError(f"sample interval must be > 0 s (e.g. 0.1); got {interval_s}")
        self._sample = sample
        self._interval_s = interval_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wanbench-profiler-sampler", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._sample()
            except Exception as err:  # noqa: BLE001 - logged and returned by stop() into the run's notes
                self.error = err
                logger.error("profiler sampling failed: %s", err)
                return

    def stop(self) -> str | None:
        """Stop and join. Returns the error the thread hit (kept as a note in the run), if any."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10.0)
        return None if self.error is None else f"the sampler thread stopped early: {self.error!r}"
