"""Run one API workflow on every rank of a parallel run (SPMD): rank 0 does everything, the other
ranks only what the denoising needs.

Which nodes a rank other than 0 runs is read from the socket types, so new node types take part
without being listed anywhere:

* a node with a `WAN22_DIT` input and no `WAN22_DIT` output (Wan Sampler) runs on every rank: it
  is where the ranks compute together;
* an output node with a `WANBENCH_PROFILER` input (Wan Benchmark Report) runs on every rank: each
  rank closes its own profiling session there and rank 0 gathers them into one report;
* the nodes those two need through `WAN22_DIT` and `WANBENCH_PROFILER` links (model loaders and
  whatever modifies a model, the profiler) run on every rank, each rank loading its own copy;
* every other node (text encoder, VAE, latents, decode, saving) runs on rank 0 only. When a node
  that runs on every rank takes a link from such a node (the text embeddings, the latent with its
  image conditioning, the saved video's path), rank 0 sends that value to the others right before
  the node runs (tensors on the CPU, through the gloo control group).

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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .nodes import NODE_CLASS_MAPPINGS
from .nodes.context import Bridge, use_bridge
from .nodes.types import DIT_EXPERTS, PROFILER
from .runner import RunResult, WorkflowError, is_link, run_node, validate_workflow
from .wan_core.runtime.distributed import ParallelRuntime, agree, broadcast_object, use_parallel

log = logging.getLogger(__name__)

__all__ = ["RankSchedule", "rank_schedule", "run_workflow_on_rank"]

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


def _reports(prompt: Mapping[str, Any], node_id: str) -> bool:
    """An output node that takes a profiler: a report node."""
    cls = NODE_CLASS_MAPPINGS[prompt[node_id]["class_type"]]
    return bool(getattr(cls, "OUTPUT_NODE", False)) and PROFILER in _in_types(prompt, node_id)


def rank_schedule(prompt: Mapping[str, Any]) -> RankSchedule:
    """What ranks other than 0 run in `prompt` (a validated API workflow)."""
    every_rank: set[str] = set()
    pending = [nid for nid in prompt if _samples(prompt, nid) or _reports(prompt, nid)]
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
        for node_id in result.order:
            if not runtime.is_root and node_id not in schedule.every_rank:
                continue
            if node_id in schedule.sent:
                _share_inputs(runtime, schedule.sent[node_id], result)
            log.info("rank %d running node %s (%s)", runtime.rank, node_id, prompt[node_id]["class_type"])
            run_node(node_id, prompt[node_id], prompt, result)
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
