"""Tiny model files ComfyUI's own loaders accept, for ComfyUI's native Wan2.2 graphs in the e2e tests.

Core's UNETLoader derives a Wan DiT's head count as dim // 128, its frequency width as 256 and its
text width as 4096 whatever the file holds, so the tiny DiTs here have dim 128 (one head), freq_dim
256 and text_dim 4096. Their text encoder is a UMT5 of width 4096 with one layer and one head
(core's CLIPLoader cannot build it: `native_pack` loads it through ComfyUI's own Wan text encoder
classes). Core's VAELoader reads the Wan2.1 VAE's width off the file (the pack's tiny Wan2.1 VAE
works), but builds the Wan2.2 VAE at full size: `full_size_wan22_vae` writes a full-size random one
(705 M parameters, 1.4 GB in fp16), cached under `.cache/e2e_models` because it takes a while.
The pack's own loaders read every one of these files too, so the same weights run in both runtimes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from wanbench.tiny_models import randomize
from wanbench.wan_core.checkpoints.dit import save_dit
from wanbench.wan_core.checkpoints.t5 import save_text_encoder
from wanbench.wan_core.checkpoints.vae import save_vae
from wanbench.wan_core.config import WAN22_VAE, DiTConfig, UMT5Config
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.t5 import UMT5Encoder
from wanbench.wan_core.tokenizer import train_tiny_spiece
from wanbench.wan_core.vae import WanVAE

log = logging.getLogger(__name__)

CORE_DIT_FILES = {
    "wanbench_core_tiny_ti2v_5B_fp16.safetensors": (48, 48),
    "wanbench_core_tiny_t2v_high_noise_14B_fp16.safetensors": (16, 16),
    "wanbench_core_tiny_t2v_low_noise_14B_fp16.safetensors": (16, 16),
}
CORE_TEXT_ENCODER = "wanbench_core_tiny_umt5_4096_fp16.safetensors"
FULL_WAN22_VAE = "wanbench_random_full_size_wan2.2_vae_fp16.safetensors"
TINY_WAN21_VAE = "wanbench_tiny_wan_2.1_vae.safetensors"  # written by `wanbench make-tiny-models`


def core_dit_config(in_dim: int, out_dim: int) -> DiTConfig:
    return DiTConfig(
        model_type="t2v",
        in_dim=in_dim,
        out_dim=out_dim,
        dim=128,
        ffn_dim=256,
        freq_dim=256,
        text_dim=4096,
        num_heads=1,
        num_layers=2,
    )


def core_text_encoder_config() -> UMT5Config:
    return UMT5Config(vocab_size=1024, dim=4096, dim_attn=64, dim_ffn=64, num_heads=1, num_layers=1)


def make_core_tiny_models(models_dir: Path, *, seed: int = 7) -> None:
    """Write the tiny DiTs and the text encoder into `models_dir/{diffusion_models,text_encoders}`."""
    for folder in ("diffusion_models", "text_encoders"):
        (models_dir / folder).mkdir(parents=True, exist_ok=True)
    for i, (name, (in_dim, out_dim)) in enumerate(CORE_DIT_FILES.items()):
        model = randomize(WanDiT(core_dit_config(in_dim, out_dim)), seed * 100 + i)
        save_dit(model, models_dir / "diffusion_models" / name, layout="comfy", dtype=torch.float16)
    config = core_text_encoder_config()
    encoder = randomize(UMT5Encoder(config), seed * 100 + 50)
    save_text_encoder(
        encoder,
        models_dir / "text_encoders" / CORE_TEXT_ENCODER,
        spiece_bytes=train_tiny_spiece(config.vocab_size),
        layout="comfy",
        dtype=torch.float16,
    )


def full_size_wan22_vae(cache_dir: Path, *, seed: int = 7) -> Path:
    """A full-size Wan2.2 VAE with random weights (cached: written once, then reused)."""
    path = cache_dir / FULL_WAN22_VAE
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        log.info("writing a full-size random Wan2.2 VAE to %s (once)", path)
        vae = randomize(WanVAE(WAN22_VAE), seed)
        save_vae(vae, path, layout="comfy", dtype=torch.float16)
        del vae
    return path
