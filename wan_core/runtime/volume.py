"""Communication volume of one denoising step under a parallel plan (analytic, like the FLOP counts).

What one rank sends per step, by kind, following exactly what the runtime sends (the tests check
these figures against the bytes the `CommMeter` counts on the tiny models):

- Ulysses over k ranks, per transformer block: one all-to-all of q, k, v (3 x b x rows x D values)
  and one of the attention output (b x rows x D), each rank keeping 1/k of what it holds; then once
  per forward the head output rows (b x rows x C_out float32) to each of the k - 1 others. rows =
  ceil(L / k) token rows, b = 2 when the forward carries both CFG halves (batched CFG), 1 under
  CFG-parallel or without guidance. Activations travel in the compute dtype.
- CFG-parallel: the rank's prediction (C, T, h, w) float32 to the other rank of its pair.
- Sharded weights over P ranks: per forward every module's weights are gathered, each rank sending
  its 1/P share to the P - 1 others: weights x (P - 1) / P (FSDP pads shards; ignored here).

Shapes: latent_thw (T, h, w) of the latent; token count L from the DiT's patch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import DiTConfig

__all__ = ["StepVolume", "step_volume"]

FLOAT32_BYTES = 4  # the head output and the predictions are float32


@dataclass(frozen=True, kw_only=True)
class StepVolume:
    """Bytes one rank sends in one step, by kind (`config.COMM_KINDS`)."""

    all_to_all: int = 0
    all_gather: int = 0
    cfg_combine: int = 0
    weight_gather: int = 0

    @property
    def total(self) -> int:
        return self.all_to_all + self.all_gather + self.cfg_combine + self.weight_gather


def step_volume(dit: DiTConfig, latent_thw: tuple[int, int, int], *, cfg_degree: int, ulysses_degree: int,
                shard_ranks: int = 1, guided: bool = True, dtype_bytes: int = 2) -> StepVolume:
    """What one rank sends in a step with guidance (`guided`) or without (cond pass only).

    `shard_ranks` is the world size when the weights are sharded (1: not sharded).
    """
    if cfg_degree not in (1, 2) or ulysses_degree < 1 or shard_ranks < 1:
        raise ValueError(f"cfg_degree must be 1 or 2, ulysses_degree and shard_ranks >= 1; got {cfg_degree}, "
                         f"{ulysses_degree}, {shard_ranks}")
    batch = 2 if guided and cfg_degree == 1 else 1
    k = ulysses_degree
    all_to_all = all_gather = 0
    if k > 1:
        rows = math.ceil(dit.num_tokens(latent_thw) / k)
        per_block = sum(n * batch * rows * dit.dim * dtype_bytes * (k - 1) // k for n in (3, 1))
        all_to_all = dit.num_layers * per_block
        head_out = dit.out_dim * math.prod(dit.patch_size)
        all_gather = batch * rows * head_out * FLOAT32_BYTES * (k - 1)
    cfg_combine = dit.out_dim * math.prod(latent_thw) * FLOAT32_BYTES if guided and cfg_degree == 2 else 0
    weight_gather = dit.num_params() * dtype_bytes * (shard_ranks - 1) // shard_ranks if shard_ranks > 1 else 0
    return StepVolume(all_to_all=all_to_all, all_gather=all_gather, cfg_combine=cfg_combine,
                      weight_gather=weight_gather)
