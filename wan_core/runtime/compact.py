"""Compact weights: the block matrices stay as stored (fp8 + scale, GGUF blocks, bf16/fp16) and are
decoded one transformer block at a time, right before it runs.

Storage choices (`config.WEIGHT_STORAGES`, the loader's `weight_dtype`), for the matrices of the
`nn.Linear` layers inside `model.blocks` (everything else is loaded in the compute dtype):

| storage | from a float file | from an fp8 file | from a GGUF file |
| --- | --- | --- | --- |
| `default` | compute dtype | dequantised at load | kept as stored (as `as_stored`) |
| `as_stored` | the file's dtype | fp8 + scale, bit for bit | GGUF blocks, bit for bit |
| `fp8_e4m3fn` | cast to e4m3fn (scale 1, clamped to +-448) | as stored | decoded, cast |
| `fp8_e4m3fn_scaled`, `..._scaled_mm` | absmax / 448 per tensor | as stored | decoded, quantised |
| `bfloat16`, `float16` | cast | decoded, cast | decoded, cast |

Between forwards each managed parameter's `.data` IS the stored tensor (fp8 values, uint8 GGUF
blocks, bf16), so placement moves and streams the compact bytes. A forward pre-hook on the block
decodes every managed weight of that block into the compute dtype (in float32, cast once) and a
post-hook (`always_call`: also when the forward raises) puts the stored tensors back. The decoded
value is always computed from the stored tensor (the parameter's own, or the kept `source` when a
forward left it decoded), so no exception can make a later forward decode twice. Outputs equal
those of the same stored weights decoded at load (tested, bit for bit).

Composition (see `runtime/__init__.py`): placement hooks run outside these hooks, weight patches
(LoRA) inside; `add_weight_transform` registers a later transform in the right order.
`remove()` leaves decoded weights in the parameters and removes the hooks.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoints.fp8 import E4M3_MAX, Fp8Scaled, QuantizedTensor, TensorFormat, quantise_fp8_scaled, split_fp8
from ..checkpoints.gguf_quants import GGUFQuant
from ..config import (
    DEFAULT_STORAGE,
    FP8_MATMUL_STORAGE,
    FP8_STORAGE,
    FP8_STORAGES,
    SCALED_FP8_STORAGE,
    STORED_STORAGE,
    WEIGHT_STORAGES,
    DiTConfig,
    weight_dtype,
)

log = logging.getLogger(__name__)

__all__ = ["CastFormat", "CompactWeights", "compact_weights", "split_for_storage", "block_matrix_names",
           "add_weight_transform", "compact_weights_of", "logical_shapes", "resident_bytes", "weight_bytes_estimate",
           "store_fp8", "store_fp8_from_state_dict", "fp8_scaled_weights"]

Hook = Callable[..., object]
_HANDLES: weakref.WeakKeyDictionary[nn.Module, CompactWeights] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class CastFormat:
    """A floating tensor stored in a narrower dtype (bf16 / fp16) than it computes in."""

    stored: torch.dtype

    @property
    def name(self) -> str:
        return str(self.stored).removeprefix("torch.")

    def shape(self, raw: torch.Tensor) -> tuple[int, ...]:
        return tuple(raw.shape)

    def decode(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return raw.to(dtype)


def _stored_dtype(fmt: TensorFormat) -> torch.dtype:
    if isinstance(fmt, Fp8Scaled):
        return fmt.dtype
    if isinstance(fmt, GGUFQuant):
        return torch.uint8
    if isinstance(fmt, CastFormat):
        return fmt.stored
    raise TypeError(f"unknown stored format {type(fmt).__name__}")


@dataclass(eq=False)
class _Entry:
    """One managed weight: its parameter, how its stored tensor decodes, and its compute dtype.

    `source` is the stored tensor while its block runs (None between forwards, when the parameter
    itself holds it). `decode_in_hook` is False for weights that a fast path (fp8 matmul) consumes
    in their stored form.
    """

    name: str
    param: nn.Parameter
    format: TensorFormat
    dtype: torch.dtype
    decode_in_hook: bool = True
    source: torch.Tensor | None = None

    def stored(self) -> torch.Tensor:
        """The stored tensor, wherever the current state keeps it (on the parameter's device)."""
        data = self.param.data
        if data.dtype == _stored_dtype(self.format):
            return data
        if self.source is None:
            raise RuntimeError(f"{self.name}: lost its stored {self.format.name} data (holds {data.dtype})")
        return self.source.to(data.device)

    def decoded(self) -> torch.Tensor:
        return self.format.decode(self.stored(), self.dtype)


class CompactWeights:
    """Block weights kept in their stored form and decoded per block forward (module docstring).

    `stored` maps parameter names (`blocks.0.self_attn.q.weight`) to `QuantizedTensor`s whose
    logical shape is the parameter's; `compute_dtype` is what the block computes in.
    """

    def __init__(self, model: nn.Module, stored: Mapping[str, QuantizedTensor], *,
                 compute_dtype: torch.dtype) -> None:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise TypeError(f"compact weights need a model with a `blocks` ModuleList (WanDiT, UMT5Encoder); "
                            f"got {type(model).__name__}")
        if model in _HANDLES:
            raise ValueError("this model already keeps compact weights; call remove() on its handle first")
        _check_stored(model, stored)
        self.model = model
        self.compute_dtype = compute_dtype
        self._entries: list[_Entry] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        for index, block in enumerate(blocks):
            entries = []
            for owner_name, owner in block.named_modules():
                for name, param in list(owner.named_parameters(recurse=False)):
                    full = ".".join(filter(None, (f"blocks.{index}", owner_name, name)))
                    if full in stored:
                        entries.append(_Entry(full, _hold(owner, name, param, stored[full].raw),
                                              stored[full].format, compute_dtype))
            self._entries.extend(entries)
            pre, post = self._block_hooks(entries)
            self._hooks.append(block.register_forward_pre_hook(pre))
            self._hooks.append(block.register_forward_hook(post, always_call=True))
        _HANDLES[model] = self

    # ---------------------------------------------------------------- what is kept
    def entry(self, param: nn.Parameter) -> _Entry | None:
        """The managed weight held by `param` (None when it is not compact)."""
        return next((e for e in self._entries if e.param is param), None)

    def format_counts(self) -> dict[str, int]:
        """How many weights are kept in each stored format ('float8_e4m3fn': 160, 'Q4_K': 120, ...)."""
        counts: dict[str, int] = {}
        for e in self._entries:
            counts[e.format.name] = counts.get(e.format.name, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def stored_bytes(self) -> int:
        """Bytes of the managed weights in their stored form."""
        return sum(e.stored().numel() * e.stored().element_size() for e in self._entries)

    @property
    def bytes_fp8(self) -> int:
        """Bytes of the weights kept in fp8 (one per weight)."""
        return sum(e.param.numel() for e in self._entries if isinstance(e.format, Fp8Scaled))

    # ---------------------------------------------------------------- hooks
    @staticmethod
    def _block_hooks(entries: list[_Entry]) -> tuple[Hook, Hook]:
        def decode(module: nn.Module, args: object) -> None:
            active = [e for e in entries if e.decode_in_hook]
            stored = [e.stored() for e in active]
            values = [e.format.decode(s, e.dtype) for e, s in zip(active, stored, strict=True)]
            for e, s, value in zip(active, stored, values, strict=True):  # all decoded before any swap
                e.source = s
                e.param.data = value

        def restore(module: nn.Module, args: object, output: object) -> None:
            for e in entries:
                if e.source is not None:
                    e.param.data = e.source
                    e.source = None

        return decode, restore

    def remove(self) -> None:
        """Decode every managed weight into its parameter for good and remove the hooks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for e in self._entries:
            e.param.data = e.decoded()
            e.source = None
        self._entries.clear()
        _HANDLES.pop(self.model, None)


def _hold(owner: nn.Module, name: str, param: nn.Parameter, raw: torch.Tensor) -> nn.Parameter:
    """Make `param` hold `raw`; a meta parameter (a model built to receive a checkpoint) is replaced."""
    if param.is_meta:
        param = nn.Parameter(raw, requires_grad=False)
        setattr(owner, name, param)
    else:
        param.data = raw.to(param.device)
    return param


def _check_stored(model: nn.Module, stored: Mapping[str, QuantizedTensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in stored.items():
        p = params.get(name)
        if p is None or not name.startswith("blocks."):
            raise ValueError(f"stored weight {name!r} is not a parameter of the model's blocks")
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"stored weight {name!r}: expected shape {tuple(p.shape)}; got {tuple(value.shape)} "
                             f"({value.format.name}, {value.raw.dtype} {tuple(value.raw.shape)})")


def compact_weights(model: nn.Module, stored: Mapping[str, QuantizedTensor], *,
                    compute_dtype: torch.dtype) -> CompactWeights:
    """Keep `stored` (block weights in their stored form) in `model` and decode them per block."""
    return CompactWeights(model, stored, compute_dtype=compute_dtype)


def compact_weights_of(model: nn.Module) -> CompactWeights | None:
    """The compact-weights handle installed on `model` (None when its weights are all plain)."""
    return _HANDLES.get(model)


def logical_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter name -> the shape of the value it stands for (a compact weight's logical shape, not
    the shape of its stored bytes): what weight patches must match."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    handle = compact_weights_of(model)
    for entry in [] if handle is None else handle._entries:
        shapes[entry.name] = tuple(entry.format.shape(entry.stored()))
    return shapes


def add_weight_transform(block: nn.Module, pre: Hook, post: Hook) -> list[torch.utils.hooks.RemovableHandle]:
    """Register a weight transform that runs after the storage decode and undoes itself before the
    stored tensors come back: the pre-hook appended, the post-hook prepended (`always_call`)."""
    return [block.register_forward_pre_hook(pre),
            block.register_forward_hook(post, prepend=True, always_call=True)]


# --------------------------------------------------------------------------------------------
# Choosing what to keep compact
# --------------------------------------------------------------------------------------------
def block_matrix_names(model: nn.Module) -> set[str]:
    """The weights that a storage choice keeps compact: those of the `nn.Linear` layers in `model.blocks`."""
    return {f"blocks.{name}.weight" for name, module in model.blocks.named_modules()
            if isinstance(module, nn.Linear)}


def _to_fp8(value: torch.Tensor | QuantizedTensor, storage: str) -> QuantizedTensor:
    if isinstance(value, QuantizedTensor) and isinstance(value.format, Fp8Scaled):
        return value  # an fp8 file's own values and scale
    dense = value.dequantise(torch.float32) if isinstance(value, QuantizedTensor) else value.float()
    if storage == FP8_STORAGE:
        fp8 = dense.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return QuantizedTensor(fp8, Fp8Scaled(torch.float8_e4m3fn, torch.ones(())))
    fp8, scale = quantise_fp8_scaled(dense)
    return QuantizedTensor(fp8, Fp8Scaled(torch.float8_e4m3fn, scale.cpu()))


def _stored_form(value: torch.Tensor | QuantizedTensor, storage: str,
                 compute_dtype: torch.dtype) -> QuantizedTensor | None:
    """The compact form of one block matrix under `storage` (None: plain, in the compute dtype)."""
    if storage in FP8_STORAGES:
        return _to_fp8(value, storage)
    if storage == STORED_STORAGE:
        if isinstance(value, QuantizedTensor):
            return value
        stored = value.dtype
    else:  # bfloat16 / float16
        stored = weight_dtype(storage)
        value = value.dequantise(stored) if isinstance(value, QuantizedTensor) else value.to(stored)
    if stored == compute_dtype or not value.is_floating_point():
        return None
    return QuantizedTensor(value, CastFormat(stored))


def split_for_storage(raw: dict[str, torch.Tensor | QuantizedTensor], matrices: set[str], storage: str, *,
                      compute_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor]]:
    """(plain tensors in the compute dtype, compact block matrices) of a raw state dict.

    `raw` comes from `checkpoints.io.read_raw_state_dict`; `matrices` are the names the storage
    applies to (`block_matrix_names`). With `default` every tensor is plain; quantised tensors
    outside `matrices` are decoded here. `raw` is consumed: each entry is taken out as it is
    converted, so the stored and the converted copy of the whole model never coexist.
    """
    if storage not in WEIGHT_STORAGES:
        raise ValueError(f"weight storage must be one of {WEIGHT_STORAGES}; got {storage!r}")
    plain: dict[str, torch.Tensor] = {}
    compact: dict[str, QuantizedTensor] = {}
    for key in list(raw):
        value = raw.pop(key)
        stored = None
        if storage != DEFAULT_STORAGE and key in matrices:
            stored = _stored_form(value, storage, compute_dtype)
        if stored is not None:
            compact[key] = stored
        elif isinstance(value, QuantizedTensor):
            plain[key] = value.dequantise(compute_dtype)
        else:
            plain[key] = value.to(compute_dtype) if value.is_floating_point() else value
    return plain, compact


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def resident_bytes(module: nn.Module) -> int:
    """Bytes of a model's parameters and buffers as they are held now (compact weights at their
    stored size); the figure a memory plan needs for one expert."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# bytes per weight of each storage's block matrices (GGUF types: bits per weight / 8 of their blocks)
_STORAGE_BYTES = {FP8_STORAGE: 1.0, SCALED_FP8_STORAGE: 1.0, FP8_MATMUL_STORAGE: 1.0}


def weight_bytes_estimate(config: DiTConfig, storage: str, compute_dtype: torch.dtype, *,
                          gguf_bytes_per_weight: float | None = None) -> int:
    """Resident bytes of one DiT under a storage choice, before loading (for memory plans).

    Block matrices at the storage's size (fp8: 1 byte; bf16/fp16: 2; `as_stored`/`default` of a GGUF
    file: `gguf_bytes_per_weight`, e.g. 34/32 for Q8_0); every other parameter in the compute dtype.
    An A14B expert (40 blocks of dim 5120, FFN 13824) in fp8 with bf16 elsewhere: about 14.5 GB.
    """
    d, f = config.dim, config.ffn_dim
    matrices = config.num_layers * (8 * d * d + 2 * d * f)
    rest = config.num_params() - matrices
    compute = torch.empty((), dtype=compute_dtype).element_size()
    if storage in _STORAGE_BYTES:
        per_weight = _STORAGE_BYTES[storage]
    elif gguf_bytes_per_weight is not None and storage in (DEFAULT_STORAGE, STORED_STORAGE):
        per_weight = gguf_bytes_per_weight
    elif storage in (DEFAULT_STORAGE, STORED_STORAGE):
        per_weight = compute
    else:
        per_weight = torch.empty((), dtype=weight_dtype(storage)).element_size()
    return math.ceil(matrices * per_weight + rest * compute)


# --------------------------------------------------------------------------------------------
# fp8 storage of a built model (the first interface, kept)
# --------------------------------------------------------------------------------------------
def store_fp8(model: nn.Module, *, compute_dtype: torch.dtype | None = None) -> CompactWeights:
    """Keep every block matrix of `model` as scaled fp8 (absmax / 448), decoded per block forward,
    in `compute_dtype` (default: the weights' current dtype). Returns the handle to undo it."""
    names = block_matrix_names(model)
    params = dict(model.named_parameters())
    dtype = compute_dtype or params[min(names)].dtype
    stored = {name: _to_fp8(params[name].data, SCALED_FP8_STORAGE) for name in sorted(names)}
    return CompactWeights(model, stored, compute_dtype=dtype)


def fp8_scaled_weights(raw: Mapping[str, torch.Tensor]) -> dict[str, QuantizedTensor]:
    """The fp8 block matrices of a raw (not dequantised) fp8-scaled DiT state dict, with their
    scales (1 when the file has none); an optional `model.diffusion_model.` prefix is stripped."""
    prefix = "model.diffusion_model."
    if any(k.startswith(prefix) for k in raw):
        raw = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    _, fp8 = split_fp8(raw)
    return {k: v for k, v in fp8.items() if k.startswith("blocks.") and k.endswith(".weight") and v.raw.dim() == 2}


def store_fp8_from_state_dict(model: nn.Module, raw: Mapping[str, torch.Tensor], *,
                              compute_dtype: torch.dtype | None = None) -> CompactWeights:
    """Keep the block weights that an fp8-scaled checkpoint stores in fp8 as its own fp8 values.

    `model` is the DiT loaded from that file (dequantised); `raw` the file's state dict as read.
    Raises `ValueError` when the file holds no fp8 block weights or they do not fit.
    """
    stored = fp8_scaled_weights(raw)
    if not stored:
        raise ValueError("the state dict holds no fp8 block weights (expected `blocks.*.weight` in "
                         "float8 with scales, as ComfyUI's fp8_scaled files store them)")
    first = dict(model.named_parameters()).get(min(stored))
    dtype = compute_dtype or (first.dtype if first is not None else torch.float32)
    return CompactWeights(model, stored, compute_dtype=dtype)
