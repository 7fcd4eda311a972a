"""The only link from wan_core to profiling: named stages and events, free when nobody listens.

`wan_core` code marks what it does with `with stage("Step_3_Inference", kind="step-inference",
flops=...):`. A profiler (see `profiling/session.py`) installs itself with `use_tracer(tracer)`
for the duration of a call; outside that, `stage()` returns a shared no-op context manager and
costs one context-variable read.

Stage kinds: "init", "preprocess", "encode", "step-loading", "step-inference", "decode", "total",
and "other" for work the profiler knows only by its name (a graph node of another pack).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, ContextManager, Protocol

STAGE_KINDS = ("init", "preprocess", "encode", "step-loading", "step-inference", "decode", "total", "other")


class Tracer(Protocol):
    """What a profiler implements to receive stages and events from wan_core."""

    def stage(self, name: str, kind: str, facts: dict[str, Any]) -> ContextManager[Any]:
        """Measure the enclosed block as one stage; `facts` (expert, cfg_mode, flops, ...) are kept."""

    def event(self, name: str, facts: dict[str, Any]) -> None:
        """Record a point event (e.g. an expert switch, a recompile)."""


_TRACER: contextvars.ContextVar[Tracer | None] = contextvars.ContextVar("wanbench_tracer", default=None)
_NO_OP = contextlib.nullcontext()


def current_tracer() -> Tracer | None:
    return _TRACER.get()


@contextlib.contextmanager
def use_tracer(tracer: Tracer | None) -> Iterator[None]:
    """Route stages and events to `tracer` inside the block (None disables tracing)."""
    token = _TRACER.set(tracer)
    try:
        yield
    finally:
        _TRACER.reset(token)


def stage(name: str, *, kind: str, **facts: Any) -> ContextManager[Any]:
    """A named stage. A no-op unless a tracer is installed."""
    tracer = _TRACER.get()
    if tracer is None:
        return _NO_OP
    if kind not in STAGE_KINDS:
        raise ValueError(f"unknown stage kind {kind!r}; expected one of {STAGE_KINDS}")
    return tracer.stage(name, kind, facts)


def event(name: str, **facts: Any) -> None:
    """A point event. A no-op unless a tracer is installed."""
    tracer = _TRACER.get()
    if tracer is not None:
        tracer.event(name, facts)
