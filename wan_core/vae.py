"""The Wan2.1 and Wan2.2 video VAEs: exact encode/decode, streamed over time, optionally tiled.

`WanVAE.encode` takes a video in [-1, 1] and returns the raw posterior mean (what ComfyUI's
`LATENT` carries); `encode_latent` returns the normalised latent the DiT works on. `decode` takes a
raw latent and returns the video clamped to [-1, 1]; `decode_latent` takes a normalised one.

Time is processed in chunks of latent frames (default 1, as the official code does), with the
history of every causal conv kept in its `CausalCache`, so results equal the whole-sequence
computation and memory does not grow with the clip length. `chunk_frames=None` runs the whole
clip at once. Spatial tiling (`vae_tiling.VAETiling`) bounds memory by the tile size.

Frame rules: F pixel frames <-> T = 1 + (F-1)/4 latent frames; decode gives F = 1 + 4(T-1).

Shapes: video (B, 3, F, H, W); latent (B, z, T, h, w) with h = H/8 (2.1) or H/16 (2.2).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..util.atomic import atomic_output, atomic_write_text
from .config import VAEConfig
from .errors import CheckpointError
from .latents import denormalize_latent, normalize_latent
from .trace import current_tracer, stage
from .vae_blocks import (
    PIXEL_CHANNELS,
    AttentionBlock,
    CausalConv3d,
    ChunkBlock,
    Decoder3d,
    Encoder3d,
    is_residual_variant,
    patchify,
    unpatchify,
)
from .vae_tiling import VAETiling, decode_tiled, resolve_tiling

logger = logging.getLogger(__name__)

ChunkCallback = Callable[[int, int], None]


@contextlib.contextmanager
def streaming(module: nn.Module) -> Iterator[None]:
    """Treat the calls inside the block as consecutive chunks of one stream (fresh caches)."""
    caches = [m.cache for m in module.modules() if isinstance(m, CausalConv3d)]
    for cache in caches:
        cache.start()
    try:
        yield
    finally:
        for cache in caches:
            cache.stop()


def chunk_ranges(num_latent_frames: int, chunk_frames: int | None) -> list[tuple[int, int]]:
    """Latent frame ranges [a, b) of the temporal chunks; None means one chunk."""
    if chunk_frames is None:
        return [(0, num_latent_frames)]
    if chunk_frames < 1:
        raise ValueError(
            f"chunk_frames must be >= 1 latent frame (or None for the whole clip); got {chunk_frames}"
        )
    return [(a, min(a + chunk_frames, num_latent_frames)) for a in range(0, num_latent_frames, chunk_frames)]


def pixel_range(config: VAEConfig, start: int, stop: int) -> tuple[int, int]:
    """Pixel frames [f0, f1) that latent frames [start, stop) cover (frame 0 maps to one frame)."""
    ts = config.temporal_stride
    return (0 if start == 0 else 1 + ts * (start - 1)), 1 + ts * (stop - 1)


class WanVAE(nn.Module):
    """The Wan2.1 / Wan2.2 video VAE (official module names, so checkpoints load unchanged).

    Weights are cast to `dtype` (float32 by default); RMS norms always compute in float32, outputs
    are float32. Use `wan_core.vae.load_vae` to build one from a checkpoint.
    """

    def __init__(
        self, config: VAEConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.config = config
        with torch.device(device or "cpu"):
            self.encoder = Encoder3d(config)
            self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
            self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
            self.decoder = Decoder3d(config)
        if dtype is not None:
            self.to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv1.weight.device

    # ----------------------------------------------------------------------------------- encode
    @torch.no_grad()
    def encode(
        self, video: torch.Tensor, *, chunk_frames: int | None = 1, drop_trailing_frames: bool = False
    ) -> torch.Tensor:
        """Posterior mean (raw, un-normalised) of a video in [-1, 1].

        `chunk_frames`: latent frames per encoder call (pixel chunks 1, 4, 4, ... for 1); None
        encodes the whole clip in one call (same numbers, more memory). A frame count that is not
        1 + 4k is an error unless `drop_trailing_frames` (then the extra frames are dropped, as the
        official code does silently).

        Shapes: video (B, 3, F, H, W) -> mu (B, z, 1 + (F-1)//4, H/s, W/s), float32.
        """
        video = self.check_video(video, drop_trailing_frames=drop_trailing_frames)
        b, _, f, h, w = video.shape
        s = self.config.spatial_stride
        latent_shape = (b, self.config.z_dim, self.config.latent_frames(f), h // s, w // s)
        traced = current_tracer() is not None
        flops = vae_flops(self.config, "encode", tuple(video.shape)) if traced else None
        with stage(
            "VAE_Encoding",
            kind="preprocess",
            flops=flops,
            vae=self.config.variant,
            input_shape=tuple(video.shape),
            latent_shape=latent_shape,
        ):
            return self._encode(video, chunk_frames)

    def _encode(self, video: torch.Tensor, chunk_frames: int | None) -> torch.Tensor:
        x = patchify(video.to(device=self.device, dtype=self.dtype), self.config.patch_size)
        parts = []
        with streaming(self.encoder):
            for start, stop in chunk_ranges(self.config.latent_frames(x.shape[2]), chunk_frames):
                f0, f1 = pixel_range(self.config, start, stop)
                parts.append(self.encoder(x[:, :, f0:f1], first_chunk=start == 0))
        moments = self.conv1(torch.cat(parts, dim=2))
        return moments[:, : self.config.z_dim].float()

    def encode_latent(
        self, video: torch.Tensor, *, chunk_frames: int | None = 1, drop_trailing_frames: bool = False
    ) -> torch.Tensor:
        """Normalised latent (mu - mean) / std, as the official pipelines use it. Shapes as `encode`."""
        mu = self.encode(video, chunk_frames=chunk_frames, drop_trailing_frames=drop_trailing_frames)
        return normalize_latent(mu, self.config)

    def check_video(self, video: torch.Tensor, *, drop_trailing_frames: bool = False) -> torch.Tensor:
        """Validate an encoder input and return it (trimmed to 1 + 4k frames if allowed)."""
        cfg = self.config
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video must be a tensor (B, 3, F, H, W) in [-1, 1]; got {got}")
        b, c, f, h, w = video.shape
        if c != PIXEL_CHANNELS:
            raise ValueError(
                f"video must have {PIXEL_CHANNELS} (RGB) channels on axis 1, layout (B, 3, F, H, W); "
                f"got {c} channels in shape {tuple(video.shape)} (convert grey/RGBA to RGB, "
                "or move channels from the last axis)"
            )
        s = cfg.spatial_stride
        if h < s or w < s or h % s or w % s:
            raise ValueError(
                f"the {cfg.variant} VAE needs height and width that are positive multiples of {s}; "
                f"got {h}x{w} (H x W); resize or crop to e.g. {max(s, h // s * s)}x{max(s, w // s * s)}"
            )
        if f < 1:
            raise ValueError(f"video has no frames: shape {tuple(video.shape)}")
        ts = cfg.temporal_stride
        extra = (f - 1) % ts
        if extra:
            usable = f - extra
            if not drop_trailing_frames:
                raise ValueError(
                    f"video has {f} frames; the encoder needs {ts}k+1 frames (e.g. {usable} or "
                    f"{usable + ts}). The official Wan code silently drops the last {extra} "
                    f"frame(s); pass drop_trailing_frames=True to do the same, or trim/pad the clip"
                )
            logger.warning(
                "dropping the last %d of %d frames: the encoder uses %dk+1 frames (%d here)",
                extra,
                f,
                ts,
                usable,
            )
            video = video[:, :, :usable]
        return video

    # ----------------------------------------------------------------------------------- decode
    @torch.no_grad()
    def decode(
        self,
        raw: torch.Tensor,
        *,
        tiling: VAETiling | str | None = None,
        callback: ChunkCallback | None = None,
        chunk_frames: int | None = 1,
        clamp: bool = True,
    ) -> torch.Tensor:
        """Video from a raw (un-normalised) latent.

        `tiling`: None (whole frames, exact), "auto" (default `VAETiling()`), or a
        `vae_tiling.VAETiling`. `callback(done_chunks, total_chunks)` runs after every chunk (of
        every tile) and may raise to stop. `chunk_frames`: latent frames per decoder call (None =
        whole clip at once). `clamp=False` returns the raw decoder output.

        Shapes: raw (B, z, T, h, w) -> video (B, 3, 1 + 4(T-1), h*s, w*s), float32.
        """
        raw = self.check_latent(raw)
        plan = resolve_tiling(tiling)
        b, _, t, h, w = raw.shape
        s = self.config.spatial_stride
        out_shape = (b, PIXEL_CHANNELS, self.config.pixel_frames(t), h * s, w * s)
        flops = None  # counted only when a profiler listens (microseconds once the VAE is loaded)
        if current_tracer() is not None:
            flops = (
                vae_flops(self.config, "decode", tuple(raw.shape))
                if plan is None
                else plan.flops(self.config, tuple(raw.shape))
            )
        with stage(
            "VAE_Decoding",
            kind="decode",
            flops=flops,
            vae=self.config.variant,
            latent_shape=tuple(raw.shape),
            output_shape=out_shape,
            tiling="none" if plan is None else plan.describe(),
        ):
            x = self.conv2(raw.to(device=self.device, dtype=self.dtype))
            if plan is None:
                out = torch.empty(out_shape, dtype=torch.float32, device=self.device)
                self.decode_into(x, out, chunk_frames=chunk_frames, callback=callback)
            else:
                out = decode_tiled(self, x, plan, chunk_frames=chunk_frames, callback=callback)
            return out.clamp_(-1.0, 1.0) if clamp else out

    def decode_latent(
        self,
        latent: torch.Tensor,
        *,
        tiling: VAETiling | str | None = None,
        callback: ChunkCallback | None = None,
        chunk_frames: int | None = 1,
        clamp: bool = True,
    ) -> torch.Tensor:
        """Decode a normalised latent (the DiT's output). Shapes as `decode`."""
        return self.decode(
            denormalize_latent(latent.float(), self.config),
            tiling=tiling,
            callback=callback,
            chunk_frames=chunk_frames,
            clamp=clamp,
        )

    def decode_into(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        *,
        chunk_frames: int | None,
        callback: ChunkCallback | None = None,
        weight: torch.Tensor | None = None,
        progress: tuple[int, int] | None = None,
        upper_only: bool = False,
    ) -> None:
        """Stream the decoder over `x` (already through `conv2`) and write or add into `out`.

        With `weight` (broadcastable to the output), the weighted output is added to `out`
        (tiled decode); otherwise it is written. `progress` = (chunks done before, total chunks).
        `upper_only`: `x` holds `decoder.lower` features and only `decoder.upper` runs.
        Shapes: x (B, z, T, h, w); out (B, 3, 1 + 4(T-1), h*s, w*s).
        """
        run = self.decoder.upper if upper_only else self.decoder
        ranges = chunk_ranges(x.shape[2], chunk_frames)
        done, total = progress or (0, len(ranges))
        with streaming(self.decoder):
            for start, stop in ranges:
                y = unpatchify(run(x[:, :, start:stop], start == 0), self.config.patch_size)
                f0, f1 = pixel_range(self.config, start, stop)
                if weight is None:
                    out[:, :, f0:f1] = y
                else:
                    out[:, :, f0:f1] += y.float() * weight
                del y
                done += 1
                if callback is not None:
                    callback(done, total)

    def decode_lower(self, x: torch.Tensor, *, chunk_frames: int | None) -> torch.Tensor:
        """`decoder.lower` over the whole latent, streamed over time (exact).

        Shapes: x (B, z, T, h, w) (after `conv2`) -> (B, 4*dec_dim, T, h, w) in the model dtype.
        """
        ranges = chunk_ranges(x.shape[2], chunk_frames)
        feats: torch.Tensor | None = None
        with streaming(self.decoder):
            for start, stop in ranges:
                y = self.decoder.lower(x[:, :, start:stop], start == 0)
                if feats is None:
                    feats = y.new_empty((y.shape[0], y.shape[1], x.shape[2], *y.shape[3:]))
                feats[:, :, start:stop] = y
        assert feats is not None
        return feats

    def check_latent(self, raw: torch.Tensor) -> torch.Tensor:
        """Validate a decoder input (B, z, T, h, w) and return it."""
        cfg = self.config
        if not isinstance(raw, torch.Tensor) or raw.dim() != 5:
            got = tuple(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
            raise ValueError(f"latent must be a tensor (B, {cfg.z_dim}, T, h, w); got {got}")
        if raw.shape[1] != cfg.z_dim:
            raise ValueError(
                f"the {cfg.variant} VAE takes {cfg.z_dim}-channel latents; got {raw.shape[1]} channels "
                f"in shape {tuple(raw.shape)} (a {raw.shape[1]}-channel latent belongs to another VAE)"
            )
        if min(raw.shape[2:]) < 1:
            raise ValueError(f"latent has an empty axis: shape {tuple(raw.shape)}")
        if not raw.is_floating_point():
            raise TypeError(f"latent must be a floating-point tensor; got {raw.dtype}")
        return raw


# ---------------------------------------------------------------------------------------- FLOPs
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
    if mode not in ("encode", "decode"):
        raise ValueError(f"mode must be 'encode' or 'decode'; got {mode!r}")
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

    def on_attention(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        b, c, t, h, w = inputs[0].shape
        counts["attn"] += 4.0 * b * t * (h * w) ** 2 * c  # q k^T and attn v

    handles = []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            handles.append(module.register_forward_hook(on_conv))
        elif isinstance(module, AttentionBlock):
            handles.append(module.register_forward_hook(on_attention))
    x = torch.empty(shape, device="meta")
    try:
        with torch.no_grad():
            if mode == "encode":
                model._encode(x, None)
            else:
                model.decoder(model.conv2(x), first_chunk=True)
    finally:
        for handle in handles:
            handle.remove()
    return counts["conv"], counts["attn"]


# ----------------------------------------------------------------------------------- checkpoints
VAE_MARKER_KEY = "decoder.middle.0.residual.0.gamma"
WAN22_MARKER_KEY = "decoder.upsamples.0.upsamples.0.residual.2.weight"
DIFFUSERS_MARKER_KEY = "post_quant_conv.weight"
VAE_PREFIXES = ("vae.", "first_stage_model.")
VAE_LAYOUTS = ("comfy", "official", "diffusers")
DIFFUSERS_FILE_NAME = "diffusion_pytorch_model.safetensors"

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
    from .config import WAN21_VAE, WAN22_VAE

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
    from .weights import read_state_dict

    sd = read_state_dict(path, dtype=dtype, strip_prefixes=VAE_PREFIXES)
    if DIFFUSERS_MARKER_KEY in sd:
        sd = from_diffusers(sd)
    config = detect_vae_config(sd)
    model = WanVAE(config, device="meta")
    load_vae_state_dict(model, sd)
    if current_tracer() is not None:
        # Count the per-cell FLOPs now (cached per config), inside the caller's loading stage,
        # so that a profiled decode or encode later costs microseconds outside its own stage.
        for mode in ("decode", "encode"):
            _unit_flops(config, mode, 1)
            _unit_flops(config, mode, 2)
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
    from .weights import write_safetensors

    if layout not in VAE_LAYOUTS:
        raise ValueError(f"unknown VAE layout {layout!r}; expected one of {VAE_LAYOUTS}")
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else dict(model_or_sd)
    config = model_or_sd.config if isinstance(model_or_sd, WanVAE) else detect_vae_config(sd)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sd.items()}
    target = Path(path)
    if layout == "comfy":
        return write_safetensors(tensors, target)
    if layout == "official":
        with atomic_output(target) as tmp:
            torch.save(tensors, tmp)
        return target
    tensors = to_diffusers(tensors, config)
    if target.suffix == ".safetensors":
        return write_safetensors(tensors, target)
    write_safetensors(tensors, target / DIFFUSERS_FILE_NAME)
    atomic_write_text(target / "config.json", json.dumps(diffusers_config(config), indent=2))
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


__all__ = [
    "ChunkBlock",
    "Decoder3d",
    "Encoder3d",
    "WanVAE",
    "chunk_ranges",
    "detect_vae_config",
    "diffusers_config",
    "from_diffusers",
    "load_vae",
    "pixel_range",
    "save_vae",
    "streaming",
    "to_diffusers",
    "vae_flops",
]
