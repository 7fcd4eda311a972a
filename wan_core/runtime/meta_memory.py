"""Peak memory of a piece of model code, found by running it on the meta device.

`trace_peak(fn)` runs `fn` (which builds its inputs and calls real module code on meta tensors:
no data, no compute, no allocation) under a dispatch mode that follows every storage the code
creates: its bytes count from the op that creates it until the last tensor viewing it is gone
(a weak-reference finalizer on the storage). The largest sum reached is the peak working set of
that code, with its real in-place ops, views, copies and dtype casts, at any size.

Attention is the one place where meta tensors cannot tell what a real device would do: on meta,
`scaled_dot_product_attention` would decompose into the math kernel and materialise the
(B, N, Lq, Lk) scores, which fused kernels (FlashAttention, memory-efficient, cuDNN, and the
blocked CPU kernel of recent torch) never hold. So attention is replaced, inside the trace, by an
output of the right shape plus the working set of the kernel that the real device would choose
(`AttentionKernel`): the scores and their softmax for the math kernel, the row statistics
(logsumexp, B x N x Lq float32) for a fused one. `sdpa_kernel` asks torch which kernel it picks
for a device, dtype and head dim, with tensors of a few bytes.

Shapes: whatever `fn` uses; the result is bytes.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MATH_KERNEL = "math"
FUSED_KERNEL = "fused"
FP32_BYTES = 4


@dataclass(frozen=True)
class AttentionKernel:
    """How attention holds memory on the real device: `math` materialises the scores, `fused`
    does not (FlashAttention, memory-efficient, cuDNN, CPU flash). `name` says which one."""

    kind: str
    name: str

    def __post_init__(self) -> None:
        if self.kind not in (MATH_KERNEL, FUSED_KERNEL):
            raise ValueError(f"attention kernel kind must be {MATH_KERNEL!r} or {FUSED_KERNEL!r}; got {self.kind!r}")

    def working_bytes(self, q: torch.Tensor, k: torch.Tensor) -> int:
        """Bytes the kernel holds besides its output. Shapes: q (B, N, Lq, Dh), k (B, N, Lk, Dh)."""
        b, n, lq = q.shape[0], q.shape[1], q.shape[2]
        if self.kind == MATH_KERNEL:
            scores = b * n * lq * k.shape[2]
            return 2 * scores * max(q.element_size(), FP32_BYTES)  # scores and their softmax
        return b * n * lq * FP32_BYTES  # the row statistics (logsumexp)


_SDP_NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


@functools.lru_cache(maxsize=32)
def sdpa_kernel(device_type: str, dtype: torch.dtype, head_dim: int, with_mask: bool) -> AttentionKernel:
    """The kernel torch's `scaled_dot_product_attention` picks on this device for this dtype and
    head dim (asked with tensors of a few elements; cached per process)."""
    device = torch.device(device_type)
    q = torch.zeros(1, 1, 2, head_dim, device=device, dtype=dtype)
    mask = torch.zeros(1, 1, 1, 2, device=device, dtype=dtype) if with_mask else None
    choice = int(torch._fused_sdp_choice(q, q, q, mask))
    name = _SDP_NAMES.get(choice, f"sdp backend {choice}")
    return AttentionKernel(MATH_KERNEL if choice == 0 else FUSED_KERNEL, f"sdpa {name}")


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage created under it while a tensor still holds it."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                self.track(t, external=True)  # made before the trace (weights, inputs): not counted
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t, external=False)
        return out

    def track(self, t: torch.Tensor, *, external: bool) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            return
        size = 0 if external else storage.nbytes()
        self._sizes[key] = size
        self.add(size)
        weakref.finalize(storage, self._release, key)

    def add(self, size: int) -> None:
        self.live += size
        self.peak = max(self.peak, self.live)

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


class _EmulatedAttention(TorchFunctionMode):
    """Replaces `scaled_dot_product_attention` by its output plus the real kernel's working set
    (`masked` for calls with an `attn_mask`, `kernel` for the others)."""

    def __init__(self, counter: _LiveBytes, kernel: AttentionKernel, masked: AttentionKernel) -> None:
        super().__init__()
        self.counter = counter
        self.kernel = kernel
        self.masked = masked

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        has_mask = kwargs.get("attn_mask") is not None or (len(args) > 3 and args[3] is not None)
        working = (self.masked if has_mask else self.kernel).working_bytes(q, k)
        self.counter.add(working)  # held while the kernel runs, released when it returns
        out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
        self.counter.live -= working
        return out


def trace_peak(fn: Callable[[], Any], *, kernel: AttentionKernel, masked: AttentionKernel | None = None) -> int:
    """Peak bytes of the storages `fn` creates on the meta device, its result included.

    `fn` must run on meta tensors only; tensors it receives from outside are not counted (the
    caller adds them). Attention runs as `kernel` would on the real device (`masked` for calls with
    a mask; default `kernel`).
    """
    counter = _LiveBytes()
    with torch.no_grad(), counter, _EmulatedAttention(counter, kernel, masked or kernel):
        result = fn()
        del result
    return counter.peak
