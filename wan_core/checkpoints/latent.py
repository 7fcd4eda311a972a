"""Latent files: one sampled latent saved beside a benchmark report, and read back to compare runs.

A latent file is a safetensors file with one tensor, `samples` (the raw latent of ComfyUI's
`LATENT`, float32), and the metadata `format: wanbench.latent/1`. Benchmark ladders read each
row's file to measure how far its output is from the baseline row's.

Shapes: samples (B, C, T, h, w).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from .io import PathLike, write_safetensors

LATENT_FORMAT = "wanbench.latent/1"
SAMPLES_KEY = "samples"


def save_latent(samples: torch.Tensor, path: PathLike) -> Path:
    """Write `samples` (float32, CPU) to `path` atomically; returns the path."""
    if not isinstance(samples, torch.Tensor) or not samples.is_floating_point():
        raise ValueError(f"a latent to save must be a floating-point tensor; got {samples!r:.80}")
    return write_safetensors({SAMPLES_KEY: samples.float()}, path, metadata={"format": LATENT_FORMAT})


def load_latent(path: PathLike) -> torch.Tensor:
    """The `samples` tensor of a latent file written by `save_latent` (float32, CPU)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"latent file not found: {file}")
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != LATENT_FORMAT or SAMPLES_KEY not in handle.keys():
            raise ValueError(f"{file} is not a latent file of this pack (format {metadata.get('format')!r}, "
                             f"keys {list(handle.keys())}); expected format {LATENT_FORMAT!r} with "
                             f"'{SAMPLES_KEY}'")
        return handle.get_tensor(SAMPLES_KEY).float()
