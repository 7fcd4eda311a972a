"""VAE checkpoints: official / ComfyUI / diffusers key maps, config detection, loading and saving.

The official `.pth` and ComfyUI's safetensors use the module names of `wan_core.vae.WanVAE`
(ComfyUI files may put them under `vae.` or `first_stage_model.`); diffusers' `AutoencoderKLWan`
renames them (spec WAN_VAE section 8.2). `detect_vae_config` tells Wan2.1 from Wan2.2 and the
widths from key names and shapes (section 8.1).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ...util.atomic import atomic_write_text
from ..config import WAN21_VAE, WAN22_VAE, VAEConfig
from ..errors import CheckpointError
from ..vae import WanVAE
from ..vae_blocks import PIXEL_CHANNELS, is_residual_variant
from .io import DIFFUSERS_FILE_NAME, OFFICIAL_CONFIG_NAME, read_state_dict, write_safetensors, write_torch_file

logger = logging.getLogger(__name__)

VAE_MARKER_KEY = "decoder.middle.0.residual.0.gamma"
WAN22_MARKER_KEY = "decoder.upsamples.0.upsamples.0.residual.2.weight"
DIFFUSERS_MARKER_KEY = "post_quant_conv.weight"
VAE_PREFIXES = ("vae.", "first_stage_model.")
VAE_LAYOUTS = ("comfy", "official", "diffusers")

# Official -> diffusers renames (spec WAN_VAE section 8.2), applied after the block prefix is mapped.
_TOP_TO_DIFFUSERS = (
    ("encoder.conv1.", "encoder.conv_in."),
    ("decoder.conv1.", "decoder.conv_in."),
    ("conv1.", "quant_conv."),
    ("conv2.", "post_quant_conv."),
)
_PART_TO_DIFFUSERS = (
    ("middle.0.", "mid_block.resnets.0."),
    ("middle.2.", "mid_block.resnets.1."),
    ("middle.1.", "mid_block.attentions.0."),
    ("head.0.", "norm_out."),
    ("head.2.", "conv_out."),
)
_RESIDUAL_TO_DIFFUSERS = (
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)


def _swap_prefix(key: str, table: tuple[tuple[str, str], ...]) -> str:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def diffusers_key(key: str, config: VAEConfig) -> str:
    """One official/ComfyUI key -> its diffusers `AutoencoderKLWan` name (spec WAN_VAE 8.2)."""
    top = _swap_prefix(key, _TOP_TO_DIFFUSERS)
    if top != key:
        return top
    side, rest = key.split(".", 1)
    rest = _swap_prefix(rest, _PART_TO_DIFFUSERS)
    parts = rest.split(".")
    if parts[0] in ("downsamples", "upsamples"):
        kind = parts[0][: -len("samples")]  # "down" | "up"
        num_res = config.num_res_blocks + (0 if kind == "down" else 1)
        if is_residual_variant(config):  # <kind>samples.i.<kind>samples.j.<tail>
            stage, j, tail = int(parts[1]), int(parts[3]), parts[4:]
            sampler = f"{kind}sampler"
        elif kind == "down":  # Wan2.1 encoder: one flat list in both layouts
            stage, j, tail = int(parts[1]), None, parts[2:]
            sampler = ""
        else:  # Wan2.1 decoder: flat list of stages of num_res res blocks + 1 upsampler
            stage, j, tail = divmod(int(parts[1]), num_res + 1) + (parts[2:],)
            sampler = "upsamplers.0"
        block = f"{kind}_blocks.{stage}"
        if j is not None:
            block += f".resnets.{j}" if j < num_res else f".{sampler}"
        rest = ".".join([block, *tail])
    for old, new in _RESIDUAL_TO_DIFFUSERS:
        rest = rest.replace("." + old, "." + new)
    return f"{side}.{rest}"


def official_keys(config: VAEConfig) -> list[str]:
    """Every state-dict key of a VAE with this config (official / ComfyUI names)."""
    return list(WanVAE(config, device="meta").state_dict().keys())


def to_diffusers(sd: dict[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """Official / ComfyUI state dict -> diffusers `AutoencoderKLWan` names."""
    return {diffusers_key(k, config): v for k, v in sd.items()}


def from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers `AutoencoderKLWan` state dict -> official names (unknown keys are kept as they are)."""
    config = _detect_from_diffusers(sd)
    names = {diffusers_key(k, config): k for k in official_keys(config)}
    return {names.get(k, k): v for k, v in sd.items()}


def _detect_from_diffusers(sd: dict[str, torch.Tensor]) -> VAEConfig:
    for key in ("encoder.conv_in.weight", "decoder.conv_in.weight", "post_quant_conv.weight"):
        if key not in sd:
            raise CheckpointError(
                f"diffusers AutoencoderKLWan checkpoint without {key!r}; the file is incomplete "
                "or not a Wan VAE"
            )
    residual = any(k.startswith("decoder.up_blocks.0.upsampler.") for k in sd)
    official = {
        "encoder.conv1.weight": sd["encoder.conv_in.weight"],
        "conv2.weight": sd["post_quant_conv.weight"],
        "decoder.conv1.weight": sd["decoder.conv_in.weight"],
        VAE_MARKER_KEY: sd["encoder.conv_in.weight"],
    }
    if residual:
        official[WAN22_MARKER_KEY] = sd["encoder.conv_in.weight"]
    return detect_vae_config(official)


def detect_vae_config(sd: dict[str, torch.Tensor]) -> VAEConfig:
    """Config from tensor names and shapes (official / ComfyUI names; spec WAN_VAE 8.1).

    Wan2.2 if `decoder.upsamples.0.upsamples.0.residual.2.weight` exists, else Wan2.1; widths from
    `encoder.conv1`, `conv2` and `decoder.conv1`. Raises `CheckpointError` for anything else.
    """
    needed = (VAE_MARKER_KEY, "encoder.conv1.weight", "conv2.weight", "decoder.conv1.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        sample = sorted(sd)[:4]
        raise CheckpointError(
            f"not a Wan2.1/Wan2.2 VAE checkpoint: missing {missing} (its keys start {sample}); "
            "load wan_2.1_vae / wan2.2_vae (.safetensors or the official .pth)"
        )
    base = WAN22_VAE if WAN22_MARKER_KEY in sd else WAN21_VAE
    dim, pixel_channels = sd["encoder.conv1.weight"].shape[:2]
    z_dim = sd["conv2.weight"].shape[0]
    dec_width = sd["decoder.conv1.weight"].shape[0]
    expected_pixels = PIXEL_CHANNELS * base.patch_size**2
    if z_dim != base.z_dim or pixel_channels != expected_pixels or dec_width % base.dim_mult[-1]:
        raise CheckpointError(
            f"checkpoint looks like a {base.variant} VAE by its keys but has z={z_dim} latent "
            f"channels and {pixel_channels} pixel channels; the {base.variant} VAE has "
            f"z={base.z_dim} and {expected_pixels}. It is another model's VAE; use "
            "wan_2.1_vae or wan2.2_vae"
        )
    return replace(base, dim=int(dim), dec_dim=int(dec_width) // base.dim_mult[-1])


def load_vae_state_dict(model: WanVAE, sd: dict[str, torch.Tensor]) -> None:
    """Load official-named weights into `model`, naming every missing, extra or mis-shaped tensor."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: {tuple(sd[k].shape)} != {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint does not fit the {model.config.variant} VAE (dim {model.config.dim}): "
            f"{len(missing)} missing {missing[:4]}, {len(unexpected)} unexpected "
            f"{unexpected[:4]}, wrong shapes {shapes[:4]}; the file is not a Wan VAE or is damaged"
        )
    model.load_state_dict(sd, strict=True, assign=model.device.type == "meta")


def load_vae(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> WanVAE:
    """Load a Wan2.1 or Wan2.2 VAE: official `.pth`, ComfyUI safetensors (optional `vae.` /
    `first_stage_model.` prefix) or a diffusers `AutoencoderKLWan` file or folder."""
    sd = read_state_dict(path, dtype=dtype, strip_prefixes=VAE_PREFIXES)
    if DIFFUSERS_MARKER_KEY in sd:
        sd = from_diffusers(sd)
    config = detect_vae_config(sd)
    model = WanVAE(config, device="meta")
    load_vae_state_dict(model, sd)
    logger.info(
        "loaded %s VAE (dim %d, dec_dim %d) from %s", config.variant, config.dim, config.dec_dim, path
    )
    return model.to(device=device, dtype=dtype)


def save_vae(
    model_or_sd: WanVAE | dict[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    layout: str = "comfy",
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a VAE: "comfy" = one safetensors file with official names; "official" = a `.pth` state
    dict; "diffusers" = a folder with `diffusion_pytorch_model.safetensors` and config.json (or one
    file if `path` ends in .safetensors). Files are written atomically. Returns what was written."""
    if layout not in VAE_LAYOUTS:
        raise ValueError(f"unknown VAE layout {layout!r}; expected one of {VAE_LAYOUTS}")
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else dict(model_or_sd)
    config = model_or_sd.config if isinstance(model_or_sd, WanVAE) else detect_vae_config(sd)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sd.items()}
    target = Path(path)
    if layout == "comfy":
        return write_safetensors(tensors, target)
    if layout == "official":
        return write_torch_file(tensors, target)
    tensors = to_diffusers(tensors, config)
    if target.suffix == ".safetensors":
        return write_safetensors(tensors, target)
    write_safetensors(tensors, target / DIFFUSERS_FILE_NAME)
    atomic_write_text(target / OFFICIAL_CONFIG_NAME, json.dumps(diffusers_config(config), indent=2))
    return target


def diffusers_config(config: VAEConfig) -> dict[str, object]:
    """The `AutoencoderKLWan` constructor arguments for this config."""
    residual = is_residual_variant(config)
    return {
        "_class_name": "AutoencoderKLWan",
        "base_dim": config.dim,
        "decoder_base_dim": config.dec_dim,
        "z_dim": config.z_dim,
        "dim_mult": list(config.dim_mult),
        "num_res_blocks": config.num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": list(config.temperal_downsample),
        "dropout": 0.0,
        "latents_mean": list(config.latents_mean),
        "latents_std": list(config.latents_std),
        "is_residual": residual,
        "in_channels": PIXEL_CHANNELS * config.patch_size**2,
        "out_channels": PIXEL_CHANNELS * config.patch_size**2,
        "patch_size": config.patch_size if config.patch_size > 1 else None,
        "scale_factor_temporal": config.temporal_stride,
        "scale_factor_spatial": config.spatial_stride,
    }
