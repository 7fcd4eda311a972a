"""UMT5-XXL text encoder (encoder only) and the prompt -> embedding wrapper.

Spec section 4. The model follows the official module names, so the official checkpoint
(`models_t5_umt5-xxl-enc-bf16.pth`) loads without renaming:

    x = token_embedding[ids]                                 (no scaling)
    per block: x += attn(RMS(x) * g1) with per-layer relative-position bias and no 1/sqrt(d),
               x += fc2(fc1(h) * gelu_tanh(gate(h))) with h = RMS(x) * g2
    out = RMS(x) * g_final

Checkpoint layouts (official, Hugging Face / ComfyUI, fp8 "scaled"), detection, loading and saving
live in `checkpoints/t5.py` (`load_text_encoder`, `save_text_encoder`).

`TextEncoder` ties a `UMT5Encoder` to a `WanTokenizer`: `encode(prompts)` returns the trimmed
`[L_i, dim]` rows the DiT consumes (true lengths, EOS included), `encode_pair(prompt, negative)`
substitutes the official default negative prompt for an empty one and is traced as stage
`T5_Encoding`. The encoder runs where it is placed (GPU, or CPU as the official `--t5_cpu`),
and `release()` frees it after encoding.

Shapes: B batch, S text positions (text_len, 512), D model dim, N heads, Dh head dim, L_i true lengths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import DEFAULT_NEGATIVE_PROMPT, T5_ENCODE_STAGE, UMT5Config
from .errors import WanError
from .tokenizer import WanTokenizer, check_prompts
from .trace import stage


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

    def encode_pair(self, prompt: str, negative: str = "", *, output_device: torch.device | str | None = None,
                    stage_facts: Mapping[str, object] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, context_null) for one prompt; an empty negative becomes `DEFAULT_NEGATIVE_PROMPT`.

        Each is encoded on its own (batch 1), as the official pipelines do. Traced as `T5_Encoding`
        (with `stage_facts` added, e.g. the memory planner's estimate).
        Shapes: returns (L_prompt, D), (L_negative, D).
        """
        check_prompts([prompt, negative], what="prompt and negative prompt")
        negative = DEFAULT_NEGATIVE_PROMPT if negative == "" else negative
        flops = self.config.flops_forward(self.tokenizer.text_len, batch=2)
        with stage(T5_ENCODE_STAGE.name, kind=T5_ENCODE_STAGE.kind, flops=flops, device=str(self.device),
                   dtype=str(self.encoder.token_embedding.weight.dtype), **dict(stage_facts or {})):
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
