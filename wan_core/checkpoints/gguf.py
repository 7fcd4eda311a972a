"""GGUF files (as ComfyUI-GGUF and llama.cpp write them): reading, writing, quantisation recipes.

Reading goes through the optional `gguf` package (`pip install gguf`; a clear `ImportError`
otherwise): `read_gguf` gives every tensor in torch order, F32/F16/BF16 tensors as plain torch
tensors and block-quantised ones as `QuantizedTensor`s (raw bytes + `GGUFQuant`), plus the
metadata fields. The torch shape is the reverse of GGUF's dimension order, or the
`comfy.gguf.orig_shape.<name>` metadata when a file carries it. Types other than those of
`gguf_quants.QUANT_TYPES` (IQ*, TQ*, ...) are refused by name.

Layouts (key names) belong to the model families: a Wan DiT GGUF uses the official DiT names
(`general.architecture` "wan"); a UMT5 GGUF uses llama.cpp's T5 names (`checkpoints/t5.py`).

Writing (`write_gguf`) serves the tiny-model tool, the tests and the benchmarks. `GGUF_RECIPES`
say which tensors a file type quantises, following the ComfyUI-GGUF tools: only 2-D `blocks.*`
matrices (and a T5's linears and token embedding); `*_K_M` mixes keep the attention `v` and the
FFN down projection (`ffn.2`, `ffn_down`) at Q6_K; a K-quant falls back to F16 for a row length
that is not a multiple of 256; 1-D tensors and modulations are F32, other tensors F16.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...util.atomic import atomic_output
from ..errors import CheckpointError
from .fp8 import QuantizedTensor
from .gguf_quants import FLOAT_TYPES, QUANT_TYPE_BY_ID, QUANT_TYPES, GGUFQuant, quantize, require_gguf

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
ARCH_KEY = "general.architecture"
WAN_ARCH = "wan"


@dataclass(frozen=True)
class GGUFFile:
    """What `read_gguf` found: tensors by name and the metadata fields (python values)."""

    tensors: dict[str, torch.Tensor | QuantizedTensor]
    fields: dict[str, Any]

    @property
    def architecture(self) -> str | None:
        arch = self.fields.get(ARCH_KEY)
        return None if arch is None else str(arch)

    def type_counts(self) -> dict[str, int]:
        """How many tensors of each stored type ('F32', 'Q4_K', ...)."""
        counts: dict[str, int] = {}
        for value in self.tensors.values():
            name = value.format.name if isinstance(value, QuantizedTensor) else _torch_type_name(value.dtype)
            counts[name] = counts.get(name, 0) + 1
        return dict(sorted(counts.items()))


def _torch_type_name(dtype: torch.dtype) -> str:
    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(dtype, str(dtype))


def is_gguf(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == GGUF_SUFFIX


def _open_reader(path: Path) -> Any:
    gguf = require_gguf()
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it is "
                              "truncated or corrupt: re-download it") from e


def read_gguf_fields(path: str | os.PathLike, *, with_arrays: bool = True) -> dict[str, Any]:
    """The metadata fields of a GGUF file (`with_arrays=False` leaves out array values)."""
    return _fields(_open_reader(Path(path)), with_arrays=with_arrays)


def _fields(reader: Any, *, with_arrays: bool) -> dict[str, Any]:
    gguf = require_gguf()
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or not field.types:
            continue  # the header (version, counts) is not metadata
        if field.types[0] == gguf.GGUFValueType.ARRAY and not with_arrays and not name.startswith(ORIG_SHAPE_KEY):
            continue
        out[name] = field.contents()
    return out


def read_gguf(path: str | os.PathLike, *, shapes_only: bool = False) -> GGUFFile:
    """Read every tensor of a GGUF file (copied out of the memory map) and its metadata.

    With `shapes_only`, tensors are meta tensors of the logical shape (no data is read).
    """
    path = Path(path)
    reader = _open_reader(path)
    fields = _fields(reader, with_arrays=not shapes_only)
    tensors: dict[str, torch.Tensor | QuantizedTensor] = {}
    for t in reader.tensors:
        type_id = int(t.tensor_type)
        orig = fields.get(ORIG_SHAPE_KEY + t.name)
        shape = tuple(int(s) for s in (orig if orig is not None else reversed(t.shape.tolist())))
        if type_id not in FLOAT_TYPES and type_id not in QUANT_TYPE_BY_ID:
            raise CheckpointError(f"{path}: tensor {t.name!r} has GGUF type {t.tensor_type.name}, which this "
                                  f"package cannot decode (supported: F32, F16, BF16, {', '.join(QUANT_TYPES)}); "
                                  "use a file quantised to one of those (e.g. Q8_0, Q6_K, Q5_K_M, Q4_K_M)")
        if shapes_only:
            tensors[t.name] = torch.empty(shape, device="meta")
            continue
        data = torch.from_numpy(np.array(t.data, copy=True))
        if type_id in FLOAT_TYPES:
            dtype = FLOAT_TYPES[type_id]
            tensors[t.name] = (data.view(dtype) if data.dtype == torch.uint8 else data.to(dtype)).reshape(shape)
        else:
            qtype = QUANT_TYPE_BY_ID[type_id]
            _, block, size = QUANT_TYPES[qtype]
            if data.numel() * block != math.prod(shape) * size:
                raise CheckpointError(f"{path}: tensor {t.name!r} ({qtype}) holds {data.numel()} bytes, which is "
                                      f"not shape {shape}; the file or its orig_shape metadata is corrupt")
            tensors[t.name] = QuantizedTensor(data.reshape(-1, data.shape[-1]), GGUFQuant(qtype, shape))
    return GGUFFile(tensors=tensors, fields=fields)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def write_gguf(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor | QuantizedTensor], *, arch: str,
               fields: Mapping[str, Any] | None = None) -> Path:
    """Write tensors (float32/float16/bfloat16 tensors, or GGUF `QuantizedTensor`s) and metadata
    atomically. Field values: str, bool, int (uint32), float (float32), bytes (uint8 array),
    lists of str / int (int32) / float (float32)."""
    gguf = require_gguf()
    with atomic_output(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        for key, value in (fields or {}).items():
            _add_field(writer, key, value)
        for name, value in tensors.items():
            if isinstance(value, QuantizedTensor):
                if not isinstance(value.format, GGUFQuant):
                    raise TypeError(f"{name}: only GGUF block formats can be written to GGUF; got {value.format.name}")
                writer.add_tensor(name, value.raw.cpu().contiguous().numpy(),
                                  raw_dtype=gguf.GGMLQuantizationType[value.format.qtype])
            elif value.dtype == torch.bfloat16:
                raw = value.detach().cpu().contiguous().view(torch.uint8).numpy()
                writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
            elif value.dtype in (torch.float32, torch.float16):
                writer.add_tensor(name, value.detach().cpu().contiguous().numpy())
            else:
                raise TypeError(f"{name}: cannot write a {value.dtype} tensor to GGUF (F32, F16, BF16 or blocks)")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


def _add_field(writer: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, (str, bytes, list, tuple)):
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value if isinstance(value, bytes) else list(value))
    else:
        raise TypeError(f"GGUF field {key!r}: unsupported value type {type(value).__name__}")


# --------------------------------------------------------------------------------------------
# Quantisation recipes
# --------------------------------------------------------------------------------------------
def _dit_quantised(key: str, value: torch.Tensor) -> bool:
    return key.startswith("blocks.") and key.endswith(".weight") and value.ndim == 2


def _high_precision(key: str) -> bool:
    """The tensors that `*_K_M` mixes keep at Q6_K: attention v and the FFN down projection."""
    return key.endswith((".v.weight", ".ffn.2.weight", "attn_v.weight", "ffn_down.weight"))


def _uniform(qtype: str) -> Callable[[str], str]:
    return lambda key: qtype


def _k_mix(base: str) -> Callable[[str], str]:
    return lambda key: "Q6_K" if _high_precision(key) else base


GGUF_RECIPES: Mapping[str, Callable[[str], str]] = {
    "Q8_0": _uniform("Q8_0"), "Q6_K": _uniform("Q6_K"), "Q5_K_M": _k_mix("Q5_K"), "Q5_K_S": _uniform("Q5_K"),
    "Q4_K_M": _k_mix("Q4_K"), "Q4_K_S": _uniform("Q4_K"), "Q5_0": _uniform("Q5_0"), "Q4_0": _uniform("Q4_0"),
}


def quantised_state_dict(sd: Mapping[str, torch.Tensor], recipe: str,
                         is_quantised: Callable[[str, torch.Tensor], bool] = _dit_quantised
                         ) -> dict[str, torch.Tensor | QuantizedTensor]:
    """The tensors of a GGUF file of type `recipe` (a key of `GGUF_RECIPES`) made from float tensors."""
    if recipe not in GGUF_RECIPES:
        raise ValueError(f"unknown GGUF file type {recipe!r}; expected one of {sorted(GGUF_RECIPES)}")
    out: dict[str, torch.Tensor | QuantizedTensor] = {}
    for key, value in sd.items():
        value = value.detach().cpu()
        if is_quantised(key, value):
            qtype = GGUF_RECIPES[recipe](key)
            block = QUANT_TYPES[qtype][1]
            if value.shape[-1] % block:  # llama.cpp keeps such a K-quant row in F16
                logger.info("%s: row of %d is not a multiple of %d; stored as F16", key, value.shape[-1], block)
                out[key] = value.to(torch.float16)
                continue
            out[key] = QuantizedTensor(quantize(value, qtype).reshape(-1, value.shape[-1] // block
                                                                      * QUANT_TYPES[qtype][2]),
                                       GGUFQuant(qtype, tuple(value.shape)))
        elif value.ndim <= 1 or "modulation" in key or value.ndim > 4 or math.prod(value.shape) <= 1024:
            out[key] = value.float()
        else:
            out[key] = value.to(torch.float16)
    return out
