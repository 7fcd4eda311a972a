"""Sharded weights: every transformer block split across the ranks with FSDP2 (`fully_shard`).

`shard_experts(experts, ...)` applies `fully_shard` to each block of each expert and then to the
expert itself (its embeddings and head), over a one-dimensional mesh of all ranks. Each rank then
keeps 1/N of every block's weights on its device; right before a block runs, FSDP gathers the
block's full weights from all ranks, and frees them again after the block (also the expert's own
weights after each forward), so at most a block or two are whole at any time. The ranks may
compute different inputs (CFG halves, token shards): FSDP only moves weights.

Applied to built models from outside, once per process: FSDP2 turns the parameters into
DTensors and the module classes into their FSDP subclasses, which cannot be undone, so a
sharded expert stays sharded (a second sampling run reuses it; nothing is applied twice). The
weights' values do not change. This is why sharding belongs to the ranks of a parallel run,
which load their own copies of the models and exit after the workflow.

The time the compute waits for a block's gathered weights is counted as communication
(`weight_gather`): a forward pre-hook placed before FSDP's own marks the start, one placed after
it marks the end.

Refused: weights of mixed dtypes within an expert (FSDP2 gathers one dtype per module), and
experts that carry forward hooks of other per-block transforms (fp8 storage, block streaming).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import COMM_WEIGHTS
from .comm import CommMeter

log = logging.getLogger(__name__)

__all__ = ["is_sharded", "shard_experts"]


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 sharded `model` (its class became an FSDP subclass)."""
    from torch.distributed.fsdp import FSDPModule  # FSDP takes ~1.5 s to import: only in parallel runs

    return isinstance(model, FSDPModule)


def shard_experts(experts: Sequence[nn.Module], *, world_size: int, device: torch.device,
                  meter: CommMeter) -> None:
    """Shard every block (then the rest) of each expert not sharded yet; collective on all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    models = [m for m in {id(m): m for m in experts}.values() if not is_sharded(m)]
    if not models:
        return
    for k, model in enumerate(models):
        _check_shardable(model, k)
    mesh = init_device_mesh(device.type, (world_size,))
    for model in models:
        for block in model.blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
            _time_weight_gather(block, meter, world_size)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
        _time_weight_gather(model, meter, world_size)
        local = sum(p.to_local().numel() for p in model.parameters())
        log.info("sharded %d blocks over %d ranks: %d of %d parameters stay on this rank", len(model.blocks),
                 world_size, local, sum(p.numel() for p in model.parameters()))


def _check_shardable(model: nn.Module, k: int) -> None:
    if not isinstance(getattr(model, "blocks", None), nn.ModuleList):
        raise TypeError(f"sharded weights need a model with a `blocks` ModuleList (WanDiT); expert {k} is "
                        f"{type(model).__name__}")
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) > 1:
        raise ValueError(f"sharded weights need one weight dtype per expert; expert {k} holds "
                         f"{sorted(str(d) for d in dtypes)}. Load it with a single dtype (bfloat16, float16 "
                         "or float32) and without fp8 storage")
    hooked = [name for name, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]
    if hooked:
        raise ValueError(f"expert {k} has forward hooks on {hooked[:3]} (fp8 storage or block streaming); "
                         "sharded weights cannot be combined with them. Use placement 'none' and "
                         "weights stored in the compute dtype")


def _time_weight_gather(module: nn.Module, meter: CommMeter, world_size: int) -> None:
    """Count the wait for the gathered weights of `module` (FSDP's own pre-forward) as communication;
    the bytes are this rank's share of the module's own weights, sent to every other rank."""
    local = sum(p.to_local().numel() * p.element_size() for name, p in module.named_parameters()
                if _owned_by(module, name))
    nbytes = local * (world_size - 1)
    started: list[Any] = []

    def before(mod: nn.Module, args: Any) -> None:
        started.append(meter.mark())

    def after(mod: nn.Module, args: Any) -> None:
        meter.add(COMM_WEIGHTS, started.pop(), meter.mark(), nbytes)

    module.register_forward_pre_hook(before, prepend=True)
    module.register_forward_pre_hook(after)


def _owned_by(module: nn.Module, name: str) -> bool:
    """Whether parameter `name` (relative to `module`) belongs to `module`'s own FSDP group, i.e. it
    does not sit inside a child that was sharded on its own."""
    owner: nn.Module = module
    for part in name.split(".")[:-1]:
        owner = getattr(owner, part)
        if is_sharded(owner):
            return False
    return True
