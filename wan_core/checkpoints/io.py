"""Generic checkpoint reading and writing, shared by every model family of this package.

Reading: `read_state_dict` reads `.safetensors` (memory-mapped, one tensor at a time), sharded
safetensors (an `*.index.json` or a folder of shards), `.pth`/`.pt` pickles through
`torch.load(weights_only=True, mmap=True)` (legacy non-zip files with `mmap=False`, still tensors
only) and `.gguf` files (`gguf.py`, needs the optional `gguf` package); it strips prefixes and
dequantises fp8 (every layout of `fp8.py`) and GGUF blocks. `read_raw_state_dict` reads the same
files but keeps quantised tensors as `QuantizedTensor`s (what the file stores, plus its format), for
loaders that keep weights compact. `read_shapes` gives the names, shapes and stored dtypes of the
same files without reading tensor data (meta tensors); `read_safetensors_metadata` the string
metadata of one file.

Writing: `write_safetensors` and `write_torch_file` write atomically (through `util.atomic`);
`fp8.quantise_fp8_scaled` / `fp8.fp8_scaled_state_dict` produce ComfyUI's fp8 "scaled" layouts.

The model families (`dit.py`, `t5.py`, `vae.py`) hold their own key maps, detection and layouts.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ...util.atomic import atomic_output
from ..errors import CheckpointError
from .fp8 import (  # noqa: F401 - the fp8 names are re-exported for callers of io
    FP8_DTYPES,
    FP8_INPUT_SCALE_SUFFIX,
    FP8_MARKER,
    FP8_SCALE_SUFFIX,
    QuantizedTensor,
    fp8_scaled_state_dict,
    is_fp8_bookkeeping,
    quantise_fp8_scaled,
    split_fp8,
)
from .gguf import is_gguf, read_gguf

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
COMFY_DIT_PREFIX = "model.diffusion_model."
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
OFFICIAL_CONFIG_NAME = "config.json"  # beside official and diffusers weights
DIFFUSERS_FILE_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' single-file weights
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
LEGACY_PICKLE_START = b"\x80"  # pickle protocol opcode: the legacy torch.save format


# --------------------------------------------------------------------------------------------
# Generic reading
# --------------------------------------------------------------------------------------------
def read_state_dict(
    path_or_paths: PathLike | Sequence[PathLike],
    *,
    dtype: torch.dtype | None = None,
    strip_prefixes: Sequence[str] = (COMFY_DIT_PREFIX,),
) -> dict[str, torch.Tensor]:
    """Read a checkpoint (one file, several files, an index or a folder) into a flat state dict.

    - `dtype`: floating tensors are cast to it one by one while reading (integer tensors are kept).
      Quantised tensors are always dequantised: to `dtype`, or to float32 when `dtype` is None.
    - fp8 "scaled" files (ComfyUI, every layout of `fp8.py`): `<name>.weight` in fp8 times its
      scale; the marker, scale and format entries are dropped. GGUF files: blocks decoded.
    - `strip_prefixes`: for each prefix in order, when some keys start with it, only those keys are
      kept, without the prefix (a ComfyUI all-in-one file keeps its diffusion model part).

    Raises `CheckpointError` for a missing, truncated or corrupt file, a pickle holding other
    objects than tensors, and a key present in two shards.
    """
    raw = read_raw_state_dict(path_or_paths, strip_prefixes=strip_prefixes)
    out: dict[str, torch.Tensor] = {}
    for key in list(raw):
        value = raw.pop(key)  # one tensor at a time: the raw copy is released as we go
        if isinstance(value, QuantizedTensor):
            value = value.dequantise(dtype or torch.float32)
        elif dtype is not None and value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)
        out[key] = value
    return out


def read_raw_state_dict(path_or_paths: PathLike | Sequence[PathLike], *,
                        strip_prefixes: Sequence[str] = (COMFY_DIT_PREFIX,)
                        ) -> dict[str, torch.Tensor | QuantizedTensor]:
    """The tensors as the files store them: plain tensors, and `QuantizedTensor`s for fp8 (with
    their scales) and GGUF blocks. Prefixes are stripped as in `read_state_dict`; fp8 bookkeeping
    entries are dropped. Formats this package cannot decode raise `CheckpointError`."""
    files = _resolve_files(path_or_paths)
    raw: dict[str, torch.Tensor | QuantizedTensor] = {}
    metadata: dict[str, str] = {}
    for file in files:
        if file.suffix == ".safetensors":
            metadata.update(read_safetensors_metadata(file))
        for key, tensor in _read_one_file(file).items():
            if key in raw:
                raise CheckpointError(f"tensor {key!r} appears in more than one file ({file}); "
                                      "pass the shards of one checkpoint only")
            raw[key] = tensor
    raw = _strip_prefixes(raw, strip_prefixes)
    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    plain, fp8 = split_fp8(tensors, metadata)  # drops the fp8 bookkeeping entries
    out: dict[str, torch.Tensor | QuantizedTensor] = {}
    for key, value in raw.items():  # in file order
        if isinstance(value, QuantizedTensor):
            out[key] = value
        elif key in fp8 or key in plain:
            out[key] = fp8[key] if key in fp8 else plain[key]
    return out


def read_shapes(path_or_paths: PathLike | Sequence[PathLike], *,
                strip_prefixes: Sequence[str] = (COMFY_DIT_PREFIX,)) -> dict[str, torch.Tensor]:
    """Meta tensors with the names, shapes and stored dtypes of a checkpoint's tensors, reading no
    tensor data.

    safetensors headers give the shapes; `.pth` files are memory-mapped (legacy ones are read).
    Prefixes are stripped as in `read_state_dict`; the fp8 "scaled" bookkeeping entries (the
    marker, `.scale_weight`, `.scale_input`) are left out.
    """
    shapes = {k: v for file in _resolve_files(path_or_paths) for k, v in _read_file_shapes(file).items()}
    return {k: v for k, v in _strip_prefixes(shapes, strip_prefixes).items() if not is_fp8_bookkeeping(k)}


# safetensors header dtype names -> torch dtypes (what `read_shapes` gives the meta tensors)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _read_file_shapes(file: Path) -> dict[str, torch.Tensor]:
    if is_gguf(file):
        return {k: v for k, v in read_gguf(file, shapes_only=True).tensors.items()}
    if file.suffix != ".safetensors":
        return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in _read_one_file(file).items()}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            out = {}
            for k in handle.keys():
                info = handle.get_slice(k)
                name = info.get_dtype()
                if name not in SAFETENSORS_DTYPES:
                    raise CheckpointError(f"tensor {k!r} of {file} has dtype {name!r}, which this pack does not "
                                          f"read; expected one of {sorted(SAFETENSORS_DTYPES)}")
                out[k] = torch.empty(info.get_shape(), dtype=SAFETENSORS_DTYPES[name], device="meta")
            return out
    except SafetensorError as e:
        raise _corrupt(file, e) from e


def read_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The `__metadata__` string map of a safetensors file (empty when it has none)."""
    file = Path(path)
    _check_exists(file)
    try:
        with safe_open(str(file), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except SafetensorError as e:
        raise _corrupt(file, e) from e


def _check_exists(file: Path) -> None:
    if not file.exists():
        raise CheckpointError(f"checkpoint not found: {file}; check the path (expected a .safetensors, "
                              ".gguf, .pth or .pt file, an *.index.json or a folder of shards)")


def _corrupt(file: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(f"file is truncated or corrupt: {file} ({error}); re-download it")


def _resolve_files(path_or_paths: PathLike | Sequence[PathLike]) -> list[Path]:
    if isinstance(path_or_paths, (str, os.PathLike)):
        paths = [Path(path_or_paths)]
    else:
        paths = [Path(p) for p in path_or_paths]
        if not paths:
            raise CheckpointError("no checkpoint files given; pass a file, an index or a folder")
    files: list[Path] = []
    for path in paths:
        _check_exists(path)
        if path.is_dir():
            files.extend(_files_in_folder(path))
        elif path.name.endswith(".index.json"):
            files.extend(_files_of_index(path))
        else:
            files.append(path)
    return files


def _files_in_folder(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"folder {folder} holds {len(indexes)} shard indexes "
                              f"({[i.name for i in indexes]}); pass the index file you mean")
    if indexes:
        return _files_of_index(indexes[0])
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        shards = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not shards:
        raise CheckpointError(f"folder {folder} holds no .safetensors, .pth or .pt files; "
                              "pass the folder that contains the checkpoint shards")
    return shards


def _files_of_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(f"shard index {index} is not a valid *.index.json with a 'weight_map' "
                              f"({e}); re-download it") from e
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    for file in files:
        if not file.exists():
            raise CheckpointError(f"shard {file.name} listed in {index} is missing; download all shards")
    return files


def _read_one_file(file: Path) -> dict[str, torch.Tensor | QuantizedTensor]:
    if file.suffix == ".safetensors":
        return _read_safetensors(file)
    if is_gguf(file):
        return read_gguf(file).tensors
    if file.suffix in PICKLE_SUFFIXES:
        return _read_pickle(file)
    raise CheckpointError(f"unsupported checkpoint file type {file.suffix!r} ({file}); expected "
                          f".safetensors, .gguf or one of {PICKLE_SUFFIXES}")


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as e:
        raise _corrupt(file, e) from e


def _read_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A tensors-only `torch.save` file: the zip format memory-mapped, the legacy format read whole."""
    with open(file, "rb") as handle:
        head = handle.read(len(ZIP_MAGIC))
    is_legacy = head[:1] == LEGACY_PICKLE_START  # torch.save(..., _use_new_zipfile_serialization=False)
    if head != ZIP_MAGIC and not is_legacy:
        raise CheckpointError(f"file is truncated or corrupt: {file} is not a torch.save file (starts with "
                              f"{head!r}; expected a zip archive {ZIP_MAGIC!r} or a legacy pickle "
                              f"{LEGACY_PICKLE_START!r}); re-download it")
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True, mmap=not is_legacy)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file} holds Python objects other than tensors, which are refused for "
                              f"safety (torch.load weights_only=True: {str(e).splitlines()[0]}); "
                              "convert it to .safetensors or use a tensors-only file") from e
    except (RuntimeError, EOFError, OSError, IndexError) as e:  # a truncated legacy file gives IndexError
        if is_legacy:
            raise CheckpointError(f"{file} is a legacy (non-zip, `_use_new_zipfile_serialization=False`) "
                                  f"torch.save file that could not be read ({type(e).__name__}: {e}); it is "
                                  "truncated or corrupt: re-download it, or re-save it with a current "
                                  "torch.save or as .safetensors") from e
        raise _corrupt(file, e) from e
    if isinstance(obj, Mapping):
        for nested in ("state_dict", "model", "module"):
            if isinstance(obj.get(nested), Mapping) and len(obj) <= 2:
                obj = obj[nested]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{file} holds a {type(obj).__name__}, expected a dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{file} is not a flat state dict: entries {bad[:5]} are not tensors; "
                              "expected a dict of name -> tensor")
    return dict(obj)


def _strip_prefixes(sd: dict[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    for prefix in prefixes:
        if not prefix or not any(k.startswith(prefix) for k in sd):
            continue
        kept = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if len(kept) != len(sd):
            logger.info("kept the %d tensors under %r and dropped %d others", len(kept), prefix,
                        len(sd) - len(kept))
        sd = kept
    return sd


# --------------------------------------------------------------------------------------------
# Generic writing
# --------------------------------------------------------------------------------------------
def write_safetensors(tensors: Mapping[str, torch.Tensor], path: PathLike, *,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write tensors to `path` atomically (`util.atomic`: temp file in the same folder, then `os.replace`)."""
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_output(path) as tmp:
        save_file(contiguous, str(tmp), metadata=dict(metadata) if metadata else None)
    return Path(path)


def write_torch_file(tensors: Mapping[str, torch.Tensor], path: PathLike) -> Path:
    """Write a tensors-only `torch.save` file (`.pth`/`.pt`) atomically; returns the path."""
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_output(path) as tmp:
        torch.save(contiguous, tmp)
    return Path(path)
