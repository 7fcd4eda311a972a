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


# --------------------------------------------------------------------------------------------
# Previews: a cheap latent -> RGB projection (no VAE)
# --------------------------------------------------------------------------------------------
# Per latent channel, its contribution to R, G and B, and a bias: a linear fit of the decoded
# colours to the normalised latents, the constants ComfyUI uses for its Wan21 / Wan22 latent
# formats (comfy/latent_formats.py). Row c is channel c.
_RGB_FACTORS_WAN21 = (
    (-0.1299, -0.1692,  0.2932),
    ( 0.0671,  0.0406,  0.0442),
    ( 0.3568,  0.2548,  0.1747),
    ( 0.0372,  0.2344,  0.1420),
    ( 0.0313,  0.0189, -0.0328),
    ( 0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925),
    ( 0.0166,  0.1902,  0.1975),
    (-0.0412,  0.0267, -0.1364),
    (-0.1293,  0.0740,  0.1636),
    ( 0.0680,  0.3019,  0.1128),
    ( 0.0032,  0.0581,  0.0639),
    (-0.1251,  0.0927,  0.1699),
    ( 0.0060, -0.0633,  0.0005),
    ( 0.3477,  0.2275,  0.2950),
    ( 0.1984,  0.0913,  0.1861),
)
_RGB_FACTORS_WAN22 = (
    ( 0.0119,  0.0103,  0.0046),
    (-0.1062, -0.0504,  0.0165),
    ( 0.0140,  0.0409,  0.0491),
    (-0.0813, -0.0677,  0.0607),
    ( 0.0656,  0.0851,  0.0808),
    ( 0.0264,  0.0463,  0.0912),
    ( 0.0295,  0.0326,  0.0590),
    (-0.0244, -0.0270,  0.0025),
    ( 0.0443, -0.0102,  0.0288),
    (-0.0465, -0.0090, -0.0205),
    ( 0.0359,  0.0236,  0.0082),
    (-0.0776,  0.0854,  0.1048),
    ( 0.0564,  0.0264,  0.0561),
    ( 0.0006,  0.0594,  0.0418),
    (-0.0319, -0.0542, -0.0637),
    (-0.0268,  0.0024,  0.0260),
    ( 0.0539,  0.0265,  0.0358),
    (-0.0359, -0.0312, -0.0287),
    (-0.0285, -0.1032, -0.1237),
    ( 0.1041,  0.0537,  0.0622),
    (-0.0086, -0.0374, -0.0051),
    ( 0.0390,  0.0670,  0.2863),
    ( 0.0069,  0.0144,  0.0082),
    ( 0.0006, -0.0167,  0.0079),
    ( 0.0313, -0.0574, -0.0232),
    (-0.1454, -0.0902, -0.0481),
    ( 0.0714,  0.0827,  0.0447),
    (-0.0304, -0.0574, -0.0196),
    ( 0.0401,  0.0384,  0.0204),
    (-0.0758, -0.0297, -0.0014),
    ( 0.0568,  0.1307,  0.1372),
    (-0.0055, -0.0310, -0.0380),
    ( 0.0239, -0.0305,  0.0325),
    (-0.0663, -0.0673, -0.0140),
    (-0.0416, -0.0047, -0.0023),
    ( 0.0166,  0.0112, -0.0093),
    (-0.0211,  0.0011,  0.0331),
    ( 0.1833,  0.1466,  0.2250),
    (-0.0368,  0.0370,  0.0295),
    (-0.3441, -0.3543, -0.2008),
    (-0.0479, -0.0489, -0.0420),
    (-0.0660, -0.0153,  0.0800),
    (-0.0101,  0.0068,  0.0156),
    (-0.0690, -0.0452, -0.0927),
    (-0.0145,  0.0041,  0.0015),
    ( 0.0421,  0.0451,  0.0373),
    ( 0.0504, -0.0483, -0.0356),
    (-0.0837,  0.0168,  0.0055),
)
LATENT_RGB: dict[str, tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]]] = {
    "wan2.1": (_RGB_FACTORS_WAN21, (-0.1835, -0.0868, -0.336)),
    "wan2.2": (_RGB_FACTORS_WAN22, (0.0317, -0.0878, -0.1388)),
}


def latent_preview_rgb(latent: torch.Tensor, cfg: VAEConfig, *, frame: int | None = None) -> torch.Tensor:
    """One latent frame of a *normalised* latent as an RGB picture (uint8), without the VAE.

    `frame` picks the latent frame (default: the middle one, where the motion is). The picture has
    the latent's size (h, w): 1/8 (Wan2.1) or 1/16 (Wan2.2) of the video's; viewers scale it up.

    Shapes: (C, T, h, w) -> (h, w, 3) uint8.
    """
    if latent.dim() != 4 or latent.shape[0] != cfg.z_dim:
        raise ValueError(f"a preview needs one normalised latent (C={cfg.z_dim}, T, h, w) for the "
                         f"{cfg.variant} VAE; got {tuple(latent.shape)}")
    if cfg.variant not in LATENT_RGB:
        raise ValueError(f"no preview colours for VAE variant {cfg.variant!r}; expected one of {sorted(LATENT_RGB)}")
    factors, bias = LATENT_RGB[cfg.variant]
    index = latent.shape[1] // 2 if frame is None else frame
    x = latent[:, index].float().cpu()  # (C, h, w)
    weight = torch.tensor(factors, dtype=torch.float32)  # (C, 3)
    rgb = torch.einsum("chw,cr->hwr", x, weight) + torch.tensor(bias, dtype=torch.float32)  # (h, w, 3)
    return ((rgb + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
