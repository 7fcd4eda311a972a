"""Run facts of a profiled graph that the pack's own nodes did not state: read off the prompt.

For graphs of ComfyUI's core nodes (or another pack's sampler) the report's run facts (size,
frames, solver, seed, DiT dtype, task) come from the prompt's inputs and from what the first
sampler run showed (`sampled`: the node id, the latent shape, the DiT configs and dtype the model
tap saw). A fact that cannot be read is left out (the report shows `n/a`), never guessed.

Shapes: latent shapes are (B, C, T, H, W); no tensors here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..wan_core.config import PREPROCESS_STAGE, PRESETS, WAN21_VAE, WAN22_VAE, DiTConfig
from . import observed_stages as roles
from .observed_graph import PromptGraph


def native_run_facts(graph: PromptGraph, sampled: Mapping[str, Any]) -> dict[str, Any]:
    """The run facts of `graph` whose first sampler run showed `sampled` (needs its `node_id`)."""
    facts: dict[str, Any] = {}
    geometry = preprocess_geometry(graph) or latent_geometry(sampled.get("latent_shape"))
    if geometry is not None:
        facts.update(zip(("width", "height", "frames"), geometry, strict=True))
    inputs = dict(graph.node(sampled["node_id"]).get("inputs", {}))
    solver, scheduler = inputs.get("sampler_name"), inputs.get("scheduler")
    if isinstance(solver, str):
        facts["solver"] = f"{solver}/{scheduler}" if isinstance(scheduler, str) else solver
    elif isinstance(scheduler, str):  # kijai's WanVideoSampler: `scheduler` names the solver (unipc, euler...)
        facts["solver"] = scheduler
    seed = inputs.get("noise_seed", inputs.get("seed"))
    if isinstance(seed, int) and not isinstance(seed, bool):
        facts["seed"] = seed
    if sampled.get("dtype"):
        facts["dit_dtype"] = sampled["dtype"]
    configs = sampled.get("configs", set())
    tasks = {p.name for p in PRESETS.values() for c in configs if same_dims(p.dit, c)}
    if len(tasks) == 1:
        facts["task"] = tasks.pop()
    return facts


def preprocess_geometry(graph: PromptGraph) -> tuple[int, int, int] | None:
    """(width, height, frames) from the inputs of the graph's first latent/preprocess node that has them."""
    for node_id in graph.nodes:
        if roles.role_of(graph.class_type(node_id)).stage != PREPROCESS_STAGE:
            continue
        inputs = graph.node(node_id).get("inputs", {})
        for keys in roles.GEOMETRY_INPUTS:
            values = [inputs.get(k) for k in keys]
            if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                return values[0], values[1], values[2]
    return None


def latent_geometry(shape: Any) -> tuple[int, int, int] | None:
    """(width, height, frames) of the video behind a Wan latent of `shape` (Wan VAE strides)."""
    if not shape or len(shape) != 5:
        return None
    vae = next((v for v in (WAN21_VAE, WAN22_VAE) if v.z_dim == shape[1]), None)
    if vae is None:
        return None
    t, h, w = shape[2:]
    return w * vae.spatial_stride, h * vae.spatial_stride, vae.pixel_frames(t)


def same_dims(a: DiTConfig, b: DiTConfig) -> bool:
    """Whether two DiT configs have the same shape (the task preset a loaded model matches)."""
    keys = ("in_dim", "out_dim", "dim", "ffn_dim", "num_layers", "num_heads")
    return all(getattr(a, k) == getattr(b, k) for k in keys)
