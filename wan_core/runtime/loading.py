"""Loading with a memory check first: the weights a file will occupy, from its headers, against
what is free where they go. Nothing is read before the check passes.

`file_weight_bytes` reads names, shapes and stored dtypes only (`checkpoints.io.read_shapes`) and
counts floating tensors at the dtype they are loaded as (fp8 files are dequantised to it, as the
loaders do today) and other tensors at their own size; the fp8 scale entries and an embedded
tokenizer are not weights. A full T5 (encoder and decoder) file counts its encoder only.

`load_experts_checked`, `load_text_encoder_checked` and `load_vae_checked` check, then call the
plain loaders of `checkpoints/`. On a CUDA device the application is asked to make room first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checkpoints.dit import load_experts
from ..checkpoints.io import COMFY_DIT_PREFIX, PathLike, read_shapes
from ..checkpoints.t5 import load_text_encoder
from ..checkpoints.vae import VAE_PREFIXES
from ..dit import WanDiT
from ..t5 import TextEncoder
from ..vae import WanVAE
from ..vae_stages import load_vae_for_stages
from .estimates import WeightBytes, weight_bytes_of_shapes
from .planner import MemoryEnvironment, budget_with_room
from .stage_plans import check_load

NOT_WEIGHTS = ("spiece_model",)  # a tokenizer embedded as a uint8 tensor
T5_DECODER_MARKER = "decoder."


def file_weight_bytes(path: PathLike | Sequence[PathLike], dtype: torch.dtype, *,
                      strip_prefixes: Sequence[str] = (COMFY_DIT_PREFIX,)) -> WeightBytes:
    """What the weights of a checkpoint will occupy once loaded at `dtype` (headers only)."""
    shapes = read_shapes(path, strip_prefixes=strip_prefixes)
    kept = {k: v for k, v in shapes.items()
            if not k.endswith(NOT_WEIGHTS) and not k.startswith(T5_DECODER_MARKER)}
    return weight_bytes_of_shapes(kept, dtype)


def _checked(what: str, weights: Sequence[WeightBytes], device: torch.device | str, memory: MemoryEnvironment,
             fix: str) -> None:
    device = torch.device(device)
    needed = sum(w.total for w in weights)
    budget = budget_with_room(memory, device, wanted=needed, own_bytes=0, keep=(), what=what)
    check_load(what, weights, device=device, budget=budget, fix=fix)


def load_experts_checked(high: PathLike, low: PathLike | None = None, *, device: torch.device | str,
                         dtype: torch.dtype, attention: str, memory: MemoryEnvironment) -> list[WanDiT]:
    """`checkpoints.dit.load_experts` after checking that the experts fit on `device`."""
    paths = [high] if low is None else [high, low]
    weights = [file_weight_bytes(p, dtype) for p in paths]
    _checked("the DiT expert(s)", weights, device, memory,
             fix="free memory, load in a smaller dtype, or load with device 'cpu' and let the sampler's "
                 "placement stream the weights")
    return load_experts(high, low, device=device, dtype=dtype, attention=attention)


def load_text_encoder_checked(path: PathLike, *, device: torch.device | str, dtype: torch.dtype,
                              memory: MemoryEnvironment) -> TextEncoder:
    """`checkpoints.t5.load_text_encoder` after checking that the encoder fits on `device`."""
    weights = file_weight_bytes(path, dtype, strip_prefixes=())
    _checked("the text encoder", [weights], device, memory, fix="free memory or load it with device 'cpu'")
    return load_text_encoder(path, device=device, dtype=dtype)


def load_vae_checked(path: PathLike, *, device: torch.device | str, dtype: torch.dtype,
                     memory: MemoryEnvironment) -> WanVAE:
    """`vae_stages.load_vae_for_stages` after checking that the VAE fits on `device`."""
    weights = file_weight_bytes(path, dtype, strip_prefixes=VAE_PREFIXES)
    _checked("the VAE", [weights], device, memory, fix="free memory or load it with device 'cpu'")
    return load_vae_for_stages(path, device=device, dtype=dtype)
