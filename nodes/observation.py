"""One profiled prompt: its profiling session and what each node of the prompt did.

`PromptObservation` turns node events (start, progress, finish: from ComfyUI's progress handler or
the in-process runner) and sampler events (from the model tap's wrappers) into the session's
stages, following the roles of `observed_stages`. It knows nothing of ComfyUI: `observer.py`
feeds it. It is driven from one thread (ComfyUI's prompt worker); the session's sampler thread
only reads telemetry.

The live view of the session (`live_view.py`, attached by the observer) stops when the
observation finishes, whichever path finishes it.

Nodes ComfyUI serves from its cache do not run and send no event. When the observation ends,
they are recorded as cached, with the stages and times they had the last time they ran under
observation, never as a measured zero (`observed_cache.py`).

Shapes: none (no tensors).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..wan_core.config import MODEL_INIT_STAGE, DiTConfig, Stage
from . import observed_cache
from . import observed_stages as roles
from .observed_facts import native_run_facts
from .observed_graph import NodeMemory, PromptGraph
from .observed_sampling import ProgressRun, RunSpan, StepNumbering, WrappedRun

log = logging.getLogger(__name__)


class PromptStopped(RuntimeError):
    """The prompt ended before every node that started had finished (an error or an interrupt)."""


class OutputsNotRun(RuntimeError):
    """Output nodes of the workflow did not run: ComfyUI dropped them (an invalid input upstream)
    or they were not among the nodes queued; the profile covers only part of the workflow."""


@dataclass
class _NodeRun:
    node_id: str
    class_type: str
    role: roles.NodeRole
    started_s: float
    frames: list[Any] = field(default_factory=list)
    progress: ProgressRun | None = None
    runs: list[RunSpan] = field(default_factory=list)
    finished: bool = False


class PromptObservation:
    """The profiling session of one prompt and the bookkeeping of its nodes."""

    def __init__(self, *, prompt_id: str, session: Any, graph: PromptGraph, memory: NodeMemory) -> None:
        self.prompt_id, self.session, self.graph, self.memory = prompt_id, session, graph, memory
        self.numbering = StepNumbering()
        self.notes: list[str] = []
        self.failure: str | None = None
        self.report_pending = False
        self.sampler_run: WrappedRun | None = None  # the core sampler run in progress (model tap)
        self.event_count = 0
        self._nodes: dict[str, _NodeRun] = {}
        self._cached_finished: set[str] = set()
        self._before: dict[str, str] = {}  # node id -> state, for nodes seen before the observation
        self._own_stages: dict[str, list[Stage]] = {}
        self._steps: list[tuple[int | None, bool]] = []
        self._cached_steps: set[int] = set()
        self._context_keys: set[str] = set()  # run facts a node of this pack stated itself
        self._sampled: dict[str, Any] = {}  # the first sampler and what its run showed (run facts)
        self.closed = False
        self.record: Any = None  # the run record, once finished
        self.live_view: Any = None  # the UI's live view of the session (`live_view.LiveView`), if any

    # -- what happened before the observation opened -----------------------------------------
    def seed(self, states: Mapping[str, str]) -> None:
        """Nodes ComfyUI had already started or finished when the profiler opened this prompt."""
        for node_id, state in states.items():
            if roles.role_of(self.graph.class_type(node_id)).role == roles.APPARATUS:
                continue
            self._before[node_id] = state
        if self._before:
            listed = ", ".join(f"{n} ({self.graph.class_type(n)})" for n in sorted(self._before))
            self.note(f"nodes that ComfyUI ran before the profiler started are not timed: {listed}")

    # -- node events ----------------------------------------------------------------------------
    def node_started(self, node_id: str) -> None:
        self.event_count += 1
        previous = self._nodes.get(node_id)
        if previous is not None and not previous.finished:  # started again (lazy inputs): time from now
            for frame in reversed(previous.frames):
                self.session.discard_stage(frame)
            if previous.progress is not None:
                previous.progress.cancel()
        class_type = self.graph.class_type(node_id)
        role = roles.role_of(class_type, self.graph.node_class(class_type))
        run = _NodeRun(node_id, class_type, role, self.session.elapsed_s())
        self._nodes[node_id] = run
        facts = {"node_id": node_id, "class_type": class_type, "title": self.graph.title(node_id)}
        if role.role == roles.LOADER:
            model_file = roles.model_file_of(dict(self.graph.node(node_id).get("inputs", {})))
            piece = self.session.open_stage(*MODEL_INIT_STAGE)
            run.frames = [piece]
            child_facts = dict(facts, model_file=model_file, expert=roles.expert_from_file(model_file))
            run.frames.append(self.session.open_stage(*role.stage, parent=piece, **child_facts))
        elif role.role in (roles.STAGE, roles.OTHER):
            assert role.stage is not None
            run.frames = [self.session.open_stage(*role.stage, **facts)]
        elif role.role in (roles.SAMPLER, roles.PROGRESS_SAMPLER):
            why = (
                "a sampler of another pack: steps are known from its progress updates"
                if role.role == roles.PROGRESS_SAMPLER
                else "no model tap in this prompt (it did not come through POST /prompt): loading, "
                "expert, CFG mode and FLOPs of its steps are not known"
            )
            run.progress = ProgressRun(self, node_id, offset=self.numbering.next_free(), why=why)
            if role.role == roles.PROGRESS_SAMPLER and not self._sampled:
                self._sampled = {"node_id": node_id}  # run facts from its inputs (no model tap sees it)

    def node_progress(self, node_id: str, value: float, maximum: float) -> None:
        self.event_count += 1
        run = self._nodes.get(node_id)
        if run is not None and run.progress is not None and not run.finished:
            run.progress.update(int(value), int(maximum))

    def node_finished(self, node_id: str) -> None:
        self.event_count += 1
        run = self._nodes.get(node_id)
        if run is None or run.finished:
            self._cached_finished.add(node_id)  # finish without start: served from the cache
            return
        run.finished = True
        for frame in reversed(run.frames):
            self.session.close_stage(frame)
        if run.progress is not None:
            span = run.progress.end()
            if span.num_steps:
                self.numbering.add(span)
                run.runs.append(span)
            run.progress = None
        if run.role.role != roles.APPARATUS:
            self.session.add_activation(run.started_s, self.session.elapsed_s())

    def node_records_own_stages(self, node_id: str, stages: Iterable[Stage]) -> None:
        """A node of this pack records `stages` itself (`maybe_profile`)."""
        self._own_stages[str(node_id)] = list(stages)

    def running_nodes(self) -> set[str]:
        """Nodes started and not finished (plus those running before the observation opened),
        the profiler's own nodes left out (two report nodes never wait for each other)."""
        running = {n for n, r in self._nodes.items() if not r.finished and r.role.role != roles.APPARATUS}
        running |= {n for n, state in self._before.items() if state == "running" and n not in self._nodes}
        return running

    def set_context(self, **facts: Any) -> None:
        """Run facts a node states (this pack's nodes); the observer does not override them."""
        self._context_keys |= set(facts)
        self.session.set_context(**facts)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # -- sampler runs (model tap wrappers) ----------------------------------------------------
    def begin_sampler_run(
        self,
        node_id: str,
        label: Any,
        sigmas: list[float],
        *,
        cfg: float | None,
        sigma_max: float | None,
        latent_shape: tuple[int, ...] | None = None,
        dtype: str | None = None,
    ) -> WrappedRun:
        run = self._nodes.get(node_id)
        if run is not None and run.progress is not None:
            run.progress.cancel()  # the wrappers time this sampler's steps
            run.progress = None
        if not self._sampled:
            self._sampled = {"node_id": node_id, "latent_shape": latent_shape, "dtype": dtype}
        starts = sigma_max is not None and bool(sigmas) and sigmas[0] >= sigma_max * (1 - 1e-6)
        earlier = observed_cache.cached_runs(self.graph, self.memory, node_id, self._nodes)
        offset, note = self.numbering.place(
            node_id, sigmas[0] if sigmas else None, starts_schedule=starts, earlier=earlier
        )
        if note:
            self.note(note)
        return WrappedRun(self, node_id, label, sigmas, offset=offset, cfg=cfg)

    def end_sampler_run(self, wrapped: WrappedRun, error: BaseException | None) -> None:
        span = wrapped.end(error)
        if error is not None and self.failure is None:
            self.failure = type(error).__name__
        if span.num_steps:
            self.numbering.add(span)
        run = self._nodes.get(wrapped.node_id)
        if run is not None:
            run.runs.append(span)

    def saw_model(self, config: DiTConfig) -> None:
        """The dims of a DiT a core sampler ran (read off the loaded weights): names the task."""
        self._sampled.setdefault("configs", set()).add(config)

    def step_recorded(self, step: int | None, *, attributable: bool) -> None:
        self._steps.append((step, attributable))

    # -- the end ------------------------------------------------------------------------------
    def cached_nodes(self) -> list[str]:
        """Nodes a node that ran needs (non-lazy inputs) that did not run: ComfyUI's cache served them."""
        return observed_cache.cached_nodes(self.graph, self._nodes, self._before, self._cached_finished)

    def outputs_not_run(self) -> list[str]:
        """Output nodes of the prompt that sent no event at all (ComfyUI runs, or finishes from its
        cache, every output node it keeps)."""
        seen = set(self._nodes) | self._cached_finished | set(self._before)
        missing = []
        for node_id in self.graph.nodes:
            class_type = self.graph.class_type(node_id)
            node_class = self.graph.node_class(class_type)
            if node_id in seen or getattr(node_class, "OUTPUT_NODE", False) is not True:
                continue
            if roles.role_of(class_type).role != roles.APPARATUS:
                missing.append(node_id)
        return missing

    def finish(self, *, error: BaseException | None = None, stopped: bool = False) -> Any:
        """Close the session: cached nodes recorded, unfinished nodes noted, memory updated.

        `stopped`: ComfyUI ended the prompt early (an error or an interrupt); the run is failed even
        when every node that started had finished."""
        if self.closed:
            raise RuntimeError(f"the observation of prompt {self.prompt_id} was already finished")
        self.closed = True
        try:
            return self._close(error=error, stopped=stopped)
        finally:
            self._stop_live_view()  # on every path, errors included

    def _close(self, *, error: BaseException | None, stopped: bool) -> Any:
        for node_id in self.cached_nodes():
            self._record_cached(node_id)
        unfinished = [r for r in self._nodes.values() if not r.finished and r.role.role != roles.APPARATUS]
        if unfinished and error is None:
            names = ", ".join(f"{r.node_id} ({r.class_type})" for r in unfinished)
            error = PromptStopped(f"the prompt stopped before node(s) {names} finished (an error or an interrupt)")
            self.note(str(error))
        elif stopped and error is None:
            error = PromptStopped("ComfyUI ended the prompt early (an error or an interrupt)")
            self.note(str(error))
        dropped = self.outputs_not_run()
        if dropped:
            names = ", ".join(f"{n} ({self.graph.class_type(n)})" for n in dropped)
            self.note(
                f"output node(s) {names} did not run: ComfyUI dropped them (an invalid input upstream) or "
                "they were not queued; this profile covers only part of the workflow"
            )
            error = error or OutputsNotRun(names)
        for r in unfinished:
            if r.progress is not None:
                r.progress.end()
        if self.failure is not None:
            self.note(f"the run stopped with {self.failure} during sampling")
        self._set_step_context()
        if self._sampled:
            self._set_native_context()
        for text in self.notes:
            self.session.add_note(text)
        record = self.session.close(error=error)
        self.record = record
        self._remember(record)
        return record

    def _stop_live_view(self) -> None:
        """The live view ends with the session, on every path that closes it."""
        if self.live_view is not None:
            self.live_view.detach()
            self.live_view = None

    def _set_step_context(self) -> None:
        steps = [s for s, _ in self._steps]
        if not self._steps:
            return
        if all(ok for _, ok in self._steps) and None not in steps:
            self.session.set_context(steps=len(set(steps) | self._cached_steps))
        else:
            self.note("the number of denoising steps is n/a: some stages could not be attributed to one step")

    def _set_native_context(self) -> None:
        """Run facts of a graph of core nodes (or another pack's sampler): `observed_facts`."""
        facts = native_run_facts(self.graph, self._sampled)
        self.session.set_context(**{k: v for k, v in facts.items() if k not in self._context_keys})

    def _record_cached(self, node_id: str) -> None:
        steps, note = observed_cache.record_cached(self.session, self.memory, self.graph, node_id, self._own_stages)
        self._cached_steps |= steps
        if note:
            self.note(note)

    def _remember(self, record: Any) -> None:
        """Remember per node what it recorded now, for the prompts that find it cached."""
        finished = [
            observed_cache.FinishedNode(r.node_id, r.class_type, r.role.role, r.runs[-1] if r.runs else None)
            for r in self._nodes.values()
            if r.finished
        ]
        observed_cache.remember(self.memory, self.graph, record, finished, self._own_stages)
