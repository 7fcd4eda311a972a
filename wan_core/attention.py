"""Attention with a registry of backends (spec section 3.6).

Every backend is a function `fn(q, k, v, k_lens) -> out` on (B, L, N, Dh) tensors with a
`supports(q, k, v, k_lens) -> str | None` check that returns why it cannot run (None when it can).
`sdpa` (torch's scaled_dot_product_attention, torch's own kernel choice) is the reference and
always present; `sdpa_flash`, `sdpa_efficient`, `sdpa_cudnn` and `sdpa_math` pin one of its
kernels. Optional packages, imported only when asked for: `flash_attn` (FlashAttention 2),
`flash_attn3` (FlashAttention 3, Hopper, module `flash_attn_interface`), `sage` (SageAttention 2,
int8 QK / fp8 PV, approximate) and `sage3` (SageAttention 3, Blackwell, FP4, approximate).

`auto` chooses by measurement (`attention_choice.py`): on the first use of a shape class it times
every installed backend that supports the inputs, checks each against float32 attention on the
same inputs, and keeps the fastest that passes, for the rest of the process. The choice, its
measured TFLOP/s and every candidate's figures go to the profiler as a trace event.

`k_lens` limits the keys of sample b to its first `k_lens[b]` rows (key padding); queries are never
masked. `key_bias` adds a float per key to the scores before the softmax; a backend declares
whether it can (`key_bias_fn`: the sdpa backends can, as an additive mask; the others cannot). The
DiT uses it to stand one key for many identical ones. Scale is 1/sqrt(Dh); no dropout, no causal mask.

A model chooses its backend by name once (`WanDiT(config, attention=...)`), resolves it once per
forward with `resolve_backend_for` (device, dtype, head shape, and for `auto` the attention's
size), and passes the resolved `AttentionBackend` to every `attention` call, which then runs it
without looking it up again.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention_choice import ACCURACY_ROWS, AttentionSelector, Candidate, ShapeClass, attention_flops, relative_error
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
# sdpa with one kernel pinned (what `auto` compares; also a user's explicit choice)
# --------------------------------------------------------------------------------------------
def _pinned(kernel: SDPBackend) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None) -> torch.Tensor:
        with sdpa_kernel(kernel):
            return _sdpa(q, k, v, k_lens)

    def key_bias_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(kernel):
            return _sdpa_key_bias(q, k, v, key_bias)

    return fn, key_bias_fn


def _cuda_half(name: str, q: torch.Tensor) -> str | None:
    if q.device.type != "cuda":
        return f"{name} needs CUDA tensors; got device {q.device}"
    if q.dtype not in HALF_DTYPES:
        return f"{name} needs float16 or bfloat16; got {q.dtype}"
    return None


def _sdpa_flash_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         k_lens: torch.Tensor | None) -> str | None:
    if q.device.type == "cpu":
        return None  # torch's CPU flash kernel takes every float dtype and masks
    if q.device.type != "cuda":
        return f"sdpa_flash runs on CPU or CUDA; got device {q.device}"
    if _needs_mask(k_lens, k.shape[1]):
        return "sdpa_flash on CUDA takes no key-padding mask"
    return _cuda_half("sdpa_flash", q)


def _sdpa_efficient_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             k_lens: torch.Tensor | None) -> str | None:
    return None if q.device.type == "cuda" else f"sdpa_efficient needs CUDA tensors; got device {q.device}"


def _sdpa_cudnn_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         k_lens: torch.Tensor | None) -> str | None:
    return _cuda_half("sdpa_cudnn", q)


# --------------------------------------------------------------------------------------------
# flash_attn (FlashAttention 2) and flash_attn3 (FlashAttention 3, module flash_attn_interface)
# --------------------------------------------------------------------------------------------
def _first(result: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """FlashAttention 3 returned (out, lse) before 2025-01 and since 2025-08 with return_attn_probs;
    out alone in between: take the output either way."""
    return result[0] if isinstance(result, tuple) else result


def _flash_with(module_name: str) -> Callable[..., torch.Tensor]:
    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None) -> torch.Tensor:
        module = importlib.import_module(module_name)
        if not _needs_mask(k_lens, k.shape[1]):
            return _first(module.flash_attn_func(q, k, v))
        b, lq, n, dh = q.shape
        lens = k_lens.to(device=q.device, dtype=torch.int32)
        cu_k = F.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
        cu_q = torch.arange(0, (b + 1) * lq, lq, device=q.device, dtype=torch.int32)
        keep = _key_padding_mask(lens, k.shape[1], q.device).reshape(b, -1)  # (B, Lk)
        out = module.flash_attn_varlen_func(q.reshape(b * lq, n, dh), k[keep], v[keep], cu_q, cu_k, lq,
                                            int(lens.max()))
        return _first(out).reshape(b, lq, n, dh)
    return fn


def _flash_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_lens: torch.Tensor | None) -> str | None:
    if q.shape[-1] > 256:
        return f"flash_attn supports head dim <= 256; got {q.shape[-1]}"
    return _cuda_half("flash_attn", q)


def _flash3_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     k_lens: torch.Tensor | None) -> str | None:
    reason = _cuda_half("flash_attn3", q)
    if reason is None and torch.cuda.get_device_capability(q.device)[0] != 9:
        return "flash_attn3 runs on Hopper GPUs (compute capability 9.x)"
    return reason


# --------------------------------------------------------------------------------------------
# sage (SageAttention 2: int8 QK^T, fp8 PV) and sage3 (SageAttention 3: FP4, Blackwell); approximate
# --------------------------------------------------------------------------------------------
def _sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None) -> torch.Tensor:
    import sageattention

    return sageattention.sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _sage_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   k_lens: torch.Tensor | None) -> str | None:
    if _needs_mask(k_lens, k.shape[1]):
        return "sage has no key-padding mask; got k_lens shorter than the key length"
    return _cuda_half("sage", q)


def _sage3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None) -> torch.Tensor:
    import sageattn3

    out = sageattn3.sageattn3_blackwell(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, N, L, Dh)
    return out.transpose(1, 2)


def _sage3_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_lens: torch.Tensor | None) -> str | None:
    reason = _sage_supports(q, k, v, k_lens)
    if reason is None and torch.cuda.get_device_capability(q.device)[0] < 10:
        return "sage3 runs on Blackwell GPUs (compute capability 10.0+)"
    return reason and reason.replace("sage", "sage3", 1)


SAGE2_HINT = ("SageAttention 2 is built from source (PyPI's `sageattention` is the older v1): "
              "pip install git+https://github.com/thu-ml/SageAttention.git --no-build-isolation")
FLASH3_HINT = ("FlashAttention 3 is built from source for Hopper: git clone https://github.com/Dao-AILab/"
               "flash-attention && cd flash-attention/hopper && pip install . --no-build-isolation")
SAGE3_HINT = ("SageAttention 3 (Blackwell) is built from source: git clone https://github.com/thu-ml/"
              "SageAttention && cd SageAttention/sageattention3_blackwell && pip install . --no-build-isolation")
_FLASH_FN, _EFFICIENT_FN, _CUDNN_FN, _MATH_FN = (_pinned(k) for k in (
    SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH))
BACKENDS: Mapping[str, AttentionBackend] = MappingProxyType({
    "sdpa": AttentionBackend("sdpa", _sdpa, _sdpa_supports, None, "part of torch", exact=True,
                             key_bias_fn=_sdpa_key_bias),
    "sdpa_flash": AttentionBackend("sdpa_flash", _FLASH_FN[0], _sdpa_flash_supports, None, "part of torch",
                                   exact=True, key_bias_fn=_FLASH_FN[1]),
    "sdpa_efficient": AttentionBackend("sdpa_efficient", _EFFICIENT_FN[0], _sdpa_efficient_supports, None,
                                       "part of torch", exact=True, key_bias_fn=_EFFICIENT_FN[1]),
    "sdpa_cudnn": AttentionBackend("sdpa_cudnn", _CUDNN_FN[0], _sdpa_cudnn_supports, None, "part of torch",
                                   exact=True, key_bias_fn=_CUDNN_FN[1]),
    "sdpa_math": AttentionBackend("sdpa_math", _MATH_FN[0], _sdpa_supports, None, "part of torch", exact=True,
                                  key_bias_fn=_MATH_FN[1]),
    "flash_attn": AttentionBackend("flash_attn", _flash_with("flash_attn"), _flash_supports, "flash_attn",
                                   "pip install flash-attn --no-build-isolation", exact=True),
    "flash_attn3": AttentionBackend("flash_attn3", _flash_with("flash_attn_interface"), _flash3_supports,
                                    "flash_attn_interface", FLASH3_HINT, exact=True),
    "sage": AttentionBackend("sage", _sage, _sage_supports, "sageattention", SAGE2_HINT, exact=False),
    "sage3": AttentionBackend("sage3", _sage3, _sage3_supports, "sageattn3", SAGE3_HINT, exact=False),
})
AUTO_BACKEND = "auto"  # chooses by measurement (attention_choice.py)
REFERENCE_BACKEND = "sdpa"
# Every name a caller may choose (a node's widget lists them in this order: the reference first).
BACKEND_CHOICES = (REFERENCE_BACKEND, AUTO_BACKEND, *(n for n in BACKENDS if n != REFERENCE_BACKEND))
_SELECTOR = AttentionSelector()  # the process-wide cache of `auto`'s measured choices


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
                                      f"{backend.module!r} is not installed. To install: {backend.install_hint}. "
                                      "Or use backend 'sdpa' (or 'auto', which measures what is installed)")
    return backend


def resolve_backend(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_lens: torch.Tensor | None = None, *, key_bias: torch.Tensor | None = None,
                    selector: AttentionSelector | None = None) -> AttentionBackend:
    """The backend that will run these inputs: `name` itself (checked), or the measured choice of
    `auto` for their shape class (measured on these inputs the first time; `selector` defaults to
    the process-wide one). With `key_bias`, `auto` chooses among the backends that can add it.
    """
    if name == AUTO_BACKEND:
        return _choose(q, k, v, k_lens, key_bias, selector or _SELECTOR)
    backend = get_backend(name)
    reason = backend.supports(q, k, v, k_lens)
    if reason is not None:
        raise ValueError(f"attention backend {name!r} cannot run these inputs: {reason}; "
                         f"use backend {REFERENCE_BACKEND!r} or {AUTO_BACKEND!r}")
    return backend


def _choose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None,
            key_bias: torch.Tensor | None, selector: AttentionSelector) -> AttentionBackend:
    """`auto`: the fastest checked candidate for the shape class of these inputs (attention_choice.py)."""
    padded = _needs_mask(k_lens, k.shape[1])
    shape = ShapeClass.of(q, k, key_bias=key_bias is not None, padded_keys=padded)
    cached = selector.cached(shape)
    if cached is not None:
        return BACKENDS[cached.name]

    def run(backend: AttentionBackend) -> Callable[[], torch.Tensor]:
        if key_bias is not None:
            return lambda: backend.key_bias_fn(q, k, v, key_bias)
        return lambda: backend.fn(q, k, v, k_lens)

    candidates = [Candidate(name, run(b), b.exact) for name, b in BACKENDS.items()
                  if name != REFERENCE_BACKEND and b.is_installed() and b.supports(q, k, v, k_lens) is None
                  and (key_bias is None or b.key_bias_fn is not None)]
    rows = slice(0, min(ACCURACY_ROWS, q.shape[1]))
    exact = _reference(q[:, rows].float(), k.float(), v.float(), k_lens, key_bias)
    reference_error = relative_error(_reference(q[:, rows], k, v, k_lens, key_bias), exact)
    choice = selector.choose(shape, candidates, reference_error=reference_error,
                             accuracy=lambda out: relative_error(out[:, rows], exact),
                             flops=attention_flops(q, k), device=q.device)
    return BACKENDS[choice.name]


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None,
               key_bias: torch.Tensor | None) -> torch.Tensor:
    if key_bias is not None:
        return _sdpa_key_bias(q, k, v, key_bias.float())
    return _sdpa(q, k, v, k_lens)


def resolve_backend_for(name: str, *, device: torch.device, dtype: torch.dtype, num_heads: int,
                        head_dim: int, batch: int = 1, num_queries: int | None = None,
                        num_keys: int | None = None, key_bias: bool = False) -> AttentionBackend:
    """`resolve_backend` for the inputs a model will pass, told by their device, dtype and head shape
    (what every backend's `supports` looks at besides key padding, which models resolved this way
    do not use). `auto` also needs the attention's size (`batch`, `num_queries`, `num_keys`,
    `key_bias`): it is measured once per shape class on seeded random inputs of that size. Models
    call it once per forward and attention site and pass the result down."""
    if name != AUTO_BACKEND:
        probe = torch.empty((1, 0, num_heads, head_dim), device=device, dtype=dtype)  # no elements
        return resolve_backend(name, probe, probe, probe)
    if num_queries is None or num_keys is None:
        raise ValueError("attention 'auto' is measured per shape: pass num_queries and num_keys")
    cached = _SELECTOR.cached(ShapeClass.for_sizes(device, dtype, batch=batch, num_queries=num_queries,
                                                   num_keys=num_keys, num_heads=num_heads, head_dim=head_dim,
                                                   key_bias=key_bias, padded_keys=False))
    if cached is not None:
        return BACKENDS[cached.name]  # nothing is allocated for a shape measured before
    shape = (batch, num_queries, num_heads, head_dim)
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    k, v = (torch.randn((batch, num_keys, num_heads, head_dim), generator=generator, device=device, dtype=dtype)
            for _ in range(2))
    bias = torch.zeros(batch, num_keys, device=device) if key_bias else None
    return resolve_backend(name, q, k, v, key_bias=bias)


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
        backend, q, k, v, k_lens, key_bias=key_bias)
    if key_bias is not None:
        return chosen.key_bias_fn(q, k, v, key_bias).to(q.dtype)
    return chosen.fn(q, k, v, k_lens).to(q.dtype)


def _check_key_bias(q: torch.Tensor, k: torch.Tensor, backend: str | AttentionBackend,
                    k_lens: torch.Tensor | None, key_bias: torch.Tensor) -> None:
    chosen = backend if isinstance(backend, AttentionBackend) else BACKENDS.get(backend)
    if chosen is not None and chosen.key_bias_fn is None:
        able = ", ".join(repr(n) for n, b in BACKENDS.items() if b.key_bias_fn is not None)
        raise ValueError(f"key_bias is supported by the sdpa backends only ({able}; {AUTO_BACKEND!r} picks one of "
                         f"them); got backend {chosen.name!r}; drop key_bias or use one of those")
    if k_lens is not None:
        raise ValueError("key_bias and k_lens cannot be combined; fold the padding into key_bias "
                         "(-inf for masked keys)")
    if key_bias.shape != (q.shape[0], k.shape[1]):
        raise ValueError(f"key_bias must have shape (B, Lk) = ({q.shape[0]}, {k.shape[1]}); "
                         f"got {tuple(key_bias.shape)}")
