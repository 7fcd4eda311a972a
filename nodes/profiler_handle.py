"""The object behind the `WANBENCH_PROFILER` socket, and how this pack's nodes record their stages.

Profiling needs no wires: the workflow observer (`observer.py`) measures the whole prompt a Wan
Profiler is part of. The `profiler` output stays for workflows that wire it (saved workflows keep
loading): a wired node opens the prompt's observation with the wired profiler's settings if
nothing opened it yet, and the report takes its case name from it.

This pack's stage nodes record finer stages than a node-level row (`Model_Initialization` with its
children, one `Step_<i>_*` pair per step) through `maybe_profile`: when the current prompt is
observed, the node's work runs with the prompt's session as wan_core's tracer.

Shapes: none (no tensors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..wan_core import trace
from . import observer
from .profiler_settings import ProfilerSettings

StageSpec = tuple[str, str]  # (stage name, stage kind)


@dataclass(frozen=True)
class ProfilerHandle:
    """What a Wan Profiler's output carries: its settings (the observer holds the sessions)."""

    settings: ProfilerSettings


def _check_handle(profiler: Any) -> ProfilerHandle | None:
    if profiler is not None and not isinstance(profiler, ProfilerHandle):
        raise TypeError(f"profiler input must come from a Wan Profiler node; got {type(profiler).__name__}")
    return profiler


def observation_for_node(profiler: Any) -> Any:
    """The current prompt's observation; a wired profiler opens it when nothing did yet."""
    handle = _check_handle(profiler)
    found = observer.current_observation()
    if found is None and handle is not None:
        found = observer.observe_current_prompt(handle.settings)
    return found


@contextlib.contextmanager
def maybe_profile(profiler: Any, node_id: str | None, stages: Iterable[StageSpec]) -> Iterator[None]:
    """Run one stage node's work with the prompt's profiling session as the tracer, if it is observed.

    `stages` are the (name, kind) pairs the work records; they are remembered so that the node can
    be reported as cached when ComfyUI serves it from its cache in a later prompt.
    """
    observation = observation_for_node(profiler)
    if observation is None:
        yield
        return
    observation.node_records_own_stages(str(node_id), [tuple(s) for s in stages])
    try:
        with observation.session.activate():
            yield
    except BaseException as err:
        if observation.failure is None:
            observation.failure = type(err).__name__
        raise


def record_context(profiler: Any, **facts: Any) -> None:
    """Facts about the run (task, resolution, frames, steps, placement, ...) for the report."""
    observation = observation_for_node(profiler)
    if observation is not None:
        observation.set_context(**facts)


def single_stage(name: str, kind: str, **facts: Any) -> contextlib.AbstractContextManager[Any]:
    """A named stage for node work that wan_core does not name itself (loading, encoding, decode)."""
    return trace.stage(name, kind=kind, **facts)
