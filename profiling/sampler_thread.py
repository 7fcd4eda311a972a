"""A background thread that calls a sampling method at an interval until stopped or its owner is gone.

The thread holds only a weak reference to the method's object (the profile session): a session
that is dropped without `close()` (a node failed before the report node ran) is garbage-collected
as usual, and the thread then stops by itself instead of keeping the session alive forever.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable

from .timers import Clock

logger = logging.getLogger(__name__)


class SamplerThread:
    """Calls the bound method `sample()` every `interval_s` seconds (daemon thread; `stop()` joins it).

    `interval_s` may be changed while the thread runs (the session doubles it when its sample
    buffer is full); the new interval applies from the next wait. The thread ends when `stop()`
    is called, when `sample()` raises, or when `sample`'s object has been garbage-collected.
    """

    def __init__(self, sample: Callable[[], None], *, interval_s: float, clock: Clock) -> None:
        if not interval_s > 0:
            raise ValueError(f"sample interval must be > 0 s (e.g. 0.1); got {interval_s}")
        if getattr(sample, "__self__", None) is None:
            raise TypeError(
                f"SamplerThread needs a bound method (it keeps only a weak reference to its object); "
                f"got {sample!r}"
            )
        stop = threading.Event()
        # When the owner is collected the callback wakes the thread at once (no wait for the interval).
        self._sample = weakref.WeakMethod(sample, lambda _ref: stop.set())
        self._owner = type(sample.__self__).__name__
        self.interval_s = interval_s
        self._clock = clock
        self._stop = stop
        self._stopped_by_owner = False
        self._thread = threading.Thread(target=self._run, name="wanbench-profiler-sampler", daemon=True)
        self.error: BaseException | None = None

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            sample = self._sample()
            if sample is None:
                break
            try:
                sample()
            except Exception as err:  # noqa: BLE001 - logged and returned by stop() into the run's notes
                self.error = err
                logger.error("profiler sampling failed: %s", err)
                return
            finally:
                sample = None  # no strong reference to the owner while waiting
        if not self._stopped_by_owner and self._sample() is None:
            logger.warning(
                "the %s that owned this sampler thread was garbage-collected without being closed; "
                "the thread stopped (its records are lost: close the session to keep them)",
                self._owner,
            )

    def stop(self) -> str | None:
        """Stop and join. Returns the error the thread hit (kept as a note in the run), if any."""
        self._stopped_by_owner = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10.0)
        return None if self.error is None else f"the sampler thread stopped early: {self.error!r}"
