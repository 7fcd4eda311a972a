"""The object behind the `WANBENCH_PROFILER` socket: one profiling session per executed prompt.

ComfyUI caches node outputs: when a prompt is queued again, a loader whose inputs did not change
does not run, so its stage is not measured this time. Reporting it as 0 s would be false. The
handle therefore remembers, per stage node (by its node id), which stages that node recorded the
last time it actually ran. The report node (never cached) asks the handle to finish the run: every
stage node of the current graph that did not run in this prompt has its stages recorded as
*cached* (served from ComfyUI's cache, no time spent now), never as measured zeros.

The handle outlives prompts (it is the cached output of the Wan Profiler node); a session is
opened lazily by the first stage node that runs and closed by the report node. A stage node that
raises (ComfyUI's interrupt included) closes the session as failed, so its sampler thread stops;
a handle dropped with a session still open (ComfyUI evicted it from its cache) closes that session
when it is garbage-collected.

Shapes: none (no tensors).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..wan_core import trace
from . import comfy_bridge
from .live_view import LiveView

log = logging.getLogger(__name__)

StageSpec = tuple[str, str]  # (stage name, stage kind)


@dataclass
class ProfilerSettings:
    """What the Wan Profiler node was configured with."""

    case_name: str
    sample_interval_ms: int
    node_id: str | None = None  # the Wan Profiler node's id: where the UI shows the live view


@dataclass
class ProfilerHandle:
    """Per-prompt sessions plus the memory of which node produced which stages."""

    settings: ProfilerSettings
    _session: Any = None
    _ran_this_run: set[str] = field(default_factory=set)
    _stages_by_node: dict[str, list[StageSpec]] = field(default_factory=dict)
    _context: dict[str, Any] = field(default_factory=dict)
    _last_seconds: dict[str, float] = field(default_factory=dict)
    _prompt_id: str | None = None
    _runs_finished: int = 0
    _finalizer: Any = None  # weakref.finalize that closes an open session if the handle is dropped
    _live: LiveView | None = None  # the live view of the open session (stops with it)

    # -- session lifetime ---------------------------------------------------------------------
    def _open_session(self) -> Any:
        prompt_id = comfy_bridge.current_prompt_id()
        if self._session is not None and prompt_id is not None and prompt_id != self._prompt_id:
            # The previous prompt failed or was interrupted before its report node ran.
            log.warning(
                "prompt %s did not reach Wan Benchmark Report; its measurements are discarded",
                self._prompt_id,
            )
            self._discard_session(RuntimeError("the prompt ended before the report node ran"))
        if self._session is None:
            self._prompt_id = prompt_id
            from ..profiling import ProfileSession

            self._session = ProfileSession(
                case_name=self.settings.case_name, sample_interval_s=self.settings.sample_interval_ms / 1000.0
            )
            self._session.open()
            self._live = LiveView.attach(self._session, self.settings.node_id)
            # The finalizer holds the session, never the handle: a dropped handle is collected and
            # its open session closed, so the session's sampler thread cannot outlive it.
            self._finalizer = weakref.finalize(self, _close_abandoned_session, self._session)
            if self._context:
                self._session.set_context(**self._context)
        return self._session

    def _forget_session(self) -> None:
        """Drop the (closed) session of this prompt and what it ran."""
        if self._live is not None:
            self._live.detach()
            self._live = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._session = None
        self._ran_this_run = set()

    def _discard_session(self, error: BaseException) -> None:
        """Close the open session as failed (its measurements are not reported) and forget it."""
        session = self._session
        self._forget_session()
        if session is not None and session.is_open:
            session.close(error=error)

    @property
    def session_open(self) -> bool:
        return self._session is not None

    @property
    def runs_finished(self) -> int:
        return self._runs_finished

    # -- what stage nodes call ----------------------------------------------------------------
    @contextlib.contextmanager
    def stage_node(self, node_id: str, stages: Iterable[StageSpec]) -> Iterator[None]:
        """Run one stage node's work with this session as the tracer.

        `stages` are the (name, kind) pairs the node's work produces; they are remembered so that
        the node can be reported as cached when ComfyUI skips it in a later prompt.
        """
        session = self._open_session()
        try:
            with session.activate():
                yield
        except BaseException as err:
            # A failed or interrupted node ends this prompt: close the session now (stopping its
            # sampler thread) instead of leaving it open until a later prompt or forever.
            log.warning(
                "node %s raised %s; the profiling session of prompt %s is closed as failed",
                node_id,
                type(err).__name__,
                self._prompt_id,
            )
            self._discard_session(err)
            raise
        self._ran_this_run.add(node_id)
        self._stages_by_node[node_id] = list(stages)

    def set_context(self, **facts: Any) -> None:
        """Facts about the run (task, resolution, frames, steps, placement, ...) for the report."""
        self._context.update(facts)
        if self._session is not None:
            self._session.set_context(**facts)

    # -- what the report node calls -----------------------------------------------------------
    def finish_run(self, graph_node_ids: Iterable[str] | None) -> Any:
        """Close this prompt's session and return it.

        Stage nodes that recorded into this handle before, are part of the current graph
        (`graph_node_ids`; None means "all known nodes") and did not run in this prompt are
        recorded as cached, stage by stage, carrying the duration measured the last time the
        stage actually ran (fact `measured_s`, absent if it never ran while this handle watched).
        """
        session = self._open_session()
        in_graph = set(self._stages_by_node) if graph_node_ids is None else set(graph_node_ids)
        cached = [nid for nid in self._stages_by_node if nid in in_graph and nid not in self._ran_this_run]
        for node_id in cached:
            for name, kind in self._stages_by_node[node_id]:
                previous = self._last_seconds.get(name)
                facts = {} if previous is None else {"measured_s": previous}
                session.record_cached(name, kind, **facts)
        if cached:
            trace_names = ", ".join(cached)
            log.info("stages of nodes %s were served from ComfyUI's cache; reported as cached", trace_names)
        record = session.close()
        for stage in record.stages:
            if not stage.cached:
                self._last_seconds[stage.name] = stage.duration_s
        self._forget_session()
        self._runs_finished += 1
        return session


def _close_abandoned_session(session: Any) -> None:
    """weakref.finalize callback: close a session whose handle was garbage-collected while open."""
    if session.is_open:
        log.warning("a Wan Profiler was dropped with its session open; closing it")
        session.close(error=RuntimeError("the Wan Profiler handle was dropped before its report ran"))


@contextlib.contextmanager
def maybe_profile(
    profiler: ProfilerHandle | None, node_id: str | None, stages: Iterable[StageSpec]
) -> Iterator[None]:
    """`profiler.stage_node(...)` when a profiler is wired, else nothing."""
    if profiler is None:
        yield
        return
    if not isinstance(profiler, ProfilerHandle):
        raise TypeError(f"profiler input must come from a Wan Profiler node; got {type(profiler).__name__}")
    with profiler.stage_node(str(node_id), stages):
        yield


def single_stage(name: str, kind: str, **facts: Any) -> contextlib.AbstractContextManager[Any]:
    """A named stage for node work that wan_core does not name itself (loading, encoding, decode)."""
    return trace.stage(name, kind=kind, **facts)
