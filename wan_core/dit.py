"""The Wan2.2 diffusion transformer (`WanModel` of the official code, spec section 3).

One class for t2v, i2v and ti2v; the two A14B experts are two instances. Parameter names are the
official ones, so an official state dict loads with `load_state_dict` directly.

Precision: the module runs with float32, bfloat16 or float16 weights. Big matmuls (patch and text
embedding, attention projections, FFN) run in the weights' dtype; the time MLP, modulation, the
residual stream, the gated residual adds, every norm's statistics and the head run in float32, as
in the official GPU run. No autocast is needed by the caller.

Differences from the official code that do not change results:
- Timesteps `(B,)` are broadcast per sample (the official `expand` fails for B > 1).
- The time MLP runs once per distinct timestep value and is broadcast, instead of once per token.
- Padding tokens up to `seq_len` is skipped: padded rows are masked out as keys and their outputs
  are discarded, so real rows are identical. `seq_len` is still checked.
- The patch embedding (a Conv3d whose kernel equals its stride) runs as one matmul over the
  gathered patches (same weights, same sums).
- Trailing all-zero text rows (the zero padding up to `text_len`) all embed to the same row. The
  text MLP runs on the distinct rows only, and in float32, when the attention backend can add a
  bias per key (sdpa), the cross-attention keeps one copy of the padding row per sample with an
  additive key bias `log(copies represented)`: softmax over keys that are exact duplicates equals
  softmax over one copy weighted by the count, so the result is the same up to float rounding
  while the text projections and cross-attention shrink from `text_len` keys to the real rows
  plus one.
- Without autograd (`torch.no_grad()`/`torch.inference_mode()`), residual updates and the FFN
  activation run in place; with autograd enabled every op is out of place.

Sequence parallelism attaches from outside through one typed seam, `WanDiT.sequence_layout`: per
forward the layout gives a `TokenShard`, which says which token rows this process computes, how
self-attention sees the other rows, and how the rows are gathered before unpatchifying. The
default layout keeps every token here (identities and plain attention); `runtime/ulysses.py`
swaps in its own for the duration of a parallel run.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import (
    AUTO_BACKEND,
    REFERENCE_BACKEND,
    AttentionBackend,
    attention,
    check_backend_name,
    resolve_backend_for,
)
from .config import DiTConfig
from .rope import RopeCache, RopeTables, rotate

SINUSOID_BASE = 10000.0


def sinusoidal_embedding(freq_dim: int, t: torch.Tensor) -> torch.Tensor:
    """`[cos(t*f_i) | sin(t*f_i)]`, f_i = 10000^(-i/half), computed in float64, returned float32.

    Shapes: t (...,) -> (..., freq_dim).
    """
    half = freq_dim // 2
    freqs = torch.pow(SINUSOID_BASE, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[..., None] * freqs
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1).float()


def _linear32(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """A Linear evaluated in float32 whatever the weight dtype (the official fp32 regions)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """A Linear in the weight dtype (the official bf16 autocast regions)."""
    return layer(x.to(layer.weight.dtype))


class WanRMSNorm(nn.Module):
    """RMS norm over the last dim: statistics in float32, cast back, times a learned weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """`inplace=True` (the caller owns x, no autograd) overwrites x instead of allocating."""
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # sum of squares in one reduction (no squared copy), then two passes over x
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (..., 1)
            scale = (norm.square() / x.shape[-1] + self.eps).rsqrt()
            if torch.is_grad_enabled():
                return x * scale * self.weight
            out = x.mul_(scale) if inplace else torch.mul(x, scale)
            return out.mul_(self.weight)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.to(x.dtype) * self.weight.to(x.dtype)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (affine parameters, when present, used in float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class WanPatchEmbedding(nn.Conv3d):
    """The patch Conv3d (kernel == stride, no padding) evaluated as one matmul over the patches.

    Same parameters and state-dict keys as `nn.Conv3d`; like the convolution, trailing frames or
    pixels that do not fill a whole patch are dropped.
    """

    def __init__(self, in_dim: int, dim: int, patch_size: tuple[int, int, int]) -> None:
        super().__init__(in_dim, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shapes: x (B, C, T, H, W) -> (B, D, T//pt, H//ph, W//pw), a view of (B, L, D) tokens."""
        pt, ph, pw = self.kernel_size
        b, c, t, h, w = x.shape
        f, hh, ww = t // pt, h // ph, w // pw
        x = x[:, :, : f * pt, : hh * ph, : ww * pw]
        patches = x.reshape(b, c, f, pt, hh, ph, ww, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        patches = patches.reshape(b, f * hh * ww, c * pt * ph * pw)
        tokens = F.linear(patches, self.weight.flatten(1), self.bias)  # (B, L, D)
        return tokens.transpose(1, 2).unflatten(2, (f, hh, ww))


class WanTextEmbedding(nn.Sequential):
    """The text MLP (Linear, GELU-tanh, Linear) over zero-padded rows, each padding row computed once.

    Same parameters and keys as the official `nn.Sequential`. Rows of `x` from `num_rows` on must
    be all zero (found by scanning `x` when `num_rows` is None), and `pad_to` extends the output
    with more zero-input rows; all those rows get the embedding of one zero row.
    """

    def __init__(self, text_dim: int, dim: int) -> None:
        super().__init__(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, *, pad_to: int | None = None,
                num_rows: int | None = None) -> torch.Tensor:
        """Shapes: x (B, S, text_dim) -> (B, max(S, pad_to), D)."""
        total = max(x.shape[1], pad_to or 0)
        if num_rows is None:
            num_rows = int(nonzero_rows(x).max()) if x.shape[0] and x.shape[1] else 0
        num_rows = min(num_rows, x.shape[1])
        if num_rows >= total:
            return super().forward(x)
        zero_row = super().forward(x.new_zeros(1, 1, x.shape[2]))  # what every padding row embeds to
        head = super().forward(x[:, :num_rows])
        return torch.cat((head, zero_row.expand(x.shape[0], total - num_rows, -1)), dim=1)


def nonzero_rows(x: torch.Tensor) -> torch.Tensor:
    """Per sample, the count of leading rows up to and including the last row that is not all zero.

    Shapes: x (B, S, C) -> (B,) int64.
    """
    nonzero = x.ne(0).any(-1)  # (B, S)
    positions = torch.arange(1, x.shape[1] + 1, device=x.device)
    return (nonzero * positions).amax(-1) if x.shape[1] else nonzero.new_zeros(x.shape[0], dtype=torch.int64)


def compact_text_keys(context: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop duplicate padding rows of an embedded context; a key bias keeps softmax unchanged.

    Rows `rows[b]:` of sample b must all be equal (the embedding of the zero padding). Keeps
    `S' = min(S, max(rows) + 1)` rows; sample b then holds `S' - rows[b]` copies of its padding
    row standing for `S - rows[b]`, so each gets the bias `log((S - rows[b]) / (S' - rows[b]))`.
    Shapes: context (B, S, D), rows (B,) -> (B, S', D) view, bias (B, S') float32 or None when
    nothing is dropped.
    """
    total = context.shape[1]
    kept = min(total, int(rows.max()) + 1)
    if kept >= total:
        return context, None
    rows = rows.to(device=context.device, dtype=torch.float64)[:, None]
    weight = ((total - rows) / (kept - rows)).log()  # (B, 1), float64
    positions = torch.arange(kept, device=context.device, dtype=torch.float64)[None, :]
    bias = torch.where(positions < rows, 0.0, weight).float()
    return context[:, :kept], bias


class TokenShard:
    """The token rows of one forward that this process computes: all of them, in this base class.

    `WanDiT.forward` routes four things through it and nothing else: the rows of the block input
    and of per-token tables (`local`), the RoPE rows (`local_rope`), self-attention
    (`self_attention`) and the rows of the head output (`gather`). A sequence-parallel layout
    (`runtime/ulysses.py`) subclasses it; the cross-attention and every per-token operation run
    unchanged on whatever rows this process holds.
    """

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """Shapes: x (B, L, ...) per-token rows, or (B, 1, ...) one row for every token -> the rows
        this process computes (a one-row table passes unchanged)."""
        return x

    def local_rope(self, rope: RopeTables) -> RopeTables:
        """The rotation tables of the rows this process computes."""
        return rope

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       backend: AttentionBackend) -> torch.Tensor:
        """Attention of the local query rows over every key of the sequence.

        Shapes: q, k, v (B, L_local, N, Dh) -> (B, L_local, N, Dh).
        """
        return attention(q, k, v, backend=backend)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Shapes: x (B, L_local, C) -> (B, L, C), every row of the sequence in order."""
        return x


FULL_SEQUENCE = TokenShard()


class SequenceLayout:
    """How the tokens of a forward are split across processes: not at all, in this base class."""

    def shard(self, num_tokens: int) -> TokenShard:
        """The `TokenShard` of a forward over `num_tokens` tokens."""
        return FULL_SEQUENCE


SINGLE_PROCESS = SequenceLayout()


class WanAttention(nn.Module):
    """q/k/v/o projections with RMS-normed q and k over the full dim (before the head split).

    Without autograd the q/k projections are normed and rotated in their own memory, so a forward
    hook on `norm_q`/`norm_k` that keeps the output must clone it.
    """

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))  # (B, L, N, Dh)

    def self_attention(self, x: torch.Tensor, rope: RopeTables | tuple[torch.Tensor, torch.Tensor],
                       backend: AttentionBackend, *, shard: TokenShard = FULL_SEQUENCE) -> torch.Tensor:
        """Shapes: x (B, L, D) in the compute dtype (the rows of `shard`), rope tables of `RopeCache`
        -> (B, L, D)."""
        owned = not torch.is_grad_enabled()  # the projections' outputs are ours to overwrite
        q = self._heads(self.norm_q(self.q(x), inplace=owned))
        k = self._heads(self.norm_k(self.k(x), inplace=owned))
        v = self._heads(self.v(x))
        q, k = rotate(q, rope, inplace=owned).to(x.dtype), rotate(k, rope, inplace=owned).to(x.dtype)
        return self.o(shard.self_attention(q, k, v, backend).flatten(2))

    def cross_attention(self, x: torch.Tensor, context: torch.Tensor, backend: AttentionBackend, *,
                        key_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Shapes: x (B, L, D), context (B, S, D), both in the compute dtype, key_bias (B, S) additive
        float32 from `compact_text_keys` or None (no mask) -> (B, L, D)."""
        owned = not torch.is_grad_enabled()
        q = self._heads(self.norm_q(self.q(x), inplace=owned))
        k = self._heads(self.norm_k(self.k(context), inplace=owned))
        v = self._heads(self.v(context))
        return self.o(attention(q, k, v, backend=backend, key_bias=key_bias).flatten(2))


def _modulation_parameter(rows: int, dim: int) -> nn.Parameter:
    """A (1, rows, dim) modulation table, randomly initialised unless built on the meta device.

    Models that are about to receive a checkpoint are built on the meta device; initialising
    there would only cost time (random ops on meta tensors are not free).
    """
    param = nn.Parameter(torch.empty(1, rows, dim))
    if not param.is_meta:
        nn.init.normal_(param, std=dim ** -0.5)
    return param


class AttentionPlan(NamedTuple):
    """The resolved backend of each attention site of a forward (they differ under `auto`)."""

    self_attn: AttentionBackend
    cross_attn: AttentionBackend


def _sites(backend: AttentionPlan | AttentionBackend | str) -> tuple[AttentionBackend | str, AttentionBackend | str]:
    return (backend.self_attn, backend.cross_attn) if isinstance(backend, AttentionPlan) else (backend, backend)


class WanBlock(nn.Module):
    """One transformer block (`WanAttentionBlock`, spec section 3.7)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        d, eps = config.dim, config.eps
        self.norm1 = WanLayerNorm(d, eps, elementwise_affine=False)
        self.self_attn = WanAttention(d, config.num_heads, eps)
        self.norm3 = WanLayerNorm(d, eps, elementwise_affine=True)
        self.cross_attn = WanAttention(d, config.num_heads, eps)
        self.norm2 = WanLayerNorm(d, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, d))
        self.modulation = _modulation_parameter(6, d)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor,
                rope: RopeTables | tuple[torch.Tensor, torch.Tensor], backend: AttentionPlan | AttentionBackend, *,
                context_bias: torch.Tensor | None = None, shard: TokenShard = FULL_SEQUENCE) -> torch.Tensor:
        """Shapes: x (B, L, D) float32, e0 (B, Lt, 6, D) float32 with Lt in {1, L}, context (B, S, D),
        context_bias (B, S) float32 key bias of a compacted context or None -> (B, L, D) float32.
        Under sequence parallelism L is the rows of `shard` (`TokenShard.local`).

        `backend`: one per attention site (`AttentionPlan`), or one for both. x itself is never
        modified; without autograd the new residual is updated in place.
        """
        dtype = self.ffn[0].bias.dtype  # the compute dtype (a weight may be held in a compact form)
        inplace = not torch.is_grad_enabled()
        self_backend, cross_backend = _sites(backend)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + e0).unbind(2)
        h = torch.addcmul(shift_sa, self.norm1(x), 1 + scale_sa).to(dtype)
        x = torch.addcmul(x, self.self_attn.self_attention(h, rope, self_backend, shard=shard).float(),
                          gate_sa)  # new tensor
        cross = self.cross_attn.cross_attention(self.norm3(x).to(dtype), context, cross_backend,
                                                key_bias=context_bias).float()
        x = x.add_(cross) if inplace else x + cross
        h = torch.addcmul(shift_ff, self.norm2(x), 1 + scale_ff).to(dtype)
        h = self.ffn[0](h)
        h = torch.ops.aten.gelu_(h, approximate="tanh") if inplace else self.ffn[1](h)
        h = self.ffn[2](h).float()
        return x.addcmul_(h, gate_ff) if inplace else torch.addcmul(x, h, gate_ff)


class WanHead(nn.Module):
    """Final modulated LayerNorm and projection to patch channels (float32 region)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        d = config.dim
        self.norm = WanLayerNorm(d, config.eps, elementwise_affine=False)
        self.head = nn.Linear(d, config.out_dim * math.prod(config.patch_size))
        self.modulation = _modulation_parameter(2, d)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Shapes: x (B, L, D), e (B, Lt, D) the time embedding (not e0) -> (B, L, prod(patch)*out_dim)."""
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)  # each (B, Lt, D)
        return _linear32(torch.addcmul(shift, self.norm(x), 1 + scale), self.head)


class WanDiT(nn.Module):
    """Wan2.2 DiT for t2v, i2v and ti2v.

    `attention` names the attention backend (`attention.BACKEND_CHOICES`; `sdpa`, the reference,
    by default). It is chosen here, resolved once per forward (per attention site: `auto` measures
    self- and cross-attention shapes separately) and handed to every block.

    Shapes: x (B, C, T, h, w) latent; y (B, C_y, T, h, w) for i2v (C + C_y = in_dim); t (B,) or
    (B, seq_len) timesteps in [0, 1000]; context a list of B (S_i, text_dim) tensors or a padded
    (B, S, text_dim) tensor (with `context_lens`); returns (B, out_dim, T, h, w) float32.
    """

    def __init__(self, config: DiTConfig, *, attention: str = REFERENCE_BACKEND,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        self._attention_backend = check_backend_name(attention)
        d = config.dim
        self.patch_embedding = WanPatchEmbedding(config.in_dim, d, config.patch_size)
        self.text_embedding = WanTextEmbedding(config.text_dim, d)
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList([WanBlock(config) for _ in range(config.num_layers)])
        self.head = WanHead(config)
        self.rope = RopeCache(config.head_dim)
        self.sequence_layout: SequenceLayout = SINGLE_PROCESS  # replaced by runtime/ulysses.py, never in here
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @property
    def attention_backend(self) -> str:
        """The attention backend chosen at construction (a name; `auto` resolves per forward)."""
        return self._attention_backend

    # ----------------------------------------------------------------------------------------
    # pieces, public so that tests and tools can look at intermediates
    # ----------------------------------------------------------------------------------------
    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Time embedding e and projection e0, once per distinct value of t (float32).

        Shapes: t (B, Lt) -> e (B, Lt, D), e0 (B, Lt, 6, D).
        """
        values, inverse = torch.unique(t.to(torch.float64), return_inverse=True)
        e = _linear32(F.silu(_linear32(sinusoidal_embedding(self.config.freq_dim, values),
                                       self.time_embedding[0])), self.time_embedding[2])
        e0 = _linear32(F.silu(e), self.time_projection[1]).unflatten(-1, (6, -1))
        return e[inverse], e0[inverse]

    def embed_text(self, context: list[torch.Tensor] | torch.Tensor,
                   context_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Zero-pad each context to text_len, then the text MLP (padded rows are not masked later).

        Shapes: list of (S_i, text_dim), or (B, S, text_dim) with context_lens (B,) -> (B, text_len, D).
        """
        return self._embed_text(context, context_lens)[0]

    def _embed_text(self, context: list[torch.Tensor] | torch.Tensor,
                    context_lens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`embed_text` plus, per sample, the count of rows before its all-zero tail (B,) int64."""
        cfg = self.config
        weight = self.text_embedding[0].weight
        if isinstance(context, torch.Tensor):
            padded = self._padded_context_tensor(context, context_lens).to(weight)
        else:
            for i, c in enumerate(context):
                if c.ndim != 2 or c.shape[1] != cfg.text_dim or c.shape[0] > cfg.text_len:
                    raise ValueError(f"context {i} must be (S <= {cfg.text_len}, {cfg.text_dim}); "
                                     f"got {tuple(c.shape)}")
            longest = max((c.shape[0] for c in context), default=0)
            padded = weight.new_zeros(len(context), longest, cfg.text_dim)
            for i, c in enumerate(context):
                padded[i, : c.shape[0]] = c.to(weight)
        rows = nonzero_rows(padded)  # padded (B, S <= text_len, text_dim): rows beyond S are zero too
        num_rows = int(rows.max()) if rows.numel() else 0
        return self.text_embedding(padded, pad_to=cfg.text_len, num_rows=num_rows), rows

    def _padded_context_tensor(self, context: torch.Tensor,
                               context_lens: torch.Tensor | None) -> torch.Tensor:
        """Check a (B, S, text_dim) context; rows at or beyond `context_lens[b]` are zeroed.

        Shapes: context (B, S, text_dim), context_lens (B,) or None -> (B, S' <= text_len, text_dim)
        (the input itself when nothing needs zeroing).
        """
        cfg = self.config
        if context.ndim != 3:
            raise ValueError(f"context must be (B, S, text_dim) or a list of (S_i, text_dim); "
                             f"got shape {tuple(context.shape)}")
        if context_lens is not None:
            if context_lens.shape != (context.shape[0],):
                raise ValueError(f"context_lens must have shape ({context.shape[0]},); "
                                 f"got {tuple(context_lens.shape)}")
            lens = context_lens.to(device=context.device, dtype=torch.int64).clamp(max=context.shape[1])
            context = context[:, : int(lens.max())] if lens.numel() else context[:, :0]
            keep = torch.arange(context.shape[1], device=context.device)[None, :] < lens[:, None]
            context = torch.where(keep[..., None], context, 0)
        if context.shape[2] != cfg.text_dim or context.shape[1] > cfg.text_len:
            raise ValueError(f"context must be (B, S <= {cfg.text_len}, {cfg.text_dim}) after trimming "
                             f"to context_lens; got {tuple(context.shape)}")
        return context

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                      num_contexts: int, seq_len: int | None) -> int:
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"x must be (B, C, T, h, w); got shape {tuple(x.shape)}")
        in_ch = x.shape[1] + (0 if y is None else y.shape[1])
        if (cfg.model_type == "i2v") != (y is not None):
            raise ValueError(f"y (the image conditioning) is {'required' if y is None else 'only accepted'} "
                             f"for model_type 'i2v'; this model is {cfg.model_type!r}")
        if y is not None and (y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]):
            raise ValueError(f"y {tuple(y.shape)} must match x {tuple(x.shape)} except on channels")
        if in_ch != cfg.in_dim:
            raise ValueError(f"input channels (x plus y) must be in_dim={cfg.in_dim}; got {in_ch}")
        if num_contexts != x.shape[0]:
            raise ValueError(f"need one context per sample: got {num_contexts} for batch {x.shape[0]}")
        num_tokens = cfg.num_tokens(tuple(x.shape[2:]))
        if seq_len is not None and seq_len < num_tokens:
            raise ValueError(f"seq_len must be >= the token count {num_tokens}; got {seq_len}")
        if t.ndim == 1 and t.shape[0] in (1, x.shape[0]):
            return num_tokens
        if t.ndim == 2 and t.shape[0] == x.shape[0] and t.shape[1] >= num_tokens:
            return num_tokens
        raise ValueError(f"t must be (B,) or (B, seq_len >= {num_tokens}) with B={x.shape[0]}; "
                         f"got shape {tuple(t.shape)}")

    def _attention_plan(self, tokens: torch.Tensor, ctx: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype
                        ) -> tuple[AttentionPlan, torch.Tensor, torch.Tensor | None]:
        """The backends of this forward (resolved once per forward), and the context they attend to.

        In float32 the padding rows of the context are compacted with a key bias when the backend can
        add one (`auto` can: the sdpa kernels are among its candidates).
        Shapes: tokens (B, L, D), ctx (B, text_len, D), rows (B,) -> plan, ctx (B, S', D), bias (B, S') or None.
        """
        cfg, name = self.config, self._attention_backend
        spec = dict(device=tokens.device, dtype=dtype, num_heads=cfg.num_heads, head_dim=cfg.head_dim)
        if name != AUTO_BACKEND:
            backend = resolve_backend_for(name, **spec)
            ctx_bias = None
            if dtype == torch.float32 and backend.key_bias_fn is not None:
                ctx, ctx_bias = compact_text_keys(ctx, rows)  # (B, S' <= text_len, D)
            return AttentionPlan(backend, backend), ctx, ctx_bias
        ctx, ctx_bias = compact_text_keys(ctx, rows) if dtype == torch.float32 else (ctx, None)
        batch, num_tokens = tokens.shape[:2]
        self_attn = resolve_backend_for(name, **spec, batch=batch, num_queries=num_tokens, num_keys=num_tokens)
        cross_attn = resolve_backend_for(name, **spec, batch=batch, num_queries=num_tokens, num_keys=ctx.shape[1],
                                         key_bias=ctx_bias is not None)
        return AttentionPlan(self_attn, cross_attn), ctx, ctx_bias

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: list[torch.Tensor] | torch.Tensor, *,
                seq_len: int | None = None, y: torch.Tensor | None = None,
                context_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the flow (velocity) for latent x at timestep t.

        Shapes: x (B, C, T, h, w), t (B,) or (B, seq_len), context list of B (S_i, text_dim) or
        (B, S, text_dim), y (B, in_dim - C, T, h, w) or None -> (B, out_dim, T, h, w) float32.
        """
        batch = x.shape[0]
        num_tokens = self._check_inputs(x, t, y, len(context), seq_len)
        dtype = self.patch_embedding.weight.dtype
        if y is not None:
            x = torch.cat((x, y), dim=1)
        patches = self.patch_embedding(x.to(dtype))  # (B, D, f, h', w')
        grid = tuple(patches.shape[2:])
        tokens = rearrange(patches, "b d f h w -> b (f h w) d").float()  # blocks never modify their input

        t = t.to(x.device)
        if t.ndim == 1:
            t = t.expand(batch)[:, None]  # (B, 1): one timestep per sample
        else:
            t = t[:, :num_tokens]
            if bool((t == t[:, :1]).all()):
                t = t[:, :1]  # every token of a sample shares its timestep: compute once, broadcast
        e, e0 = self.embed_time(t)  # (B, Lt, D), (B, Lt, 6, D)

        ctx, rows = self._embed_text(context, context_lens)
        plan, ctx, ctx_bias = self._attention_plan(tokens, ctx.to(dtype), rows, dtype)
        shard = self.sequence_layout.shard(num_tokens)
        rope = shard.local_rope(self.rope.tables(grid, tokens.device))
        tokens, e, e0 = shard.local(tokens), shard.local(e), shard.local(e0)  # this process's rows
        for block in self.blocks:
            tokens = block(tokens, e0, ctx, rope, plan, context_bias=ctx_bias, shard=shard)
        out = shard.gather(self.head(tokens, e))  # (B, L, prod(patch)*out_dim)
        pt, ph, pw = self.config.patch_size
        return rearrange(out, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)",
                         f=grid[0], h=grid[1], w=grid[2], pt=pt, ph=ph, pw=pw).float()
