"""Wan VAE Decode: raw `LATENT` -> `IMAGE` frames (stage `VAE_Decoding`).

The decode plans its memory first (tiling "auto": whole frames when they fit, else the largest
tiles that fit; an explicit choice that cannot fit is refused with the figures).
"""

from __future__ import annotations

from typing import Any

import torch

from ..wan_core.config import AUTO_TILING, TILINGS, VAE_DECODE_STAGE
from . import comfy_bridge as bridge
from . import memory
from . import types as T
from .profiler_handle import maybe_profile


def video_to_images(video: torch.Tensor) -> torch.Tensor:
    """Decoded video (1, 3, F, H, W) in [-1, 1] -> ComfyUI IMAGE (F, H, W, 3) in [0, 1].

    Shapes: (1, 3, F, H, W) -> (F, H, W, 3).
    """
    if video.dim() != 5 or video.shape[0] != 1 or video.shape[1] != 3:
        raise ValueError(f"decoded video must be (1, 3, F, H, W); got {tuple(video.shape)}")
    return video[0].permute(1, 2, 3, 0).float().add(1.0).mul(0.5).clamp(0.0, 1.0).cpu().contiguous()


class _ChunkProgress:
    """Decode callback: ComfyUI progress per decoded chunk, and the interrupt check."""

    def __init__(self) -> None:
        self._advance: Any = None

    def __call__(self, done: int, num_chunks: int) -> None:
        if self._advance is None:
            self._advance = bridge.make_progress(num_chunks, "Wan VAE Decode")
        self._advance(done)
        bridge.check_interrupt()


class WanVAEDecode:
    """Decodes a video latent with the Wan VAE (chunked over time, optionally tiled in space)."""

    CATEGORY = T.CATEGORY
    RETURN_TYPES = (T.IMAGE,)
    RETURN_NAMES = ("images",)
    FUNCTION = "decode"
    RECORDS_STAGES = True  # the workflow observer leaves its stages to the node (maybe_profile)
    DESCRIPTION = "Decodes raw video latents into frames (IMAGE), so core image/video nodes can follow."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "vae": (T.VAE, {"tooltip": "The VAE of the task (Wan2.2 VAE for TI2V-5B, Wan2.1 for A14B)."}),
                "latent": (T.LATENT, {"tooltip": "Raw video latent (B, z, T, h, w), e.g. from Wan Sampler."}),
                "tiling": (
                    list(TILINGS),
                    {
                        "default": AUTO_TILING,
                        "tooltip": "Spatial tiling of the decode: auto = whole frames (exact) when they fit "
                        "in free memory, else the largest overlapping tiles that fit; none = whole frames "
                        "(refused with the figures when they cannot fit).",
                    },
                ),
            },
            "optional": dict(T.PROFILER_INPUT),
            "hidden": dict(T.HIDDEN_IDS),
        }

    def decode(
        self,
        vae: Any,
        latent: dict[str, Any],
        tiling: str,
        profiler: Any = None,
        unique_id: str | None = None,
    ) -> tuple[torch.Tensor]:
        if tiling not in TILINGS:
            raise ValueError(f"tiling must be one of {TILINGS}; got {tiling!r}")
        samples = latent.get("samples") if isinstance(latent, dict) else None
        z_dim = vae.config.z_dim
        if not isinstance(samples, torch.Tensor) or samples.dim() != 5 or samples.shape[1] != z_dim:
            got = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
            raise ValueError(
                f"latent must be a video LATENT with samples (B, {z_dim}, T, h, w) for the "
                f"{vae.config.variant} VAE; got {got}"
            )
        from ..wan_core.vae_stages import decode_video

        frames = []
        memory.bring_back(vae)
        for item in samples:  # one video at a time
            # decode_video plans its memory and traces the VAE_Decoding stage.
            with maybe_profile(profiler, unique_id, [VAE_DECODE_STAGE]):
                video = decode_video(vae, item[None], tiling=tiling, callback=_ChunkProgress(),
                                     memory=memory.PackMemory())
            frames.append(video_to_images(video))
        return (torch.cat(frames, dim=0),)
