"""DiT checkpoints: the official <-> diffusers key map, config detection, loading and saving.

Layouts (`DIT_LAYOUTS`): the official release (a folder of shards with an index and config.json),
ComfyUI's single files (official names, optionally under `model.diffusion_model.`, optionally fp8
"scaled") and diffusers' `WanTransformer3DModel` (spec section 3.10). Files are read through
`io.read_state_dict`; `detect_dit_config` tells the `DiTConfig` from key names and shapes,
`read_dit_config` does it from the headers alone (no tensor data). `load_dit`, `load_experts` and
`save_dit` build and write `WanDiT` models.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch import nn

from ...util.atomic import atomic_write_text
from ..attention import REFERENCE_BACKEND, check_backend_name
from ..config import (
    DEFAULT_STORAGE,
    FP8_MATMUL_STORAGE,
    STORED_STORAGE,
    TASK_BY_MODEL_TYPE,
    WEIGHT_STORAGES,
    DiTConfig,
)
from ..dit import WanDiT
from ..errors import CheckpointError
from ..runtime.compact import block_matrix_names, compact_weights, split_for_storage
from ..runtime.fp8_matmul import apply_fp8_matmul
from .fp8 import QuantizedTensor, fp8_scaled_state_dict
from .gguf import WAN_ARCH, is_gguf, quantised_state_dict, read_gguf_fields, write_gguf
from .gguf_quants import GGUFQuant
from .io import (
    COMFY_DIT_PREFIX,
    DIFFUSERS_FILE_NAME,
    OFFICIAL_CONFIG_NAME,
    PathLike,
    read_raw_state_dict,
    read_safetensors_metadata,
    read_shapes,
    read_state_dict,
    write_safetensors,
)

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Key maps
# --------------------------------------------------------------------------------------------
DIT_REQUIRED_KEYS = ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
                     "blocks.0.self_attn.q.weight", "blocks.0.ffn.0.weight", "head.head.weight")
DIFFUSERS_MARKER = "condition_embedder."
DIT_LAYOUTS = ("official", "comfy", "comfy_prefixed", "diffusers", "gguf")
DIT_CONFIG_METADATA_KEY = "wanbench.dit_config"
NUM_HEADS_METADATA_KEY = "wanbench.num_heads"
OFFICIAL_SHARD_NAME = "diffusion_pytorch_model-{:05d}-of-{:05d}.safetensors"
OFFICIAL_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
NUM_OFFICIAL_SHARDS = 2
HEAD_DIM_OF_RELEASED_MODELS = 128
# Key fragments of Wan2.1 I2V's image conditioning, official names and diffusers names.
WAN21_IMAGE_KEY_MARKERS = ("img_emb.", ".k_img.", ".v_img.", "norm_k_img", "image_embedder.", ".add_k_proj.",
                           ".add_v_proj.")

# Official -> diffusers names outside the blocks (prefix match) and inside `blocks.N.`.
_TOP_LEVEL_TO_DIFFUSERS = (
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
)
_BLOCK_TO_DIFFUSERS = (
    ("modulation", "scale_shift_table"),
    ("self_attn.q.", "attn1.to_q."), ("self_attn.k.", "attn1.to_k."), ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."), ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."),
    ("cross_attn.q.", "attn2.to_q."), ("cross_attn.k.", "attn2.to_k."), ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."), ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."),
    ("norm3.", "norm2."),  # the cross-attention pre-norm: official norm3 is diffusers norm2
    ("ffn.0.", "ffn.net.0.proj."), ("ffn.2.", "ffn.net.2."),
)


def _rename(key: str, table: Iterable[tuple[str, str]], reverse: bool) -> str:
    for official, diffusers in table:
        src, dst = (diffusers, official) if reverse else (official, diffusers)
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def _convert_key(key: str, reverse: bool) -> str:
    if key.startswith("blocks."):
        parts = key.split(".", 2)
        if len(parts) < 3:  # "blocks." itself: no block index, nothing to rename
            return key
        _, index, rest = parts
        return f"blocks.{index}." + _rename(rest, _BLOCK_TO_DIFFUSERS, reverse)
    return _rename(key, _TOP_LEVEL_TO_DIFFUSERS, reverse)


def dit_key_to_diffusers(key: str) -> str:
    """One official DiT name (parameter or module path followed by '.') -> its diffusers name."""
    return _convert_key(key, reverse=False)


def dit_key_from_diffusers(key: str) -> str:
    """One diffusers `WanTransformer3DModel` name -> the official name (unknown names unchanged)."""
    return _convert_key(key, reverse=True)


def dit_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DiT key names -> diffusers `WanTransformer3DModel` names (spec section 3.10)."""
    return {_convert_key(k, reverse=False): v for k, v in sd.items()}


def dit_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers `WanTransformer3DModel` key names -> official DiT names."""
    return {_convert_key(k, reverse=True): v for k, v in sd.items()}


def is_diffusers_dit(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(DIFFUSERS_MARKER) for k in sd)


# --------------------------------------------------------------------------------------------
# Config detection
# --------------------------------------------------------------------------------------------
def detect_dit_config(sd: Mapping[str, torch.Tensor], *, num_heads: int | None = None,
                      extra: Mapping[str, object] | None = None) -> DiTConfig:
    """The `DiTConfig` of an official-named DiT state dict, from key names and shapes.

    | field | decided by |
    | --- | --- |
    | dim, in_dim, patch_size | `patch_embedding.weight` (D, in_dim, pt, ph, pw) |
    | out_dim | `head.head.weight` rows / prod(patch_size) |
    | ffn_dim | `blocks.0.ffn.0.weight` rows |
    | freq_dim | `time_embedding.0.weight` columns |
    | text_dim | `text_embedding.0.weight` columns |
    | num_layers | number of distinct `blocks.N.` indices |
    | model_type | (in_dim, out_dim) matched against the task presets of config.py: |
    |            | (16, 16) t2v, (36, 16) i2v, (48, 48) ti2v |
    | num_heads | the `num_heads` argument, else `extra["num_heads"]` (official config.json or |
    |           | the file's metadata), else dim // 128 when dim % 128 == 0 and dim >= 1024 |
    |           | (head dim 128, true of all released models), else an error asking for it |
    | text_len, eps | `extra` when given, else 512 and 1e-6 |

    `extra` holds config values read beside the weights (official `config.json`, or the
    `wanbench.dit_config` metadata that `save_dit` writes); they must agree with the shapes.
    A Wan2.1 I2V file (image-conditioning keys, `WAN21_IMAGE_KEY_MARKERS`) and a detected config
    that `DiTConfig` rejects raise `CheckpointError`.
    """
    _reject_wan21_i2v(sd)
    missing = [k for k in DIT_REQUIRED_KEYS if k not in sd]
    if missing:
        found = sorted(sd)[:6]
        raise CheckpointError(f"not a Wan2.2 DiT checkpoint: missing {missing[:3]} (expected keys such as "
                              f"'blocks.0.self_attn.q.weight', 'patch_embedding.weight'); found keys such as "
                              f"{found}; pick the diffusion model file, not the text encoder or VAE")
    extra = dict(extra or {})
    patch = sd["patch_embedding.weight"]
    if patch.ndim != 5:
        raise CheckpointError(f"patch_embedding.weight must be 5-D (D, in_dim, pt, ph, pw); "
                              f"got {tuple(patch.shape)}")
    dim, in_dim = int(patch.shape[0]), int(patch.shape[1])
    patch_size = tuple(int(s) for s in patch.shape[2:])
    out_dim, rem = divmod(int(sd["head.head.weight"].shape[0]), math.prod(patch_size))
    if rem:
        raise CheckpointError(f"head.head.weight has {sd['head.head.weight'].shape[0]} rows, not a multiple "
                              f"of the patch volume {math.prod(patch_size)}")
    model_type = _model_type_from_channels(in_dim, out_dim)
    if "model_type" in extra and extra["model_type"] != model_type:
        raise CheckpointError(f"config says model_type {extra['model_type']!r} but the weights have "
                              f"in_dim {in_dim} / out_dim {out_dim}, which is {model_type!r}")
    heads = num_heads or extra.get("num_heads") or _default_num_heads(dim)
    layers = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    detected = dict(
        model_type=model_type, patch_size=patch_size, in_dim=in_dim, dim=dim, out_dim=out_dim,
        ffn_dim=int(sd["blocks.0.ffn.0.weight"].shape[0]),
        freq_dim=int(sd["time_embedding.0.weight"].shape[1]),
        text_dim=int(sd["text_embedding.0.weight"].shape[1]), num_heads=int(heads), num_layers=len(layers),
        text_len=int(extra.get("text_len", 512)), eps=float(extra.get("eps", 1e-6)),
    )
    try:
        cfg = DiTConfig(**detected)
    except ValueError as e:
        source = ("the num_heads argument" if num_heads else "config.json / file metadata"
                  if "num_heads" in extra else "dim // 128")
        raise CheckpointError(f"the weights give an invalid DiT config: {e}. Detected {detected} "
                              f"(num_heads from {source}); pass num_heads=... that divides dim {dim} into an "
                              "even head dim >= 6, or fix the checkpoint's config") from e
    for name in ("dim", "in_dim", "out_dim", "ffn_dim", "freq_dim", "num_layers"):
        if name in extra and int(extra[name]) != getattr(cfg, name):
            raise CheckpointError(f"config says {name}={extra[name]} but the weights give "
                                  f"{getattr(cfg, name)}")
    if layers != set(range(len(layers))):
        raise CheckpointError(f"block indices are not contiguous from 0: {sorted(layers)}; "
                              "the file is incomplete")
    return cfg


def _reject_wan21_i2v(sd: Mapping[str, torch.Tensor]) -> None:
    """Wan2.1 I2V/FLF2V DiTs add CLIP image conditioning (`img_emb.*`, `cross_attn.k_img/v_img`);
    Wan2.2 has none. Their other keys are Wan2.2 names, so without this check they would fail later
    as "unexpected keys"."""
    found = [k for k in sd if any(marker in k for marker in WAN21_IMAGE_KEY_MARKERS)]
    if found:
        raise CheckpointError(
            f"this is a Wan2.1 image-to-video DiT (CLIP image-conditioning keys such as {sorted(found)[:3]}); "
            "this pack runs Wan2.2 models only. For image-to-video use the Wan2.2 I2V-A14B experts "
            "(ComfyUI: wan2.2_i2v_high_noise_14B_*.safetensors + wan2.2_i2v_low_noise_14B_*.safetensors; "
            "official: Wan2.2-I2V-A14B/high_noise_model + low_noise_model) or Wan2.2 TI2V-5B "
            "(wan2.2_ti2v_5B_*.safetensors)")


def _model_type_from_channels(in_dim: int, out_dim: int) -> str:
    for model_type, task in TASK_BY_MODEL_TYPE.items():
        if (task.dit.in_dim, task.dit.out_dim) == (in_dim, out_dim):
            return model_type
    known = {mt: (t.dit.in_dim, t.dit.out_dim) for mt, t in TASK_BY_MODEL_TYPE.items()}
    raise CheckpointError(f"unknown Wan2.2 DiT channels in_dim={in_dim}, out_dim={out_dim}; "
                          f"expected one of {known}")


def _default_num_heads(dim: int) -> int:
    if dim % HEAD_DIM_OF_RELEASED_MODELS == 0 and dim >= 1024:
        return dim // HEAD_DIM_OF_RELEASED_MODELS
    raise CheckpointError(f"cannot tell num_heads for dim {dim} from the weights (no config.json or "
                          f"'{DIT_CONFIG_METADATA_KEY}' metadata); pass num_heads=...")


def _extra_config(path: Path) -> dict[str, object]:
    """Config values stored beside the weights: config.json of a folder/index, or file metadata."""
    folder = path if path.is_dir() else path.parent if path.name.endswith(".index.json") else None
    if folder is not None and (folder / OFFICIAL_CONFIG_NAME).is_file():
        raw = _read_config_json(folder / OFFICIAL_CONFIG_NAME)
        if "num_attention_heads" in raw:  # diffusers config.json
            names = {"num_attention_heads": "num_heads", "num_layers": "num_layers", "eps": "eps",
                     "ffn_dim": "ffn_dim", "freq_dim": "freq_dim", "in_channels": "in_dim",
                     "out_channels": "out_dim", "text_len": "text_len"}
            return {ours: raw[theirs] for theirs, ours in names.items() if raw.get(theirs) is not None}
        return {k: raw[k] for k in ("model_type", "dim", "in_dim", "out_dim", "ffn_dim", "freq_dim",
                                     "num_heads", "num_layers", "text_len", "eps") if k in raw}
    if path.is_file() and (path.suffix == ".safetensors" or is_gguf(path)):
        meta = read_gguf_fields(path, with_arrays=False) if is_gguf(path) else read_safetensors_metadata(path)
        if DIT_CONFIG_METADATA_KEY in meta:
            try:
                return dict(json.loads(meta[DIT_CONFIG_METADATA_KEY]))
            except (json.JSONDecodeError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: the '{DIT_CONFIG_METADATA_KEY}' metadata is not a JSON object "
                                      f"({e}); re-save the file with save_dit or re-download it") from e
        if NUM_HEADS_METADATA_KEY in meta:
            return {"num_heads": int(meta[NUM_HEADS_METADATA_KEY])}
    return {}


def _read_config_json(file: Path) -> dict[str, object]:
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); re-download the checkpoint's config.json, "
                              "or delete it to detect the config from the weights (then pass num_heads=... "
                              "if it cannot be told from the shapes)") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} holds a JSON {type(raw).__name__}, expected an object of config "
                              "values such as {\"dim\": 5120, \"num_heads\": 40}; re-download it")
    return raw


def _config_json(cfg: DiTConfig) -> dict[str, object]:
    out = asdict(cfg)
    out["patch_size"], out["window_size"] = list(cfg.patch_size), list(cfg.window_size)
    return out


# --------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------
def read_dit_state_dict(path: PathLike | Sequence[PathLike], *, dtype: torch.dtype | None = None,
                        num_heads: int | None = None) -> tuple[dict[str, torch.Tensor], DiTConfig]:
    """Official-named state dict and detected config of any supported DiT file or folder."""
    sd = _official_names(read_state_dict(path, dtype=dtype, strip_prefixes=(COMFY_DIT_PREFIX,)))
    return sd, _detect(sd, path, num_heads)


def read_dit_config(path: PathLike | Sequence[PathLike], *, num_heads: int | None = None) -> DiTConfig:
    """The detected config of a DiT file or folder from its key names and shapes, reading no tensor data.

    safetensors headers give the shapes; `.pth` files are memory-mapped (legacy ones are read).
    """
    sd = _official_names(read_shapes(path, strip_prefixes=(COMFY_DIT_PREFIX,)))
    return _detect(sd, path, num_heads)


def _official_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dit_from_diffusers(sd) if is_diffusers_dit(sd) else sd


def _detect(sd: Mapping[str, torch.Tensor], path: PathLike | Sequence[PathLike],
            num_heads: int | None) -> DiTConfig:
    first = Path(path) if isinstance(path, (str, os.PathLike)) else Path(path[0])
    return detect_dit_config(sd, num_heads=num_heads, extra=_extra_config(first))


def load_dit_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """`load_state_dict` with errors that name the tensor and the expected and found shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"DiT state dict does not match the model: missing {missing[:5]} "
                              f"({len(missing)} in all), unexpected {unexpected[:5]} "
                              f"({len(unexpected)} in all)")
    for key, ref in expected.items():
        if tuple(sd[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"shape mismatch for {key}: expected {tuple(ref.shape)}, got "
                                  f"{tuple(sd[key].shape)}; the file belongs to another model size")
    model.load_state_dict(sd, strict=True, assign=True)


def load_dit(path: PathLike | Sequence[PathLike], *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, num_heads: int | None = None,
             attention: str = REFERENCE_BACKEND, storage: str = DEFAULT_STORAGE) -> WanDiT:
    """Build a `WanDiT` (with attention backend `attention`) from a file, a shard index or a folder
    in any supported layout (safetensors, fp8-scaled, GGUF, official, diffusers).

    `dtype` is the compute dtype; `storage` (`config.WEIGHT_STORAGES`) how the block matrices are
    kept in memory (`runtime/compact.py`): `default` casts everything to `dtype` (an fp8 file is
    dequantised; a GGUF file stays quantised), the others keep them compact and decode them per
    block; `fp8_e4m3fn_scaled_mm` also runs them as fp8 matmuls (`runtime/fp8_matmul.py`).
    """
    check_backend_name(attention)  # before reading any tensor
    if storage not in WEIGHT_STORAGES:
        raise ValueError(f"weight storage must be one of {WEIGHT_STORAGES}; got {storage!r}")
    raw = _official_names(read_raw_state_dict(path, strip_prefixes=(COMFY_DIT_PREFIX,)))
    cfg = _detect({k: _meta(v) for k, v in raw.items()}, path, num_heads)
    is_gguf_file = any(isinstance(v, QuantizedTensor) and isinstance(v.format, GGUFQuant) for v in raw.values())
    if storage == DEFAULT_STORAGE and is_gguf_file:
        storage = STORED_STORAGE  # decoding a GGUF file at load would undo what it is for
    with torch.device("meta"):
        model = WanDiT(cfg, attention=attention)
    plain, compact = split_for_storage(raw, block_matrix_names(model), storage, compute_dtype=dtype)
    raw.clear()
    load_dit_state_dict(model, {**plain, **{k: _meta(v) for k, v in compact.items()}})
    if compact:
        compact_weights(model, compact, compute_dtype=dtype)
    model = model.to(device=device).eval().requires_grad_(False)
    if storage == FP8_MATMUL_STORAGE:
        apply_fp8_matmul(model)
    logger.info("loaded %s DiT (%d layers, dim %d) from %s; block matrices %s", cfg.model_type, cfg.num_layers,
                cfg.dim, path, f"kept as {storage}" if compact else f"in {dtype}")
    return model


def _meta(value: torch.Tensor | QuantizedTensor) -> torch.Tensor:
    """A meta tensor with the logical shape of a stored value (for detection and key checks)."""
    return torch.empty(value.shape, device="meta")


def load_experts(high: PathLike, low: PathLike | None = None, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, num_heads: int | None = None,
                 attention: str = REFERENCE_BACKEND, storage: str = DEFAULT_STORAGE) -> list[WanDiT]:
    """One model (ti2v) or the high- and low-noise experts (A14B), checked to be of one task and size.

    The check reads only key names and shapes (`read_dit_config`), so two mismatched 14B files fail
    in a second instead of after both have been loaded. Every expert uses attention backend `attention`.
    """
    check_backend_name(attention)
    paths = [high] if low is None else [high, low]
    configs = [read_dit_config(p, num_heads=num_heads) for p in paths]
    if len(configs) == 2 and configs[0] != configs[1]:
        a, b = configs
        diff = {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in fields(a)
                if getattr(a, f.name) != getattr(b, f.name)}
        raise CheckpointError(f"the two experts differ (high vs low): {diff}; expected the high- and "
                              f"low-noise models of one task (high is {a.model_type}, low is {b.model_type})")
    return [load_dit(p, device=device, dtype=dtype, num_heads=num_heads, attention=attention, storage=storage)
            for p in paths]


def save_dit(state_dict_or_model: nn.Module | Mapping[str, torch.Tensor], path: PathLike, *,
             layout: str = "comfy", dtype: torch.dtype = torch.float16, fp8_scaled: bool = False,
             config: DiTConfig | None = None, gguf_type: str = "Q8_0") -> Path:
    """Write a DiT in one of `DIT_LAYOUTS`; returns the file or folder written.

    - official: folder with 2 shards, `diffusion_pytorch_model.safetensors.index.json`, config.json.
    - comfy / comfy_prefixed: one file, official names (prefixed with `model.diffusion_model.`).
      `fp8_scaled`: 2-D block weights in fp8 e4m3fn with `<layer>.scale_weight` (absmax/448) and
      the `scaled_fp8` marker; everything else in `dtype`.
    - diffusers: one file with diffusers names when `path` ends in .safetensors, else a folder with
      `diffusion_pytorch_model.safetensors` and a diffusers config.json.
    - gguf: a `.gguf` file of type `gguf_type` (`gguf.GGUF_RECIPES`, e.g. Q8_0, Q4_K_M), official
      names, as the ComfyUI-GGUF tools write them (block matrices quantised, the rest F32/F16).
    Single files carry the full config in their metadata (`wanbench.dit_config`).
    """
    if layout not in DIT_LAYOUTS:
        raise ValueError(f"unknown DiT layout {layout!r}; expected one of {DIT_LAYOUTS}")
    if layout == "gguf" and Path(path).suffix != ".gguf":
        raise ValueError(f"the gguf layout is a .gguf file; got {Path(path).name}")
    if fp8_scaled and layout not in ("comfy", "comfy_prefixed"):
        raise ValueError(f"fp8_scaled is a ComfyUI layout; use layout 'comfy' or 'comfy_prefixed', "
                         f"not {layout!r}")
    if isinstance(state_dict_or_model, WanDiT):
        config = config or state_dict_or_model.config
    is_module = isinstance(state_dict_or_model, nn.Module)
    sd = dict(state_dict_or_model.state_dict() if is_module else state_dict_or_model)
    config = config or detect_dit_config(sd)
    tensors = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    metadata = {DIT_CONFIG_METADATA_KEY: json.dumps(_config_json(config)),
                NUM_HEADS_METADATA_KEY: str(config.num_heads)}
    target = Path(path)
    if layout == "gguf":
        return write_gguf(target, quantised_state_dict(sd, gguf_type), arch=WAN_ARCH, fields=metadata)
    if layout == "official":
        return _save_official(tensors, target, config)
    if layout == "diffusers":
        return _save_diffusers(dit_to_diffusers(tensors), target, config, metadata)
    if fp8_scaled:
        tensors = fp8_scaled_state_dict(sd, is_quantised=_is_fp8_block_weight, dtype=dtype)
    if layout == "comfy_prefixed":
        tensors = {COMFY_DIT_PREFIX + k: v for k, v in tensors.items()}
    return write_safetensors(tensors, target, metadata=metadata)


def _is_fp8_block_weight(key: str, value: torch.Tensor) -> bool:
    """The matrices of the transformer blocks: what ComfyUI's fp8 "scaled" DiT files store in fp8."""
    return key.startswith("blocks.") and key.endswith(".weight") and value.ndim == 2


def _save_official(tensors: dict[str, torch.Tensor], folder: Path, config: DiTConfig) -> Path:
    keys = sorted(tensors)
    per_shard = math.ceil(len(keys) / NUM_OFFICIAL_SHARDS)
    weight_map: dict[str, str] = {}
    for i in range(NUM_OFFICIAL_SHARDS):
        name = OFFICIAL_SHARD_NAME.format(i + 1, NUM_OFFICIAL_SHARDS)
        chunk = keys[i * per_shard:(i + 1) * per_shard]
        write_safetensors({k: tensors[k] for k in chunk}, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(folder / OFFICIAL_INDEX_NAME, json.dumps(index, indent=2))
    official_cfg = {"_class_name": "WanModel", "model_type": config.model_type, "dim": config.dim,
                    "eps": config.eps, "ffn_dim": config.ffn_dim, "freq_dim": config.freq_dim,
                    "in_dim": config.in_dim, "num_heads": config.num_heads, "num_layers": config.num_layers,
                    "out_dim": config.out_dim, "text_len": config.text_len}
    atomic_write_text(folder / OFFICIAL_CONFIG_NAME, json.dumps(official_cfg, indent=2))
    return folder


def _save_diffusers(tensors: dict[str, torch.Tensor], target: Path, config: DiTConfig,
                    metadata: dict[str, str]) -> Path:
    if target.suffix == ".safetensors":
        return write_safetensors(tensors, target, metadata=metadata)
    diffusers_cfg = {
        "_class_name": "WanTransformer3DModel", "patch_size": list(config.patch_size),
        "num_attention_heads": config.num_heads, "attention_head_dim": config.head_dim,
        "in_channels": config.in_dim, "out_channels": config.out_dim, "text_dim": config.text_dim,
        "freq_dim": config.freq_dim, "ffn_dim": config.ffn_dim, "num_layers": config.num_layers,
        "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": config.eps,
        "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
        "text_len": config.text_len,  # not a diffusers field (its pipelines pad to 512); kept for reloading
    }
    write_safetensors(tensors, target / DIFFUSERS_FILE_NAME, metadata=metadata)
    atomic_write_text(target / OFFICIAL_CONFIG_NAME, json.dumps(diffusers_cfg, indent=2))
    return target
