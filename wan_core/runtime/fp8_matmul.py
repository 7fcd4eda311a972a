"""fp8 matmul linears: the block matrices that compact storage keeps in fp8 multiply fp8 activations
on the tensor cores (`torch._scaled_mm`), instead of being decoded to bf16 first.

`apply_fp8_matmul(model, activation=...)` replaces every `nn.Linear` of `model.blocks` whose weight
is a compact fp8 weight (`runtime/compact.py`, storage `fp8_e4m3fn*`) by an `Fp8Linear` holding the
same parameters (state-dict keys unchanged), and tells the storage hooks to leave that weight in
fp8. Per forward an `Fp8Linear` quantises its input to fp8 e4m3fn, per row (`activation="row"`: one
scale absmax/448 per token, the default) or per tensor, and calls
`_scaled_mm(x_fp8, w_fp8.T, scale_a, scale_b = the file's weight scale)` with the output in the
input's dtype. `remove()` puts the original layers back.

Accuracy: the only new rounding is the activation's (fp8 e4m3 has 3 mantissa bits). Against the
dequantised path (same fp8 weights decoded to the compute dtype, then `F.linear`) the relative
error of a linear's output is a few percent of its norm; the tests bound it at
`ACTIVATION_ERROR_BOUND` (row scaling) on random weights and inputs.

Hardware: fp8 tensor cores need CUDA compute capability 8.9+ (Ada, Hopper, Blackwell); on older
GPUs `apply_fp8_matmul` refuses with the capability found. torch's CPU build runs `_scaled_mm` too
(slowly): this path is tested on the CPU for correctness; its speed is a GPU measurement. On CUDA,
per-row scaling needs a bfloat16 compute dtype (fp16 on newer torch), and `_scaled_mm` needs both
matrix dims to be multiples of 16 (every Wan2.2 size is; other layers keep the decoded path).

LoRA: weight patches cannot be merged into fp8 weights that are multiplied as fp8. An `Fp8Linear`
whose weight was replaced (a patch hook put a float tensor in its place) raises an error naming the
fix (storage `fp8_e4m3fn_scaled`, which decodes per block and takes patches);
`weight_patch_problem(model)` tells a patching node before it runs.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

from ..checkpoints.fp8 import E4M3_MAX, FP8_DTYPES, Fp8Scaled
from ..config import FP8_ACTIVATION_SCALINGS, FP8_MATMUL_STORAGE, SCALED_FP8_STORAGE
from .compact import compact_weights_of

log = logging.getLogger(__name__)

MIN_CUDA_CAPABILITY = (8, 9)
ACTIVATION_ERROR_BOUND = 0.06  # relative (L2) output error vs the dequantised path, row scaling
_ALIGN = 16  # _scaled_mm on CUDA: both dims of the weight a multiple of 16
_HANDLES: weakref.WeakKeyDictionary[nn.Module, Fp8Matmul] = weakref.WeakKeyDictionary()


class Fp8Linear(nn.Module):
    """`y = x W^T + b` with W in fp8 (and its scale) and x quantised to fp8 per row or per tensor.

    Shapes: x (..., in_features) in the compute dtype -> (..., out_features) in the same dtype.
    """

    def __init__(self, linear: nn.Linear, scale: torch.Tensor, *, activation: str) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same parameters: keys and storage unchanged
        self.bias = linear.bias
        self.activation = activation
        self.register_buffer("weight_scale", scale.float().reshape(()).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight.dtype not in FP8_DTYPES:
            raise RuntimeError(f"an fp8 matmul layer found a {weight.dtype} weight: something (a LoRA patch?) "
                               f"replaced its fp8 weight. Weight patches need storage {SCALED_FP8_STORAGE!r} "
                               f"(fp8 decoded per block), not {FP8_MATMUL_STORAGE!r}")
        rows = x.reshape(-1, self.in_features)  # (M, K)
        x32 = rows.float()
        if self.activation == "row":
            amax = x32.abs().amax(dim=-1, keepdim=True)  # (M, 1)
            scale_b = self.weight_scale.expand(1, self.out_features).contiguous()  # (1, N)
        else:
            amax = x32.abs().amax()
            scale_b = self.weight_scale
        scale_a = (amax / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        x_fp8 = (x32 / scale_a).to(torch.float8_e4m3fn)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = torch._scaled_mm(x_fp8, weight.t(), scale_a=scale_a, scale_b=scale_b, bias=bias,
                               out_dtype=x.dtype)  # (M, N)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


class Fp8Matmul:
    """Handle of `apply_fp8_matmul`: which layers were replaced, and `remove()` to undo it."""

    def __init__(self, model: nn.Module, activation: str) -> None:
        storage = compact_weights_of(model)
        if storage is None:
            raise ValueError("fp8 matmul needs the block weights kept in fp8; load the model with weight_dtype "
                             f"{FP8_MATMUL_STORAGE!r} (or attach compact fp8 weights first)")
        self.model = model
        self._swapped: list[tuple[nn.Module, str, nn.Linear, object]] = []
        for parent in model.blocks.modules():
            for child_name, child in list(parent.named_children()):
                entry = storage.entry(child.weight) if isinstance(child, nn.Linear) else None
                if entry is None or not isinstance(entry.format, Fp8Scaled):
                    continue
                if child.in_features % _ALIGN or child.out_features % _ALIGN:
                    log.info("fp8 matmul: %s (%d x %d) is not 16-aligned; it stays on the decoded path",
                             entry.name, child.out_features, child.in_features)
                    continue
                setattr(parent, child_name, Fp8Linear(child, entry.format.scale, activation=activation))
                entry.decode_in_hook = False
                self._swapped.append((parent, child_name, child, entry))
        if not self._swapped:
            raise ValueError("no block matrix of this model is stored in fp8; nothing to run as fp8 matmul")

    @property
    def num_layers(self) -> int:
        return len(self._swapped)

    def remove(self) -> None:
        for parent, child_name, linear, entry in self._swapped:
            setattr(parent, child_name, linear)
            entry.decode_in_hook = True
        self._swapped.clear()
        _HANDLES.pop(self.model, None)


def check_fp8_matmul_device(device: torch.device | str) -> None:
    """Refuse a CUDA device without fp8 tensor cores (capability below 8.9)."""
    device = torch.device(device)
    if device.type != "cuda":
        if device.type == "cpu":
            log.warning("fp8 matmul on the CPU runs (torch's CPU _scaled_mm) but is slower than the decoded path; "
                        "it is meant for GPUs with fp8 tensor cores (compute capability 8.9+)")
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CUDA_CAPABILITY:
        raise ValueError(f"fp8 matmul needs fp8 tensor cores (CUDA compute capability >= 8.9: Ada, Hopper, "
                         f"Blackwell); {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}. "
                         f"Use weight_dtype {SCALED_FP8_STORAGE!r} (fp8 kept in memory, decoded per block)")


def apply_fp8_matmul(model: nn.Module, *, activation: str = "row") -> Fp8Matmul:
    """Run the model's fp8 block matrices as fp8 x fp8 matmuls (module docstring); returns the handle."""
    if activation not in FP8_ACTIVATION_SCALINGS:
        raise ValueError(f"activation scaling must be one of {FP8_ACTIVATION_SCALINGS}; got {activation!r}")
    device = next(model.parameters()).device
    check_fp8_matmul_device(device)
    handle = Fp8Matmul(model, activation)
    _HANDLES[model] = handle
    log.info("fp8 matmul: %d block linears of %s run as _scaled_mm (activations per %s)", handle.num_layers,
             type(model).__name__, activation)
    return handle


def weight_patch_problem(model: nn.Module) -> str | None:
    """Why weight patches (LoRA) cannot be applied to `model` (None when they can)."""
    if model in _HANDLES:
        return (f"the model runs its block matrices as fp8 matmuls (weight_dtype {FP8_MATMUL_STORAGE!r}), which "
                f"cannot take weight patches; load it with weight_dtype {SCALED_FP8_STORAGE!r} to use LoRAs")
    return None
