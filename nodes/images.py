"""Wan Test Image: a deterministic synthetic start image, so image workflows run without files.

Used by the tiny workflows and the demo (no image file needed); real workflows load a picture with
ComfyUI's own Load Image node instead.
"""

from __future__ import annotations

from typing import Any

import torch

from . import types as T
from .validation import MAX_SIZE, check_node_inputs

PATTERNS = ("gradient", "checker")


class WanTestImage:
    """A smooth colour gradient or a checkerboard as an IMAGE (1, H, W, 3) in [0, 1]."""

    CATEGORY = T.CATEGORY
    RETURN_TYPES = (T.IMAGE,)
    RETURN_NAMES = ("image",)
    FUNCTION = "make"
    DESCRIPTION = "Synthetic start image for image-to-video tests (no file needed)."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "width": (
                    "INT",
                    {
                        "default": 512,
                        "min": 8,
                        "max": MAX_SIZE,
                        "step": 8,
                        "tooltip": "Image width in pixels.",
                    },
                ),
                "height": (
                    "INT",
                    {
                        "default": 512,
                        "min": 8,
                        "max": MAX_SIZE,
                        "step": 8,
                        "tooltip": "Image height in pixels.",
                    },
                ),
                "pattern": (list(PATTERNS), {"default": "gradient", "tooltip": "What the image shows."}),
            },
        }

    def make(self, width: int, height: int, pattern: str) -> tuple[torch.Tensor]:
        check_node_inputs(WanTestImage, width=width, height=height, pattern=pattern)
        ys = torch.linspace(0.0, 1.0, height)[:, None].expand(height, width)
        xs = torch.linspace(0.0, 1.0, width)[None, :].expand(height, width)
        if pattern == "gradient":
            image = torch.stack([xs, ys, 1.0 - 0.5 * (xs + ys)], dim=-1)  # (H, W, 3)
        else:
            cell = max(1, min(width, height) // 8)
            rows = torch.arange(height)[:, None] // cell
            cols = torch.arange(width)[None, :] // cell
            image = ((rows + cols) % 2).float()[..., None].expand(height, width, 3)
        return (image[None].contiguous(),)
