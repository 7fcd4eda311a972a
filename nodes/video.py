"""Wan Save Video: IMAGE frames -> H.264 mp4 through PyAV, saved in the output folder with a preview."""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from ..util.atomic import atomic_output, release_claim
from ..util.deps import require
from . import comfy_bridge as bridge
from . import types as T
from .validation import check_node_inputs, check_prefix, first_problem

log = logging.getLogger(__name__)

FORMATS = {"mp4 (h264)": ("mp4", "libx264"), "mp4 (mpeg4)": ("mp4", "mpeg4")}
MAX_FPS = 120
FPS_FROM_TASK = 0  # the fps widget value that means "the task's sample fps"
MAX_CRF = 51


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """IMAGE (F, H, W, 3) float in [0, 1] -> uint8 frames, the 8-bit quantisation every saver does.

    Shapes: (F, H, W, 3) -> (F, H, W, 3) uint8.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be an IMAGE (F, H, W, 3) in [0, 1]; got {got}")
    return images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def write_mp4(frames: torch.Tensor, path: Path, *, fps: int, codec: str = "libx264", crf: int = 19) -> Path:
    """Encode uint8 RGB frames (F, H, W, 3) into an mp4 (yuv420p; H and W must be even).

    The file is encoded under a temporary name and renamed when complete: a failing encoder
    leaves nothing at `path`.
    """
    av = require("av")

    num_frames, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(
            f"mp4 (yuv420p) needs an even width and height; got {width}x{height}. "
            "Decode at an even size (every Wan size is a multiple of 16) or crop the frames"
        )
    with atomic_output(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        for frame in frames.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    log.info("wrote %s (%d frames, %dx%d, %d fps)", path, num_frames, width, height, fps)
    return path


def read_mp4(path: Path) -> torch.Tensor:
    """The frames of a video file as uint8 RGB (what `write_mp4` encoded, after its lossy codec).

    Shapes: -> (F, H, W, 3) uint8.
    """
    import av

    if not Path(path).is_file():
        raise FileNotFoundError(f"video not found: {path}")
    with av.open(str(path)) as container:
        frames = [torch.from_numpy(frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path} holds no video frames")
    return torch.stack(frames)


def resolve_fps(fps: int, model: T.DiTExperts | None) -> int:
    """The fps to encode with: `fps` itself, or the task's sample fps when `fps` is 0."""
    if fps != FPS_FROM_TASK:
        return fps
    if not isinstance(model, T.DiTExperts):
        raise ValueError(
            "fps is 0 (= the task's fps) but no model is connected to Wan Save Video; connect Wan "
            "Model Loader's model to its model input, or set fps (24 for TI2V-5B, 16 for A14B)"
        )
    return int(model.task.fps)


class WanSaveVideo:
    """Saves frames as an mp4 in the output folder and previews it in the UI."""

    CATEGORY = T.CATEGORY
    RETURN_TYPES = (T.STRING,)
    RETURN_NAMES = ("video_path",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    DESCRIPTION = (
        "Writes an mp4 (PyAV) into ComfyUI's output folder and outputs its path; Wan Benchmark Report "
        "needs no wire from it."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "images": (T.IMAGE, {"tooltip": "Frames (F, H, W, C) in [0, 1], e.g. from Wan VAE Decode."}),
                "fps": (
                    "INT",
                    {
                        "default": FPS_FROM_TASK,
                        "min": FPS_FROM_TASK,
                        "max": MAX_FPS,
                        "tooltip": "Frames per second. 0 = the task's fps, read from the model input "
                        "(24 for TI2V-5B, 16 for the A14B tasks); any other value is used as is.",
                    },
                ),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "wanbench/video",
                        "tooltip": "File name prefix inside the output folder; a counter is appended.",
                    },
                ),
                "format": (
                    list(FORMATS),
                    {"default": "mp4 (h264)", "tooltip": "Container and codec (PyAV/FFmpeg)."},
                ),
                "crf": (
                    "INT",
                    {
                        "default": 19,
                        "min": 0,
                        "max": MAX_CRF,
                        "tooltip": "H.264 quality: lower is better and larger (0 = lossless).",
                    },
                ),
            },
            "optional": {
                "model": (
                    T.DIT_EXPERTS,
                    {"tooltip": "Wan Model Loader's model: with fps 0 the video gets its task's fps."},
                ),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix: str | None = None) -> bool | str:
        # Only the prefix (the message lands on it); ComfyUI checks the ranges of fps and crf.
        return first_problem(check_prefix("filename_prefix", filename_prefix))

    def save(
        self,
        images: torch.Tensor,
        fps: int,
        filename_prefix: str,
        format: str,
        crf: int,
        model: T.DiTExperts | None = None,
    ) -> dict[str, Any]:
        check_node_inputs(WanSaveVideo, fps=fps, filename_prefix=filename_prefix, format=format, crf=crf)
        fps = resolve_fps(fps, model)
        ext, codec = FORMATS[format]
        frames = images_to_uint8(images)
        name = bridge.claim_output(filename_prefix, f".{ext}", int(frames.shape[2]), int(frames.shape[1]))
        try:
            path = write_mp4(frames, name.path, fps=fps, codec=codec, crf=crf)
        except BaseException:
            release_claim(name.path)  # the claimed (still empty) name goes back; no empty video stays
            raise
        preview = {"filename": path.name, "subfolder": name.subfolder, "type": "output"}
        return {"ui": {"images": [preview], "animated": (True,)}, "result": (str(path),)}
