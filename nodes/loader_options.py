"""What the loader nodes share: the device choice, the weight-storage choices and model-file lists.

How every loader node works (`loaders.py`, `encoder_loaders.py`): it makes one wan_core load call,
which first checks from the file headers that the weights fit where they go (`runtime.loading`:
refused with the figures otherwise, before anything is read); files come from ComfyUI's model
folders (plain paths outside ComfyUI). With a profiler wired, the load is recorded as an `init`
stage: one piece of `Model_Initialization` with the load as its child stage (the profiling session
joins consecutive pieces into one Model_Initialization and keeps the per-loader children; a loader
served from ComfyUI's cache is reported by its child stage name). Every loaded model is listed with
ComfyUI's memory manager (`memory.py`), which moves it off the GPU when memory is needed, or on
`POST /free`.

Shapes: none (no tensors).
"""

from __future__ import annotations

import torch

from ..wan_core.config import FP8_MATMUL_STORAGE, WEIGHT_STORAGES
from . import comfy_bridge as bridge

NONE_FILE = "none"
DEVICES = ("auto", "cuda", "cpu")

def load_device(device: str) -> str:
    """Where a loader puts weights that compute on `resolve_device(device)`: host memory for "auto"
    (they move when their stage runs), else that device."""
    return "cpu" if device == "auto" else resolve_device(device)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; 'cuda' without a GPU is an error."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}; got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was chosen but no CUDA GPU is available; choose 'auto' or 'cpu'")
    return device


TEXT_ENCODER_STORAGES = tuple(s for s in WEIGHT_STORAGES if s != FP8_MATMUL_STORAGE)
STORAGE_TOOLTIP = (
    "How the transformer blocks' matrices are kept in memory. default: in dtype (fp8 files are "
    "dequantised at load; GGUF files stay quantised). as_stored: as the file stores them (fp8 + scale, "
    "GGUF blocks, bf16/fp16). fp8_e4m3fn: cast to fp8 without a scale; fp8_e4m3fn_scaled: fp8 with a "
    "per-tensor scale (more accurate). Compact weights are decoded to dtype one block at a time. "
)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")


def file_choices(folder: str, *, optional: bool = False) -> list[str]:
    names = bridge.list_models(folder)
    return [NONE_FILE, *names] if optional else names
