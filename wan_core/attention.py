"""Attention with a registry of backends (spec section 3.6).

Every backend is a function `fn(q, k, v, k_lens) -> out` on (B, L, N, Dh) tensors with a
`supports(q, k, v, k_lens) -> str | None` check that returns why it cannot run (None when it can).
`sdpa` (torch's scaled_dot_product_attention) is the reference and always present. `flash_attn`
(FlashAttention 2) and `sage` (SageAttention, int8 QK, approximate) are optional: their packages
are imported only when they are asked for. `auto` picks the first exact backend that supports the
inputs (flash_attn, then sdpa) and logs its pick once per process; it never picks `sage`.

`k_lens` limits the keys of sample b to its first `k_lens[b]` rows (key padding); queries are never
masked. `key_bias` adds a float per key to the scores before the softmax; a backend declares
whether it can (`key_bias_fn`: sdpa can, as an additive mask; flash_attn and sage cannot). The DiT
uses it to stand one key for many identical ones. Scale is 1/sqrt(Dh); no dropout, no causal mask.

A model chooses its backend by name once (`WanDiT(config, attention=...)`), resolves it once per
forward with `resolve_backend_for` (device, dtype and head dim decide), and passes the resolved
`AttentionBackend` to every `attention` call, which then runs it without looking it up again.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.nn.functional as F

from .config import HALF_DTYPES
from .errors import BackendUnavailableError

logger = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
KeyBiasFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SupportsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], "str | None"]


@dataclass(frozen=True)
class AttentionBackend:
    """One attention implementation: how to run it, when it can, and how to install it."""

    name: str
    fn: AttentionFn
    supports: SupportsFn
    module: str | None  # Python package that must be importable (None: part of torch)
    install_hint: str
    exact: bool  # True when it computes softmax attention without approximation
    key_bias_fn: KeyBiasFn | None = None  # fn(q, k, v, key_bias) when it can add a bias per key

    def is_installed(self) -> bool:
        return self.module is None or _module_installed(self.module)


@functools.lru_cache(maxsize=None)
def _module_installed(module: str) -> bool:
    """Whether a package can be imported (looked up once per process; nothing is imported)."""
    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------------------------
# sdpa: the reference
# --------------------------------------------------------------------------------------------
def _key_padding_mask(k_lens: torch.Tensor, num_keys: int, device: torch.device) -> torch.Tensor:
    """Shapes: k_lens (B,) -> bool mask (B, 1, 1, Lk), True where the key is attended."""
    positions = torch.arange(num_keys, device=device)
    return (positions[None, :] < k_lens.to(device)[:, None])[:, None, None, :]


def _needs_mask(k_lens: torch.Tensor | None, num_keys: int) -> bool:
    return k_lens is not None and bool((k_lens < num_keys).any())


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None) -> torch.Tensor:
    mask = _key_padding_mask(k_lens, k.shape[1], q.device) if _needs_mask(k_lens, k.shape[1]) else None
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask)  # (B, N, Lq, Dh)
    return out.transpose(1, 2)


def _sdpa_key_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
    """Shapes: q (B, Lq, N, Dh), k/v (B, Lk, N, Dh), key_bias (B, Lk) -> (B, Lq, N, Dh)."""
    mask = key_bias.to(q.dtype)[:, None, None, :]  # (B, 1, 1, Lk)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2)


def _sdpa_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   k_lens: torch.Tensor | None) -> str | None:
    return None


# --------------------------------------------------------------------------------------------
# flash_attn (FlashAttention 2)
# --------------------------------------------------------------------------------------------
def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None) -> torch.Tensor:
    import flash_attn

    if not _needs_mask(k_lens, k.shape[1]):
        return flash_attn.flash_attn_func(q, k, v)
    b, lq, n, dh = q.shape
    lens = k_lens.to(device=q.device, dtype=torch.int32)
    cu_k = F.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (b + 1) * lq, lq, device=q.device, dtype=torch.int32)
    keep = _key_padding_mask(lens, k.shape[1], q.device).reshape(b, -1)  # (B, Lk)
    out = flash_attn.flash_attn_varlen_func(
        q.reshape(b * lq, n, dh), k[keep], v[keep], cu_q, cu_k, lq, int(lens.max()))
    return out.reshape(b, lq, n, dh)


def _flash_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_lens: torch.Tensor | None) -> str | None:
    if q.device.type != "cuda":
        return f"flash_attn needs CUDA tensors; got device {q.device}"
    if q.dtype not in HALF_DTYPES:
        return f"flash_attn needs float16 or bfloat16; got {q.dtype}"
    if q.shape[-1] > 256:
        return f"flash_attn supports head dim <= 256; got {q.shape[-1]}"
    return None


# --------------------------------------------------------------------------------------------
# sage (SageAttention: int8 QK^T, approximate)
# --------------------------------------------------------------------------------------------
def _sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None) -> torch.Tensor:
    import sageattention

    return sageattention.sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _sage_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   k_lens: torch.Tensor | None) -> str | None:
    if q.device.type != "cuda":
        return f"sage needs CUDA tensors; got device {q.device}"
    if q.dtype not in HALF_DTYPES:
        return f"sage needs float16 or bfloat16; got {q.dtype}"
    if _needs_mask(k_lens, k.shape[1]):
        return "sage has no key-padding mask; got k_lens shorter than the key length"
    return None


BACKENDS: Mapping[str, AttentionBackend] = MappingProxyType({
    "sdpa": AttentionBackend("sdpa", _sdpa, _sdpa_supports, None, "part of torch", exact=True,
                             key_bias_fn=_sdpa_key_bias),
    "flash_attn": AttentionBackend("flash_attn", _flash, _flash_supports, "flash_attn",
                                   "pip install flash-attn --no-build-isolation", exact=True),
    "sage": AttentionBackend("sage", _sage, _sage_supports, "sageattention",
                             "pip install sageattention", exact=False),
})
AUTO_BACKEND = "auto"  # picks the first exact backend of AUTO_ORDER that supports the inputs
AUTO_ORDER = ("flash_attn", "sdpa")
REFERENCE_BACKEND = "sdpa"
# Every name a caller may choose (a node's widget lists them in this order: the reference first).
BACKEND_CHOICES = (REFERENCE_BACKEND, AUTO_BACKEND, *(n for n in BACKENDS if n != REFERENCE_BACKEND))


@dataclass
class _AutoPickLog:
    """Remembers which automatic picks were already logged (one line per pick per process)."""

    logged: set[str] = field(default_factory=set)

    def note(self, name: str, reason: str) -> None:
        if name not in self.logged:
            self.logged.add(name)
            logger.info("attention backend 'auto' picked %r (%s)", name, reason)


_AUTO_LOG = _AutoPickLog()


def available_backends() -> list[str]:
    """Names of the backends whose packages are installed (`sdpa` always), plus `auto`."""
    return [name for name, b in BACKENDS.items() if b.is_installed()] + [AUTO_BACKEND]


def check_backend_name(name: str) -> str:
    """`name` when it can be chosen: `auto` or a known backend whose package is installed."""
    if name != AUTO_BACKEND:
        get_backend(name)
    return name


def get_backend(name: str) -> AttentionBackend:
    """The backend called `name`; raises if it is unknown or its package is not installed."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of "
                         f"{sorted(BACKENDS) + [AUTO_BACKEND]}")
    backend = BACKENDS[name]
    if not backend.is_installed():
        raise BackendUnavailableError(f"attention backend {name!r} is not available: package "
                                      f"{backend.module!r} is not installed; install it with "
                                      f"`{backend.install_hint}` or use backend 'sdpa'")
    return backend


def resolve_backend(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_lens: torch.Tensor | None = None, *, key_bias: bool = False) -> AttentionBackend:
    """The backend that will run these inputs: `name` itself (checked), or the pick of `auto`.

    With `key_bias`, `auto` picks among the backends that can add a bias per key.
    """
    if name == AUTO_BACKEND:
        for candidate in AUTO_ORDER:
            backend = BACKENDS[candidate]
            if (backend.is_installed() and backend.supports(q, k, v, k_lens) is None
                    and (backend.key_bias_fn is not None or not key_bias)):
                _AUTO_LOG.note(candidate, f"{q.device.type}, {q.dtype}")
                return backend
        raise AssertionError("sdpa supports every input")  # pragma: no cover
    backend = get_backend(name)
    reason = backend.supports(q, k, v, k_lens)
    if reason is not None:
        raise ValueError(f"attention backend {name!r} cannot run these inputs: {reason}; "
                         f"use backend {REFERENCE_BACKEND!r} or {AUTO_BACKEND!r}")
    return backend


def resolve_backend_for(name: str, *, device: torch.device, dtype: torch.dtype, num_heads: int,
                        head_dim: int) -> AttentionBackend:
    """`resolve_backend` for the inputs a model will pass, told by their device, dtype and head shape
    (what every backend's `supports` looks at besides key padding, which models resolved this way
    do not use). Models call it once per forward and pass the result down."""
    probe = torch.empty((1, 0, num_heads, head_dim), device=device, dtype=dtype)  # no elements
    return resolve_backend(name, probe, probe, probe)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              backend: str | AttentionBackend = REFERENCE_BACKEND, k_lens: torch.Tensor | None = None,
              key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention over keys `k_lens[b]` of each sample, scale 1/sqrt(Dh), plus an optional
    additive per-key bias (backends with a `key_bias_fn`, and `auto`; not combined with `k_lens`).

    `backend` is a name, looked up and checked against these inputs, or an `AttentionBackend` that
    the caller resolved for them (`resolve_backend_for`), which runs as it is.
    Shapes: q (B, Lq, N, Dh), k/v (B, Lk, N, Dh), k_lens (B,) ints or None, key_bias (B, Lk) float
    or None; returns (B, Lq, N, Dh) in q's dtype.
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention expects q (B, Lq, N, Dh) and k, v (B, Lk, N, Dh); "
                         f"got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k_lens is not None and k_lens.shape != (q.shape[0],):
        raise ValueError(f"k_lens must have shape ({q.shape[0]},); got {tuple(k_lens.shape)}")
    if key_bias is not None:
        _check_key_bias(q, k, backend, k_lens, key_bias)
    chosen = backend if isinstance(backend, AttentionBackend) else resolve_backend(
        backend, q, k, v, k_lens, key_bias=key_bias is not None)
    if key_bias is not None:
        return chosen.key_bias_fn(q, k, v, key_bias).to(q.dtype)
    return chosen.fn(q, k, v, k_lens).to(q.dtype)


def _check_key_bias(q: torch.Tensor, k: torch.Tensor, backend: str | AttentionBackend,
                    k_lens: torch.Tensor | None, key_bias: torch.Tensor) -> None:
    chosen = backend if isinstance(backend, AttentionBackend) else BACKENDS.get(backend)
    if chosen is not None and chosen.key_bias_fn is None:
        able = " or ".join(repr(n) for n, b in BACKENDS.items() if b.key_bias_fn is not None)
        raise ValueError(f"key_bias is supported by the {able} backend only (and {AUTO_BACKEND!r}, which then "
                         f"picks it); got backend {chosen.name!r}; drop key_bias or use {able}")
    if k_lens is not None:
        raise ValueError("key_bias and k_lens cannot be combined; fold the padding into key_bias "
                         "(-inf for masked keys)")
    if key_bias.shape != (q.shape[0], k.shape[1]):
        raise ValueError(f"key_bias must have shape (B, Lk) = ({q.shape[0]}, {k.shape[1]}); "
                         f"got {tuple(key_bias.shape)}")
