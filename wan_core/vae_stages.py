"""The VAE as steps of the pipeline: the `VAE_Encoding` and `VAE_Decoding` stages.

`WanVAE` is an `nn.Module` and opens no profiling stage (profiling never enters a module). The code
that runs the VAE as a step of the pipeline calls these functions instead, as `sampler.py` does for
the DiT: each checks its input, opens the stage with its FLOPs and facts, and runs the module.
Outside a profiler the stages are no-ops and no FLOPs are counted.

`load_vae_for_stages` loads a VAE and, under a profiler, counts its per-cell FLOPs right away
(cached per config), inside the caller's loading stage, so that a profiled encode or decode later
spends microseconds outside its own stage.

`decode_video` plans its memory first (`runtime.stage_plans.plan_decode`): tiling "auto" is whole
frames when they fit in what is free on the VAE's device, else the largest tiles that fit; an
explicit tiling that cannot fit is refused (`MemoryPlanError`) before anything is allocated. (The
module's own `WanVAE.decode(tiling="auto")` means the default tiles; the planner is the pipeline's.)

Shapes: video (B, 3, F, H, W) in [-1, 1]; raw latent (B, z, T, h, w).
"""

from __future__ import annotations

import torch

from .checkpoints.io import PathLike
from .checkpoints.vae import load_vae
from .config import NO_TILING, VAE_DECODE_STAGE, VAE_ENCODE_STAGE
from .flops import count_vae_flops_ahead, vae_decode_flops, vae_flops
from .runtime.planner import MemoryEnvironment, SystemMemory
from .runtime.stage_plans import plan_decode
from .trace import current_tracer, event, stage
from .vae import ChunkCallback, WanVAE
from .vae_blocks import PIXEL_CHANNELS
from .vae_tiling import VAETiling


def load_vae_for_stages(path: PathLike, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> WanVAE:
    """`checkpoints.vae.load_vae`; under a profiler the VAE's FLOP counts are prepared as well."""
    model = load_vae(path, device=device, dtype=dtype)
    if current_tracer() is not None:
        count_vae_flops_ahead(model.config)
    return model


def encode_video(vae: WanVAE, video: torch.Tensor, *, chunk_frames: int | None = 1,
                 drop_trailing_frames: bool = False) -> torch.Tensor:
    """`vae.encode` as the stage `VAE_Encoding` (kind "preprocess").

    Shapes: video (B, 3, F, H, W) -> raw mean (B, z, 1 + (F-1)//4, H/s, W/s), float32.
    """
    video = vae.check_video(video, drop_trailing_frames=drop_trailing_frames)
    cfg = vae.config
    b, _, f, h, w = video.shape
    s = cfg.spatial_stride
    latent_shape = (b, cfg.z_dim, cfg.latent_frames(f), h // s, w // s)
    flops = vae_flops(cfg, "encode", tuple(video.shape)) if current_tracer() is not None else None
    with stage(VAE_ENCODE_STAGE.name, kind=VAE_ENCODE_STAGE.kind, flops=flops, vae=cfg.variant,
               input_shape=tuple(video.shape), latent_shape=latent_shape):
        return vae.encode(video, chunk_frames=chunk_frames)


def decode_video(vae: WanVAE, raw: torch.Tensor, *, tiling: VAETiling | str | None = None,
                 callback: ChunkCallback | None = None, chunk_frames: int | None = 1,
                 clamp: bool = True, memory: MemoryEnvironment | None = None) -> torch.Tensor:
    """`vae.decode` as the stage `VAE_Decoding` (kind "decode"), after its memory plan.

    `tiling`: "auto" (the planner's choice), "none"/None (whole frames) or a `VAETiling`; other
    arguments as `WanVAE.decode`; `memory`: how the application reports and frees memory (default:
    the system's figures). The decision is the trace event `memory_plan`.

    Shapes: raw (B, z, T, h, w) -> video (B, 3, 1 + 4(T-1), h*s, w*s), float32.
    """
    raw = vae.check_latent(raw)
    memory_plan = plan_decode(vae, tuple(raw.shape), tiling=tiling, memory=memory or SystemMemory(),
                              chunk_frames=chunk_frames)
    event("memory_plan", **memory_plan.facts())
    plan = memory_plan.tiling
    cfg = vae.config
    b, _, t, h, w = raw.shape
    s = cfg.spatial_stride
    out_shape = (b, PIXEL_CHANNELS, cfg.pixel_frames(t), h * s, w * s)
    flops = vae_decode_flops(cfg, tuple(raw.shape), plan) if current_tracer() is not None else None
    with stage(VAE_DECODE_STAGE.name, kind=VAE_DECODE_STAGE.kind, flops=flops, vae=cfg.variant,
               latent_shape=tuple(raw.shape), output_shape=out_shape,
               tiling=NO_TILING if plan is None else plan.describe(), **memory_plan.estimate.facts()):
        return vae.decode(raw, tiling=plan, callback=callback, chunk_frames=chunk_frames, clamp=clamp)
