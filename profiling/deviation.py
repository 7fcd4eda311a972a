"""How far one run's output is from another's: latent relative L2 and PSNR of decoded frames.

Both compare two runs of the same workflow (same weights unless the row changes them, same seed
and so the same noise). They measure numeric distance, not visual quality: a distilled model can
look as good while being far from the baseline, and a deviation of 1e-3 can still be visible.

Shapes: latents any (same) shape; frames (F, H, W, 3) uint8.
"""

from __future__ import annotations

import math

import torch

PEAK_8BIT = 255.0


def _check_shapes(what: str, value: torch.Tensor, reference: torch.Tensor) -> None:
    if value.shape != reference.shape:
        raise ValueError(f"{what} shapes differ: {tuple(value.shape)} vs the reference's {tuple(reference.shape)} "
                         "(the row changed the output size; a deviation needs the same geometry)")


def relative_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| in float64 (0 when identical)."""
    _check_shapes("latent", value, reference)
    ref = reference.double()
    norm = float(torch.linalg.vector_norm(ref))
    diff = float(torch.linalg.vector_norm(value.double() - ref))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def psnr_8bit(frames: torch.Tensor, reference: torch.Tensor) -> float | None:
    """PSNR in dB of 8-bit frames against the reference frames; None when they are identical
    (infinite PSNR)."""
    _check_shapes("video", frames, reference)
    if frames.dtype != torch.uint8 or reference.dtype != torch.uint8:
        raise TypeError(f"PSNR compares uint8 frames; got {frames.dtype} and {reference.dtype}")
    total = 0.0
    for frame, ref in zip(frames, reference, strict=True):  # one frame at a time: a 720p video is 224 MB
        total += float((frame.to(torch.int32) - ref.to(torch.int32)).square().sum())
    mse = total / max(frames.numel(), 1)
    if mse == 0.0:
        return None
    return 10.0 * math.log10(PEAK_8BIT**2 / mse)
