"""CFG-parallel: the conditional and unconditional passes of a step on two ranks.

The sampler's guided prediction is `uncond + g * (cond - uncond)`. Under CFG-parallel the rank at
CFG half 0 runs the model on the prompt, the rank at half 1 on the negative prompt (each a batch
of 1, on the same latent, timestep and image conditioning); one all-gather of the two predictions
per step gives both ranks both halves, and each combines them with the same formula, so every
rank holds the same new latent. A step whose guidance scale is 1 needs only the conditional pass:
both ranks run it (with sharded weights or token shards every rank must take part in each
forward), and nothing is exchanged.

Shapes: latent (C, T, h, w); predictions (C, T, h, w) float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from ..config import CFG_OFF, COMM_CFG_COMBINE
from .comm import CommMeter, all_gather_rows

__all__ = ["GuidanceInputs", "GuidedPrediction", "cfg_parallel_prediction"]


class GuidanceInputs(Protocol):
    """What the sampler holds for one run and the guided prediction reads."""

    context: torch.Tensor  # (S, text_dim) prompt
    context_null: torch.Tensor  # (S', text_dim) negative prompt
    y: torch.Tensor | None  # (C_y, T, h, w) I2V conditioning
    seq_len: int


# guided(model, latent, t_model, run, g, cfg_mode) -> prediction (C, T, h, w) float32
GuidedPrediction = Callable[[nn.Module, torch.Tensor, torch.Tensor, Any, float, str], torch.Tensor]


def cfg_parallel_prediction(single: GuidedPrediction, *, group: dist.ProcessGroup | None, index: int,
                            meter: CommMeter) -> GuidedPrediction:
    """The guided prediction with this rank computing half `index` (0 cond, 1 uncond) of CFG.

    `single` (the sampler's own guided prediction) runs the steps without guidance.
    """
    if group is None or dist.get_world_size(group) != 2 or index not in (0, 1):
        raise ValueError(f"CFG-parallel needs a group of 2 ranks and a half index 0 or 1; got group "
                         f"{group} and index {index}")

    def guided(model: nn.Module, latent: torch.Tensor, t_model: torch.Tensor, run: GuidanceInputs,
               g: float, cfg_mode: str) -> torch.Tensor:
        if cfg_mode == CFG_OFF:
            return single(model, latent, t_model, run, g, cfg_mode)
        context = run.context if index == 0 else run.context_null
        y = None if run.y is None else run.y[None]
        own = model(latent[None], t_model, [context], seq_len=run.seq_len, y=y)[0].float()  # (C, T, h, w)
        cond, uncond = all_gather_rows(own, group, meter, kind=COMM_CFG_COMBINE)
        return uncond + g * (cond - uncond)

    return guided
