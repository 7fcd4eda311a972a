"""Memory estimates of the pipeline's pieces, from configs and sizes, before anything is allocated.

Weights: `WeightBytes` counts what a model holds (its parameters and buffers at their current
dtypes: fp8 storage counts one byte per element) or, before loading, what a checkpoint will hold
at the load dtype (`weight_bytes_of_file`, from the file headers: names, shapes and dtypes, no
tensor data).

Working sets (activations and temporaries of one call) come from running the real module code on
the meta device (`meta_memory.trace_peak`), cached per size:

- `dit_forward_bytes`: one `WanDiT.forward` of batch B (2 for batched CFG) at the token count of a
  latent, with the attention kernel the device would use. The forward reads a few values from its
  inputs (the text rows, whether all tokens share a timestep); on meta those are answered from
  what the sampler will pass (`_MetaScalars`). A one-block copy of the model is traced: blocks run
  one after the other on the same residual, so one block's working set is every block's.
- `vae_decode_bytes`: one `WanVAE.decode` (chunked over time, optionally tiled). The working set is
  affine in the latent frames (each chunk after the first is alike; the output buffer and, when
  tiled, the lower-part features grow by a frame's worth), so two short traces give any length.
- `t5_encode_bytes`: one UMT5 encoder block at the full text length plus the embedding rows.

Shapes: latent (C, T, h, w) or (B, z, T, h, w) as named; results are bytes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..attention import BACKENDS, REFERENCE_BACKEND
from ..config import DiTConfig, UMT5Config, VAEConfig
from ..dit import WanDiT
from ..rope import RopeTables
from ..vae import WanVAE
from .compact import compact_weights_of, logical_shapes
from .meta_memory import AttentionKernel, sdpa_kernel, trace_peak

META = torch.device("meta")
FUSED_BACKENDS = ("flash_attn", "sage")  # kernels that never materialise the scores


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightBytes:
    """Bytes of one model's weights: all of it, its transformer blocks one by one, the rest.

    `dequant_block_bytes`: the largest temporary one block needs when its weights are kept compact
    (`runtime.compact`: fp8, GGUF, bf16 storage) and decoded to the compute dtype right before it
    runs (0 when stored as computed).
    """

    total: int
    blocks: tuple[int, ...] = ()
    dequant_block_bytes: int = 0

    @property
    def other(self) -> int:
        """Everything outside the blocks (embeddings, head, norms)."""
        return self.total - sum(self.blocks)

    @property
    def largest_block(self) -> int:
        return max(self.blocks, default=0)

    @classmethod
    def of_module(cls, module: nn.Module) -> WeightBytes:
        """What `module` holds now (parameters and buffers; `module.blocks` counted per block)."""
        total = _tensor_bytes(module)
        blocks = getattr(module, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            return cls(total=total)
        per_block = tuple(_tensor_bytes(b) for b in blocks)
        return cls(total=total, blocks=per_block, dequant_block_bytes=_dequant_block_bytes(module))


def _dequant_block_bytes(module: nn.Module) -> int:
    """The largest per-block temporary of weights kept compact (`runtime.compact`): the block's
    managed matrices decoded to the compute dtype (their logical shapes; GGUF blocks are bytes)."""
    if compact_weights_of(module) is None:
        return 0
    compute = _compute_itemsize(module)
    per_block: dict[str, int] = {}
    for name, shape in logical_shapes(module).items():
        if name.startswith("blocks."):
            block = name.split(".", 2)[1]
            per_block[block] = per_block.get(block, 0) + math.prod(shape) * compute
    return max(per_block.values(), default=0)


def _tensor_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        key = id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _compute_itemsize(module: nn.Module) -> int:
    """Bytes per element of the compute dtype: that of the patch embedding (never kept compact), else
    the widest floating dtype among the weights."""
    embedding = getattr(module, "patch_embedding", None)
    if embedding is not None:
        return embedding.weight.element_size()
    sizes = [p.element_size() for p in module.parameters() if p.is_floating_point()]
    return max(sizes, default=4)


def weight_bytes_of_shapes(shapes: Mapping[str, torch.Tensor], dtype: torch.dtype) -> WeightBytes:
    """What a state dict of these (meta) tensors holds once loaded with floating tensors cast to
    `dtype` (integer tensors keep theirs). Keys `blocks.<i>.*` are counted per block."""
    item = torch.empty((), dtype=dtype).element_size()
    per_block: dict[int, int] = {}
    total = 0
    for key, t in shapes.items():
        size = t.numel() * (item if t.is_floating_point() else t.element_size())
        total += size
        if key.startswith("blocks."):
            index = int(key.split(".", 2)[1])
            per_block[index] = per_block.get(index, 0) + size
    return WeightBytes(total=total, blocks=tuple(per_block[i] for i in sorted(per_block)))


# --------------------------------------------------------------------------------------------
# Attention kernels
# --------------------------------------------------------------------------------------------
def attention_kernel(backend: str, *, device: torch.device, dtype: torch.dtype, head_dim: int,
                     with_mask: bool = False) -> AttentionKernel:
    """How the attention backend named `backend` ('sdpa', 'auto', 'flash_attn', 'sage') holds
    memory on `device`: FlashAttention and Sage are fused; sdpa is what torch picks there."""
    if backend in FUSED_BACKENDS or (backend == "auto" and device.type == "cuda"
                                     and BACKENDS["flash_attn"].is_installed() and dtype != torch.float32):
        return AttentionKernel("fused", backend if backend != "auto" else "flash_attn")
    if device.type == "cuda" and not torch.cuda.is_available():  # planning for a GPU that is not here
        return AttentionKernel("fused", "sdpa on CUDA (assumed fused: no CUDA device here to ask)")
    return sdpa_kernel(device.type, dtype, head_dim, with_mask)


# --------------------------------------------------------------------------------------------
# DiT
# --------------------------------------------------------------------------------------------
class _MetaScalars(TorchFunctionMode):
    """Answers the few values the model code reads from its inputs, which meta tensors lack.

    DiT: `int(...)` is the number of text rows (`nonzero_rows(...).max()`), `bool(...)` whether
    every token shares its sample's timestep, `torch.unique` of the timesteps has one value (two
    with a TI2V start image). UMT5: `bool(...)` is the fp16 overflow check (no overflow).
    """

    def __init__(self, *, text_rows: int, uniform_time: bool) -> None:
        super().__init__()
        self.text_rows = text_rows
        self.uniform_time = uniform_time

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.__int__ or func is torch.Tensor.item:
            return self.text_rows
        if func is torch.Tensor.__bool__:
            return self.uniform_time
        if func is torch.unique:
            t = args[0]
            num_distinct = 1 if self.uniform_time else 2  # TI2V with a start image: t and 0
            return torch.empty(num_distinct, dtype=t.dtype, device=t.device), \
                torch.empty(t.shape, dtype=torch.int64, device=t.device)
        return func(*args, **kwargs)


class _MetaRope:
    """RoPE tables made on the meta device (the real cache computes them in float64 on the CPU)."""

    def __init__(self, head_dim: int) -> None:
        self.head_dim = head_dim

    def tables(self, grid: tuple[int, int, int], device: torch.device) -> RopeTables:
        pairs = torch.empty((math.prod(grid), 1, self.head_dim // 2, 2), device=device)  # (L, 1, Dh/2, 2)
        return RopeTables(pairs, torch.view_as_complex(pairs))


@functools.lru_cache(maxsize=64)
def _meta_dit(cfg: DiTConfig, dtype: torch.dtype) -> nn.Module:
    with META:
        model = WanDiT(replace(cfg, num_layers=1), attention=REFERENCE_BACKEND)
    model = model.to(dtype)
    model.rope = _MetaRope(cfg.head_dim)
    return model


@functools.lru_cache(maxsize=128)
def dit_forward_bytes(cfg: DiTConfig, dtype: torch.dtype, *, batch: int, latent_thw: tuple[int, int, int],
                      text_rows: int, kernel: AttentionKernel, masked: AttentionKernel | None = None,
                      token_time: str = "uniform") -> int:
    """Peak working set of one DiT forward: everything the call allocates, its output included.

    `token_time`: "uniform" (one timestep per sample, or TI2V text-only), "per_token" (TI2V with a
    start image: frame-0 tokens at t = 0, so the time embedding is per token).
    """
    model = _meta_dit(cfg, dtype)
    t_frames, h, w = latent_thw
    seq_len = cfg.num_tokens(latent_thw)
    x = torch.empty((batch, cfg.out_dim, t_frames, h, w), device=META)
    y = None
    if cfg.in_dim != cfg.out_dim and cfg.model_type == "i2v":
        y = torch.empty((batch, cfg.in_dim - cfg.out_dim, t_frames, h, w), device=META)
    t = torch.empty((batch, seq_len) if cfg.model_type == "ti2v" else (batch,), device=META)
    contexts = [torch.empty((text_rows, cfg.text_dim), device=META, dtype=dtype) for _ in range(batch)]
    scalars = _MetaScalars(text_rows=text_rows, uniform_time=token_time == "uniform")

    def forward() -> torch.Tensor:
        with scalars:
            return model(x, t, contexts, seq_len=seq_len, y=y)

    return trace_peak(forward, kernel=kernel, masked=masked)


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _meta_vae(cfg: VAEConfig, dtype: torch.dtype) -> nn.Module:
    return WanVAE(cfg, device=META, dtype=dtype)


def vae_attention_dim(cfg: VAEConfig) -> int:
    """Channels (the head dim) of the decoder's middle attention: dec_dim x the last multiplier."""
    return cfg.dec_dim * cfg.dim_mult[-1]


@functools.lru_cache(maxsize=128)
def _vae_decode_trace(cfg: VAEConfig, dtype: torch.dtype, latent_shape: tuple[int, ...], tiling: Any,
                      kernel: AttentionKernel, chunk_frames: int | None) -> int:
    vae = _meta_vae(cfg, dtype)
    raw = torch.empty(latent_shape, device=META)
    return trace_peak(lambda: vae.decode(raw, tiling=tiling, chunk_frames=chunk_frames), kernel=kernel)


def vae_decode_bytes(cfg: VAEConfig, dtype: torch.dtype, latent_shape: tuple[int, int, int, int, int], *,
                     tiling: Any, kernel: AttentionKernel, chunk_frames: int | None = 1) -> int:
    """Peak working set of `WanVAE.decode` (`chunk_frames` latent frames per call), output included.

    With chunks of one latent frame (the default, the pipeline's) the working set is traced at 2
    and 3 latent frames and extended linearly to T: exact, since every later chunk is alike and
    what grows with T (the output, and when tiled the kept lower features) grows by a frame each.
    Other chunkings are traced at the full length (one trace per call of the decoder's loop).
    Shapes: latent_shape (B, z, T, h, w).
    """
    b, z, t, h, w = latent_shape
    if t <= 3 or chunk_frames != 1:
        return _vae_decode_trace(cfg, dtype, tuple(latent_shape), tiling, kernel, chunk_frames)
    two = _vae_decode_trace(cfg, dtype, (b, z, 2, h, w), tiling, kernel, 1)
    three = _vae_decode_trace(cfg, dtype, (b, z, 3, h, w), tiling, kernel, 1)
    return three + (t - 3) * (three - two)


# --------------------------------------------------------------------------------------------
# UMT5
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def t5_encode_bytes(cfg: UMT5Config, dtype: torch.dtype, *, device_type: str, batch: int = 1) -> int:
    """Peak working set of one UMT5 encode at the full text length on a device of `device_type`:
    the token embeddings, one block's working set (blocks run one after the other, each with its
    (B, N, S, S) position bias) and the output rows."""
    from ..t5 import T5Block  # here, not at the top: t5 needs the tokenizer's packages (ftfy), sampling does not

    with META:
        block = T5Block(cfg).to(dtype)
    length = cfg.text_len
    x = torch.empty((batch, length, cfg.dim), device=META, dtype=dtype)
    buckets = block.pos_embedding.offset_buckets(length)
    kernel = sdpa_kernel(device_type, dtype, cfg.head_dim, True)
    scalars = _MetaScalars(text_rows=length, uniform_time=False)  # `bool`: no fp16 overflow to clamp

    def run() -> torch.Tensor:
        with scalars:
            return block(x, None, buckets)

    rows = batch * length * cfg.dim * x.element_size()
    return trace_peak(run, kernel=kernel) + 2 * rows  # the embedded input and the returned rows
