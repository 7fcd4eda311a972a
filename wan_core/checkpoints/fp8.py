"""fp8 checkpoint formats: ComfyUI's three ways of storing fp8 weights with their scales.

A quantised layer stores `<layer>.weight` as float8 (e4m3fn or e5m2); its real value is
`weight.float() * scale` with one float32 scale per tensor. The files say so in one of three ways:

| layout | marked by | weight scale | input scale (unused) |
| --- | --- | --- | --- |
| `legacy` (ComfyUI 0.3.x) | a `scaled_fp8` marker tensor | `.scale_weight` | `.scale_input` |
| `comfy_quant` (ComfyUI 0.33+) | `<layer>.comfy_quant`: JSON `{"format": ...}` | `.weight_scale` | `.input_scale` |
| `metadata` (ComfyUI 0.3.7x) | header `_quantization_metadata` (JSON) | `.weight_scale` | `.input_scale` |

Plain fp8 weights without any scale (files cast to fp8 directly) have scale 1. Only per-tensor
fp8 formats (`SUPPORTED_QUANT_FORMATS`) are read; a layer in another format (nvfp4, mxfp8, int8)
is refused with its name. `split_fp8` turns a raw state dict into plain tensors plus
`QuantizedTensor`s; the loaders either dequantise those (`QuantizedTensor.dequantise`) or keep
them compact (`runtime/compact.py`).

Writing: `quantise_fp8_scaled` (absmax / 448 per tensor) and `fp8_scaled_state_dict` (the legacy
or the `comfy_quant` layout) make such files for the tiny-model tool and the tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from ..errors import CheckpointError

FP8_MARKER = "scaled_fp8"
FP8_SCALE_SUFFIX = ".scale_weight"  # legacy layout
FP8_INPUT_SCALE_SUFFIX = ".scale_input"
WEIGHT_SCALE_SUFFIX = ".weight_scale"  # comfy_quant and metadata layouts
INPUT_SCALE_SUFFIX = ".input_scale"
COMFY_QUANT_SUFFIX = ".comfy_quant"
QUANT_METADATA_KEY = "_quantization_metadata"
# Further per-layer entries of ComfyUI's newer formats (scales of formats this package refuses).
_OTHER_QUANT_SUFFIXES = (".weight_scale_2", ".pre_quant_scale")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SUPPORTED_QUANT_FORMATS: Mapping[str, torch.dtype] = {
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
}
FP8_LAYOUTS = ("legacy", "comfy_quant")
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


class TensorFormat(Protocol):
    """How a stored tensor maps to its real value (fp8 with a scale, GGUF blocks, ...)."""

    @property
    def name(self) -> str:
        """Short name for logs and reports: 'float8_e4m3fn', 'Q4_K', ..."""

    def shape(self, raw: torch.Tensor) -> tuple[int, ...]:
        """The logical shape of the value that `raw` stores."""

    def decode(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The value in `dtype`, on `raw`'s device (computed in float32, cast once)."""


class QuantizedTensor(NamedTuple):
    """A tensor kept as a file stores it: the stored bytes and the format that decodes them."""

    raw: torch.Tensor
    format: TensorFormat

    @property
    def shape(self) -> tuple[int, ...]:
        return self.format.shape(self.raw)

    @property
    def nbytes(self) -> int:
        return self.raw.numel() * self.raw.element_size()

    def dequantise(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.format.decode(self.raw, dtype)


@dataclass(frozen=True, eq=False)
class Fp8Scaled:
    """fp8 values times one float32 scale (a 0-d CPU tensor; 1 for unscaled fp8)."""

    dtype: torch.dtype
    scale: torch.Tensor

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def shape(self, raw: torch.Tensor) -> tuple[int, ...]:
        return tuple(raw.shape)

    def decode(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (raw.float() * self.scale).to(dtype)


def is_fp8_bookkeeping(key: str) -> bool:
    """The marker, scales and format entries that describe fp8 layers (never model parameters)."""
    return key == FP8_MARKER or key.endswith((FP8_SCALE_SUFFIX, FP8_INPUT_SCALE_SUFFIX, WEIGHT_SCALE_SUFFIX,
                                              INPUT_SCALE_SUFFIX, COMFY_QUANT_SUFFIX, *_OTHER_QUANT_SUFFIXES))


def _layer_formats(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """{layer: format} declared by `comfy_quant` entries or the `_quantization_metadata` header."""
    formats: dict[str, str] = {}
    for key, value in sd.items():
        if key.endswith(COMFY_QUANT_SUFFIX):
            layer = key[: -len(COMFY_QUANT_SUFFIX)]
            try:
                spec = json.loads(bytes(value.to(torch.uint8).flatten().tolist()).decode("utf-8"))
                formats[layer] = str(spec["format"])
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{key} is not a UTF-8 JSON object with a 'format' ({e}); the file "
                                      "is corrupt or from an unknown ComfyUI version: re-download it") from e
    if QUANT_METADATA_KEY in metadata:
        try:
            layers = json.loads(metadata[QUANT_METADATA_KEY])["layers"]
            formats.update({str(name): str(spec["format"]) for name, spec in layers.items()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"the '{QUANT_METADATA_KEY}' header is not JSON of the form "
                                  f"{{\"layers\": {{name: {{\"format\": ...}}}}}} ({e}); re-download the file") from e
    return formats


def _match_layer(layer: str, sd: Mapping[str, torch.Tensor]) -> str | None:
    """The state-dict weight key of a layer named with or without a prefix the state dict lost."""
    if layer + ".weight" in sd:
        return layer + ".weight"
    hits = [k for k in sd if k.endswith(".weight") and layer.endswith("." + k[: -len(".weight")])]
    return max(hits, key=len) if hits else None


def _scale_of(sd: Mapping[str, torch.Tensor], weight_key: str) -> torch.Tensor:
    owner = weight_key[: -len(".weight")]
    for suffix in (FP8_SCALE_SUFFIX, WEIGHT_SCALE_SUFFIX):
        scale = sd.get(owner + suffix)
        if scale is not None:
            if scale.numel() != 1:
                raise CheckpointError(f"{owner + suffix} holds {scale.numel()} values; only one scale per "
                                      "tensor (per-tensor fp8) is supported")
            return scale.detach().float().reshape(()).cpu()
    return torch.ones(())


def split_fp8(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor]]:
    """(plain tensors, fp8 weights) of a raw state dict in any of the layouts above.

    Every fp8 tensor becomes a `QuantizedTensor` with its scale (1 when the file has none); the
    bookkeeping entries (marker, scales, formats) are dropped. A layer declared in a format other
    than per-tensor fp8 raises `CheckpointError` naming it.
    """
    for layer, fmt in _layer_formats(sd, metadata or {}).items():
        if fmt not in SUPPORTED_QUANT_FORMATS:
            raise CheckpointError(f"layer {layer!r} is stored as {fmt!r}, which this package cannot read "
                                  f"(supported: {sorted(SUPPORTED_QUANT_FORMATS)}); use an fp8 (e4m3fn "
                                  "or e5m2 scaled), GGUF, bf16 or fp16 file of the model")
        key = _match_layer(layer, sd)
        if key is not None and sd[key].dtype != SUPPORTED_QUANT_FORMATS[fmt]:
            raise CheckpointError(f"layer {layer!r} is declared {fmt} but {key} is {sd[key].dtype}; "
                                  "the file is corrupt: re-download it")
    plain: dict[str, torch.Tensor] = {}
    quantised: dict[str, QuantizedTensor] = {}
    for key, tensor in sd.items():
        if is_fp8_bookkeeping(key):
            continue
        if tensor.dtype in FP8_DTYPES:
            scale = _scale_of(sd, key) if key.endswith(".weight") else torch.ones(())
            quantised[key] = QuantizedTensor(tensor, Fp8Scaled(tensor.dtype, scale))
        else:
            plain[key] = tensor
    return plain, quantised


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def quantise_fp8_scaled(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor fp8 e4m3fn quantisation: (weight / scale in fp8, scale) with scale = absmax / 448."""
    w = weight.detach().float()
    scale = (w.abs().max() / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scale).to(torch.float8_e4m3fn), scale.reshape(())


def fp8_scaled_state_dict(sd: Mapping[str, torch.Tensor], *, is_quantised: Callable[[str, torch.Tensor], bool],
                          dtype: torch.dtype, layout: str = "legacy") -> dict[str, torch.Tensor]:
    """ComfyUI's fp8 "scaled" files: the tensors `is_quantised(key, tensor)` picks in fp8 e4m3fn
    (`quantise_fp8_scaled`), floating tensors otherwise cast to `dtype`, the rest kept.

    `layout` "legacy": `<layer>.scale_weight` and the `scaled_fp8` marker; "comfy_quant":
    `<layer>.weight_scale` and a `<layer>.comfy_quant` JSON entry per layer.
    """
    if layout not in FP8_LAYOUTS:
        raise ValueError(f"fp8 layout must be one of {FP8_LAYOUTS}; got {layout!r}")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not is_quantised(key, value):
            out[key] = value.detach().to(dtype) if value.is_floating_point() else value
            continue
        layer = key[: -len(".weight")]
        out[key], scale = quantise_fp8_scaled(value)
        if layout == "legacy":
            out[layer + FP8_SCALE_SUFFIX] = scale
        else:
            out[layer + WEIGHT_SCALE_SUFFIX] = scale
            spec = json.dumps({"format": "float8_e4m3fn"}).encode("utf-8")
            out[layer + COMFY_QUANT_SUFFIX] = torch.tensor(list(spec), dtype=torch.uint8)
    if layout == "legacy":
        out[FP8_MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out
