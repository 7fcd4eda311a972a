"""Image conditioning and sizes of the image tasks (spec sections 2, 6.2, 6.4).

I2V-A14B: the start image is resized (bicubic) to a size derived from its aspect ratio and the pixel
area budget, put as frame 0 of an otherwise mid-grey (zero) video, VAE-encoded, and concatenated with a
4-channel first-frame mask into the 20-channel `y` the model takes next to the noise latent.

TI2V-5B with an image: the image is resized (Lanczos, cover) and centre-cropped to the best size on
the 32-pixel grid, VAE-encoded into one latent frame `z`; the sampler pins latent frame 0 to `z` and
gives frame-0 tokens the timestep 0.

The functions that need a VAE take an `encode` callable with the `WanVAE.encode` contract
(video (B, 3, F, H, W) in [-1, 1] -> raw mean (B, z, T, h, w)); its result is normalised here.

Shapes: image (H, W, 3) uint8 or float in [0, 1]; video (3, F, H, W) in [-1, 1]; latents (C, T, h, w).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import VAEConfig, WanConfig
from .latents import normalize_latent

__all__ = [
    "EncodeFn", "I2VCondition", "TI2VCondition", "image_to_tensor", "i2v_latent_size", "i2v_resize",
    "i2v_vae_input", "i2v_mask", "i2v_y", "i2v_condition", "best_output_size", "ti2v_resize",
    "ti2v_condition", "first_frame_mask", "pin_first_frame", "token_timesteps",
]

EncodeFn = Callable[[torch.Tensor], torch.Tensor]


def image_to_tensor(image: torch.Tensor) -> torch.Tensor:
    """An RGB image to a float32 (3, H, W) tensor in [-1, 1].

    Shapes: image (H, W, 3) uint8 (0..255) or floating point in [0, 1] -> (3, H, W).
    """
    if image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB; got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        x = image.permute(2, 0, 1).float().div(255)
    elif image.is_floating_point():
        x = image.permute(2, 0, 1).float()
    else:
        raise TypeError(f"image must be uint8 or floating point; got {image.dtype}")
    return x.sub(0.5).div(0.5).contiguous()


def i2v_latent_size(image_hw: tuple[int, int], max_area: int, *, spatial_stride: int,
                    patch: int) -> tuple[int, int]:
    """(lat_h, lat_w) of I2V-A14B for an image of (H, W) and a pixel area budget (e.g. 1280*720).

    Keeps the image's aspect ratio; both sides are multiples of the DiT patch (official rule).
    """
    ih, iw = image_hw
    if ih <= 0 or iw <= 0 or max_area <= 0:
        raise ValueError(f"image size and max_area must be positive; got {image_hw} and {max_area}")
    aspect = ih / iw
    lat_h = round(math.sqrt(max_area * aspect) // spatial_stride // patch * patch)
    lat_w = round(math.sqrt(max_area / aspect) // spatial_stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise ValueError(f"max_area {max_area} is too small for a {iw}x{ih} image; it gives a "
                         f"{lat_w}x{lat_h} latent (need at least {patch}x{patch})")
    return lat_h, lat_w


def i2v_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize of an I2V start image, float32 on CPU, without clamping the overshoot.

    Shapes: image (H0, W0, 3) -> (3, height, width) in about [-1, 1].
    """
    x = image_to_tensor(image.cpu())[None]  # (1, 3, H0, W0)
    return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)[0]


def i2v_vae_input(image_chw: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The video the VAE encodes for I2V: the image as frame 0, zeros (mid-grey) after it.

    Shapes: image_chw (3, H, W) -> (3, num_frames, H, W).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1; got {num_frames}")
    c, h, w = image_chw.shape
    rest = image_chw.new_zeros(c, num_frames - 1, h, w)
    return torch.cat([image_chw[:, None], rest], dim=1)


def i2v_mask(num_frames: int, lat_h: int, lat_w: int, *, temporal_stride: int,
             device: torch.device | None = None) -> torch.Tensor:
    """The I2V first-frame mask: `temporal_stride` channels, ones on latent frame 0, zeros elsewhere.

    Built like the official code: a per-pixel-frame mask with frame 0 repeated `temporal_stride`
    times, grouped by `temporal_stride` frames per latent frame.
    Shapes: -> (temporal_stride, T, lat_h, lat_w), T = (num_frames - 1) // temporal_stride + 1.
    """
    if (num_frames - 1) % temporal_stride:
        raise ValueError(f"num_frames must be {temporal_stride}k+1 (e.g. 81); got {num_frames}")
    per_frame = torch.zeros(num_frames, lat_h, lat_w, device=device)
    per_frame[0] = 1
    padded = torch.cat([per_frame[:1].repeat(temporal_stride - 1, 1, 1), per_frame], dim=0)
    grouped = padded.view(-1, temporal_stride, lat_h, lat_w)  # (T, s, h, w)
    return grouped.transpose(0, 1).contiguous()


def i2v_y(mask: torch.Tensor, image_latent: torch.Tensor) -> torch.Tensor:
    """Conditioning `y = concat(mask, image_latent)` on the channel axis.

    Shapes: mask (4, T, h, w), image_latent (z, T, h, w) normalised -> (4 + z, T, h, w).
    """
    if mask.shape[1:] != image_latent.shape[1:]:
        raise ValueError(f"mask {tuple(mask.shape)} and image latent {tuple(image_latent.shape)} "
                         "must share (T, h, w)")
    return torch.cat([mask.to(image_latent), image_latent], dim=0)


@dataclass(frozen=True)
class I2VCondition:
    """What I2V sampling needs from the start image.

    Shapes: y (4 + z, T, h, w); vae_input (3, F, H, W); latent_shape = (z, T, h, w) of the noise.
    """

    y: torch.Tensor
    vae_input: torch.Tensor
    latent_shape: tuple[int, int, int, int]

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(width, height) of the video."""
        return int(self.vae_input.shape[3]), int(self.vae_input.shape[2])


def i2v_condition(image: torch.Tensor, *, num_frames: int, max_area: int, task: WanConfig,
                  encode: EncodeFn) -> I2VCondition:
    """Image -> I2V conditioning `y` (mask + normalised image latent), for I2V-A14B.

    Shapes: image (H0, W0, 3) -> y (4 + z, T, h, w).
    """
    vae = task.vae
    lat_h, lat_w = i2v_latent_size(tuple(image.shape[:2]), max_area, spatial_stride=vae.spatial_stride,
                                   patch=task.dit.patch_size[1])
    resized = i2v_resize(image, lat_h * vae.spatial_stride, lat_w * vae.spatial_stride)
    video = i2v_vae_input(resized, num_frames)
    latent = _encode_normalised(encode, video, vae)  # (z, T, h, w)
    mask = i2v_mask(num_frames, lat_h, lat_w, temporal_stride=vae.temporal_stride, device=latent.device)
    y = i2v_y(mask, latent)
    return I2VCondition(y=y, vae_input=video, latent_shape=(task.dit.out_dim, *latent.shape[1:]))


def best_output_size(width: int, height: int, multiple_w: int, multiple_h: int,
                     max_area: int) -> tuple[int, int]:
    """TI2V output (width, height): the grid size of about `max_area` pixels closest in aspect."""
    ratio = width / height
    ow = math.sqrt(max_area * ratio)
    oh = max_area / ow
    ow1 = int(ow // multiple_w * multiple_w)
    oh1 = int(max_area / ow1 // multiple_h * multiple_h) if ow1 > 0 else 0
    oh2 = int(oh // multiple_h * multiple_h)
    ow2 = int(max_area / oh2 // multiple_w * multiple_w) if oh2 > 0 else 0
    if min(ow1, oh1, ow2, oh2) <= 0:
        raise ValueError(f"max_area {max_area} is too small for a {multiple_w}x{multiple_h} grid")
    ratio1, ratio2 = ow1 / oh1, ow2 / oh2
    if max(ratio / ratio1, ratio1 / ratio) < max(ratio / ratio2, ratio2 / ratio):
        return ow1, oh1
    return ow2, oh2


def ti2v_resize(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Lanczos resize to cover (width, height), then centre crop (needs Pillow, as ComfyUI has).

    Shapes: image (H0, W0, 3) uint8 or float in [0, 1] -> (3, 1, height, width) in [-1, 1].
    """
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("the TI2V image preprocessing needs Pillow: pip install Pillow") from exc
    if image.dtype != torch.uint8:
        image = image.clamp(0, 1).mul(255).round().to(torch.uint8)
    pil = Image.fromarray(image.cpu().numpy())
    iw, ih = pil.size
    scale = max(width / iw, height / ih)
    pil = pil.resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
    left, top = (pil.width - width) // 2, (pil.height - height) // 2
    pil = pil.crop((left, top, left + width, top + height))
    pixels = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return image_to_tensor(pixels)[:, None]


@dataclass(frozen=True)
class TI2VCondition:
    """TI2V first-frame latent and the video geometry.

    Shapes: z (z_dim, 1, h, w) normalised; vae_input (3, 1, H, W); latent_shape (z_dim, T, h, w).
    """

    z: torch.Tensor
    vae_input: torch.Tensor
    latent_shape: tuple[int, int, int, int]

    @property
    def pixel_size(self) -> tuple[int, int]:
        return int(self.vae_input.shape[3]), int(self.vae_input.shape[2])


def ti2v_condition(image: torch.Tensor, *, num_frames: int, max_area: int, task: WanConfig,
                   encode: EncodeFn) -> TI2VCondition:
    """Image -> TI2V first-frame latent `z` and the noise latent shape (TI2V-5B image mode)."""
    m = task.size_multiple
    ow, oh = best_output_size(int(image.shape[1]), int(image.shape[0]), m, m, max_area)
    task.validate_video(ow, oh, num_frames)
    pixels = ti2v_resize(image, ow, oh)
    z = _encode_normalised(encode, pixels, task.vae)  # (z, 1, h, w)
    return TI2VCondition(z=z, vae_input=pixels, latent_shape=task.latent_shape(ow, oh, num_frames))


def _encode_normalised(encode: EncodeFn, video: torch.Tensor, vae: VAEConfig) -> torch.Tensor:
    mu = encode(video[None])
    if mu.dim() != 5 or mu.shape[0] != 1 or mu.shape[1] != vae.z_dim:
        raise ValueError(f"encode must return a raw latent (1, {vae.z_dim}, T, h, w); got {tuple(mu.shape)}")
    return normalize_latent(mu[0].float(), vae)


def first_frame_mask(latent_shape: tuple[int, ...], *, device: torch.device | None = None) -> torch.Tensor:
    """TI2V noise mask: ones with latent frame 0 set to 0. Shapes: (C, T, h, w)."""
    mask = torch.ones(latent_shape, dtype=torch.float32, device=device)
    mask[:, 0] = 0
    return mask


def pin_first_frame(latent: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(1 - mask) * z + mask * latent`: latent frame 0 := z (the official arithmetic).

    Shapes: latent (C, T, h, w) or (B, C, T, h, w); z (C, 1, h, w); mask like latent without batch.
    """
    return (1.0 - mask) * z + mask * latent


def token_timesteps(t: torch.Tensor | int, mask: torch.Tensor, *, patch_size: tuple[int, int, int],
                    seq_len: int) -> torch.Tensor:
    """Per-token timesteps of TI2V: `t` on every token, 0 on the tokens of masked-out frames.

    Tokens are in (f, h, w) order; the result is padded with `t` up to `seq_len`.
    Shapes: mask (C, T, h, w) -> (1, seq_len) float32.
    """
    pt, ph, pw = patch_size
    per_token = (mask[0][::pt, ::ph, ::pw] * t).flatten()
    if per_token.numel() > seq_len:
        raise ValueError(f"seq_len {seq_len} is smaller than the {per_token.numel()} video tokens")
    pad = per_token.new_ones(seq_len - per_token.numel()) * t
    return torch.cat([per_token, pad])[None].float()
