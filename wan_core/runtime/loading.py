"""Loading with a memory check first: the weights a file will occupy, from its headers, against
what is free where they go. Nothing is read before the check passes.

`file_weight_bytes` reads names, shapes and stored dtypes only (`checkpoints.io.read_shapes`) and
counts floating tensors at the dtype they are loaded as and other tensors at their own size; the
fp8 scale entries and an embedded tokenizer are not weights. A full T5 (encoder and decoder) file
counts its encoder only. A DiT kept compact (`weight_dtype` other than `default`, or a GGUF file)
is counted by `runtime.compact.weight_bytes_estimate` from its config (read from the headers): its
block matrices at the storage's size. The text encoder is counted at the compute dtype (an upper
bound when it is kept compact).

`load_experts_checked`, `load_text_encoder_checked` and `load_vae_checked` check, then call the
plain loaders of `checkpoints/`. On a CUDA device the application is asked to make room first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..checkpoints.dit import load_experts, read_dit_config
from ..checkpoints.gguf import is_gguf
from ..checkpoints.io import COMFY_DIT_PREFIX, PathLike, read_shapes
from ..checkpoints.t5 import load_text_encoder
from ..checkpoints.vae import VAE_PREFIXES
from ..config import DEFAULT_STORAGE
from ..dit import WanDiT
from ..t5 import TextEncoder
from ..vae import WanVAE
from ..vae_stages import load_vae_for_stages
from .compact import weight_bytes_estimate
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


def dit_weight_bytes(path: PathLike, dtype: torch.dtype, storage: str = DEFAULT_STORAGE) -> WeightBytes:
    """What one DiT file will occupy once loaded with compute dtype `dtype` and `storage`."""
    gguf = isinstance(path, (str, os.PathLike)) and is_gguf(Path(path))
    if storage == DEFAULT_STORAGE and not gguf:
        return file_weight_bytes(path, dtype)
    config = read_dit_config(path)
    per_weight = os.path.getsize(path) / config.num_params() if gguf else None
    return WeightBytes(total=weight_bytes_estimate(config, storage, dtype, gguf_bytes_per_weight=per_weight))


def load_experts_checked(high: PathLike, low: PathLike | None = None, *, device: torch.device | str,
                         dtype: torch.dtype, attention: str, memory: MemoryEnvironment,
                         storage: str = DEFAULT_STORAGE) -> list[WanDiT]:
    """`checkpoints.dit.load_experts` after checking that the experts fit on `device`."""
    paths = [high] if low is None else [high, low]
    weights = [dit_weight_bytes(p, dtype, storage) for p in paths]
    _checked("the DiT expert(s)", weights, device, memory,
             fix="free memory, keep the weights compact (weight_dtype fp8), or load with device 'cpu' and "
                 "let the sampler's placement stream the weights")
    return load_experts(high, low, device=device, dtype=dtype, attention=attention, storage=storage)


def load_text_encoder_checked(path: PathLike, *, device: torch.device | str, dtype: torch.dtype,
                              memory: MemoryEnvironment, storage: str = DEFAULT_STORAGE) -> TextEncoder:
    """`checkpoints.t5.load_text_encoder` after checking that the encoder fits on `device`."""
    weights = file_weight_bytes(path, dtype, strip_prefixes=())
    _checked("the text encoder", [weights], device, memory, fix="free memory or load it with device 'cpu'")
    return load_text_encoder(path, device=device, dtype=dtype, storage=storage)


def load_vae_checked(path: PathLike, *, device: torch.device | str, dtype: torch.dtype,
                     memory: MemoryEnvironment) -> WanVAE:
    """`vae_stages.load_vae_for_stages` after checking that the VAE fits on `device`."""
    weights = file_weight_bytes(path, dtype, strip_prefixes=VAE_PREFIXES)
    _checked("the VAE", [weights], device, memory, fix="free memory or load it with device 'cpu'")
    return load_vae_for_stages(path, device=device, dtype=dtype)
