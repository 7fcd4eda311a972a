"""Latent normalisation: raw VAE means <-> the normalised latents the DiT works on.

Raw latents cross node boundaries (ComfyUI's `LATENT`), normalised ones live inside the sampler.
The official wrappers normalise with `(mu - mean) * (1/std)` and undo it with `latent / (1/std) + mean`
(spec WAN_VAE section 6); the same order of operations is kept here so results match to the ulp.

Shapes: (B, z, T, h, w) or (z, T, h, w).
"""

from __future__ import annotations

import torch

from .config import VAEConfig


def _stats(cfg: VAEConfig, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    channel_axis = 1 if like.dim() == 5 else 0
    if like.shape[channel_axis] != cfg.z_dim:
        raise ValueError(f"latent has {like.shape[channel_axis]} channels on axis {channel_axis}; "
                         f"the {cfg.variant} VAE uses {cfg.z_dim}")
    view = [1] * like.dim()
    view[channel_axis] = cfg.z_dim
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=like.device).view(view)
    inv_std = (1.0 / torch.tensor(cfg.latents_std, dtype=torch.float32, device=like.device)).view(view)
    return mean, inv_std


def normalize_latent(mu: torch.Tensor, cfg: VAEConfig) -> torch.Tensor:
    """Raw VAE mean -> normalised latent (what the DiT sees)."""
    mean, inv_std = _stats(cfg, mu)
    return ((mu.float() - mean) * inv_std).to(mu.dtype)


def denormalize_latent(latent: torch.Tensor, cfg: VAEConfig) -> torch.Tensor:
    """Normalised latent -> raw VAE mean (what `LATENT` carries and the decoder takes)."""
    mean, inv_std = _stats(cfg, latent)
    return (latent.float() / inv_std + mean).to(latent.dtype)
