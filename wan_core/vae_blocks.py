"""Building blocks of the Wan2.1 / Wan2.2 video VAEs (spec WAN_VAE sections 2 and 5).

Time is causal everywhere. Every temporal convolution is a `CausalConv3d` that owns a
`CausalCache`: the input frames it still needs from earlier chunks of the same stream. A video can
therefore be processed in one piece or in temporal chunks with identical results; the blocks
only need to know whether a chunk is the first of its stream (`first_chunk`), because frame 0 is
special (it passes the temporal resampling unchanged, spec section 11.2).

Module and parameter names follow the official checkpoints so state dicts load unchanged. The
convolutions that skip known-zero work (the first-chunk kernel slice, the upsampling conv as four
2x2 phase convs) live in `vae_conv.py`.
`streaming`, `chunk_ranges` and `pixel_range` are the temporal-chunking helpers that the VAE and
its tiled decode share.

Shapes: B batch, C channels, T frames (pixel or latent, whatever the stage sees), H/W size.
All 5-D tensors are (B, C, T, H, W).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import VAEConfig
from .vae_conv import CausalCache, CausalConv3d, PhaseKernels, downsample2x_conv, upsample2x_conv

PIXEL_CHANNELS = 3


class RMSNorm(nn.Module):
    """Per-voxel channel norm: x / max(||x||_2 over C, 1e-12) * sqrt(C) * gamma, computed in fp32.

    `images=True` gives gamma the (C, 1, 1) shape used on 4-D tensors; otherwise (C, 1, 1, 1).
    Shapes: (B, C, ...) -> same.
    """

    def __init__(self, dim: int, *, images: bool) -> None:
        super().__init__()
        self.scale = math.sqrt(dim)
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        # F.normalize(x) * gamma, in two passes over x instead of three (no normalised temporary).
        xf = x.float()
        norm = torch.linalg.vector_norm(xf, dim=1, keepdim=True).clamp_min_(1e-12)  # (B, 1, ...)
        y = xf * (self.scale * self.gamma.float())
        return y.div_(norm).to(x.dtype)


class ChunkBlock(nn.Module):
    """A VAE block called as `block(x, first_chunk)` (`first_chunk`: this chunk holds frame 0)."""

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, first_chunk)")


class ResidualBlock(ChunkBlock):
    """RMS -> SiLU -> conv3 -> RMS -> SiLU -> dropout -> conv3, plus a 1x1x1 shortcut if Ci != Co.

    Shapes: (B, Ci, T, H, W) -> (B, Co, T, H, W).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(inplace=True),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False),
            nn.SiLU(inplace=True),
            nn.Dropout(0.0),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:  # noqa: D102
        out = self.residual(x)  # a fresh tensor (a conv output): the shortcut is added in place
        return out.add_(self.shortcut(x))


class AttentionBlock(ChunkBlock):
    """Single-head self-attention over the H*W positions of each frame, with a residual add.

    Shapes: (B, C, T, H, W) -> same; attention never crosses frames.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:  # noqa: D102
        b, c, t, h, w = x.shape
        frames = rearrange(x, "b c t h w -> (b t) c h w")
        qkv = self.to_qkv(self.norm(frames))
        q, k, v = rearrange(qkv, "n (three c) h w -> three n 1 (h w) c", three=3)  # (B*T, 1, H*W, C) each
        o = F.scaled_dot_product_attention(q, k, v)
        o = self.proj(rearrange(o, "n 1 (h w) c -> n c h w", h=h, w=w))
        return x + rearrange(o, "(b t) c h w -> b c t h w", b=b, t=t)


class Resample(ChunkBlock):
    """Spatial (and optionally temporal) down- or up-sampling by 2 (spec 2.5).

    modes: "downsample2d", "downsample3d", "upsample2d", "upsample3d". `out_dim` is the channel
    count after an upsample (C/2 in Wan2.1, C in Wan2.2); downsamples keep C.
    Shapes: downsample (B, C, T, H, W) -> (B, C, T', H/2, W/2) with T' = T, or for 3d and the whole
    sequence 1 + (T-1)/2; upsample -> (B, out_dim, T', 2H, 2W) with T' = T, or for 3d 1 + 2(T-1).
    """

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str, *, out_dim: int | None = None) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode must be one of {self.MODES}; got {mode!r}")
        self.mode = mode
        self.dim = dim
        # `resample` keeps the official modules (and state-dict names); `forward` computes what
        # they compute without the per-frame reshapes (vae_conv.upsample2x_conv / downsample2x_conv).
        self.kernels = PhaseKernels() if mode.startswith("up") else None
        if mode.startswith("up"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(dim, out_dim or dim, 3, padding=1)
            )
            self.time_conv = (
                CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0)) if mode == "upsample3d" else None
            )
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            self.time_conv = (
                CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if mode == "downsample3d" else None
            )

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:  # noqa: D102
        if self.kernels is not None:  # upsampling
            if self.mode == "upsample3d":
                x = self._time_upsample(x, first_chunk)
            return upsample2x_conv(x, self.resample[1], self.kernels)
        x = downsample2x_conv(x, self.resample[1])
        if self.mode == "downsample3d":
            x = self._time_downsample(x, first_chunk)
        return x

    def _time_upsample(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        """Frame 0 passes; every later frame becomes two through the causal `time_conv`.

        Shapes: (B, C, T, H, W) -> (B, C, 2T - 1 (first chunk) or 2T, H, W); the frames are
        interleaved straight into the output (one copy, no concatenation).
        """
        assert self.time_conv is not None
        num_head = 1 if first_chunk else 0
        y = self.time_conv(x[:, :, num_head:])  # (B, 2C, T - num_head, H, W): the two frames of each
        b, c, t, h, w = x.shape
        t_rest = y.shape[2]
        out = x.new_empty(b, c, num_head + 2 * t_rest, h, w)
        out[:, :, :num_head] = x[:, :, :num_head]
        out[:, :, num_head:].view(b, c, t_rest, 2, h, w).copy_(y.view(b, 2, c, t_rest, h, w).transpose(1, 3)
                                                               .transpose(1, 2))
        return out

    def _time_downsample(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        """Frame 0 passes; output k >= 1 is the stride-2 conv over frames (2k-2, 2k-1, 2k)."""
        assert self.time_conv is not None
        y = self.time_conv(x)
        return torch.cat([x[:, :, :1], y], dim=2) if first_chunk else y


class AvgDown3D(nn.Module):
    """Parameter-free Wan2.2 shortcut: fold (ft, fs, fs) blocks into channels, then average groups.

    Shapes: (B, Ci, T, H, W) -> (B, Co, ceil(T/ft), H/fs, W/fs); time is zero-padded in front.
    """

    def __init__(self, in_dim: int, out_dim: int, *, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.factor_t, self.factor_s = factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        if (in_dim * factor) % out_dim:
            raise ValueError(f"AvgDown3D: {in_dim} channels x {factor} is not divisible by {out_dim}")
        self.group = in_dim * factor // out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ft, fs = self.factor_t, self.factor_s
        pad = (ft - x.shape[2] % ft) % ft
        if pad:
            x = F.pad(x, (0, 0, 0, 0, pad, 0))
        folded = rearrange(x, "b c (t dt) (h dy) (w dx) -> b (c dt dy dx) t h w", dt=ft, dy=fs, dx=fs)
        b, _, t, h, w = folded.shape
        return folded.view(b, self.out_dim, self.group, t, h, w).mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free Wan2.2 shortcut: repeat channels, unfold them into (ft, fs, fs) blocks.

    Shapes: (B, Ci, T, H, W) -> (B, Co, T*ft, H*fs, W*fs), minus the first ft-1 frames on the
    first chunk (frame 0 maps to one frame).
    """

    def __init__(self, in_dim: int, out_dim: int, *, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.factor_t, self.factor_s = factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        if (out_dim * factor) % in_dim:
            raise ValueError(f"DupUp3D: {out_dim} channels x {factor} is not divisible by {in_dim}")
        self.repeats = out_dim * factor // in_dim

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:  # noqa: D102
        ft, fs = self.factor_t, self.factor_s
        x = x.repeat_interleave(self.repeats, dim=1)
        x = rearrange(x, "b (c dt dy dx) t h w -> b c (t dt) (h dy) (w dx)", dt=ft, dy=fs, dx=fs)
        return x[:, :, ft - 1 :] if first_chunk else x


class DownResidualBlock(ChunkBlock):
    """Wan2.2 encoder stage: res blocks (+ Resample) plus the AvgDown3D shortcut (spec 2.6).

    Shapes: (B, Ci, T, H, W) -> (B, Co, T', H', W') as the Resample decides.
    """

    def __init__(
        self, in_dim: int, out_dim: int, *, num_res_blocks: int, temporal_down: bool, down: bool
    ) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(
            in_dim, out_dim, factor_t=2 if temporal_down else 1, factor_s=2 if down else 1
        )
        blocks: list[nn.Module] = []
        for i in range(num_res_blocks):
            blocks.append(ResidualBlock(in_dim if i == 0 else out_dim, out_dim))
        if down:
            blocks.append(Resample(out_dim, "downsample3d" if temporal_down else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:  # noqa: D102
        shortcut = self.avg_shortcut(x)
        for block in self.downsamples:
            x = block(x, first_chunk)
        return x.add_(shortcut)  # x is the last block's fresh output


class UpResidualBlock(ChunkBlock):
    """Wan2.2 decoder stage: res blocks (+ Resample) plus the DupUp3D shortcut when upsampling.

    Shapes: (B, Ci, T, H, W) -> (B, Co, T', H', W') as the Resample decides.
    """

    def __init__(
        self, in_dim: int, out_dim: int, *, num_res_blocks: int, temporal_up: bool, up: bool
    ) -> None:
        super().__init__()
        self.avg_shortcut = (
            DupUp3D(in_dim, out_dim, factor_t=2 if temporal_up else 1, factor_s=2) if up else None
        )
        blocks: list[nn.Module] = []
        for i in range(num_res_blocks):
            blocks.append(ResidualBlock(in_dim if i == 0 else out_dim, out_dim))
        if up:
            blocks.append(Resample(out_dim, "upsample3d" if temporal_up else "upsample2d", out_dim=out_dim))
        self.upsamples = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:  # noqa: D102
        shortcut = None if self.avg_shortcut is None else self.avg_shortcut(x, first_chunk)
        for block in self.upsamples:
            x = block(x, first_chunk)
        return x if shortcut is None else x.add_(shortcut)  # x is the last block's fresh output


def is_residual_variant(config: VAEConfig) -> bool:
    """Wan2.2 has parameter-free AvgDown3D/DupUp3D skips around every stage; Wan2.1 does not."""
    return config.variant == "wan2.2"


class Encoder3d(nn.Module):
    """Pixels (patchified for 2.2) -> 2z channels (mean and log-variance), spec sections 3 and 4.

    Shapes: (B, 3*p*p, F, H/p, W/p) -> (B, 2z, T, h, w).
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        mults = (1, *config.dim_mult)
        dims = [config.dim * m for m in mults]
        num_stages = len(config.dim_mult)
        self.conv1 = CausalConv3d(PIXEL_CHANNELS * config.patch_size**2, dims[0], 3, padding=1)
        stages: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            is_last = i == num_stages - 1
            temporal = (not is_last) and config.temperal_downsample[i]
            if is_residual_variant(config):
                stages.append(
                    DownResidualBlock(
                        in_dim,
                        out_dim,
                        num_res_blocks=config.num_res_blocks,
                        temporal_down=temporal,
                        down=not is_last,
                    )
                )
                continue
            for j in range(config.num_res_blocks):
                stages.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim))
            if not is_last:
                stages.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.ModuleList(stages)
        self.middle = nn.ModuleList(
            [ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]), ResidualBlock(dims[-1], dims[-1])]
        )
        self.head = nn.Sequential(
            RMSNorm(dims[-1], images=False),
            nn.SiLU(inplace=True),
            CausalConv3d(dims[-1], 2 * config.z_dim, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:  # noqa: D102
        x = self.conv1(x)
        for block in (*self.downsamples, *self.middle):
            x = block(x, first_chunk)
        return self.head(x)


class Decoder3d(nn.Module):
    """z channels -> pixels (patchified for 2.2), spec sections 3 and 4.

    Shapes: (B, z, T, h, w) -> (B, 3*p*p, F', H/p, W/p); F' = 1 + 4(T-1) for a whole sequence.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        mults = (config.dim_mult[-1], *reversed(config.dim_mult))
        dims = [config.dec_dim * m for m in mults]
        temporal_up = tuple(reversed(config.temperal_downsample))
        num_stages = len(config.dim_mult)
        residual = is_residual_variant(config)
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = nn.ModuleList(
            [ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])]
        )
        stages: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            is_last = i == num_stages - 1
            temporal = (not is_last) and temporal_up[i]
            if residual:
                stages.append(
                    UpResidualBlock(
                        in_dim,
                        out_dim,
                        num_res_blocks=config.num_res_blocks + 1,
                        temporal_up=temporal,
                        up=not is_last,
                    )
                )
                continue
            if i > 0:
                in_dim //= 2  # the Wan2.1 upsample conv of the previous stage halved the channels
            for j in range(config.num_res_blocks + 1):
                stages.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim))
            if not is_last:
                stages.append(
                    Resample(out_dim, "upsample3d" if temporal else "upsample2d", out_dim=out_dim // 2)
                )
        self.upsamples = nn.ModuleList(stages)
        self.head = nn.Sequential(
            RMSNorm(dims[-1], images=False),
            nn.SiLU(inplace=True),
            CausalConv3d(dims[-1], PIXEL_CHANNELS * config.patch_size**2, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:  # noqa: D102
        return self.upper(self.lower(x, first_chunk), first_chunk)

    def lower(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        """conv1 and the middle section (with the frame-global attention), at latent resolution.

        Shapes: (B, z, T, h, w) -> (B, 4*dec_dim, T, h, w).
        """
        x = self.conv1(x)
        for block in self.middle:
            x = block(x, first_chunk)
        return x

    def upper(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        """The upsampling stages and the head (convolutions only: local in space).

        Shapes: (B, 4*dec_dim, T, h, w) -> (B, 3*p*p, F', H/p, W/p).
        """
        for block in self.upsamples:
            x = block(x, first_chunk)
        return self.head(x)


def patchify(video: torch.Tensor, patch: int) -> torch.Tensor:
    """Fold p x p pixel blocks into channels, channel = (c * p + dx) * p + dy (spec 2.6).

    Shapes: (B, C, F, H, W) -> (B, C*p*p, F, H/p, W/p).
    """
    if patch == 1:
        return video
    return rearrange(video, "b c f (h q) (w r) -> b (c r q) f h w", q=patch, r=patch)


def unpatchify(video: torch.Tensor, patch: int) -> torch.Tensor:
    """Inverse of `patchify`. Shapes: (B, C*p*p, F, h, w) -> (B, C, F, h*p, w*p)."""
    if patch == 1:
        return video
    return rearrange(video, "b (c r q) f h w -> b c f (h q) (w r)", q=patch, r=patch)


# ------------------------------------------------------------------------------------------ streaming
@contextlib.contextmanager
def streaming(module: nn.Module) -> Iterator[None]:
    """Treat the calls inside the block as consecutive chunks of one stream (fresh caches).

    The causal caches keep frames from chunk to chunk; the upsampling convs keep their phase
    kernels for the stream (built once per decode, not per chunk). All are freed on exit.
    """
    caches: list[CausalCache | PhaseKernels] = [m.cache for m in module.modules() if isinstance(m, CausalConv3d)]
    caches += [m.kernels for m in module.modules() if isinstance(m, Resample) and m.kernels is not None]
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
