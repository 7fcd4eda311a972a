"""UMT5-XXL text encoder (encoder only), its checkpoint layouts and the prompt -> embedding wrapper.

Spec section 4. The model follows the official module names, so the official checkpoint
(`models_t5_umt5-xxl-enc-bf16.pth`) loads without renaming:

    x = token_embedding[ids]                                 (no scaling)
    per block: x += attn(RMS(x) * g1) with per-layer relative-position bias and no 1/sqrt(d),
               x += fc2(fc1(h) * gelu_tanh(gate(h))) with h = RMS(x) * g2
    out = RMS(x) * g_final

The Hugging Face / ComfyUI layout (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q.weight`,
...) is mapped to these names by `hf_to_official` (spec 4.1); the layout is detected from the keys.
ComfyUI's fp8 "scaled" files are dequantised while reading (`weights.read_state_dict`).

`TextEncoder` ties a `UMT5Encoder` to a `WanTokenizer`: `encode(prompts)` returns the trimmed
`[L_i, dim]` rows the DiT consumes (true lengths, EOS included), `encode_pair(prompt, negative)`
substitutes the official default negative prompt for an empty one and is traced as stage
`T5_Encoding`. The encoder runs where it is placed (GPU, or CPU as the official `--t5_cpu`),
and `release()` frees it after encoding.

Shapes: B batch, S text positions (text_len, 512), D model dim, N heads, Dh head dim, L_i true lengths.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import DEFAULT_NEGATIVE_PROMPT, UMT5Config
from .errors import CheckpointError, WanError
from .tokenizer import (
    DEFAULT_TEXT_LEN,
    SPIECE_TENSOR_KEY,
    WanTokenizer,
    check_prompts,
    find_spiece_model,
    searched_places,
)
from .trace import stage
from .weights import FP8_MARKER, FP8_SCALE_SUFFIX, quantise_fp8_scaled, read_state_dict, write_safetensors

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
LAYOUTS = ("comfy", "official")
TOKENIZER_SUBFOLDER = "google/umt5-xxl"


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
def relative_position_bucket(rel_pos: torch.Tensor, *, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 bucket of a relative position (key minus query), spec 4.1.

    Half of the buckets are for keys after the query. Distances below a quarter of the buckets
    get their own bucket; larger ones share log-spaced buckets up to `max_distance`.

    Shapes: rel_pos (...) int -> (...) int64 in [0, num_buckets).
    """
    half = num_buckets // 2
    exact = half // 2
    bucket = (rel_pos > 0).long() * half
    dist = rel_pos.abs()
    log_ratio = torch.log(dist.float() / exact) / math.log(max_distance / exact)
    far = exact + (log_ratio * (half - exact)).long()
    far = torch.clamp(far, max=half - 1)
    return bucket + torch.where(dist < exact, dist, far)


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """The official guard: fp16 activations that overflowed are clamped back to a finite range."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


class T5LayerNorm(nn.Module):
    """RMS norm: x * rsqrt(mean(x^2) + eps) in fp32, cast to a 16-bit weight's dtype, times weight."""

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            # sum of squares in one reduction (no squared copy), then two passes over x
            scale = (torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1] + self.eps).rsqrt()
            return torch.mul(x, scale).mul_(self.weight)
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


class T5RelativeEmbedding(nn.Module):
    """Per-layer relative-position bias table `embedding.weight` of shape (num_buckets, N)."""

    def __init__(self, num_buckets: int, num_heads: int, *, max_distance: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def offset_buckets(self, length: int) -> torch.Tensor:
        """Shapes: returns (2*length - 1,) int64, the bucket of key-minus-query offsets -(length-1) .. length-1.

        Self-attention bias depends on the offset only, so these few values describe a whole
        (length, length) bias; they are the same for every layer.
        """
        offsets = torch.arange(1 - length, length, device=self.embedding.weight.device)
        return relative_position_bucket(offsets, num_buckets=self.num_buckets, max_distance=self.max_distance)

    def lookup(self, offset_buckets: torch.Tensor) -> torch.Tensor:
        """The (length, length) self-attention bias from `offset_buckets(length)`, head-major.

        Entry [n, i, j] is the table value of offset j - i: per head a Toeplitz matrix, built as a
        sliding window over the per-offset values (one gather of 2*length - 1 values per head,
        one contiguous write) instead of a gather per entry.
        Shapes: offset_buckets (2L-1,) -> (1, N, L, L) contiguous.
        """
        length = (offset_buckets.shape[0] + 1) // 2
        per_offset = self.embedding.weight.t()[:, offset_buckets]  # (N, 2L-1), offsets ascending
        # window a = L-1-i, position j holds offset a + j - (L-1) = j - i; flipping a orders rows by i
        return per_offset.unfold(1, length, 1).flip(1).unsqueeze(0)  # (1, N, L, L)

    def forward(self, lq: int, lk: int) -> torch.Tensor:
        """Shapes: returns (1, N, lq, lk), entry [0, n, i, j] = bias for key j seen from query i."""
        if lq == lk:
            return self.lookup(self.offset_buckets(lq))
        device = self.embedding.weight.device
        rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]  # (lq, lk)
        buckets = relative_position_bucket(rel, num_buckets=self.num_buckets, max_distance=self.max_distance)
        return self.embedding.weight.t()[:, buckets].unsqueeze(0)


class T5Attention(nn.Module):
    """Self-attention without biases and without 1/sqrt(Dh) scaling; softmax in fp32."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, pos_bias: torch.Tensor) -> torch.Tensor:
        """Shapes: x (B, S, D), mask (B, S) (0 = padded key) or None, pos_bias (1, N, S, S) -> (B, S, D)."""
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.num_heads, self.head_dim)  # (B, S, N, Dh)
        k = self.k(x).view(b, s, self.num_heads, self.head_dim)
        v = self.v(x).view(b, s, self.num_heads, self.head_dim)
        bias = pos_bias.to(x.dtype)  # (1, N, S, S)
        if mask is not None:  # padded keys get the lowest value, written in one pass
            keep = mask.view(b, 1, 1, s) != 0
            bias = torch.where(keep, bias, torch.finfo(x.dtype).min)  # (B, N, S, S)
        else:
            bias = bias.expand(b, -1, -1, -1)
        # softmax(q k^T + bias) v, unscaled; the fused kernel accumulates in float32
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=bias, scale=1.0)  # (B, N, S, Dh)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))  # (B, S, N*Dh)


class T5FeedForward(nn.Module):
    """Gated GELU (tanh approximation): fc2(fc1(x) * gelu_tanh(gate(x))), no biases."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.fc2(self.fc1(x) * self.gate(x))
        gate = torch.ops.aten.gelu_(self.gate[0](x), approximate="tanh")  # in place: no autograd here
        return self.fc2(self.fc1(x).mul_(gate))


class T5Block(nn.Module):
    """One encoder layer with its own relative-position bias (`shared_pos = False`)."""

    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        self.norm1 = T5LayerNorm(config.dim, eps=config.eps)
        self.attn = T5Attention(config.dim, config.dim_attn, config.num_heads)
        self.norm2 = T5LayerNorm(config.dim, eps=config.eps)
        self.ffn = T5FeedForward(config.dim, config.dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(config.num_buckets, config.num_heads,
                                                 max_distance=config.max_distance)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                offset_buckets: torch.Tensor | None = None) -> torch.Tensor:
        """Shapes: x (B, S, D), mask (B, S), offset_buckets (2S-1,) from `pos_embedding.offset_buckets`
        or None -> (B, S, D)."""
        if offset_buckets is None:
            offset_buckets = self.pos_embedding.offset_buckets(x.size(1))
        pos_bias = self.pos_embedding.lookup(offset_buckets)
        x = _clamp_fp16(x + self.attn(self.norm1(x), mask, pos_bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """The UMT5 encoder stack. Parameter names are the official checkpoint's (spec 4.1)."""

    def __init__(self, config: UMT5Config, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if config.shared_pos:
            raise ValueError("UMT5 uses a relative-position bias per layer; got UMT5Config(shared_pos=True), "
                             "which describes T5 v1.1 (set shared_pos=False)")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList([T5Block(config) for _ in range(config.num_layers)])
        self.norm = T5LayerNorm(config.dim, eps=config.eps)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the encoder on all positions; padded keys (mask 0) are ignored by attention.

        Positions after the last real token of the whole batch are dropped before the first layer:
        they are masked keys for every query, so the real rows do not depend on them.

        Shapes:
            ids  (B, S) int token ids < vocab_size
            mask (B, S) int/bool, 1 on real tokens (or None: every position is real)
            returns (B, S, D) in the weights' dtype; rows at padded positions are meaningless (those
            after the batch's last real token are zeros, the others are computed).
        """
        if ids.dim() != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"ids must be an integer (B, S) tensor; got {ids.dtype} "
                             f"of shape {tuple(ids.shape)}")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal ids shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); got [{int(ids.min())}, "
                             f"{int(ids.max())}] (is the tokenizer meant for this encoder?)")
        total = ids.shape[1]
        used = total if mask is None else max(1, int(nonzero_positions(mask)))
        x = self.token_embedding(ids[:, :used])  # (B, S', D)
        mask = None if mask is None else mask[:, :used]
        if mask is not None and bool(mask.all()):
            mask = None  # no padded key left: attention needs no mask
        # every layer has its own bias table but the same buckets: compute them once
        buckets = self.blocks[0].pos_embedding.offset_buckets(used) if len(self.blocks) else None
        for block in self.blocks:
            x = block(x, mask, buckets)
        x = self.norm(x)
        if used == total:
            return x
        out = x.new_zeros(ids.shape[0], total, x.shape[2])
        out[:, :used] = x
        return out


def nonzero_positions(mask: torch.Tensor) -> int:
    """One past the last position where any sample's mask is non-zero (0 when none is).

    Shapes: mask (B, S) -> int.
    """
    if mask.numel() == 0:
        return 0
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return int((mask.ne(0) * positions).amax())


# ------------------------------------------------------------------------------------------------
# Checkpoint layouts
# ------------------------------------------------------------------------------------------------
# (official name, Hugging Face / ComfyUI name); "{i}" is the block index.
_BLOCK_KEY_PAIRS = (
    ("blocks.{i}.norm1.weight", "encoder.block.{i}.layer.0.layer_norm.weight"),
    ("blocks.{i}.attn.q.weight", "encoder.block.{i}.layer.0.SelfAttention.q.weight"),
    ("blocks.{i}.attn.k.weight", "encoder.block.{i}.layer.0.SelfAttention.k.weight"),
    ("blocks.{i}.attn.v.weight", "encoder.block.{i}.layer.0.SelfAttention.v.weight"),
    ("blocks.{i}.attn.o.weight", "encoder.block.{i}.layer.0.SelfAttention.o.weight"),
    ("blocks.{i}.pos_embedding.embedding.weight",
     "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("blocks.{i}.norm2.weight", "encoder.block.{i}.layer.1.layer_norm.weight"),
    ("blocks.{i}.ffn.gate.0.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight"),
    ("blocks.{i}.ffn.fc1.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight"),
    ("blocks.{i}.ffn.fc2.weight", "encoder.block.{i}.layer.1.DenseReluDense.wo.weight"),
)
_GLOBAL_KEY_PAIRS = (
    ("token_embedding.weight", "shared.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
)
_HF_EMBED_ALIAS = "encoder.embed_tokens.weight"
_HF_IGNORED_PREFIXES = ("decoder.", "lm_head.")
# Keys whose presence identifies a layout, and that locate a prefix in front of the encoder.
_OFFICIAL_ANCHOR = "blocks.0.attn.q.weight"
_HF_ANCHOR = "encoder.block.0.layer.0.SelfAttention.q.weight"
_FP8_LINEAR = re.compile(r"\.(q|k|v|o|wi_0|wi_1|wo|fc1|fc2|gate\.0)\.weight$")


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


_OFFICIAL_TO_HF = [(_pattern(o), h) for o, h in _BLOCK_KEY_PAIRS]
_HF_TO_OFFICIAL = [(_pattern(h), o) for o, h in _BLOCK_KEY_PAIRS]


def _rename(key: str, table: list[tuple[re.Pattern[str], str]], globals_: dict[str, str]) -> str | None:
    if key in globals_:
        return globals_[key]
    for pattern, template in table:
        match = pattern.match(key)
        if match:
            return template.replace("{i}", match.group(1))
    return None


def hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face / ComfyUI UMT5 encoder keys -> official keys (spec 4.1).

    `encoder.embed_tokens.weight` (a tied copy of `shared.weight`) stands in when `shared.weight`
    is absent; decoder and lm_head tensors of a full seq2seq file are dropped. Unknown keys raise.
    """
    sd = dict(sd)
    alias = sd.pop(_HF_EMBED_ALIAS, None)
    if "shared.weight" not in sd and alias is not None:
        sd["shared.weight"] = alias
    dropped = [k for k in sd if k.startswith(_HF_IGNORED_PREFIXES)]
    if dropped:
        logger.info("ignoring %d decoder/lm_head tensors (only the encoder is used)", len(dropped))
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    hf_globals = {h: o for o, h in _GLOBAL_KEY_PAIRS}
    for key, tensor in sd.items():
        if key.startswith(_HF_IGNORED_PREFIXES):
            continue
        name = _rename(key, _HF_TO_OFFICIAL, hf_globals)
        if name is None:
            unknown.append(key)
        else:
            out[name] = tensor
    if unknown:
        raise CheckpointError(f"unexpected tensors in a Hugging Face/ComfyUI UMT5 encoder file: {unknown[:6]}"
                              f"{' ...' if len(unknown) > 6 else ''}; expected only shared.weight, "
                              "encoder.block.N.layer.{0,1}.* and encoder.final_layer_norm.weight")
    return out


def official_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official UMT5 encoder keys -> Hugging Face / ComfyUI keys (the inverse of `hf_to_official`)."""
    out: dict[str, torch.Tensor] = {}
    official_globals = dict(_GLOBAL_KEY_PAIRS)
    for key, tensor in sd.items():
        name = _rename(key, _OFFICIAL_TO_HF, official_globals)
        if name is None:
            raise CheckpointError(f"{key!r} is not an official UMT5 encoder key; expected "
                                  "token_embedding.weight, blocks.N.* or norm.weight")
        out[name] = tensor
    return out


def _select_encoder(sd: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], str]:
    """Find the layout by its anchor key, strip any prefix in front of it. Returns (sd, layout)."""
    for anchor, layout in ((_OFFICIAL_ANCHOR, "official"), (_HF_ANCHOR, "hf")):
        hits = [k for k in sd if k == anchor or k.endswith("." + anchor)]
        if hits:
            prefix = min(hits, key=len)[: -len(anchor)]
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, layout
    sample = sorted(sd)[:5]
    hint = ""
    if any("diffusion_model" in k or "patch_embedding" in k for k in sd):
        hint = " (this looks like a Wan DiT; load it as a diffusion model)"
    elif any(k.startswith(("encoder.conv", "decoder.conv", "conv1")) for k in sd):
        hint = " (this looks like a VAE)"
    raise CheckpointError(f"{source} is not a UMT5 text encoder{hint}: no {_OFFICIAL_ANCHOR!r} "
                          f"(official layout) or {_HF_ANCHOR!r} (Hugging Face/ComfyUI layout) key; "
                          f"first keys: {sample}. "
                          "Expected models_t5_umt5-xxl-enc-bf16.pth or umt5_xxl_*.safetensors")


def detect_t5_config(sd: dict[str, torch.Tensor], *, text_len: int = 512) -> UMT5Config:
    """UMT5Config from official-layout shapes: vocab/dim (embedding), dim_attn (q), heads and buckets
    (relative bias [buckets, N]), dim_ffn (fc1), layers (block count). `max_distance` stays 128."""
    required = ("token_embedding.weight", "norm.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
                "blocks.0.pos_embedding.embedding.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise CheckpointError(f"UMT5 encoder weights are incomplete: missing {missing}; the file is "
                              "truncated or is not a UMT5 encoder")
    vocab, dim = sd["token_embedding.weight"].shape
    num_buckets, num_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if layers != list(range(len(layers))):
        raise CheckpointError(f"UMT5 encoder blocks are not numbered 0..N-1: got {layers}")
    no_bias = [i for i in layers if f"blocks.{i}.pos_embedding.embedding.weight" not in sd]
    if no_bias:
        raise CheckpointError(f"blocks {no_bias[:4]} have no relative-position bias: this is a T5 v1.1 "
                              "encoder (one shared bias, e.g. t5xxl for Flux/SD3), not UMT5; "
                              "use umt5_xxl_*.safetensors")
    return UMT5Config(vocab_size=int(vocab), dim=int(dim),
                      dim_attn=int(sd["blocks.0.attn.q.weight"].shape[0]),
                      dim_ffn=int(sd["blocks.0.ffn.fc1.weight"].shape[0]), num_heads=int(num_heads),
                      num_layers=len(layers), num_buckets=int(num_buckets), text_len=text_len)


def read_t5_state_dict(path: PathLike, *, dtype: torch.dtype | None = None
                       ) -> tuple[dict[str, torch.Tensor], bytes | None]:
    """Read a UMT5 encoder file in any supported layout -> (official-key state dict, embedded spiece bytes).

    Files: `.pth`/`.pt` (official, memory-mapped pickle), `.safetensors` (ComfyUI, fp16/bf16/fp8
    scaled), sharded folders/indexes. Tensors are cast to `dtype` one by one while reading.
    """
    raw = read_state_dict(path, dtype=dtype, strip_prefixes=())
    spiece_keys = [k for k in raw if k == SPIECE_TENSOR_KEY or k.endswith("." + SPIECE_TENSOR_KEY)]
    spiece = raw.pop(spiece_keys[0]).numpy().tobytes() if spiece_keys else None
    sd, layout = _select_encoder(raw, str(path))
    if layout == "hf":
        sd = hf_to_official(sd)
    logger.info("read UMT5 encoder %s (%s layout, %d tensors%s)", path, layout, len(sd),
                ", embedded tokenizer" if spiece else "")
    return sd, spiece


def load_umt5_encoder(path: PathLike, *, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.bfloat16) -> UMT5Encoder:
    """Build a `UMT5Encoder` from a checkpoint without a random init or a float32 staging copy."""
    sd, _ = read_t5_state_dict(path, dtype=dtype)
    return _encoder_from_state_dict(sd, device=device, dtype=dtype, source=str(path))


def _encoder_from_state_dict(sd: dict[str, torch.Tensor], *, device: torch.device | str, dtype: torch.dtype,
                             source: str) -> UMT5Encoder:
    config = detect_t5_config(sd)
    with torch.device("meta"):
        encoder = UMT5Encoder(config)
    for key in list(sd):
        sd[key] = sd[key].to(device=device, dtype=dtype)  # one tensor at a time
    try:
        encoder.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source} does not match a UMT5 encoder of detected config {config}: "
                              f"{str(e).splitlines()[0]}") from e
    return encoder.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# Prompt -> embeddings
# ------------------------------------------------------------------------------------------------
class TextEncoder:
    """A UMT5 encoder with its tokenizer; runs on `device` ("cpu" = the official `--t5_cpu`)."""

    def __init__(self, encoder: UMT5Encoder, tokenizer: WanTokenizer, *,
                 device: torch.device | str = "cpu") -> None:
        if tokenizer.vocab_size > encoder.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the encoder embeds only "
                             f"{encoder.config.vocab_size}; pair the encoder with its own tokenizer")
        self._encoder: UMT5Encoder | None = encoder.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.device = torch.device(device)

    @property
    def encoder(self) -> UMT5Encoder:
        if self._encoder is None:
            raise WanError("this text encoder was released; load it again to encode more prompts")
        return self._encoder

    @property
    def config(self) -> UMT5Config:
        return self.encoder.config

    @property
    def is_released(self) -> bool:
        return self._encoder is None

    def to(self, device: torch.device | str) -> TextEncoder:
        """Move the encoder (e.g. back to CPU after encoding on the GPU). Returns self."""
        self._encoder = self.encoder.to(device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], *, output_device: torch.device | str | None = None
               ) -> list[torch.Tensor]:
        """Encode a batch of prompts as the official `T5EncoderModel.__call__` does.

        Shapes: prompts B strings -> B tensors (L_i, D), L_i = pieces + EOS, in the encoder's dtype,
        on `output_device` (default: where the encoder runs).
        """
        prompts = check_prompts(prompts)
        ids, mask = self.tokenizer(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.encoder(ids, mask)  # (B, S, D)
        lens = mask.sum(dim=1).tolist()
        target = self.device if output_device is None else torch.device(output_device)
        return [out[b, :n].to(target) for b, n in enumerate(lens)]

    def encode_pair(self, prompt: str, negative: str = "", *, output_device: torch.device | str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, context_null) for one prompt; an empty negative becomes `DEFAULT_NEGATIVE_PROMPT`.

        Each is encoded on its own (batch 1), as the official pipelines do. Traced as `T5_Encoding`.
        Shapes: returns (L_prompt, D), (L_negative, D).
        """
        check_prompts([prompt, negative], what="prompt and negative prompt")
        negative = DEFAULT_NEGATIVE_PROMPT if negative == "" else negative
        cfg = self.config
        with stage("T5_Encoding", kind="encode", flops=cfg.flops_forward(self.tokenizer.text_len, batch=2),
                   device=str(self.device), dtype=str(self.encoder.token_embedding.weight.dtype)):
            context = self.encode([prompt], output_device=output_device)[0]
            context_null = self.encode([negative], output_device=output_device)[0]
        return context, context_null

    def release(self) -> None:
        """Free the encoder's memory (weights become meta tensors); the tokenizer stays usable."""
        if self._encoder is None:
            return
        on_cuda = self.device.type == "cuda"
        self._encoder.to("meta")
        self._encoder = None
        if on_cuda:
            torch.cuda.empty_cache()


def pad_text_embeds(embeds: Sequence[torch.Tensor], text_len: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad trimmed embeddings to `text_len` rows, as the DiT does before its text embedding.

    Shapes: B tensors (L_i, D) -> (B, text_len, D) and lens (B,) int64.
    """
    if not embeds:
        raise ValueError("embeds is empty; pass the list returned by TextEncoder.encode")
    too_long = [int(e.shape[0]) for e in embeds if e.shape[0] > text_len]
    if too_long:
        raise ValueError(f"text embeddings of {too_long} rows exceed text_len {text_len}")
    dim = embeds[0].shape[-1]
    out = embeds[0].new_zeros(len(embeds), text_len, dim)
    for b, e in enumerate(embeds):
        out[b, : e.shape[0]] = e
    return out, torch.tensor([e.shape[0] for e in embeds], dtype=torch.int64)


def load_text_encoder(path: PathLike, *, tokenizer_path: PathLike | None = None,
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                      text_len: int = DEFAULT_TEXT_LEN) -> TextEncoder:
    """Load encoder weights and find the tokenizer (padding prompts to `text_len`, 512 as in Wan).

    Tokenizer, first found: `tokenizer_path`; the `spiece_model` tensor embedded in the file
    (ComfyUI); next to the file (`google/umt5-xxl/spiece.model` etc., the official release).
    Raises FileNotFoundError naming every place it looked.
    """
    sd, spiece = read_t5_state_dict(path, dtype=dtype)
    if tokenizer_path is not None:
        tokenizer = WanTokenizer.from_path(tokenizer_path, text_len=text_len)
    elif spiece is not None:
        tokenizer = WanTokenizer.from_spiece_bytes(spiece, text_len=text_len,
                                                   source=f"{path}:{SPIECE_TENSOR_KEY}")
    else:
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        found = find_spiece_model(folder)
        if found is None:
            raise FileNotFoundError(f"no tokenizer for {path}: it has no embedded '{SPIECE_TENSOR_KEY}' "
                                    f"tensor and none of {searched_places(folder)} exists; pass "
                                    f"tokenizer_path (the {TOKENIZER_SUBFOLDER} folder of the official "
                                    "release or its spiece.model)")
        tokenizer = WanTokenizer.from_path(found, text_len=text_len)
    encoder = _encoder_from_state_dict(sd, device=device, dtype=dtype, source=str(path))
    logger.info("loaded UMT5 encoder %s (%d layers, dim %d, %s) on %s; tokenizer %s", path,
                encoder.config.num_layers, encoder.config.dim, dtype, device, tokenizer.source)
    return TextEncoder(encoder, tokenizer, device=device)


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------
def save_text_encoder(encoder_or_sd: UMT5Encoder | dict[str, torch.Tensor], path: PathLike, *,
                      spiece_bytes: bytes | None = None, layout: str = "comfy",
                      dtype: torch.dtype = torch.bfloat16, fp8_scaled: bool = False) -> Path:
    """Write a UMT5 encoder (a model, or a state dict in either layout) in ComfyUI's or the official layout.

    - "comfy": Hugging Face keys in a `.safetensors`; `spiece_bytes` go in as the uint8 `spiece_model` tensor.
    - "official": official keys, `.pth` (torch.save) or `.safetensors` by suffix; `spiece_bytes` are
      written to `<folder>/google/umt5-xxl/spiece.model` as in the official release.
    - `fp8_scaled`: linear weights in float8 e4m3fn with `<name>.scale_weight` and a `scaled_fp8`
      marker, as ComfyUI's fp8-scaled files; embeddings and norms stay in `dtype`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    target = Path(path)
    sd = encoder_or_sd.state_dict() if isinstance(encoder_or_sd, nn.Module) else dict(encoder_or_sd)
    if _HF_ANCHOR in sd:
        sd = hf_to_official(sd)
    detect_t5_config(sd)  # refuses anything that is not a complete official-layout UMT5 encoder
    if layout == "comfy" and target.suffix != ".safetensors":
        raise ValueError(f"the comfy layout is a .safetensors file; got {target.name}")
    if target.suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(f"unsupported file type {target.suffix!r}; use .safetensors, .pth or .pt")
    out = official_to_hf(sd) if layout == "comfy" else sd
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in out.items():
        tensor = tensor.detach().cpu()
        if fp8_scaled and _FP8_LINEAR.search(key):
            tensors[key], tensors[key[: -len(".weight")] + FP8_SCALE_SUFFIX] = quantise_fp8_scaled(tensor)
        else:
            tensors[key] = tensor.to(dtype).contiguous()
    if fp8_scaled:
        tensors[FP8_MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn)
    if spiece_bytes is not None and layout == "comfy":
        tensors[SPIECE_TENSOR_KEY] = torch.frombuffer(bytearray(spiece_bytes), dtype=torch.uint8).clone()
    if target.suffix == ".safetensors":
        write_safetensors(tensors, target)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, target)
    if spiece_bytes is not None and layout == "official":
        folder = target.parent / TOKENIZER_SUBFOLDER
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "spiece.model").write_bytes(spiece_bytes)
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>", "pad_token": "<pad>",
             "unk_token": "<unk>"}, indent=1), encoding="utf-8")
    logger.info("saved UMT5 encoder to %s (%s layout, %s%s)", target, layout, dtype,
                ", fp8 scaled" if fp8_scaled else "")
    return target
