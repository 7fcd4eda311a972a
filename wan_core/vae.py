"""The Wan2.1 and Wan2.2 video VAEs: exact encode/decode, streamed over time, optionally tiled.

`WanVAE.encode` takes a video in [-1, 1] and returns the raw posterior mean (what ComfyUI's
`LATENT` carries); `encode_latent` returns the normalised latent the DiT works on. `decode` takes a
raw latent and returns the video clamped to [-1, 1]; `decode_latent` takes a normalised one.

Time is processed in chunks of latent frames (default 1, as the official code does), with the
history of every causal conv kept in its `CausalCache`, so results equal the whole-sequence
computation and memory does not grow with the clip length. `chunk_frames=None` runs the whole
clip at once. Spatial tiling (`vae_tiling.VAETiling`) bounds memory by the tile size.

The module opens no profiling stage: `vae_stages.encode_video` / `decode_video` run it as the
pipeline's `VAE_Encoding` / `VAE_Decoding` stages. Checkpoints: `checkpoints/vae.py`; FLOPs:
`flops.vae_flops`.

Frame rules: F pixel frames <-> T = 1 + (F-1)/4 latent frames; decode gives F = 1 + 4(T-1).

Shapes: video (B, 3, F, H, W); latent (B, z, T, h, w) with h = H/8 (2.1) or H/16 (2.2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from .config import VAEConfig
from .latents import denormalize_latent, normalize_latent
from .vae_blocks import (
    PIXEL_CHANNELS,
    CausalConv3d,
    Decoder3d,
    Encoder3d,
    chunk_ranges,
    patchify,
    pixel_range,
    streaming,
    unpatchify,
)
from .vae_tiling import VAETiling, decode_tiled, resolve_tiling

logger = logging.getLogger(__name__)

ChunkCallback = Callable[[int, int], None]


class WanVAE(nn.Module):
    """The Wan2.1 / Wan2.2 video VAE (official module names, so checkpoints load unchanged).

    Weights are cast to `dtype` (float32 by default); RMS norms always compute in float32, outputs
    are float32. Use `wan_core.checkpoints.vae.load_vae` to build one from a checkpoint.
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
        x = self.conv2(raw.to(device=self.device, dtype=self.dtype))
        if plan is None:
            out = torch.empty((b, PIXEL_CHANNELS, self.config.pixel_frames(t), h * s, w * s),
                              dtype=torch.float32, device=self.device)
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
