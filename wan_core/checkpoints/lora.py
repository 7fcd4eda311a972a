"""LoRA files for the Wan2.2 DiT: layout detection from the keys, one normalised patch set keyed by
the official parameter names, and checks against the model the LoRA is meant for.

Layouts (`config.LORA_LAYOUTS`, told from each key's prefix):

| layout | example key | made by |
| --- | --- | --- |
| kohya | `lora_unet_blocks_0_self_attn_q.lora_down.weight` (+ `.alpha`) | musubi-tuner, kohya (also |
|       | `lora_unet__...` (Wan-Fun), `lora_transformer_...`, `lycoris_...`) | |
| comfy | `diffusion_model.blocks.0.self_attn.q.lora_up.weight` | ComfyUI, Wan2.2-Lightning, LightX2V, |
|       | | ai-toolkit, diffusion-pipe |
| diffusers | `transformer.blocks.0.attn1.to_q.lora_A.weight` | diffusers `save_lora_weights` |
| peft | `base_model.model.blocks.0.self_attn.q.lora_A.weight` | PEFT `get_peft_model_state_dict` |
| bare | `blocks.0.self_attn.q.lora_down.weight` | early Lightning files, LightX2V internals |

Module names may be the official ones (`self_attn.q`, `ffn.0`, `head.head`, `modulation`) or
diffusers' (`attn1.to_q`, `ffn.net.0.proj`, `proj_out`, `scale_shift_table`) in any layout.
Per module `P` a file may hold:

- a low-rank pair: up/down as `lora_up`/`lora_down`, `lora_B`/`lora_A` (also `.default`, without
  `.weight`, `lora.up`, `_lora.up`, `lora_linear_layer.up`), and optionally `P.alpha`. The delta of
  `P.weight` is `(alpha / rank) * up @ down` with rank = down's first dim; without alpha the scale is
  1 (ComfyUI's rule), or PEFT's `lora_alpha / r` (`/ sqrt(r)` with rsLoRA) when the file's
  `lora_adapter_metadata` gives it (diffusers). alpha 0 means "no alpha" (kohya, LightX2V).
  Conv3d weights (`patch_embedding`) use the flattened matrices, as ComfyUI does.
- full deltas: `P.diff` (of `P.weight`, or of parameter `P` itself such as `blocks.N.modulation`),
  `P.diff_b` (of `P.bias`; PEFT's `lora_B.bias` means the same) and LightX2V's `P.diff_m` (of
  `P.modulation`: `blocks.N.diff_m`, `head.diff_m`). ComfyUI drops `diff_m`; this pack applies it,
  as LightX2V and kijai's wrapper do: the file says the distilled model's modulation differs.

Keys of Wan2.1's image conditioning (`k_img`, `v_img`, `norm_k_img`, `img_emb`), which Wan2.2 has
no module for, are counted apart and skipped (LightX2V's I2V distill LoRAs carry them). DoRA,
LoHa, LoKr, OFT and `set_weight` entries are refused (their arithmetic is not implemented here).

Checks (`read_lora`): every tensor that names a model parameter must fit its shape; the first
that does not is named with both shapes (a LoRA for another model size). Keys that match nothing
are counted and the first few listed; when fewer than `MIN_MATCHED_FRACTION` of the keys match,
the file is refused. `save_lora` writes a patch set in any layout (the tiny-model tool uses it).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import LORA_LAYOUTS
from ..errors import CheckpointError
from .dit import dit_key_from_diffusers, dit_key_to_diffusers
from .io import PathLike, read_safetensors_metadata, read_state_dict, write_safetensors

MIN_MATCHED_FRACTION = 0.9
NUM_LISTED_KEYS = 5
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers stores the PEFT config here (JSON)
LORA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (key suffix, role), longest spellings first so that `.lora_B.default.weight` is not read as `.weight`.
_SUFFIXES = (
    (".lora_up.weight", "up"), (".lora_down.weight", "down"),
    (".lora_B.default.weight", "up"), (".lora_A.default.weight", "down"),
    (".lora_linear_layer.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
    (".lora_B.weight", "up"), (".lora_A.weight", "down"),
    (".lora.up.weight", "up"), (".lora.down.weight", "down"),
    ("_lora.up.weight", "up"), ("_lora.down.weight", "down"),
    (".lora_B.bias", "diff_b"), (".lora_B", "up"), (".lora_A", "down"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff_m", "diff_m"), (".diff", "diff"),
)
_UNSUPPORTED = {  # key fragment -> what it is
    ".dora_scale": "DoRA", ".lora_mid.": "LoCon mid (Tucker)", ".hada_": "LoHa", ".lokr_": "LoKr",
    ".oft_": "OFT", ".set_weight": "set_weight", ".w_norm": "w_norm", ".b_norm": "b_norm",
    ".reshape_weight": "reshape_weight",
}
# (prefix, layout); dotted prefixes are stripped repeatedly (`base_model.model.transformer.`).
_DOTTED_PREFIXES = (("model.diffusion_model.", "comfy"), ("diffusion_model.", "comfy"),
                    ("transformer.", "diffusers"), ("base_model.model.", "peft"))
_UNDERSCORE_PREFIXES = ("lora_unet__", "lora_unet_", "lora_transformer_", "lycoris_")
_IMAGE_FRAGMENTS = ("img_emb", "k_img", "v_img", "image_embedder", "add_k_proj", "add_v_proj", "norm_added_k")
_PAIR_NAMES = {"lora_up": (".lora_up.weight", ".lora_down.weight"), "lora_B": (".lora_B.weight", ".lora_A.weight")}


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class LoraPair:
    """One low-rank update: delta = scale * up.flatten(1) @ down.flatten(1), reshaped to the weight.

    Shapes: up (out, r, ...), down (r, in, ...) in the file's dtype (kept on the CPU).
    """

    up: torch.Tensor
    down: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class LoraTerms:
    """Everything one LoRA file adds to one parameter: low-rank pairs and full deltas (summed)."""

    pairs: tuple[LoraPair, ...] = ()
    diffs: tuple[torch.Tensor, ...] = ()


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class LoraFile:
    """A LoRA file read and matched against a model: `targets` maps official parameter names
    (`blocks.0.self_attn.q.weight`) to what the file adds to them."""

    name: str
    layout: str
    kinds: tuple[str, ...]  # what the file holds: "lora_up/lora_down", "lora_A/lora_B", "diff", ...
    targets: Mapping[str, LoraTerms]
    num_keys: int
    num_matched: int
    unmatched: tuple[str, ...]
    num_image_keys: int  # Wan2.1 image-conditioning keys, skipped
    dtype: str

    def summary(self, prefix: str = "") -> str:
        """'file.safetensors (<prefix>comfy: lora_up/lora_down, diff; 1200 of 1200 keys)'."""
        skipped = f", {self.num_image_keys} Wan2.1 image keys skipped" if self.num_image_keys else ""
        return (f"{self.name} ({prefix}{self.layout}: {', '.join(self.kinds)}; {self.num_matched} of "
                f"{self.num_keys - self.num_image_keys} keys{skipped})")


@dataclass
class _Module:
    """What the file says about one module path while it is being read."""

    pair: dict[str, tuple[str, torch.Tensor]]  # role ("up", "down", "alpha") -> (key, tensor)
    deltas: list[tuple[str, str, torch.Tensor]]  # (role, key, tensor)


def param_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a model (what `read_lora` matches a file against)."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def read_lora(path: PathLike, params: Mapping[str, Sequence[int]], *,
              min_matched: float = MIN_MATCHED_FRACTION) -> LoraFile:
    """Read a LoRA file (.safetensors or a tensors-only .pt/.pth) and match it to a model.

    `params` maps the model's official parameter names to their shapes (`param_shapes(model)`).
    Raises `CheckpointError` for a missing or corrupt file, an unsupported adapter kind, a tensor that
    does not fit the model (named with both shapes), an incomplete pair, or fewer than `min_matched`
    of the keys matching the model.
    """
    file = Path(path)
    sd = read_state_dict(file, strip_prefixes=())
    if not sd:
        raise CheckpointError(f"LoRA file {file.name} holds no tensors; re-download it")
    _refuse_unsupported(file.name, sd)
    names = _NameMap(params)
    modules: dict[str, _Module] = {}
    unmatched: list[str] = []
    layouts: dict[str, int] = {}
    num_image = 0
    for key in sorted(sd):
        role, stem = _split_suffix(key)
        layout, path_ = _strip_prefix(stem) if role is not None else (None, None)
        if role is None or path_ is None:
            unmatched.append(key)
            continue
        if any(fragment in path_ for fragment in _IMAGE_FRAGMENTS):
            num_image += 1
            continue
        module = names.module(path_, underscored=layout == "kohya")
        if module is None:
            unmatched.append(key)
            continue
        layouts[layout] = layouts.get(layout, 0) + 1
        entry = modules.setdefault(module, _Module(pair={}, deltas=[]))
        if role in ("up", "down", "alpha"):
            if role in entry.pair:
                raise CheckpointError(f"LoRA file {file.name} gives {role} of module {module!r} twice "
                                      f"({entry.pair[role][0]!r} and {key!r}); the file mixes two LoRAs")
            entry.pair[role] = (key, sd[key])
        else:
            entry.deltas.append((role, key, sd[key]))
    scale_of = _peft_scale(file)
    targets, matched, kinds, orphans = _build_targets(file.name, modules, names, scale_of)
    unmatched += orphans
    _check_match(file.name, len(sd), num_image, matched, unmatched, min_matched)
    layout = max(layouts, key=layouts.get) if layouts else LORA_LAYOUTS[1]
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in sd.values()})
    return LoraFile(name=file.name, layout=layout, kinds=tuple(kinds), targets=targets, num_keys=len(sd),
                    num_matched=matched, unmatched=tuple(unmatched), num_image_keys=num_image,
                    dtype="/".join(dtypes))


def _refuse_unsupported(name: str, sd: Mapping[str, torch.Tensor]) -> None:
    for key, tensor in sd.items():
        for fragment, what in _UNSUPPORTED.items():
            if fragment in key:
                raise CheckpointError(f"LoRA file {name} holds {what} entries (e.g. {key!r}), which this pack "
                                      "does not apply; use a plain LoRA (lora_up/lora_down or lora_A/lora_B, "
                                      "with optional .alpha, .diff, .diff_b, .diff_m)")
        if not tensor.is_floating_point() or tensor.dtype not in LORA_DTYPES:
            raise CheckpointError(f"LoRA file {name}: tensor {key!r} is {tensor.dtype}; expected "
                                  f"{[str(d).removeprefix('torch.') for d in LORA_DTYPES]}; the file is "
                                  "corrupt or not a LoRA")


def _split_suffix(key: str) -> tuple[str | None, str]:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return role, key[: -len(suffix)]
    return None, key


def _strip_prefix(stem: str) -> tuple[str, str | None]:
    """(layout, module path with dots or kohya underscores) of a key stem."""
    for prefix in _UNDERSCORE_PREFIXES:
        if stem.startswith(prefix):
            return "kohya", stem[len(prefix):]
    layout = None
    stripped = True
    while stripped:
        stripped = False
        for prefix, name in _DOTTED_PREFIXES:
            if stem.startswith(prefix):
                stem, layout, stripped = stem[len(prefix):], layout or name, True
    return layout or "bare", stem


class _NameMap:
    """Official parameter names, their module paths, and the reverse of kohya's underscored names."""

    def __init__(self, params: Mapping[str, Sequence[int]]) -> None:
        self.shapes = {name: tuple(int(s) for s in shape) for name, shape in params.items()}
        paths: set[str] = set()
        for name in self.shapes:
            parts = name.split(".")
            paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        self.paths = paths
        underscored: dict[str, str | None] = {}
        for path in paths:
            for spelling in (path, dit_key_to_diffusers(path + ".")[:-1]):
                flat = spelling.replace(".", "_")
                underscored[flat] = path if underscored.get(flat, path) == path else None  # None: ambiguous
        self.underscored = underscored

    def module(self, stem: str, *, underscored: bool) -> str | None:
        """The official module (or parameter) path a key stem names, or None."""
        if underscored:
            return self.underscored.get(stem)
        if stem in self.paths:
            return stem
        official = dit_key_from_diffusers(stem + ".")[:-1]
        return official if official in self.paths else None


def _peft_scale(file: Path) -> dict[str, float]:
    """`{"alpha": lora_alpha, "rslora": 0 or 1}` from diffusers' PEFT metadata, or {} (no metadata)."""
    if file.suffix != ".safetensors":
        return {}
    raw = read_safetensors_metadata(file).get(PEFT_METADATA_KEY)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"LoRA file {file.name}: its '{PEFT_METADATA_KEY}' metadata is not JSON ({e})") from e
    alpha = next((v for k, v in meta.items() if k.split(".")[-1] == "lora_alpha"), None)
    patterns = [k for k, v in meta.items() if k.split(".")[-1] in ("alpha_pattern", "rank_pattern") and v]
    if patterns:
        raise CheckpointError(f"LoRA file {file.name} sets per-module ranks or alphas ({patterns}); only one "
                              "lora_alpha for all modules is supported")
    rslora = any(v for k, v in meta.items() if k.split(".")[-1] == "use_rslora")
    return {} if alpha is None else {"alpha": float(alpha), "rslora": float(rslora)}


def _pair_scale(alpha: torch.Tensor | None, rank: int, peft: Mapping[str, float]) -> float:
    value = None if alpha is None else float(alpha.float().reshape(-1)[0])
    if value:  # an alpha tensor (0 means none, as kohya and LightX2V read it)
        return value / rank
    if peft:
        return peft["alpha"] / (math.sqrt(rank) if peft["rslora"] else rank)
    return 1.0


def _build_targets(name: str, modules: Mapping[str, _Module], names: _NameMap, peft: Mapping[str, float]
                   ) -> tuple[dict[str, LoraTerms], int, list[str], list[str]]:
    """(parameter -> terms, matched key count, kinds, orphan keys), checking every shape."""
    targets: dict[str, LoraTerms] = {}
    kinds: dict[str, None] = {}
    orphans: list[str] = []
    matched = 0
    for module, entry in modules.items():
        pairs: list[LoraPair] = []
        if "up" in entry.pair or "down" in entry.pair:
            pair = _pair(name, module, entry.pair, names, peft)
            pairs.append(pair)
            matched += len(entry.pair)
            up_key = entry.pair["up"][0]
            kinds["lora_A/lora_B" if "lora_B" in up_key else "lora_up/lora_down"] = None
            _add(targets, module + ".weight", pairs=(pair,))
        elif "alpha" in entry.pair:
            orphans.append(entry.pair["alpha"][0])
        for role, key, tensor in entry.deltas:
            param = _delta_target(role, module, names)
            if param is None:
                orphans.append(key)
                continue
            _check_shape(name, key, tuple(tensor.shape), param, names.shapes[param])
            _add(targets, param, diffs=(tensor,))
            kinds[role] = None
            matched += 1
    order = ("lora_up/lora_down", "lora_A/lora_B", "diff", "diff_b", "diff_m")
    return targets, matched, sorted(kinds, key=order.index), orphans


def _pair(name: str, module: str, pair: Mapping[str, tuple[str, torch.Tensor]], names: _NameMap,
          peft: Mapping[str, float]) -> LoraPair:
    if "up" not in pair or "down" not in pair:
        have, missing = ("up", "down") if "up" in pair else ("down", "up")
        raise CheckpointError(f"LoRA file {name} has {pair[have][0]!r} but no {missing} matrix for module "
                              f"{module!r}; the file is incomplete or corrupt: re-download it")
    (up_key, up), (down_key, down) = pair["up"], pair["down"]
    param = module + ".weight"
    if param not in names.shapes:
        raise CheckpointError(f"LoRA file {name}: {up_key!r} targets {module!r}, which has no weight in this "
                              "model; the LoRA was made for another model")
    shape = names.shapes[param]
    up2, down2 = up.flatten(1).shape, down.flatten(1).shape
    if up2[1] != down2[0]:
        raise CheckpointError(f"LoRA file {name}: {up_key!r} {tuple(up.shape)} and {down_key!r} "
                              f"{tuple(down.shape)} have different ranks ({up2[1]} vs {down2[0]}); the file is "
                              "corrupt: re-download it")
    if up2[0] != shape[0]:
        _check_shape(name, up_key, tuple(up.shape), param, shape, expected=f"({shape[0]}, rank)")
    if down2[1] != math.prod(shape[1:]):
        _check_shape(name, down_key, tuple(down.shape), param, shape,
                     expected=f"(rank, {', '.join(str(s) for s in shape[1:])})")
    alpha = pair.get("alpha", (None, None))[1]
    return LoraPair(up=up, down=down, scale=_pair_scale(alpha, int(down2[0]), peft))


def _delta_target(role: str, module: str, names: _NameMap) -> str | None:
    if role == "diff_m":
        candidates = [module + ".modulation"]
    elif role == "diff_b":
        candidates = [module + ".bias"]
    else:
        candidates = [module + ".weight", module]
    return next((c for c in candidates if c in names.shapes), None)


def _check_shape(name: str, key: str, got: tuple[int, ...], param: str, shape: tuple[int, ...], *,
                 expected: str | None = None) -> None:
    if expected is None and got == shape:
        return
    raise CheckpointError(
        f"LoRA file {name} does not fit this model: tensor {key!r} has shape {got}, but the model's {param} "
        f"is {shape}{'' if expected is None else f' (expected {expected})'}. The LoRA was made for another "
        "model (e.g. Wan2.1 1.3B, TI2V-5B or another width); pick a LoRA made for this task and size")


def _add(targets: dict[str, LoraTerms], param: str, *, pairs: tuple[LoraPair, ...] = (),
         diffs: tuple[torch.Tensor, ...] = ()) -> None:
    old = targets.get(param, LoraTerms())
    targets[param] = LoraTerms(pairs=old.pairs + pairs, diffs=old.diffs + diffs)


def _check_match(name: str, num_keys: int, num_image: int, matched: int, unmatched: Sequence[str],
                 min_matched: float) -> None:
    considered = num_keys - num_image
    if considered == 0:
        raise CheckpointError(f"LoRA file {name} holds only Wan2.1 image-conditioning keys, which Wan2.2 has no "
                              "module for; it changes nothing")
    if matched / considered >= min_matched:
        return
    listed = ", ".join(repr(k) for k in unmatched[:NUM_LISTED_KEYS])
    raise CheckpointError(
        f"LoRA file {name}: only {matched} of its {considered} keys match this model's parameters "
        f"({len(unmatched)} match nothing, e.g. {listed}); at least {min_matched:.0%} must match. It is "
        f"a LoRA for another model or a key layout this pack does not read (known: {', '.join(LORA_LAYOUTS)})")


# --------------------------------------------------------------------------------------------
# Writing (tiny test files and conversions)
# --------------------------------------------------------------------------------------------
def save_lora(targets: Mapping[str, LoraTerms], path: PathLike, *, layout: str = "comfy",
              pair_names: str = "lora_up", dtype: torch.dtype = torch.float32,
              write_alpha: bool = True) -> Path:
    """Write a patch set (official parameter names) as a LoRA file in `layout` (`LORA_LAYOUTS`).

    Pairs are written as `pair_names` "lora_up" (lora_up/lora_down) or "lora_B" (lora_B/lora_A), with
    `alpha = scale * rank` when `write_alpha` (else the scale must be 1). Deltas are written as
    `.diff` / `.diff_b` / `.diff_m` (LightX2V's names); diffusers and kohya module names are used for
    those layouts. A parameter may carry at most one pair and one delta.
    """
    if layout not in LORA_LAYOUTS:
        raise ValueError(f"layout must be one of {LORA_LAYOUTS}; got {layout!r}")
    if pair_names not in _PAIR_NAMES:
        raise ValueError(f"pair_names must be one of {list(_PAIR_NAMES)}; got {pair_names!r}")
    up_suffix, down_suffix = _PAIR_NAMES[pair_names]
    out: dict[str, torch.Tensor] = {}
    for param, terms in targets.items():
        if len(terms.pairs) > 1 or len(terms.diffs) > 1:
            raise ValueError(f"{param}: save_lora writes one pair and one delta per parameter")
        module, leaf = param.rsplit(".", 1) if "." in param else ("", param)
        for pair in terms.pairs:
            stem = _key_stem(module, layout)
            out[stem + up_suffix] = pair.up.to(dtype)
            out[stem + down_suffix] = pair.down.to(dtype)
            if write_alpha:
                out[stem + ".alpha"] = torch.tensor(pair.scale * pair.rank, dtype=dtype)
            elif pair.scale != 1.0:
                raise ValueError(f"{param}: a pair with scale {pair.scale} needs write_alpha=True")
        for diff in terms.diffs:
            if leaf == "modulation":
                key = _key_stem(module, layout) + ".diff_m"
            else:
                key = _key_stem(module, layout) + (".diff_b" if leaf == "bias" else ".diff")
            out[key] = diff.to(dtype)
    target = Path(path)
    os.makedirs(target.parent, exist_ok=True)
    return write_safetensors(out, target)


def _key_stem(module: str, layout: str) -> str:
    if layout == "kohya":
        return "lora_unet_" + module.replace(".", "_")
    if layout == "diffusers":
        return "transformer." + dit_key_to_diffusers(module + ".")[:-1]
    prefix = {"comfy": "diffusion_model.", "peft": "base_model.model.", "bare": ""}[layout]
    return prefix + module
