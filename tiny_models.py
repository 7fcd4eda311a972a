"""`make-tiny-models`: tiny random-weight checkpoints in ComfyUI's real file layouts.

The files drop into a ComfyUI `models/` folder (DIR/diffusion_models, DIR/text_encoders, DIR/vae)
and are what the tiny workflows name. They are written by wan_core's own savers from the `.tiny()`
configs, so loading them exercises the same code paths as the real files: DiTs in the ComfyUI
single-file layout, the UMT5 encoder in the Hugging Face key layout with an embedded
`spiece_model`, both VAEs with the official key names. Weights are seeded: the same seed gives
byte-identical files.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
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

    def all_files(self) -> list[Path]:
        return [*self.dits.values(), self.text_encoder, *self.vaes.values()]


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


def make_tiny_models(root: str | Path, *, seed: int = 0, overwrite: bool = True) -> TinyModels:
    """Write every tiny checkpoint under `root/{diffusion_models,text_encoders,vae}`.

    Existing files are kept when `overwrite` is False (they were written by the same code).
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
    return TinyModels(root=root, dits=dits, text_encoder=t5_path, vaes=vaes)
