"""The memory plan of one sampling run: from the experts, the task and the latent size to a placement.

`plan_sampling` estimates, on the compute device, the experts' weights under each placement, the
working set of one DiT forward (batch 2 when any step runs batched CFG, else 1; traced on the meta
device with the attention kernel the device picks) and the sampler's latents; it asks the
application to make room when the fastest option needs it, then takes (placement `auto`) or
checks (an explicit one) the placement. A refusal lists the placements that would fit, running
the two CFG passes one after the other when that would, and a frame count that would.

Shapes: latent (C, T, h, w).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import AUTO_PLACEMENT
from ..dit import WanDiT
from .estimates import WeightBytes, attention_kernel, dit_forward_bytes
from .planner import (
    Estimate,
    MemoryEnvironment,
    PlacementPlan,
    budget_with_room,
    bytes_on_device,
    placement_estimates,
    plan_placement,
)

SAMPLER_LATENT_COPIES = 10  # latent, its update, the guided prediction and its temporaries, solver history
FP32_BYTES = 4


@dataclass(frozen=True)
class SamplingShape:
    """What the plan needs to know about a run besides the experts."""

    latent_shape: tuple[int, int, int, int]  # (C, T, h, w)
    batch: int  # 2 when a step runs batched CFG, else 1
    text_rows: int  # the longest context
    token_time: str  # "uniform" or "per_token" (TI2V with a start image)
    temporal_stride: int  # pixel frames per latent frame after the first (the VAE's)
    conditioning_channels: int = 0  # I2V: mask + image latent channels beside the latent


def _unique(experts: Sequence[nn.Module]) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for m in experts:
        seen.setdefault(id(m), m)
    return list(seen.values())


def _compute_dtype(model: nn.Module) -> torch.dtype:
    return model.patch_embedding.weight.dtype


def working_parts(model: nn.Module, shape: SamplingShape, device: torch.device, *,
                  batch: int | None = None, frames: int | None = None) -> tuple[tuple[str, int], ...]:
    """The placement-independent parts on the compute device: one forward and the sampler's latents.

    `batch` and `frames` (latent frames) override the run's, for the alternatives of a refusal.
    """
    cfg = model.config
    c, t, h, w = shape.latent_shape
    t = frames if frames is not None else t
    b = batch if batch is not None else shape.batch
    latent = c * t * h * w * FP32_BYTES
    conditioning = shape.conditioning_channels * t * h * w * FP32_BYTES
    latents = ("sampler latents", SAMPLER_LATENT_COPIES * latent + conditioning)
    if not isinstance(model, WanDiT):  # the sampler also runs any module with WanDiT's forward contract
        return ((f"forward working set (not estimated: {type(model).__name__} is not a WanDiT)", 0), latents)
    dtype = _compute_dtype(model)
    backend = getattr(model, "attention_backend", "sdpa")
    kernel = attention_kernel(backend, device=device, dtype=dtype, head_dim=cfg.head_dim)
    masked = attention_kernel(backend, device=device, dtype=dtype, head_dim=cfg.head_dim, with_mask=True)
    forward = dit_forward_bytes(cfg, dtype, batch=b, latent_thw=(t, h, w), text_rows=shape.text_rows,
                                kernel=kernel, masked=masked, token_time=shape.token_time)
    return ((f"DiT forward (batch {b}, {kernel.name})", forward), latents)


def lora_parts(loras: Sequence[Any], weights: Sequence[WeightBytes]) -> tuple[tuple[str, int], ...]:
    """LoRA patches on the compute device (`runtime.lora`): the files' factors (kept there for the
    run), and while a block runs its patched weights next to the base ones plus one float32 delta."""
    if not loras:
        return ()
    factors = sum(t.numel() * t.element_size() for lora in loras for terms in lora.lora.targets.values()
                  for t in [*(x for p in terms.pairs for x in (p.up, p.down)), *terms.diffs])
    largest = max((w.largest_block for w in weights), default=0)
    # a patched block next to the base one, plus the float32 delta of its largest matrix: at most 3x
    return (("LoRA factors", factors), ("LoRA-patched block and its float32 delta (bound)", 3 * largest))


def plan_sampling(experts: Sequence[nn.Module], shape: SamplingShape, *, device: torch.device | str,
                  placement: str, num_resident_blocks: int, memory: MemoryEnvironment,
                  loras: Sequence[Any] = ()) -> PlacementPlan:
    """The placement of this run on `device` (see the module docstring); raises `MemoryPlanError`.

    `loras` (`runtime.lora.ExpertLora`) add their factors and one patched block to the estimate.
    """
    device = torch.device(device)
    models = _unique(experts)
    weights = [WeightBytes.of_module(m) for m in models]
    working = (*working_parts(models[0], shape, device), *lora_parts(loras, weights))
    what = "DiT sampling"
    options = placement_estimates(weights, working=working, device=str(device), what=what)
    wanted_option = next((e for p, n, e in options if placement in (AUTO_PLACEMENT, p)
                          and (p != "blocks" or placement == AUTO_PLACEMENT or n == num_resident_blocks)),
                         options[0][2])
    own = bytes_on_device(models, device)
    budget = budget_with_room(memory, device, wanted=wanted_option.needed, own_bytes=own, keep=models,
                              what="the experts")
    return plan_placement(weights, working=working, device=str(device), requested=placement,
                          num_resident_blocks=num_resident_blocks, budget=budget,
                          alternatives=lambda: _alternatives(models[0], weights, shape, device, what),
                          fix="choose a smaller size or fewer frames", what=what)


def _alternatives(model: nn.Module, weights: list[WeightBytes], shape: SamplingShape, device: torch.device,
                  what: str) -> list[tuple[str, Estimate]]:
    """Other ways out for a refusal: the two CFG passes one after the other, and fewer frames
    (the largest 4k+1 count, halving the latent frames, whose leanest placement would fit)."""
    out: list[tuple[str, Estimate]] = []
    if device.type == "cuda":  # with the leanest placement: no resident block
        suffix = ", placement 'blocks' with 0 resident blocks"

        def lean(parts: tuple[tuple[str, int], ...]) -> Estimate:
            return placement_estimates(weights, working=parts, device=str(device), what=what)[-1][2]
    else:
        suffix = ""

        def lean(parts: tuple[tuple[str, int], ...]) -> Estimate:
            return Estimate(what, str(device), (("weights (in host memory)", sum(w.total for w in weights)),
                                                *parts))
    if shape.batch == 2:
        out.append((f"batched_cfg off (cond and uncond as two passes of batch 1){suffix}",
                    lean(working_parts(model, shape, device, batch=1))))
    frames = shape.latent_shape[1]
    while frames > 1:
        frames = max(1, frames // 2)
        pixel_frames = shape.temporal_stride * (frames - 1) + 1
        out.append((f"fewer frames: {pixel_frames}{suffix}", lean(working_parts(model, shape, device, frames=frames))))
    return out
