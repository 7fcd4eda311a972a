"""`make-tiny-models`: tiny random-weight checkpoints in ComfyUI's real file layouts.

The files drop into a ComfyUI `models/` folder (DIR/diffusion_models, DIR/text_encoders, DIR/vae)
and are what the tiny workflows name. They are written by wan_core's own savers from the `.tiny()`
configs, so loading them exercises the same code paths as the real files: DiTs in the ComfyUI
single-file layout, the UMT5 encoder in the Hugging Face key layout with an embedded
`spiece_model`, both VAEs with the official key names. Weights are seeded: the same seed gives
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

from .nodes.comfy_bridge import FOLDER_DIT, FOLDER_TEXT_ENCODERS, FOLDER_VAE
from .wan_core.config import I2V_A14B, T2V_A14B, TI2V_5B, UMT5_XXL, WAN21_VAE, WAN22_VAE

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
class TinyModels:
    """Where `make_tiny_models` wrote each file."""

    root: Path
    dits: dict[str, Path]
    text_encoder: Path
    vaes: dict[str, Path]
    ggufs: dict[str, Path] = field(default_factory=dict)

    def all_files(self) -> list[Path]:
        return [*self.dits.values(), self.text_encoder, *self.vaes.values(), *self.ggufs.values()]


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
    folders = {name: root / name for name in (FOLDER_DIT, FOLDER_TEXT_ENCODERS, FOLDER_VAE)}
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
    ggufs = _write_ggufs(folders, seed, wanted) if gguf else {}
    return TinyModels(root=root, dits=dits, text_encoder=t5_path, vaes=vaes, ggufs=ggufs)


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
