"""Nodes ComfyUI served from its cache in an observed prompt, and what is remembered for them.

A node served from the cache does not run and sends no event (or only a finish). When an
observation ends, every node that a node which ran needs (its non-lazy inputs) and that did not run
itself was served from the cache: `cached_nodes` finds them. `record_cached` records such a node as
cached, with the stages and times it had the last time it ran under observation (`NodeMemory`),
never as a measured zero; `remember` stores what each node that ran recorded, for later prompts;
`cached_runs` gives the sampler runs remembered for the cached nodes a sampler needs (the
high-noise sampler before a low-noise one), so that its steps are numbered after them.

Pure Python: the observation (`observation.py`) passes in its graph, session and bookkeeping.

Shapes: none (no tensors).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..wan_core.config import MODEL_INIT_STAGE, Stage
from . import observed_stages as roles
from .observed_graph import NodeMemory, PromptGraph, Remembered, RememberedStage
from .observed_sampling import RunSpan


@dataclass(frozen=True)
class FinishedNode:
    """A node that ran to its end in the observed prompt."""

    node_id: str
    class_type: str
    role: str  # an `observed_stages` role
    last_run: RunSpan | None  # its last sampler run, if it sampled


def cached_nodes(graph: PromptGraph, ran: Collection[str], seen_before: Collection[str],
                 finished_only: Collection[str]) -> list[str]:
    """Nodes a node that ran needs (non-lazy inputs) that did not run: ComfyUI's cache served them.

    `ran`: nodes that started under observation; `seen_before`: nodes ComfyUI had started or
    finished before the observation opened; `finished_only`: nodes that sent a finish with no start
    (served from the cache, and said so)."""
    known = set(ran) | set(seen_before) | set(finished_only)
    seen: set[str] = set()
    stack = [n for n in known if n in graph.nodes or n in ran]
    cached: list[str] = []
    while stack:
        node_id = stack.pop()
        for source in graph.needed_inputs(node_id):
            if source in seen:
                continue
            seen.add(source)
            if source not in ran and source not in seen_before:
                cached.append(source)
            stack.append(source)
    cached += [n for n in finished_only if n not in ran]
    return sorted(set(cached), key=lambda n: (len(n), n))


def ancestors(graph: PromptGraph, node_id: str) -> list[str]:
    """Every node `node_id` needs, directly or through others (non-lazy inputs)."""
    seen: list[str] = []
    stack = [node_id]
    while stack:
        for source in graph.needed_inputs(stack.pop()):
            if source not in seen:
                seen.append(source)
                stack.append(source)
    return seen


def cached_runs(graph: PromptGraph, memory: NodeMemory, node_id: str, ran: Collection[str]) -> list[RunSpan]:
    """Sampler runs remembered for the nodes `node_id` needs that did not run in this prompt."""
    found = []
    for source in ancestors(graph, node_id):
        if source in ran:
            continue
        item = memory.recall(source, graph.class_type(source), graph.signature(source))
        if item is not None and item.run is not None:
            found.append(item.run)
    return found


def record_cached(session: Any, memory: NodeMemory, graph: PromptGraph, node_id: str,
                  own_stages: Mapping[str, list[Stage]]) -> tuple[set[int], str | None]:
    """Record one cached node in `session`: the steps it covers (remembered step stages), and a
    note when what it did cannot be shown (a sampler never seen running)."""
    class_type = graph.class_type(node_id)
    role = roles.role_of(class_type, graph.node_class(class_type))
    steps: set[int] = set()
    if role.role == roles.APPARATUS:
        return steps, None
    item = memory.recall(node_id, class_type, graph.signature(node_id))
    facts = {"node_id": node_id, "class_type": class_type}
    if item is not None:
        for stage in item.stages:
            record = session.record_cached(stage.name, stage.kind, **stage.facts, measured_s=stage.seconds)
            if record.kind == "step-inference" and record.step is not None:
                steps.add(record.step)
        return steps, None
    if role.role in (roles.LOADER, roles.STAGE, roles.OTHER) and role.stage is not None:
        session.record_cached(*role.stage, **facts)
    elif role.role == roles.SELF:
        for name, kind in own_stages.get(node_id, []):
            session.record_cached(name, kind, **facts)
    elif role.role in (roles.SAMPLER, roles.PROGRESS_SAMPLER):
        return steps, (
            f"sampler node {node_id} ({class_type}) was served from ComfyUI's cache and did not run while "
            "the profiler watched it; its steps are not in this run"
        )
    return steps, None


def remember(memory: NodeMemory, graph: PromptGraph, record: Any, finished: Iterable[FinishedNode],
             own_stages: Mapping[str, list[Stage]]) -> None:
    """Remember per node what it recorded in `record` (the run record), for the prompts that find it cached."""
    by_node: dict[str, list[RememberedStage]] = {}
    for stage in record.stages:
        node_id = stage.facts.get("node_id") or stage.facts.get("sampler_node")
        if stage.cached or node_id is None or stage.name == MODEL_INIT_STAGE.name:
            continue
        keep = {k: v for k, v in stage.facts.items() if k not in ("unfinished", "measured_s", "error")}
        for key in ("expert", "cfg_mode"):
            if getattr(stage, key) is not None:
                keep[key] = getattr(stage, key)
        by_node.setdefault(str(node_id), []).append(RememberedStage(stage.name, stage.kind, stage.duration_s, keep))
    for node in finished:
        if node.role == roles.APPARATUS:
            continue
        stages = tuple(by_node.get(node.node_id, []))
        if node.role == roles.SELF:
            own = {name for name, _ in own_stages.get(node.node_id, [])}
            stages = tuple(
                RememberedStage(s.name, s.kind, s.duration_s, {"node_id": node.node_id})
                for s in record.stages
                if s.name in own and not s.cached
            )
        memory.remember(node.node_id, node.class_type, Remembered(graph.signature(node.node_id), stages, node.last_run))
