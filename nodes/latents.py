"""Wan Empty Latent (text-to-video) and Wan Image To Video (TI2V-5B and I2V-A14B start image).

Both emit ComfyUI's `LATENT` (`{"samples": raw zeros (1, z, T, h, w)}`: one video per run); Wan Image
To Video adds
`"wan_condition"`: the wan_core conditioning object (`TI2VCondition` or `I2VCondition`) that Wan
Sampler passes on. The task follows from the VAE: the Wan2.2 VAE means TI2V-5B, the Wan2.1 VAE
means the A14B tasks.

The size is checked against host memory before anything is made: a latent whose decoded video (and
the IMAGE frames made of it) could never be held is refused with the figures
(`runtime.stage_plans.check_video_output`), instead of a server killed by the OOM killer later.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

import torch

from ..wan_core.config import I2V_A14B, PREPROCESS_STAGE, T2V_A14B, TI2V_5B
from . import memory
from . import types as T
from .profiler_handle import maybe_profile, record_context, single_stage
from .validation import (
    FRAME_STEP,
    MAX_FRAMES,
    MAX_SIZE,
    SIZE_STEP,
    check_frames,
    check_node_inputs,
    check_size,
    first_problem,
    raise_problems,
)


def task_for_vae(vae: Any, *, with_image: bool) -> Any:
    """The task preset a VAE belongs to, with the loaded VAE's own config."""
    variant = vae.config.variant
    if variant == "wan2.2":
        base = TI2V_5B
    elif variant == "wan2.1":
        base = I2V_A14B if with_image else T2V_A14B
    else:
        raise ValueError(f"unknown VAE variant {variant!r}; expected 'wan2.1' or 'wan2.2'")
    return replace(base, vae=vae.config)


def check_video_fits(task: Any, width: int, height: int, length: int) -> None:
    """Refuse a size whose decoded frames could not be held in host memory (before any allocation)."""
    from ..wan_core.runtime.stage_plans import check_video_output

    _, t, h, w = task.latent_shape(width, height, length)  # raises on bad geometry
    budget = memory.PackMemory().budget(torch.device("cpu"))
    check_video_output(task.vae, (1, task.vae.z_dim, t, h, w), budget=budget,
                       size=f"{width}x{height}, {length}-frame")


def _geometry_inputs(default_w: int, default_h: int, default_frames: int) -> dict[str, Any]:
    return {
        "width": (
            "INT",
            {
                "default": default_w,
                "min": SIZE_STEP,
                "max": MAX_SIZE,
                "step": SIZE_STEP,
                "tooltip": "Video width in pixels: a multiple of 32 for TI2V-5B (e.g. 1280), "
                "of 16 for A14B (e.g. 1280 or 832).",
            },
        ),
        "height": (
            "INT",
            {
                "default": default_h,
                "min": SIZE_STEP,
                "max": MAX_SIZE,
                "step": SIZE_STEP,
                "tooltip": "Video height in pixels: a multiple of 32 for TI2V-5B (e.g. 704), "
                "of 16 for A14B (e.g. 720 or 480).",
            },
        ),
        "length": (
            "INT",
            {
                "default": default_frames,
                "min": 1,
                "max": MAX_FRAMES,
                "step": FRAME_STEP,
                "tooltip": "Number of frames, 4k+1: 121 for TI2V-5B (24 fps), 81 for A14B (16 fps).",
            },
        ),
    }


def _validate_length(length: int | None) -> bool | str:
    """What ComfyUI checks before the prompt runs: the frame count (4k+1), on the `length` input.

    Width and height are checked when the node runs, against the task's grid (16 for A14B, 32 for
    TI2V-5B, known from the VAE); ComfyUI checks their min/max before that.
    """
    return first_problem(check_frames("length", length))


def check_geometry(cls: type, task: Any, width: int, height: int, length: int) -> None:
    """Every problem with the geometry widgets at once, each naming its input (ValueError)."""
    check_node_inputs(cls, width=width, height=height, length=length)
    raise_problems(
        check_size("width", width, task.size_multiple),
        check_size("height", height, task.size_multiple),
        headline=f"{task.name}: ",
    )


class WanEmptyLatent:
    """An all-zero raw latent of the right shape for text-to-video (any task)."""

    CATEGORY = T.CATEGORY
    RETURN_TYPES = (T.LATENT,)
    RETURN_NAMES = ("latent",)
    FUNCTION = "make"
    RECORDS_STAGES = True  # the workflow observer leaves its stages to the node (maybe_profile)
    DESCRIPTION = "Empty video latent for text-to-video; its shape follows the VAE (Wan2.1 or Wan2.2)."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "vae": (T.VAE, {"tooltip": "The VAE of the task: sets channels and stride."}),
                **_geometry_inputs(*TI2V_5B.default_size, TI2V_5B.frame_num),
            },
            "optional": dict(T.PROFILER_INPUT),
            "hidden": dict(T.HIDDEN_IDS),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, length: int | None = None) -> bool | str:
        return _validate_length(length)

    def make(
        self,
        vae: Any,
        width: int,
        height: int,
        length: int,
        profiler: Any = None,
        unique_id: str | None = None,
    ) -> tuple[dict[str, Any]]:
        task = task_for_vae(vae, with_image=False)
        check_geometry(WanEmptyLatent, task, width, height, length)
        check_video_fits(task, width, height, length)
        with (
            maybe_profile(profiler, unique_id, [PREPROCESS_STAGE]),
            single_stage(*PREPROCESS_STAGE, mode="t2v"),
        ):
            shape = task.latent_shape(width, height, length)  # (z, T, h, w); raises on bad geometry
            samples = torch.zeros((1, task.vae.z_dim, *shape[1:]), dtype=torch.float32)
        record_context(profiler, width=width, height=height, frames=length)
        return ({"samples": samples},)


class WanImageToVideo:
    """Start-image conditioning: TI2V-5B (first frame pinned) or I2V-A14B (mask + image latent)."""

    CATEGORY = T.CATEGORY
    RETURN_TYPES = (T.LATENT,)
    RETURN_NAMES = ("latent",)
    FUNCTION = "make"
    RECORDS_STAGES = True  # the workflow observer leaves its stages to the node (maybe_profile)
    DESCRIPTION = (
        "Encodes a start image. With the Wan2.2 VAE (TI2V-5B) the output size is the 32-grid "
        "size of width x height pixels closest to the image's aspect; with the Wan2.1 VAE "
        "(I2V-A14B) the image is resized to about width x height pixels."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "vae": (T.VAE, {"tooltip": "The VAE of the task; it encodes the start image."}),
                "start_image": (
                    T.IMAGE,
                    {"tooltip": "First frame of the video (the first image of a batch)."},
                ),
                **_geometry_inputs(*TI2V_5B.default_size, TI2V_5B.frame_num),
            },
            "optional": dict(T.PROFILER_INPUT),
            "hidden": dict(T.HIDDEN_IDS),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, length: int | None = None) -> bool | str:
        return _validate_length(length)

    def make(
        self,
        vae: Any,
        start_image: torch.Tensor,
        width: int,
        height: int,
        length: int,
        profiler: Any = None,
        unique_id: str | None = None,
    ) -> tuple[dict[str, Any]]:
        from ..wan_core import conditioning
        from ..wan_core.vae_stages import encode_video

        if not isinstance(start_image, torch.Tensor) or start_image.dim() != 4 or start_image.shape[-1] != 3:
            got = (
                tuple(start_image.shape)
                if isinstance(start_image, torch.Tensor)
                else type(start_image).__name__
            )
            raise ValueError(
                f"start_image must be an IMAGE (B, H, W, 3) in [0, 1]; got {got}. "
                "connect an IMAGE output (Load Image, Wan Test Image) to it"
            )
        task = task_for_vae(vae, with_image=True)
        check_node_inputs(WanImageToVideo, width=width, height=height, length=length)
        check_video_fits(task, width, height, length)
        memory.bring_back(vae)
        image = start_image[0]  # (H, W, 3): IMAGE -> one RGB image
        build = conditioning.ti2v_condition if task.dit.model_type == "ti2v" else conditioning.i2v_condition
        with (
            maybe_profile(profiler, unique_id, [PREPROCESS_STAGE]),
            single_stage(*PREPROCESS_STAGE, mode=task.dit.model_type),
        ):
            condition = build(
                image, num_frames=length, max_area=width * height, task=task, encode=partial(encode_video, vae)
            )
        shape = condition.latent_shape  # (C, T, h, w) of the noise
        samples = torch.zeros((1, task.vae.z_dim, *shape[1:]), dtype=torch.float32)
        out_w, out_h = condition.pixel_size
        record_context(profiler, width=out_w, height=out_h, frames=length)
        return ({"samples": samples, "wan_condition": condition},)
