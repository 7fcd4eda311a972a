"""Run one API workflow on every rank of a parallel run (SPMD): rank 0 does everything, the other
ranks only what the denoising needs.

Which nodes a rank other than 0 runs is read from the socket types, so new node types take part
without being listed anywhere:

* a node with a `WAN22_DIT` input and no `WAN22_DIT` output (Wan Sampler) runs on every rank: it
  is where the ranks compute together;
* a node with a `WANBENCH_PROFILER` output (Wan Profiler) and an output node that declares a
  `WANBENCH_PROFILER` input, wired or not (Wan Benchmark Report), run on every rank: profiling
  needs no wires, so they are found by the sockets they declare. Each rank observes the nodes it
  runs (the workflow observer, driven by `runner.run_observed`) and closes its own session in the
  report node, where rank 0 gathers every rank's record into one report;
* the nodes those need through `WAN22_DIT` and `WANBENCH_PROFILER` links (model loaders and
  whatever modifies a model) run on every rank, each rank loading its own copy;
* every other node (text encoder, VAE, latents, decode, saving) runs on rank 0 only. When a node
  that runs on every rank takes a link from such a node (the text embeddings, the latent with its
  image conditioning; the saved video's path where an older workflow wires it into the report),
  rank 0 sends that value to the others right before the node runs (tensors on the CPU, through
  the gloo control group). A rank's observer sees only the nodes that rank runs
  (`observed_view`), so the nodes of rank 0 are neither timed nor reported as cached there.

Every rank goes through the nodes in the same order, so the collectives inside them line up. The
ranks first agree on the workflow (a hash of the prompt after overrides): ranks started with
different workflows stop with an error before loading anything. Outputs are written by rank 0
only; the other ranks write nothing.

Shapes: none (graph plumbing only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .nodes import NODE_CLASS_MAPPINGS
from .nodes.api_prompt import is_link
from .nodes.context import Bridge, use_bridge
from .nodes.observer import InProcessPrompt, in_process_prompt
from .nodes.types import DIT_EXPERTS, PROFILER
from .runner import RunResult, WorkflowError, run_observed, validate_workflow
from .wan_core.runtime.distributed import ParallelRuntime, agree, broadcast_object, use_parallel

log = logging.getLogger(__name__)

__all__ = ["RankSchedule", "observed_view", "rank_schedule", "run_workflow_on_rank"]

SHARED_TYPES = frozenset({DIT_EXPERTS, PROFILER})  # computed by every rank for itself


@dataclass(frozen=True)
class RankSchedule:
    """The nodes every rank runs, and per such node the links whose values rank 0 sends."""

    every_rank: frozenset[str]
    sent: Mapping[str, tuple[tuple[str, int], ...]]  # node id -> (source node id, output slot) pairs


def _output_type(prompt: Mapping[str, Any], link: list[Any]) -> str:
    return NODE_CLASS_MAPPINGS[prompt[link[0]]["class_type"]].RETURN_TYPES[link[1]]


def _links(prompt: Mapping[str, Any], node_id: str) -> list[tuple[str, list[Any]]]:
    return [(name, v) for name, v in prompt[node_id].get("inputs", {}).items() if is_link(v)]


def _in_types(prompt: Mapping[str, Any], node_id: str) -> set[str]:
    return {_output_type(prompt, link) for _, link in _links(prompt, node_id)}


def _samples(prompt: Mapping[str, Any], node_id: str) -> bool:
    """A node that computes with a model (a `WAN22_DIT` input, no `WAN22_DIT` output): a sampler."""
    cls = NODE_CLASS_MAPPINGS[prompt[node_id]["class_type"]]
    return DIT_EXPERTS in _in_types(prompt, node_id) and DIT_EXPERTS not in cls.RETURN_TYPES


def _declared_input_types(cls: Any) -> set[str]:
    spec = cls.INPUT_TYPES()
    entries = [e for section in ("required", "optional") for e in spec.get(section, {}).values()]
    return {e[0] for e in entries if isinstance(e[0], str)}


def _profiles(prompt: Mapping[str, Any], node_id: str) -> bool:
    """A node that opens a profiling session (a `WANBENCH_PROFILER` output), or an output node that
    takes one (a `WANBENCH_PROFILER` input, wired or not): the profiler and the report node."""
    cls = NODE_CLASS_MAPPINGS[prompt[node_id]["class_type"]]
    if PROFILER in cls.RETURN_TYPES:
        return True
    return bool(getattr(cls, "OUTPUT_NODE", False)) and PROFILER in _declared_input_types(cls)


def rank_schedule(prompt: Mapping[str, Any]) -> RankSchedule:
    """What ranks other than 0 run in `prompt` (a validated API workflow)."""
    every_rank: set[str] = set()
    pending = [nid for nid in prompt if _samples(prompt, nid) or _profiles(prompt, nid)]
    while pending:
        node_id = pending.pop()
        if node_id in every_rank:
            continue
        every_rank.add(node_id)
        pending += [link[0] for _, link in _links(prompt, node_id) if _output_type(prompt, link) in SHARED_TYPES]
    sent: dict[str, tuple[tuple[str, int], ...]] = {}
    for node_id in every_rank:
        links = tuple((link[0], link[1]) for _, link in _links(prompt, node_id) if link[0] not in every_rank)
        if links:
            sent[node_id] = links
    return RankSchedule(frozenset(every_rank), sent)


def observed_view(prompt: Mapping[str, Any], schedule: RankSchedule, *, is_root: bool) -> Mapping[str, Any]:
    """The part of `prompt` a rank runs, as its workflow observer sees it: all of it on rank 0; on
    another rank the nodes every rank runs, without the links whose values rank 0 sends (those
    nodes run on rank 0 only: this rank's report neither lists them as cached nor misses them)."""
    if is_root:
        return prompt
    view: dict[str, Any] = {}
    for node_id in prompt:
        if node_id in schedule.every_rank:
            inputs = prompt[node_id].get("inputs", {})
            kept = {k: v for k, v in inputs.items() if not (is_link(v) and v[0] not in schedule.every_rank)}
            view[node_id] = {**prompt[node_id], "inputs": kept}
    return view


def workflow_digest(prompt: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def run_workflow_on_rank(prompt: Mapping[str, Any], bridge: Bridge, runtime: ParallelRuntime) -> RunResult:
    """Validate and run `prompt` as one rank of `runtime`'s run (see the module docstring)."""
    result = RunResult()
    with use_bridge(bridge), use_parallel(runtime):
        result.order = validate_workflow(prompt)
        agree(runtime, "workflow (after --set overrides)", workflow_digest(prompt))
        schedule = rank_schedule(prompt)
        if not any(_samples(prompt, nid) for nid in prompt):
            raise WorkflowError("a parallel run needs a node that samples with a WAN22_DIT model (Wan Sampler); "
                                "this workflow has none, so the other ranks would have nothing to do. Run it "
                                "without --nproc")
        own = [n for n in result.order if runtime.is_root or n in schedule.every_rank]
        view = observed_view(prompt, schedule, is_root=runtime.is_root)
        observed = InProcessPrompt(prompt_id=uuid.uuid4().hex, nodes=view, node_classes=NODE_CLASS_MAPPINGS)

        def receive(node_id: str) -> None:
            if node_id in schedule.sent:
                _share_inputs(runtime, schedule.sent[node_id], result)
            log.info("rank %d running node %s (%s)", runtime.rank, node_id, prompt[node_id]["class_type"])

        with in_process_prompt(observed):
            run_observed(prompt, own, result, observed, before_node=receive)
    return result


def _share_inputs(runtime: ParallelRuntime, links: tuple[tuple[str, int], ...], result: RunResult) -> None:
    """Rank 0 sends the values of `links`; the other ranks store them as those nodes' outputs."""
    values = broadcast_object(runtime, [result.outputs[src][slot] for src, slot in links] if runtime.is_root
                              else None)
    if runtime.is_root:
        return
    for (src, slot), value in zip(links, values, strict=True):
        outputs = list(result.outputs.get(src, ()))
        outputs += [None] * (slot + 1 - len(outputs))
        outputs[slot] = value
        result.outputs[src] = tuple(outputs)
