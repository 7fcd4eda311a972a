"""The workflow observer: profiles the whole prompt a Wan Profiler / Wan Benchmark Report is part of.

No wires are needed. The first of these to run in a prompt opens the prompt's observation
(`observe_current_prompt`): Wan Profiler (when it runs), Wan Benchmark Report (at its start: it is
an async output node with no needed inputs, so ComfyUI starts it before loaders, encoders and
samplers), or a node of this pack whose `profiler` input is wired. The observation is keyed by
the prompt id ComfyUI executes (`comfy_execution.utils.get_executing_context`), and it is fed
through ComfyUI's own extension points, nothing patched:

- a `ProgressHandler` added to the prompt's progress registry (`progress_hook.py`): node
  start / progress / finish. ComfyUI replaces the registry for every prompt, so the handler never
  sees another prompt;
- model wrappers on a clone of each loaded model (`model_tap.py`, inserted by `prompt_rewrite.py`):
  per-step timing of core samplers;
- the end of the prompt: Wan Benchmark Report waits until nothing else runs, then closes the
  observation and writes the report. A watcher task on the prompt's event loop is cancelled by
  ComfyUI when the prompt's execution ends (success, error or interrupt: `asyncio.run` cancels
  what is left); it closes an observation no report closed, so its sampler thread never outlives
  the prompt (e.g. when ComfyUI dropped the report node for an invalid input). The handler's
  `reset()`, called when the next prompt starts, is the last backstop.

The in-process runner drives the same observation through `InProcessPrompt` (node start / finish).
Profiling never stops a run: an error inside the observer is logged and noted in the report.

Shapes: none (no tensors).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from . import comfy_bridge, progress_hook
from .live_view import LiveView
from .observation import PromptObservation
from .observed_graph import NodeMemory, PromptGraph
from .profiler_settings import DEFAULT_INTERVAL_MS, ProfilerSettings, check_profiler_settings

log = logging.getLogger(__name__)

PROFILER_CLASS = "WanBenchProfiler"
QUIET_POLL_S = 0.02  # how often the report checks that nothing else runs
QUIET_POLLS = 2  # consecutive quiet polls with no new event before the report is written
OBSERVER_ERRORS = (RuntimeError, ValueError, TypeError, KeyError, AttributeError, IndexError, OSError)


@dataclass
class _Active:
    observation: PromptObservation
    registry: Any = None  # ComfyUI's progress registry the handler is in (None in-process)
    watcher: asyncio.Task[None] | None = None


_LOCK = threading.Lock()
_ACTIVE: dict[str, _Active] = {}
_MEMORY = NodeMemory()


# ------------------------------------------------------------------------------------------------
# Which prompt runs now
# ------------------------------------------------------------------------------------------------
@dataclass
class InProcessPrompt:
    """A prompt run by the in-process runner: its id and graph, and the node events it reports."""

    prompt_id: str
    nodes: Mapping[str, Mapping[str, Any]]
    node_classes: Mapping[str, Any]

    def graph(self) -> PromptGraph:
        return PromptGraph(self.nodes, node_class=self.node_classes.get)

    def node_started(self, node_id: str) -> None:
        _feed(self.prompt_id, "node_started", node_id)

    def node_finished(self, node_id: str) -> None:
        _feed(self.prompt_id, "node_finished", node_id)

    def ended(self, error: BaseException | None) -> None:
        """The runner finished the prompt: an observation no report closed is closed now, and forgotten."""
        active = _ACTIVE.get(self.prompt_id)
        if active is not None and not active.observation.closed:
            end_observation(active.observation, error=error, reason="the workflow ended before its report")
        with _LOCK:
            _ACTIVE.pop(self.prompt_id, None)


_IN_PROCESS: contextvars.ContextVar[InProcessPrompt | None] = contextvars.ContextVar(
    "wanbench_in_process_prompt", default=None
)


@contextlib.contextmanager
def in_process_prompt(prompt: InProcessPrompt) -> Iterator[InProcessPrompt]:
    """Run the block as `prompt` (what the in-process runner does around a workflow)."""
    token = _IN_PROCESS.set(prompt)
    try:
        yield prompt
    finally:
        _IN_PROCESS.reset(token)


def current_prompt_id() -> str | None:
    """The prompt being executed: the runner's, ComfyUI's executing context, or its last prompt id."""
    in_process = _IN_PROCESS.get()
    if in_process is not None:
        return in_process.prompt_id
    utils = sys.modules.get("comfy_execution.utils")
    get_context = getattr(utils, "get_executing_context", None)
    context = get_context() if get_context is not None else None
    if context is not None and getattr(context, "prompt_id", None):
        return str(context.prompt_id)
    return comfy_bridge.current_prompt_id()


def observation_for(prompt_id: str | None) -> PromptObservation | None:
    """The open observation of a prompt, or None (the fast path of every model wrapper)."""
    if prompt_id is None:
        return None
    active = _ACTIVE.get(prompt_id)
    return None if active is None or active.observation.closed else active.observation


def current_observation() -> PromptObservation | None:
    return observation_for(current_prompt_id())


# ------------------------------------------------------------------------------------------------
# Opening
# ------------------------------------------------------------------------------------------------
def settings_from_graph(nodes: Mapping[str, Mapping[str, Any]]) -> ProfilerSettings:
    """The settings of the one Wan Profiler in a prompt (its widget values)."""
    found = [nid for nid, node in nodes.items() if node.get("class_type") == PROFILER_CLASS]
    if not found:
        raise ValueError(
            "Wan Benchmark Report found no Wan Profiler in this workflow; add a Wan Profiler node "
            "(no wires needed): it names the case and the sampling interval"
        )
    if len(found) > 1:
        raise ValueError(
            f"this workflow has {len(found)} Wan Profiler nodes ({', '.join(sorted(found))}); keep one: "
            "one profiler measures the whole prompt"
        )
    inputs = nodes[found[0]].get("inputs", {})
    case_name, interval = inputs.get("case_name"), inputs.get("sample_interval_ms", DEFAULT_INTERVAL_MS)
    if not isinstance(case_name, str) or isinstance(interval, list):
        raise ValueError(
            f"the Wan Profiler (node {found[0]}) gets its case_name or sample_interval_ms from a link; "
            "type them into the node, or wire its profiler output into the report"
        )
    return check_profiler_settings(case_name, interval, node_id=str(found[0]))


def observe_current_prompt(settings: ProfilerSettings | None = None) -> PromptObservation:
    """The observation of the prompt being executed, opened now if none is open."""
    prompt_id = current_prompt_id()
    if prompt_id is None:
        raise RuntimeError(
            "the Wan Profiler can only measure a prompt that ComfyUI (or `wanbench run`) executes; no prompt is running"
        )
    in_process = _IN_PROCESS.get()
    registry = None if in_process is not None else progress_hook.progress_registry()
    with _LOCK:
        active = _ACTIVE.get(prompt_id)
    if active is not None and active.registry is registry:
        return active.observation  # possibly closed already (another report node wrote it)
    _end_stale(prompt_id, registry)
    graph = in_process.graph() if in_process is not None else progress_hook.graph_of(registry)
    settings = settings or settings_from_graph(graph.nodes)
    from ..profiling import ProfileSession

    session = ProfileSession(case_name=settings.case_name, sample_interval_s=settings.sample_interval_ms / 1000.0)
    session.open()
    observation = PromptObservation(prompt_id=prompt_id, session=session, graph=graph, memory=_MEMORY)
    active = _Active(observation)
    try:
        if registry is not None:
            observation.seed(progress_hook.node_states(registry))
            _add_handler(active, registry)
        with _LOCK:
            _ACTIVE[prompt_id] = active
        active.watcher = _start_watcher(observation)
        observation.live_view = LiveView.attach(session, settings.node_id or _profiler_node(graph))
    except BaseException as err:  # never leave a session (and its sampler thread) behind half-opened
        with _LOCK:
            _ACTIVE.pop(prompt_id, None)
        if not observation.closed:
            observation.finish(error=err)
        _remove_handler(active)
        raise
    log.info("profiling prompt %s as case %r", prompt_id, settings.case_name)
    return observation


def _profiler_node(graph: PromptGraph) -> str | None:
    """The id of the prompt's one Wan Profiler node (where the UI shows the live view), if any."""
    found = [str(nid) for nid in graph.nodes if graph.class_type(str(nid)) == PROFILER_CLASS]
    return found[0] if len(found) == 1 else None


def _add_handler(active: _Active, registry: Any) -> None:
    observation = active.observation

    def on_reset() -> None:  # ComfyUI started another prompt (or unregistered the handler)
        if not observation.closed:
            guarded(
                observation,
                "the end of the prompt",
                lambda: end_observation(observation, error=None, reason="the next prompt started before its end"),
            )

    progress_hook.add_handler(_feed, on_reset)
    active.registry = registry


def _feed(prompt_id: str, event: str, *args: Any) -> None:
    """Pass a node event to the prompt's observation; an observer error is logged, never raised."""
    observation = observation_for(str(prompt_id))
    if observation is None:
        return
    guarded(observation, event, lambda: getattr(observation, event)(*(str(args[0]), *args[1:])))


def guarded(observation: PromptObservation, what: str, call: Any) -> Any:
    """Run one observer action; an error is logged and noted, and the run goes on unmeasured there."""
    try:
        return call()
    except OBSERVER_ERRORS as err:
        log.warning("the profiler failed at %s: %s: %s (the run goes on)", what, type(err).__name__, err, exc_info=err)
        observation.note(f"the profiler failed at {what} ({type(err).__name__}: {err}); figures there are missing")
        return None


# ------------------------------------------------------------------------------------------------
# The end of the prompt
# ------------------------------------------------------------------------------------------------
def _start_watcher(observation: PromptObservation) -> asyncio.Task[None] | None:
    if _IN_PROCESS.get() is not None:
        return None  # the in-process runner ends the observation itself
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None  # no event loop (in-process runner): the runner ends the observation itself
    return loop.create_task(_watch(observation), name=f"wanbench-observer-{observation.prompt_id}")


async def _watch(observation: PromptObservation) -> None:
    try:
        await asyncio.Event().wait()  # never set: the task lives until ComfyUI's prompt loop shuts down
    except asyncio.CancelledError:
        if not observation.closed and not observation.report_pending:
            guarded(
                observation,
                "the end of the prompt",
                lambda: end_observation(observation, error=None, reason="the prompt ended without running its report"),
            )
        raise


async def wait_until_quiet(observation: PromptObservation, *, me: str | None) -> None:
    """Return once no node but `me` runs and no event arrived for `QUIET_POLLS` polls.

    While a synchronous node runs, ComfyUI's event loop does not run this coroutine; it resumes
    when ComfyUI has nothing left to start (or another async node yields), so a quiet poll means
    the rest of the prompt has run.
    """
    observation.report_pending = True
    if _IN_PROCESS.get() is not None:
        return  # the in-process runner starts the report after every other node has finished
    quiet, last = 0, -1
    while quiet < QUIET_POLLS:
        await asyncio.sleep(QUIET_POLL_S)
        busy = observation.running_nodes() - ({me} if me is not None else set())
        quiet = quiet + 1 if not busy and observation.event_count == last else 0
        last = observation.event_count


def end_observation(
    observation: PromptObservation,
    *,
    error: BaseException | None,
    reason: str | None = None,
    stopped: bool = False,
) -> Any:
    """Close an observation (idempotent); returns its run record, None if it was already closed.

    A closed observation stays known for its prompt (a second report node of the prompt writes the
    same record) until another prompt opens one, or the in-process runner ends its prompt."""
    with _LOCK:
        active = _ACTIVE.get(observation.prompt_id)
    if observation.closed:
        return None
    if reason:
        log.warning("prompt %s: %s; its profiling session is closed", observation.prompt_id, reason)
        observation.note(f"{reason}; no report node finished this profile")
    try:
        record = observation.finish(error=error, stopped=stopped)
    finally:
        if active is not None:
            _remove_handler(active)
    return record


def _remove_handler(active: _Active) -> None:
    if active.registry is not None:
        progress_hook.remove_handler(active.registry, active.observation.prompt_id)


def _end_stale(prompt_id: str, registry: Any) -> None:
    """Forget observations no longer current, closing any still open (backstop: a lost end signal).

    ComfyUI runs one prompt at a time: when it opens one, every other prompt's observation is stale,
    and so is one of an earlier run that reused this prompt id (another registry). The in-process
    runner ends and forgets its own observations; for it, only an observation of this prompt id
    opened elsewhere (by ComfyUI in the same process) is stale."""
    in_process = _IN_PROCESS.get() is not None
    with _LOCK:
        stale = [
            a.observation
            for pid, a in _ACTIVE.items()
            if (pid == prompt_id and a.registry is not registry) or (pid != prompt_id and not in_process)
        ]
    for observation in stale:
        end_observation(observation, error=None, reason="a later prompt started before its end")
        with _LOCK:
            _ACTIVE.pop(observation.prompt_id, None)


def open_prompt_ids() -> list[str]:
    """Prompts with an open observation (tests check nothing is left behind)."""
    with _LOCK:
        return [pid for pid, a in _ACTIVE.items() if not a.observation.closed]
