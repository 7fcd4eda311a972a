"""`make-tiny-models`: tiny random-weight checkpoints in ComfyUI's real file layouts.

The files drop into a ComfyUI `models/` folder (DIR/diffusion_models, DIR/text_encoders, DIR/vae,
DIR/loras) and are what the tiny workflows name. They are written by wan_core's own savers from the
`.tiny()` configs, so loading them exercises the same code paths as the real files: DiTs in the
ComfyUI single-file layout, the UMT5 encoder in the Hugging Face key layout with an embedded
`spiece_model`, both VAEs with the official key names, and LoRAs for the tiny A14B experts: the
4-step distill pair of each task (high noise in LightX2V's extractor layout: bf16 pairs without
alpha plus `.diff`/`.diff_b`/`.diff_m`; low noise as the Lightning files: fp32 pairs with alpha)
and one LoRA per key layout (`TINY_LAYOUT_LORAS`). Weights are seeded: the same seed gives
byte-identical files.

With `gguf=True` (needs the `gguf` package) it also writes GGUF files as ComfyUI-GGUF users have
them: the tiny TI2V-5B DiT and the UMT5 encoder in Q8_0 (the very weights of the fp16 files,
quantised), and a TI2V-5B DiT widened to dim 256 in Q4_K_M, so that its rows are whole K-quant
blocks of 256 (the tiny dim of 64 is not: llama.cpp would keep such rows in F16).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .nodes.comfy_bridge import FOLDER_DIT, FOLDER_LORAS, FOLDER_TEXT_ENCODERS, FOLDER_VAE
from .wan_core.config import I2V_A14B, T2V_A14B, TI2V_5B, UMT5_XXL, WAN21_VAE, WAN22_VAE, WanConfig

log = logging.getLogger(__name__)

DIT_FILES = {
    "wanbench_tiny_ti2v_5B_fp16.safetensors": TI2V_5B,
    "wanbench_tiny_t2v_high_noise_14B_fp16.safetensors": T2V_A14B,
    "wanbench_tiny_t2v_low_noise_14B_fp16.safetensors": T2V_A14B,
    "wanbench_tiny_i2v_high_noise_14B_fp16.safetensors": I2V_A14B,
    "wanbench_tiny_i2v_low_noise_14B_fp16.safetensors": I2V_A14B,
}
TEXT_ENCODER_FILE = "wanbench_tiny_umt5_xxl_fp16.safetensors"
GGUF_DIT_FILE = "wanbench_tiny_ti2v_5B_Q8_0.gguf"  # same weights as the fp16 TI2V file
GGUF_KQUANT_DIT_FILE = "wanbench_tiny_ti2v_5B_d256_Q4_K_M.gguf"  # dim 256: rows of whole K-quant blocks
GGUF_TEXT_ENCODER_FILE = "wanbench_tiny_umt5_xxl_Q8_0.gguf"  # same weights as the fp16 encoder
KQUANT_DIT_DIM = 256
VAE_FILES = {
    "wanbench_tiny_wan2.2_vae.safetensors": WAN22_VAE,
    "wanbench_tiny_wan_2.1_vae.safetensors": WAN21_VAE,
}
WEIGHT_STD = 1.0  # weights ~ N(0, WEIGHT_STD^2 / fan_in): activations keep their scale through layers
BIAS_STD = 0.02


@dataclass(frozen=True)
class TinyLora:
    """How one tiny LoRA file is written (see `tiny_lora_targets` for the styles)."""

    task: WanConfig
    style: str  # "distill" | "lightning" | "full"
    layout: str  # config.LORA_LAYOUTS
    pair_names: str = "lora_up"  # "lora_up" (lora_up/lora_down) or "lora_B" (lora_B/lora_A)
    dtype: torch.dtype = torch.float32
    alpha: bool = True  # write `.alpha` (scale alpha / rank = 0.5); without it the scale is 1


LORA_RANK = 4
LORA_UP_STD = 0.3  # delta entries ~ LORA_UP_STD / sqrt(fan_in): a visible but tame change
LORA_DIFF_STD = 0.05
DISTILL_LORAS = {
    "wanbench_tiny_t2v_4steps_lora_high_noise.safetensors": TinyLora(
        task=T2V_A14B, style="distill", layout="comfy", dtype=torch.bfloat16, alpha=False),
    "wanbench_tiny_t2v_4steps_lora_low_noise.safetensors": TinyLora(task=T2V_A14B, style="lightning", layout="comfy"),
    "wanbench_tiny_i2v_4steps_lora_high_noise.safetensors": TinyLora(
        task=I2V_A14B, style="distill", layout="comfy", dtype=torch.bfloat16, alpha=False),
    "wanbench_tiny_i2v_4steps_lora_low_noise.safetensors": TinyLora(task=I2V_A14B, style="lightning", layout="comfy"),
}
TINY_LAYOUT_LORAS = {  # every key layout, each patching every parameter kind of the tiny T2V experts
    "wanbench_tiny_t2v_lora_kohya.safetensors": TinyLora(
        task=T2V_A14B, style="full", layout="kohya", dtype=torch.float16),
    "wanbench_tiny_t2v_lora_comfy_peft.safetensors": TinyLora(
        task=T2V_A14B, style="full", layout="comfy", pair_names="lora_B"),
    "wanbench_tiny_t2v_lora_diffusers.safetensors": TinyLora(
        task=T2V_A14B, style="full", layout="diffusers", pair_names="lora_B", dtype=torch.bfloat16, alpha=False),
    "wanbench_tiny_t2v_lora_peft.safetensors": TinyLora(
        task=T2V_A14B, style="full", layout="peft", pair_names="lora_B", alpha=False),
    "wanbench_tiny_t2v_lora_bare.safetensors": TinyLora(task=T2V_A14B, style="full", layout="bare"),
}
LORA_FILES = {**DISTILL_LORAS, **TINY_LAYOUT_LORAS}


@dataclass(frozen=True)
class TinyModels:
    """Where `make_tiny_models` wrote each file."""

    root: Path
    dits: dict[str, Path]
    text_encoder: Path
    vaes: dict[str, Path]
    loras: dict[str, Path]
    ggufs: dict[str, Path] = field(default_factory=dict)

    def all_files(self) -> list[Path]:
        return [*self.dits.values(), self.text_encoder, *self.vaes.values(), *self.loras.values(),
                *self.ggufs.values()]


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Seeded random weights for every parameter (norm scales 1, others scaled by fan-in)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and param.dim() == 1 or leaf == "gamma":
                param.fill_(1.0)
            elif param.dim() >= 2:
                fan_in = math.prod(param.shape[1:])
                values = torch.randn(param.shape, generator=generator) * (WEIGHT_STD / math.sqrt(fan_in))
                param.copy_(values)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * BIAS_STD)
    return module


def tiny_lora_targets(params: dict[str, tuple[int, ...]], style: str, *, seed: int, rank: int = LORA_RANK,
                      with_alpha: bool = True) -> dict[str, object]:
    """Seeded random LoRA content for a DiT's parameters (name -> shape): official name -> `LoraTerms`.

    Styles: "full" (a pair on every matrix and the patch Conv3d, a full delta on every other
    parameter: norms, biases, modulations), "distill" (LightX2V's extractor: pairs on the larger
    matrices, full deltas on the head matrix, the patch embedding, norms, biases and modulations),
    "lightning" (pairs on the transformer blocks' matrices only). Pair scales are alpha / rank with
    alpha = rank / 2 when `with_alpha`, else 1.
    """
    from .wan_core.checkpoints.lora import LoraPair, LoraTerms

    if style not in ("full", "distill", "lightning"):
        raise ValueError(f"style must be 'full', 'distill' or 'lightning'; got {style!r}")
    generator = torch.Generator().manual_seed(seed)

    def randn(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    scale = 0.5 if with_alpha else 1.0
    targets: dict[str, object] = {}
    for name, shape in sorted(params.items()):
        is_matrix = len(shape) >= 2 and name.endswith(".weight")
        in_block = name.startswith("blocks.")
        as_pair = is_matrix and (style == "full" or (style == "distill" and not name.startswith(
            ("head.", "patch_embedding."))) or (style == "lightning" and in_block))
        if as_pair:
            fan_in = math.prod(shape[1:])
            down = randn((rank, *shape[1:]) if len(shape) > 2 else (rank, fan_in), 1 / math.sqrt(fan_in))
            up = randn((shape[0], rank, *[1] * (len(shape) - 2)), LORA_UP_STD / math.sqrt(rank))
            targets[name] = LoraTerms(pairs=(LoraPair(up=up, down=down, scale=scale),))
        elif style != "lightning":
            targets[name] = LoraTerms(diffs=(randn(shape, LORA_DIFF_STD),))
    return targets


def write_tiny_lora(path: str | Path, spec: TinyLora, *, seed: int) -> Path:
    """Write one tiny LoRA for the tiny DiT of `spec.task`, in `spec.layout`."""
    from .wan_core.checkpoints.lora import save_lora
    from .wan_core.dit import WanDiT

    with torch.device("meta"):
        model = WanDiT(spec.task.dit.tiny())
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    targets = tiny_lora_targets(params, spec.style, seed=seed, with_alpha=spec.alpha)
    return save_lora(targets, path, layout=spec.layout, pair_names=spec.pair_names, dtype=spec.dtype,
                     write_alpha=spec.alpha)


def _seed_for(name: str, seed: int) -> int:
    return seed * 1000 + sum(ord(c) for c in name)  # stable per file, independent of write order


def make_tiny_models(root: str | Path, *, seed: int = 0, overwrite: bool = True, gguf: bool = False) -> TinyModels:
    """Write every tiny checkpoint under `root/{diffusion_models,text_encoders,vae}`.

    Existing files are kept when `overwrite` is False (they were written by the same code).
    `gguf` adds the GGUF files (module docstring).
    """
    from .wan_core.checkpoints.dit import save_dit
    from .wan_core.checkpoints.t5 import save_text_encoder
    from .wan_core.checkpoints.vae import save_vae
    from .wan_core.dit import WanDiT
    from .wan_core.t5 import UMT5Encoder
    from .wan_core.tokenizer import train_tiny_spiece
    from .wan_core.vae import WanVAE

    root = Path(root)
    folders = {name: root / name for name in (FOLDER_DIT, FOLDER_TEXT_ENCODERS, FOLDER_VAE, FOLDER_LORAS)}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)

    def wanted(path: Path) -> bool:
        return overwrite or not path.exists()

    dits: dict[str, Path] = {}
    for name, task in DIT_FILES.items():
        path = folders[FOLDER_DIT] / name
        if wanted(path):
            model = randomize(WanDiT(task.dit.tiny()), _seed_for(name, seed))
            save_dit(model, path, layout="comfy", dtype=torch.float16)
            log.info("wrote %s", path)
        dits[name] = path
    t5_path = folders[FOLDER_TEXT_ENCODERS] / TEXT_ENCODER_FILE
    if wanted(t5_path):
        t5_cfg = UMT5_XXL.tiny()
        encoder = randomize(UMT5Encoder(t5_cfg), _seed_for(TEXT_ENCODER_FILE, seed))
        save_text_encoder(
            encoder,
            t5_path,
            spiece_bytes=train_tiny_spiece(t5_cfg.vocab_size),
            layout="comfy",
            dtype=torch.float16,
        )
        log.info("wrote %s", t5_path)
    vaes: dict[str, Path] = {}
    for name, vae_cfg in VAE_FILES.items():
        path = folders[FOLDER_VAE] / name
        if wanted(path):
            vae = randomize(WanVAE(vae_cfg.tiny()), _seed_for(name, seed))
            save_vae(vae, path, layout="comfy", dtype=torch.float16)
            log.info("wrote %s", path)
        vaes[name] = path
    loras: dict[str, Path] = {}
    for name, spec in LORA_FILES.items():
        path = folders[FOLDER_LORAS] / name
        if wanted(path):
            write_tiny_lora(path, spec, seed=_seed_for(name, seed))
            log.info("wrote %s", path)
        loras[name] = path
    ggufs = _write_ggufs(folders, seed, wanted) if gguf else {}
    return TinyModels(root=root, dits=dits, text_encoder=t5_path, vaes=vaes, loras=loras, ggufs=ggufs)


def _write_ggufs(folders: dict[str, Path], seed: int, wanted: Callable[[Path], bool]) -> dict[str, Path]:
    from .wan_core.checkpoints.dit import save_dit
    from .wan_core.checkpoints.t5 import save_text_encoder
    from .wan_core.dit import WanDiT
    from .wan_core.t5 import UMT5Encoder
    from .wan_core.tokenizer import train_tiny_spiece

    fp16_name = next(n for n, task in DIT_FILES.items() if task is TI2V_5B)
    dit_cfg = TI2V_5B.dit.tiny()
    widened = replace(dit_cfg, dim=KQUANT_DIT_DIM, ffn_dim=2 * KQUANT_DIT_DIM)
    jobs = {
        folders[FOLDER_DIT] / GGUF_DIT_FILE: lambda path: save_dit(
            randomize(WanDiT(dit_cfg), _seed_for(fp16_name, seed)), path, layout="gguf", gguf_type="Q8_0"),
        folders[FOLDER_DIT] / GGUF_KQUANT_DIT_FILE: lambda path: save_dit(
            randomize(WanDiT(widened), _seed_for(GGUF_KQUANT_DIT_FILE, seed)), path, layout="gguf",
            gguf_type="Q4_K_M"),
        folders[FOLDER_TEXT_ENCODERS] / GGUF_TEXT_ENCODER_FILE: lambda path: save_text_encoder(
            randomize(UMT5Encoder(UMT5_XXL.tiny()), _seed_for(TEXT_ENCODER_FILE, seed)), path, layout="gguf",
            gguf_type="Q8_0", spiece_bytes=train_tiny_spiece(UMT5_XXL.tiny().vocab_size)),
    }
    for path, write in jobs.items():
        if wanted(path):
            write(path)
            log.info("wrote %s", path)
    return {path.name: path for path in jobs}
