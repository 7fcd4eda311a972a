"""UMT5 text-encoder checkpoints: official <-> Hugging Face / ComfyUI key maps, detection, load, save.

The official checkpoint (`models_t5_umt5-xxl-enc-bf16.pth`) uses the module names of
`wan_core.t5.UMT5Encoder`. The Hugging Face / ComfyUI layout (`shared.weight`,
`encoder.block.N.layer.0.SelfAttention.q.weight`, ...) is mapped to them by `hf_to_official`
(spec 4.1), and llama.cpp's GGUF layout (`token_embd.weight`, `enc.blk.N.attn_q.weight`, ...) by
`gguf_to_official`; the layout is detected from the keys. ComfyUI's fp8 "scaled" files are
dequantised while reading (or kept compact: `storage`), and its files embed the tokenizer as a
`spiece_model` tensor; a GGUF file carries it as `tokenizer.ggml.*` metadata (`gguf_tokenizer.py`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ...util.atomic import atomic_output, atomic_write_text
from ..config import DEFAULT_STORAGE, FP8_MATMUL_STORAGE, STORED_STORAGE, WEIGHT_STORAGES, UMT5Config
from ..errors import CheckpointError
from ..runtime.compact import block_matrix_names, compact_weights, split_for_storage
from ..t5 import TextEncoder, UMT5Encoder
from ..tokenizer import DEFAULT_TEXT_LEN, SPIECE_TENSOR_KEY, WanTokenizer, find_spiece_model, searched_places
from .fp8 import QuantizedTensor, fp8_scaled_state_dict
from .gguf import is_gguf, quantised_state_dict, read_gguf, write_gguf
from .gguf_quants import GGUFQuant
from .gguf_tokenizer import fields_from_spiece, spiece_from_fields
from .io import PathLike, read_raw_state_dict, write_safetensors, write_torch_file

logger = logging.getLogger(__name__)

TensorLike = torch.Tensor | QuantizedTensor

LAYOUTS = ("comfy", "official", "gguf")
GGUF_T5_ARCH = "t5encoder"  # llama.cpp's architecture name for an encoder-only T5
TOKENIZER_SUBFOLDER = "google/umt5-xxl"


# ------------------------------------------------------------------------------------------------
# Key maps and detection
# ------------------------------------------------------------------------------------------------
# (official name, Hugging Face / ComfyUI name); "{i}" is the block index.
_BLOCK_KEY_PAIRS = (
    ("blocks.{i}.norm1.weight", "encoder.block.{i}.layer.0.layer_norm.weight"),
    ("blocks.{i}.attn.q.weight", "encoder.block.{i}.layer.0.SelfAttention.q.weight"),
    ("blocks.{i}.attn.k.weight", "encoder.block.{i}.layer.0.SelfAttention.k.weight"),
    ("blocks.{i}.attn.v.weight", "encoder.block.{i}.layer.0.SelfAttention.v.weight"),
    ("blocks.{i}.attn.o.weight", "encoder.block.{i}.layer.0.SelfAttention.o.weight"),
    ("blocks.{i}.pos_embedding.embedding.weight",
     "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("blocks.{i}.norm2.weight", "encoder.block.{i}.layer.1.layer_norm.weight"),
    ("blocks.{i}.ffn.gate.0.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight"),
    ("blocks.{i}.ffn.fc1.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight"),
    ("blocks.{i}.ffn.fc2.weight", "encoder.block.{i}.layer.1.DenseReluDense.wo.weight"),
)
_GLOBAL_KEY_PAIRS = (
    ("token_embedding.weight", "shared.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
)
# (official name, llama.cpp GGUF name)
_GGUF_BLOCK_KEY_PAIRS = (
    ("blocks.{i}.norm1.weight", "enc.blk.{i}.attn_norm.weight"),
    ("blocks.{i}.attn.q.weight", "enc.blk.{i}.attn_q.weight"),
    ("blocks.{i}.attn.k.weight", "enc.blk.{i}.attn_k.weight"),
    ("blocks.{i}.attn.v.weight", "enc.blk.{i}.attn_v.weight"),
    ("blocks.{i}.attn.o.weight", "enc.blk.{i}.attn_o.weight"),
    ("blocks.{i}.pos_embedding.embedding.weight", "enc.blk.{i}.attn_rel_b.weight"),
    ("blocks.{i}.norm2.weight", "enc.blk.{i}.ffn_norm.weight"),
    ("blocks.{i}.ffn.gate.0.weight", "enc.blk.{i}.ffn_gate.weight"),
    ("blocks.{i}.ffn.fc1.weight", "enc.blk.{i}.ffn_up.weight"),
    ("blocks.{i}.ffn.fc2.weight", "enc.blk.{i}.ffn_down.weight"),
)
_GGUF_GLOBAL_KEY_PAIRS = (("token_embedding.weight", "token_embd.weight"), ("norm.weight", "enc.output_norm.weight"))
_HF_EMBED_ALIAS = "encoder.embed_tokens.weight"
_HF_IGNORED_PREFIXES = ("decoder.", "lm_head.")
# Keys whose presence identifies a layout, and that locate a prefix in front of the encoder.
_OFFICIAL_ANCHOR = "blocks.0.attn.q.weight"
_HF_ANCHOR = "encoder.block.0.layer.0.SelfAttention.q.weight"
_GGUF_ANCHOR = "enc.blk.0.attn_q.weight"
_FP8_LINEAR = re.compile(r"\.(q|k|v|o|wi_0|wi_1|wo|fc1|fc2|gate\.0)\.weight$")


def _is_gguf_quantised(key: str, tensor: torch.Tensor) -> bool:
    """What llama.cpp quantises in a T5 encoder: the linears and the token embedding."""
    return key == "token_embd.weight" or key.endswith(("_q.weight", "_k.weight", "_v.weight", "_o.weight",
                                                       "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"))


def _save_gguf(sd: dict[str, torch.Tensor], target: Path, spiece_bytes: bytes | None, gguf_type: str) -> Path:
    if target.suffix != ".gguf":
        raise ValueError(f"the gguf layout is a .gguf file; got {target.name}")
    tensors = quantised_state_dict(official_to_gguf(sd), gguf_type, is_quantised=_is_gguf_quantised)
    fields = fields_from_spiece(spiece_bytes) if spiece_bytes is not None else {}
    write_gguf(target, tensors, arch=GGUF_T5_ARCH, fields=fields)
    logger.info("saved UMT5 encoder to %s (gguf %s)", target, gguf_type)
    return target


def _is_fp8_linear(key: str, tensor: torch.Tensor) -> bool:
    """The linear weights: what ComfyUI's fp8 "scaled" UMT5 files store in fp8."""
    return _FP8_LINEAR.search(key) is not None


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


_OFFICIAL_TO_HF = [(_pattern(o), h) for o, h in _BLOCK_KEY_PAIRS]
_HF_TO_OFFICIAL = [(_pattern(h), o) for o, h in _BLOCK_KEY_PAIRS]
_OFFICIAL_TO_GGUF = [(_pattern(o), g) for o, g in _GGUF_BLOCK_KEY_PAIRS]
_GGUF_TO_OFFICIAL = [(_pattern(g), o) for o, g in _GGUF_BLOCK_KEY_PAIRS]


def _rename(key: str, table: list[tuple[re.Pattern[str], str]], globals_: dict[str, str]) -> str | None:
    if key in globals_:
        return globals_[key]
    for pattern, template in table:
        match = pattern.match(key)
        if match:
            return template.replace("{i}", match.group(1))
    return None


def hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face / ComfyUI UMT5 encoder keys -> official keys (spec 4.1).

    `encoder.embed_tokens.weight` (a tied copy of `shared.weight`) stands in when `shared.weight`
    is absent; decoder and lm_head tensors of a full seq2seq file are dropped. Unknown keys raise.
    """
    sd = dict(sd)
    alias = sd.pop(_HF_EMBED_ALIAS, None)
    if "shared.weight" not in sd and alias is not None:
        sd["shared.weight"] = alias
    dropped = [k for k in sd if k.startswith(_HF_IGNORED_PREFIXES)]
    if dropped:
        logger.info("ignoring %d decoder/lm_head tensors (only the encoder is used)", len(dropped))
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    hf_globals = {h: o for o, h in _GLOBAL_KEY_PAIRS}
    for key, tensor in sd.items():
        if key.startswith(_HF_IGNORED_PREFIXES):
            continue
        name = _rename(key, _HF_TO_OFFICIAL, hf_globals)
        if name is None:
            unknown.append(key)
        else:
            out[name] = tensor
    if unknown:
        raise CheckpointError(f"unexpected tensors in a Hugging Face/ComfyUI UMT5 encoder file: {unknown[:6]}"
                              f"{' ...' if len(unknown) > 6 else ''}; expected only shared.weight, "
                              "encoder.block.N.layer.{0,1}.* and encoder.final_layer_norm.weight")
    return out


def official_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official UMT5 encoder keys -> Hugging Face / ComfyUI keys (the inverse of `hf_to_official`)."""
    out: dict[str, torch.Tensor] = {}
    official_globals = dict(_GLOBAL_KEY_PAIRS)
    for key, tensor in sd.items():
        name = _rename(key, _OFFICIAL_TO_HF, official_globals)
        if name is None:
            raise CheckpointError(f"{key!r} is not an official UMT5 encoder key; expected "
                                  "token_embedding.weight, blocks.N.* or norm.weight")
        out[name] = tensor
    return out


def gguf_to_official(sd: Mapping[str, TensorLike]) -> dict[str, TensorLike]:
    """llama.cpp GGUF UMT5 encoder keys -> official keys; unknown keys raise."""
    out, unknown = {}, []
    gguf_globals = {g: o for o, g in _GGUF_GLOBAL_KEY_PAIRS}
    for key, tensor in sd.items():
        name = _rename(key, _GGUF_TO_OFFICIAL, gguf_globals)
        if name is None:
            unknown.append(key)
        else:
            out[name] = tensor
    if unknown:
        raise CheckpointError(f"unexpected tensors in a GGUF UMT5 encoder file: {unknown[:6]}; expected "
                              "token_embd.weight, enc.blk.N.* and enc.output_norm.weight")
    return out


def official_to_gguf(sd: Mapping[str, TensorLike]) -> dict[str, TensorLike]:
    """Official UMT5 encoder keys -> llama.cpp GGUF keys (the inverse of `gguf_to_official`)."""
    out = {}
    for key, tensor in sd.items():
        name = _rename(key, _OFFICIAL_TO_GGUF, dict(_GGUF_GLOBAL_KEY_PAIRS))
        if name is None:
            raise CheckpointError(f"{key!r} is not an official UMT5 encoder key")
        out[name] = tensor
    return out


def _select_encoder(sd: dict[str, TensorLike], source: str) -> tuple[dict[str, TensorLike], str]:
    """Find the layout by its anchor key, strip any prefix in front of it. Returns (sd, layout)."""
    for anchor, layout in ((_OFFICIAL_ANCHOR, "official"), (_HF_ANCHOR, "hf"), (_GGUF_ANCHOR, "gguf")):
        hits = [k for k in sd if k == anchor or k.endswith("." + anchor)]
        if hits:
            prefix = min(hits, key=len)[: -len(anchor)]
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, layout
    sample = sorted(sd)[:5]
    hint = ""
    if any("diffusion_model" in k or "patch_embedding" in k for k in sd):
        hint = " (this looks like a Wan DiT; load it as a diffusion model)"
    elif any(k.startswith(("encoder.conv", "decoder.conv", "conv1")) for k in sd):
        hint = " (this looks like a VAE)"
    raise CheckpointError(f"{source} is not a UMT5 text encoder{hint}: no {_OFFICIAL_ANCHOR!r} "
                          f"(official layout) or {_HF_ANCHOR!r} (Hugging Face/ComfyUI layout) key; "
                          f"first keys: {sample}. "
                          "Expected models_t5_umt5-xxl-enc-bf16.pth or umt5_xxl_*.safetensors")


def detect_t5_config(sd: dict[str, torch.Tensor], *, text_len: int = 512) -> UMT5Config:
    """UMT5Config from official-layout shapes: vocab/dim (embedding), dim_attn (q), heads and buckets
    (relative bias [buckets, N]), dim_ffn (fc1), layers (block count). `max_distance` stays 128."""
    required = ("token_embedding.weight", "norm.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
                "blocks.0.pos_embedding.embedding.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise CheckpointError(f"UMT5 encoder weights are incomplete: missing {missing}; the file is "
                              "truncated or is not a UMT5 encoder")
    vocab, dim = sd["token_embedding.weight"].shape
    num_buckets, num_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if layers != list(range(len(layers))):
        raise CheckpointError(f"UMT5 encoder blocks are not numbered 0..N-1: got {layers}")
    no_bias = [i for i in layers if f"blocks.{i}.pos_embedding.embedding.weight" not in sd]
    if no_bias:
        raise CheckpointError(f"blocks {no_bias[:4]} have no relative-position bias: this is a T5 v1.1 "
                              "encoder (one shared bias, e.g. t5xxl for Flux/SD3), not UMT5; "
                              "use umt5_xxl_*.safetensors")
    return UMT5Config(vocab_size=int(vocab), dim=int(dim),
                      dim_attn=int(sd["blocks.0.attn.q.weight"].shape[0]),
                      dim_ffn=int(sd["blocks.0.ffn.fc1.weight"].shape[0]), num_heads=int(num_heads),
                      num_layers=len(layers), num_buckets=int(num_buckets), text_len=text_len)


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def read_t5_state_dict(path: PathLike, *, dtype: torch.dtype | None = None
                       ) -> tuple[dict[str, torch.Tensor], bytes | None]:
    """Read a UMT5 encoder file in any supported layout -> (official-key state dict, embedded spiece bytes).

    Files: `.pth`/`.pt` (official, memory-mapped pickle), `.safetensors` (ComfyUI, fp16/bf16/fp8
    scaled), `.gguf` (llama.cpp layout, decoded here), sharded folders/indexes. Tensors are cast
    to `dtype` one by one while reading (quantised ones decoded to it, or to float32).
    """
    raw, spiece = read_t5_raw_state_dict(path)
    sd = {}
    for key in list(raw):
        value = raw.pop(key)
        if isinstance(value, QuantizedTensor):
            value = value.dequantise(dtype or torch.float32)
        elif dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        sd[key] = value
    return sd, spiece


def read_t5_raw_state_dict(path: PathLike) -> tuple[dict[str, TensorLike], bytes | None]:
    """(official-key tensors as stored: fp8 and GGUF values as `QuantizedTensor`s, spiece bytes)."""
    if is_gguf(path):  # one pass over the file: the gguf reader parses all metadata on opening (slow for a vocabulary)
        found = read_gguf(path)
        raw, spiece = dict(found.tensors), spiece_from_fields(found.fields)
    else:
        raw = read_raw_state_dict(path, strip_prefixes=())
        spiece_keys = [k for k in raw if k == SPIECE_TENSOR_KEY or k.endswith("." + SPIECE_TENSOR_KEY)]
        spiece = raw.pop(spiece_keys[0]).numpy().tobytes() if spiece_keys else None
    sd, layout = _select_encoder(raw, str(path))
    if layout == "hf":
        sd = hf_to_official(sd)
    elif layout == "gguf":
        sd = gguf_to_official(sd)
    logger.info("read UMT5 encoder %s (%s layout, %d tensors%s)", path, layout, len(sd),
                ", embedded tokenizer" if spiece else "")
    return sd, spiece


def load_umt5_encoder(path: PathLike, *, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.bfloat16, storage: str = DEFAULT_STORAGE) -> UMT5Encoder:
    """Build a `UMT5Encoder` from a checkpoint without a random init or a float32 staging copy."""
    sd, _ = read_t5_raw_state_dict(path)
    return _encoder_from_state_dict(sd, device=device, dtype=dtype, storage=storage, source=str(path))


def _encoder_from_state_dict(sd: dict[str, TensorLike], *, device: torch.device | str, dtype: torch.dtype,
                             storage: str, source: str) -> UMT5Encoder:
    """Build the encoder from official-key tensors as stored; `storage` as for the DiT
    (`runtime/compact.py`): a GGUF file stays quantised under `default`; fp8 matmul is DiT-only."""
    if storage not in WEIGHT_STORAGES or storage == FP8_MATMUL_STORAGE:
        allowed = [s for s in WEIGHT_STORAGES if s != FP8_MATMUL_STORAGE]
        raise ValueError(f"text encoder weight storage must be one of {allowed}; got {storage!r} "
                         "(fp8 matmul is a DiT option)")
    config = detect_t5_config({k: torch.empty(v.shape, device="meta") for k, v in sd.items()})
    if storage == DEFAULT_STORAGE and any(isinstance(v, QuantizedTensor) and isinstance(v.format, GGUFQuant)
                                          for v in sd.values()):
        storage = STORED_STORAGE
    with torch.device("meta"):
        encoder = UMT5Encoder(config)
    plain, compact = split_for_storage(sd, block_matrix_names(encoder), storage, compute_dtype=dtype)
    sd.clear()
    for key in list(plain):
        plain[key] = plain[key].to(device=device)  # one tensor at a time
    placeholders = {k: torch.empty(v.shape, device="meta") for k, v in compact.items()}
    try:
        encoder.load_state_dict({**plain, **placeholders}, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source} does not match a UMT5 encoder of detected config {config}: "
                              f"{str(e).splitlines()[0]}") from e
    if compact:
        compact_weights(encoder, compact, compute_dtype=dtype)
        encoder.to(device)
    return encoder.eval().requires_grad_(False)


def load_text_encoder(path: PathLike, *, tokenizer_path: PathLike | None = None,
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                      text_len: int = DEFAULT_TEXT_LEN, storage: str = DEFAULT_STORAGE) -> TextEncoder:
    """Load encoder weights and find the tokenizer (padding prompts to `text_len`, 512 as in Wan).

    Tokenizer, first found: `tokenizer_path`; the `spiece_model` tensor embedded in the file
    (ComfyUI); next to the file (`google/umt5-xxl/spiece.model` etc., the official release).
    Raises FileNotFoundError naming every place it looked.
    """
    sd, spiece = read_t5_raw_state_dict(path)
    if tokenizer_path is not None:
        tokenizer = WanTokenizer.from_path(tokenizer_path, text_len=text_len)
    elif spiece is not None:
        where = "tokenizer.ggml metadata" if is_gguf(path) else SPIECE_TENSOR_KEY
        tokenizer = WanTokenizer.from_spiece_bytes(spiece, text_len=text_len, source=f"{path}:{where}")
    else:
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        found = find_spiece_model(folder)
        if found is None:
            raise FileNotFoundError(f"no tokenizer for {path}: it has no embedded '{SPIECE_TENSOR_KEY}' "
                                    f"tensor and none of {searched_places(folder)} exists; pass "
                                    f"tokenizer_path (the {TOKENIZER_SUBFOLDER} folder of the official "
                                    "release or its spiece.model)")
        tokenizer = WanTokenizer.from_path(found, text_len=text_len)
    encoder = _encoder_from_state_dict(sd, device=device, dtype=dtype, storage=storage, source=str(path))
    logger.info("loaded UMT5 encoder %s (%d layers, dim %d, %s, storage %s) on %s; tokenizer %s", path,
                encoder.config.num_layers, encoder.config.dim, dtype, storage, device, tokenizer.source)
    return TextEncoder(encoder, tokenizer, device=device)


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------
def save_text_encoder(encoder_or_sd: UMT5Encoder | dict[str, torch.Tensor], path: PathLike, *,
                      spiece_bytes: bytes | None = None, layout: str = "comfy",
                      dtype: torch.dtype = torch.bfloat16, fp8_scaled: bool = False,
                      gguf_type: str = "Q8_0") -> Path:
    """Write a UMT5 encoder (a model, or a state dict in either layout) in ComfyUI's, the official or
    llama.cpp's GGUF layout.

    - "comfy": Hugging Face keys in a `.safetensors`; `spiece_bytes` go in as the uint8 `spiece_model` tensor.
    - "official": official keys, `.pth` (torch.save) or `.safetensors` by suffix; `spiece_bytes` are
      written to `<folder>/google/umt5-xxl/spiece.model` as in the official release.
    - "gguf": a `.gguf` file of type `gguf_type` (`gguf.GGUF_RECIPES`: the linears and the token
      embedding quantised), the tokenizer as `tokenizer.ggml.*` metadata.
    - `fp8_scaled`: linear weights in float8 e4m3fn with `<name>.scale_weight` and a `scaled_fp8`
      marker, as ComfyUI's fp8-scaled files; embeddings and norms stay in `dtype`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    target = Path(path)
    sd = encoder_or_sd.state_dict() if isinstance(encoder_or_sd, nn.Module) else dict(encoder_or_sd)
    if _HF_ANCHOR in sd:
        sd = hf_to_official(sd)
    detect_t5_config(sd)  # refuses anything that is not a complete official-layout UMT5 encoder
    if layout == "gguf":
        return _save_gguf(sd, target, spiece_bytes, gguf_type)
    if layout == "comfy" and target.suffix != ".safetensors":
        raise ValueError(f"the comfy layout is a .safetensors file; got {target.name}")
    if target.suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(f"unsupported file type {target.suffix!r}; use .safetensors, .pth or .pt")
    out = official_to_hf(sd) if layout == "comfy" else sd
    out = {key: tensor.detach().cpu() for key, tensor in out.items()}
    if fp8_scaled:
        tensors = fp8_scaled_state_dict(out, is_quantised=_is_fp8_linear, dtype=dtype)
    else:
        tensors = {key: tensor.to(dtype) for key, tensor in out.items()}
    if spiece_bytes is not None and layout == "comfy":
        tensors[SPIECE_TENSOR_KEY] = torch.frombuffer(bytearray(spiece_bytes), dtype=torch.uint8).clone()
    if target.suffix == ".safetensors":
        write_safetensors(tensors, target)
    else:
        write_torch_file(tensors, target)
    if spiece_bytes is not None and layout == "official":
        folder = target.parent / TOKENIZER_SUBFOLDER
        with atomic_output(folder / "spiece.model") as tmp:
            tmp.write_bytes(spiece_bytes)
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(
            {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>", "pad_token": "<pad>",
             "unk_token": "<unk>"}, indent=1))
    logger.info("saved UMT5 encoder to %s (%s layout, %s%s)", target, layout, dtype,
                ", fp8 scaled" if fp8_scaled else "")
    return target
