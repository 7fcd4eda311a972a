"""Analytic FLOP counts of the VAE, for the profiling stages that run it.

The DiT and UMT5 FLOPs are closed formulas on their configs (`DiTConfig.flops_forward`,
`UMT5Config.flops_forward`). The VAE's come from its layer shapes: `vae_flops` counts the
convolutions and attention of one encode or decode from meta-device runs of `WanVAE` (no data, no
compute), cached per config; `vae_decode_flops` adds up the tiles of a tiled decode.
`count_vae_flops_ahead` runs those meta runs once, so that later counts cost microseconds.

The VAE counts are those of the official computation (every conv with its full kernel over the
zero-padded input, the upsampling conv on the upsampled image), the usual basis of achieved
FLOP/s and MFU. `WanVAE` itself does fewer multiply-adds (vae_conv.py: the first-chunk kernel
slice, the upsampling conv as 2x2 phase convs); `bench/bench_vae.py` reports both.

Shapes: video (B, 3, F, H, W); latent (B, z, T, h, w).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .config import VAEConfig
from .vae import WanVAE
from .vae_blocks import PIXEL_CHANNELS, AttentionBlock, Resample
from .vae_tiling import VAETiling

VAE_MODES = ("encode", "decode")


def vae_flops(config: VAEConfig, mode: str, shape: tuple[int, ...]) -> float:
    """FLOPs (2 x multiply-adds) of convolutions and attention for one encode or decode.

    `mode` "encode" takes the video shape (B, 3, F, H, W), "decode" the latent shape
    (B, z, T, h, w). Norms and activations are not counted (spec section 10).

    Counted from the layer shapes of runs on the meta device (no data, no compute), made cheap
    for any size by the structure of the network: every layer's output has (frames) x (area)
    elements with the area proportional to the latent area `a = h*w` and the frame count affine
    in the latent frames T (the first frame is handled alone, every later one alike), and the
    per-frame attention costs `a^2`. So FLOPs(B, T, a) = B * (conv(T) * a + attn(T) * a^2) with
    conv and attn affine in T; both come from two meta runs on a one-cell latent (T = 1 and 2),
    cached per config. Equal to a meta run at the full shape (tested).
    """
    if mode not in VAE_MODES:
        raise ValueError(f"mode must be one of {VAE_MODES}; got {mode!r}")
    if len(shape) != 5:
        raise ValueError(f"shape must be (B, C, frames, H, W); got {shape!r}")
    b, _, frames, height, width = (int(v) for v in shape)
    s = config.spatial_stride
    if mode == "encode":
        num_latent = config.latent_frames(frames)
        area = (height // s) * (width // s)
    else:
        num_latent, area = frames, height * width
    conv1, attn1 = _unit_flops(config, mode, 1)
    conv2, attn2 = _unit_flops(config, mode, 2)
    later = num_latent - 1
    conv = conv1 + later * (conv2 - conv1)
    attn = attn1 + later * (attn2 - attn1)
    return float(b * (conv * area + attn * area * area))


@functools.lru_cache(maxsize=16)
def _unit_flops(config: VAEConfig, mode: str, latent_frames: int) -> tuple[float, float]:
    """(conv FLOPs, attention FLOPs) of one sample on a one-cell latent with `latent_frames` frames."""
    s = config.spatial_stride
    if mode == "encode":
        shape = (1, PIXEL_CHANNELS, config.pixel_frames(latent_frames), s, s)
    else:
        shape = (1, config.z_dim, latent_frames, 1, 1)
    conv, attn = _meta_flops(config, mode, shape)
    return conv, attn


def _meta_flops(config: VAEConfig, mode: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(conv FLOPs, attention FLOPs) of one encode or decode of `shape`, run on the meta device."""
    model = WanVAE(config, device="meta")
    counts = {"conv": 0.0, "attn": 0.0}

    def on_conv(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        counts["conv"] += 2.0 * output.numel() * per_output

    def on_resample(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        # The official per-frame conv (a 3x3 conv after a 2x nearest upsampling, or a stride-2 3x3
        # conv), counted as such: `Resample` computes it without calling the module (vae_conv.py).
        conv = module.resample[1]
        if module.mode.startswith("up"):
            positions = output.numel() // output.shape[1]  # the resample conv's output is the block's
        else:
            b, _, t, h, w = inputs[0].shape  # every input frame, padded right and bottom by 1
            positions = b * t * ((h + 1 - conv.kernel_size[0]) // conv.stride[0] + 1) * (
                (w + 1 - conv.kernel_size[1]) // conv.stride[1] + 1)
        counts["conv"] += 2.0 * positions * conv.out_channels * conv.in_channels * math.prod(conv.kernel_size)

    def on_attention(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        b, c, t, h, w = inputs[0].shape
        counts["attn"] += 4.0 * b * t * (h * w) ** 2 * c  # q k^T and attn v

    handles = []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            handles.append(module.register_forward_hook(on_conv))
        elif isinstance(module, AttentionBlock):
            handles.append(module.register_forward_hook(on_attention))
        elif isinstance(module, Resample):
            handles.append(module.register_forward_hook(on_resample))
    x = torch.empty(shape, device="meta")
    try:
        with torch.no_grad():
            if mode == "encode":
                model.encode(x, chunk_frames=None)
            else:
                model.decoder(model.conv2(x), first_chunk=True)
    finally:
        for handle in handles:
            handle.remove()
    return counts["conv"], counts["attn"]


def vae_decode_flops(config: VAEConfig, latent_shape: tuple[int, ...], tiling: VAETiling | None) -> float:
    """Decode FLOPs of a latent, summed over the tiles of `tiling` (overlaps are decoded twice).

    Shapes: latent_shape (B, z, T, h, w).
    """
    if tiling is None:
        return vae_flops(config, "decode", latent_shape)
    b, z, t, h, w = latent_shape
    return sum(vae_flops(config, "decode", (b, z, t, y1 - y0, x1 - x0)) for y0, y1, x0, x1 in tiling.tiles(h, w))


def count_vae_flops_ahead(config: VAEConfig) -> None:
    """Run the one-off meta runs of `vae_flops` for this config now (they are cached per config)."""
    for mode in VAE_MODES:
        _unit_flops(config, mode, 1)
        _unit_flops(config, mode, 2)
