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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention
from .config import DiTConfig
from .rope import RopeCache, apply_rope

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.to(x.dtype) * self.weight.to(x.dtype)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (affine parameters, when present, used in float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class WanAttention(nn.Module):
    """q/k/v/o projections with RMS-normed q and k over the full dim (before the head split)."""

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

    def self_attention(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                       backend: str) -> torch.Tensor:
        """Shapes: x (B, L, D) in the compute dtype -> (B, L, D)."""
        q = self._heads(self.norm_q(self.q(x)))
        k = self._heads(self.norm_k(self.k(x)))
        v = self._heads(self.v(x))
        q, k = apply_rope(q, *rope).to(x.dtype), apply_rope(k, *rope).to(x.dtype)
        return self.o(attention(q, k, v, backend=backend).flatten(2))

    def cross_attention(self, x: torch.Tensor, context: torch.Tensor, backend: str) -> torch.Tensor:
        """Shapes: x (B, L, D), context (B, S, D), both in the compute dtype -> (B, L, D). No mask."""
        q = self._heads(self.norm_q(self.q(x)))
        k = self._heads(self.norm_k(self.k(context)))
        v = self._heads(self.v(context))
        return self.o(attention(q, k, v, backend=backend).flatten(2))


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
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / math.sqrt(d))

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], backend: str) -> torch.Tensor:
        """Shapes: x (B, L, D) float32, e0 (B, Lt, 6, D) float32 with Lt in {1, L}, context (B, S, D)."""
        dtype = self.ffn[0].weight.dtype
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + e0).unbind(2)
        h = torch.addcmul(shift_sa, self.norm1(x), 1 + scale_sa).to(dtype)
        x = torch.addcmul(x, self.self_attn.self_attention(h, rope, backend).float(), gate_sa)
        x = x + self.cross_attn.cross_attention(self.norm3(x).to(dtype), context, backend).float()
        h = torch.addcmul(shift_ff, self.norm2(x), 1 + scale_ff).to(dtype)
        return torch.addcmul(x, self.ffn(h).float(), gate_ff)


class WanHead(nn.Module):
    """Final modulated LayerNorm and projection to patch channels (float32 region)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        d = config.dim
        self.norm = WanLayerNorm(d, config.eps, elementwise_affine=False)
        self.head = nn.Linear(d, config.out_dim * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, d) / math.sqrt(d))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Shapes: x (B, L, D), e (B, Lt, D) the time embedding (not e0) -> (B, L, prod(patch)*out_dim)."""
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)  # each (B, Lt, D)
        return _linear32(torch.addcmul(shift, self.norm(x), 1 + scale), self.head)


class WanDiT(nn.Module):
    """Wan2.2 DiT for t2v, i2v and ti2v.

    Shapes: x (B, C, T, h, w) latent; y (B, C_y, T, h, w) for i2v (C + C_y = in_dim); t (B,) or
    (B, seq_len) timesteps in [0, 1000]; context a list of B (S_i, text_dim) tensors or a padded
    (B, S, text_dim) tensor (with `context_lens`); returns (B, out_dim, T, h, w) float32.
    """

    def __init__(self, config: DiTConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        self.attention_backend = "sdpa"
        d = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, d, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, d), nn.GELU(approximate="tanh"),
                                            nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList([WanBlock(config) for _ in range(config.num_layers)])
        self.head = WanHead(config)
        self.rope = RopeCache(config.head_dim)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

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
        cfg = self.config
        if isinstance(context, torch.Tensor):
            if context.ndim != 3:
                raise ValueError(f"context must be (B, S, text_dim) or a list of (S_i, text_dim); "
                                 f"got shape {tuple(context.shape)}")
            lens = [context.shape[1]] * context.shape[0] if context_lens is None else context_lens.tolist()
            context = [c[: int(n)] for c, n in zip(context, lens)]
        weight = self.text_embedding[0].weight
        padded = weight.new_zeros(len(context), cfg.text_len, cfg.text_dim)
        for i, c in enumerate(context):
            if c.ndim != 2 or c.shape[1] != cfg.text_dim or c.shape[0] > cfg.text_len:
                raise ValueError(f"context {i} must be (S <= {cfg.text_len}, {cfg.text_dim}); "
                                 f"got {tuple(c.shape)}")
            padded[i, : c.shape[0]] = c.to(weight)
        return self.text_embedding(padded)

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
        tokens = rearrange(patches, "b d f h w -> b (f h w) d").float()

        t = t.to(x.device)
        if t.ndim == 1:
            t = t.expand(batch)[:, None]  # (B, 1): one timestep per sample
        else:
            t = t[:, :num_tokens]
            if bool((t == t[:, :1]).all()):
                t = t[:, :1]  # every token of a sample shares its timestep: compute once, broadcast
        e, e0 = self.embed_time(t)  # (B, Lt, D), (B, Lt, 6, D)

        ctx = self.embed_text(context, context_lens).to(dtype)  # (B, text_len, D)
        rope = self.rope.cos_sin(grid, tokens.device)
        for block in self.blocks:
            tokens = block(tokens, e0, ctx, rope, self.attention_backend)
        out = self.head(tokens, e)  # (B, L, prod(patch)*out_dim)
        pt, ph, pw = self.config.patch_size
        return rearrange(out, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)",
                         f=grid[0], h=grid[1], w=grid[2], pt=pt, ph=ph, pw=pw).float()

    def flops(self, latent_thw: tuple[int, int, int], *, batch: int = 1) -> float:
        """Analytic FLOPs of one forward on a (T, h, w) latent (time MLP counted once per sample)."""
        return self.config.flops_forward(self.config.num_tokens(latent_thw), batch=batch)
