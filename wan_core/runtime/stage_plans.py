"""Memory plans of the stages other than sampling: loading weights, encoding text, the decoded video,
and the VAE decode (with its tiling).

Each builds an `Estimate` from configs and sizes and checks it against a budget before the stage
allocates anything (`MemoryPlanError` with the figures otherwise):

- `check_load`: the weights a loader is about to read, at the dtype they will have, on the device
  they go to (from the file headers: no tensor data is read).
- `check_text_encode`: the UMT5 weights on the device they run on and one encode's working set.
- `check_video_output`: the frames a latent decodes to, in host memory (the decode's output and
  the `IMAGE` frames made of it): checked where the latent size is chosen, so that a size that
  could never be decoded is refused before its latent is made.
- `plan_decode`: whole frames or tiles (`auto`: whole frames when they fit, else the largest tiles
  that fit), weights and the traced decode on the VAE's device.

Shapes: raw latent (B, z, T, h, w); video (B, 3, F, H, W).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..config import AUTO_TILING, NO_TILING, UMT5Config, VAEConfig
from ..vae_tiling import VAETiling
from .estimates import WeightBytes, attention_kernel, t5_encode_bytes, vae_attention_dim, vae_decode_bytes
from .planner import Estimate, MemoryBudget, MemoryEnvironment, TilingPlan, budget_with_room, check_fits, plan_tiling

FP32_BYTES = 4
PIXEL_CHANNELS = 3
TILE_CANDIDATES = (64, 48, 32, 24, 16)  # latent cells per tile side, tried largest first
TILE_OVERLAP = 8


def check_load(what: str, weights: Sequence[WeightBytes], *, device: torch.device | str, budget: MemoryBudget,
               fix: str) -> Estimate:
    """Refuse to load `weights` onto `device` when they would not fit; returns the estimate."""
    device = torch.device(device)
    estimate = Estimate(f"loading {what}", str(device), tuple((f"weights {i}" if len(weights) > 1 else "weights",
                                                                w.total) for i, w in enumerate(weights)))
    check_fits(estimate, budget, fix=fix)
    return estimate


def video_bytes(vae: VAEConfig, latent_shape: Sequence[int]) -> int:
    """Bytes of the float32 video a raw latent (B, z, T, h, w) decodes to."""
    b, _, t, h, w = (int(v) for v in latent_shape)
    s = vae.spatial_stride
    return b * PIXEL_CHANNELS * vae.pixel_frames(t) * h * s * w * s * FP32_BYTES


def check_video_output(vae: VAEConfig, latent_shape: Sequence[int], *, budget: MemoryBudget,
                       size: str) -> Estimate:
    """Refuse a latent size whose decoded frames could not be held in host memory: the decode's
    output video and the `IMAGE` frames made of it, both float32. `size` names it for the message."""
    frames = video_bytes(vae, latent_shape)
    estimate = Estimate(f"the video of a {size} latent", budget.device,
                        (("decoded video", frames), ("IMAGE frames", frames)))
    check_fits(estimate, budget, fix="choose a smaller size or fewer frames")
    return estimate


def check_text_encode(encoder: nn.Module, config: UMT5Config, *, device: torch.device | str,
                      memory: MemoryEnvironment, keep: Sequence[object]) -> Estimate:
    """The UMT5 weights on `device` plus one encode's working set, against what is free there
    (the application is asked to make room first on a GPU)."""
    device = torch.device(device)
    weights = WeightBytes.of_module(encoder)
    dtype = next(encoder.parameters()).dtype
    working = t5_encode_bytes(config, dtype, device_type=device.type)
    estimate = Estimate("UMT5 text encoding", str(device), (("weights", weights.total), ("encode", working)))
    own = sum(t.numel() * t.element_size() for t in [*encoder.parameters(), *encoder.buffers()]
              if t.device.type == device.type)
    budget = budget_with_room(memory, device, wanted=estimate.needed, own_bytes=own, keep=keep,
                              what="the encoder")
    check_fits(estimate, budget, fix="load the text encoder with device 'cpu', or free memory")
    return estimate


Candidate = tuple[str, object, Callable[[], Estimate]]


def _candidates(vae: nn.Module, latent_shape: tuple[int, ...], requested: object, weights: int,
                chunk_frames: int | None) -> list[Candidate]:
    """(label, tiling, estimate thunk): the requested choice first; whole frames, then tiles from
    large to small (only those smaller than the latent, which they cut)."""
    cfg = vae.config
    device = str(vae.device)
    dtype = vae.dtype
    kernel = attention_kernel("sdpa", device=vae.device, dtype=dtype, head_dim=vae_attention_dim(cfg))
    h, w = latent_shape[-2:]

    def estimate(tiling: VAETiling | None) -> Callable[[], Estimate]:
        def build() -> Estimate:
            working = vae_decode_bytes(cfg, dtype, latent_shape, tiling=tiling, kernel=kernel,
                                       chunk_frames=chunk_frames)
            return Estimate("VAE decode", device, (("weights", weights), ("decode (output video included)", working)))
        return build

    if isinstance(requested, VAETiling):
        return [(requested.describe(), requested, estimate(requested))]
    tiles = [VAETiling(tile_size=n, overlap=TILE_OVERLAP) for n in TILE_CANDIDATES if n < max(h, w)]
    return [("tiling 'none' (whole frames)", None, estimate(None)),
            *[(f"tiling 'auto' with {t.describe()}", t, estimate(t)) for t in tiles]]


def plan_decode(vae: nn.Module, latent_shape: Sequence[int], *, tiling: object, memory: MemoryEnvironment,
                chunk_frames: int | None = 1) -> TilingPlan:
    """The tiling of this decode (see the module docstring); raises `MemoryPlanError`.

    `tiling`: "auto", "none" / None, or a `VAETiling`; `chunk_frames` as `WanVAE.decode`.
    Shapes: latent_shape (B, z, T, h, w).
    """
    requested = NO_TILING if tiling is None else tiling
    if requested not in (AUTO_TILING, NO_TILING) and not isinstance(requested, VAETiling):
        raise TypeError(f"tiling must be {NO_TILING!r}, {AUTO_TILING!r} or a VAETiling; got {tiling!r}")
    shape = tuple(int(v) for v in latent_shape)
    candidates = _candidates(vae, shape, requested, WeightBytes.of_module(vae).total, chunk_frames)
    own = sum(t.numel() * t.element_size() for t in [*vae.parameters(), *vae.buffers()]
              if t.device.type == vae.device.type)
    budget = budget_with_room(memory, vae.device, wanted=candidates[0][2]().needed, own_bytes=own, keep=[vae],
                              what="the VAE")
    label = requested if isinstance(requested, str) else requested.describe()
    return plan_tiling(candidates, requested=label, budget=budget, fix="choose a smaller size or fewer frames")
