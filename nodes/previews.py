"""Latent previews while Wan Sampler runs, through ComfyUI's own preview channel.

ComfyUI shows a picture of the latent under a sampling node when its preview setting asks for one
(`--preview-method`, and in current versions the per-prompt setting `Comfy.Execution.PreviewMethod`,
which the server copies into the same `comfy.cli_args.args.preview_method` before the prompt
runs). With it set to anything but `none`, `latent_previewer` returns a function that turns the
sampler's latent into ComfyUI's preview tuple `("JPEG", PIL image, max size)`, which
`comfy_bridge.make_progress` hands to `ProgressBar.update_absolute`. The picture is wan_core's cheap
latent -> RGB projection (`latents.latent_preview_rgb`, no VAE): Wan2.1 16-channel and Wan2.2
48-channel latents, the middle latent frame, about a millisecond per step. Without ComfyUI, or
with previews off, there is no previewer and nothing is computed.

Shapes: latent (C, T, h, w) -> an RGB picture of (h, w).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..wan_core.config import VAEConfig
from ..wan_core.latents import LATENT_RGB, latent_preview_rgb
from . import comfy_bridge

log = logging.getLogger(__name__)

Preview = tuple[str, Any, int]  # ("JPEG", PIL.Image.Image, max size in pixels)


def latent_previewer(vae: VAEConfig) -> Callable[[torch.Tensor], Preview] | None:
    """A latent -> preview function when ComfyUI's preview setting is on, else None."""
    max_size = comfy_bridge.preview_size()
    if max_size is None:
        return None
    colours = LATENT_RGB.get(vae.variant)  # (per-channel factors, bias)
    if colours is None or len(colours[0]) != vae.z_dim:
        log.info("no latent preview for a %s VAE with %d latent channels", vae.variant, vae.z_dim)
        return None

    def preview(latent: torch.Tensor) -> Preview:
        from PIL import Image

        rgb = latent_preview_rgb(latent, vae)  # (h, w, 3) uint8
        return ("JPEG", Image.fromarray(rgb.numpy()), max_size)

    return preview
