"""Wan Text Encoder Loader (UMT5-XXL with its tokenizer) and Wan VAE Loader (Wan2.1 / Wan2.2).

How every loader loads, profiles and hands its model to ComfyUI's memory manager:
`loader_options.py`.

Device "auto" with a GPU: the text encoder is read into host memory and moves to the GPU when it
encodes (or stays on the CPU when the GPU is short); the VAE is loaded onto the GPU.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..wan_core.config import (
    DEFAULT_STORAGE,
    MODEL_INIT_STAGE,
    TEXT_ENCODER_INIT_STAGE,
    VAE_INIT_STAGE,
    WEIGHT_DTYPES,
)
from ..wan_core.config import weight_dtype as _dtype  # `weight_dtype` names the storage input below
from . import comfy_bridge as bridge
from . import memory
from . import types as T
from .loader_options import (
    DEVICES,
    STORAGE_TOOLTIP,
    TEXT_ENCODER_STORAGES,
    check_choice,
    file_choices,
    load_device,
    resolve_device,
)
from .profiler_handle import maybe_profile, record_context, single_stage


class WanTextEncoderLoader:
    """Loads the UMT5-XXL encoder and its SentencePiece tokenizer (embedded in ComfyUI's files)."""

    CATEGORY = T.CATEGORY
    RETURN_TYPES = (T.TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    # Inputs that name a model file, and the ComfyUI model folder each is looked up in.
    MODEL_FOLDERS: ClassVar[dict[str, str]] = {"text_encoder": bridge.FOLDER_TEXT_ENCODERS}
    FUNCTION = "load"
    RECORDS_STAGES = True  # the workflow observer leaves its stages to the node (maybe_profile)
    DESCRIPTION = "Loads the UMT5-XXL text encoder (the tokenizer comes from the file's spiece_model)."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "text_encoder": (
                    file_choices(bridge.FOLDER_TEXT_ENCODERS),
                    {"tooltip": "UMT5-XXL file from models/text_encoders (e.g. umt5_xxl_fp8_e4m3fn_scaled)."},
                ),
                "dtype": (
                    list(WEIGHT_DTYPES),
                    {
                        "default": "bfloat16",
                        "tooltip": "Compute dtype of the encoder (the official run uses bf16).",
                    },
                ),
                "device": (
                    list(DEVICES),
                    {
                        "default": "auto",
                        "tooltip": "Where the encoder runs: auto = the GPU when it fits there (else the CPU), "
                        "moved off it when other models need the memory; cpu keeps ~11 GB off the GPU.",
                    },
                ),
            },
            "optional": {
                **T.PROFILER_INPUT,
                "weight_dtype": (
                    list(TEXT_ENCODER_STORAGES),
                    {"default": DEFAULT_STORAGE, "tooltip": STORAGE_TOOLTIP},
                ),
            },
            "hidden": dict(T.HIDDEN_IDS),
        }

    def load(
        self,
        text_encoder: str,
        dtype: str,
        device: str,
        profiler: Any = None,
        unique_id: str | None = None,
        weight_dtype: str = DEFAULT_STORAGE,
    ) -> tuple[Any]:
        from ..wan_core.runtime.loading import load_text_encoder_checked

        check_choice("weight_dtype", weight_dtype, TEXT_ENCODER_STORAGES)
        path = bridge.resolve_model(bridge.FOLDER_TEXT_ENCODERS, text_encoder)
        with (
            maybe_profile(profiler, unique_id, [TEXT_ENCODER_INIT_STAGE]),
            single_stage(*MODEL_INIT_STAGE),
            single_stage(*TEXT_ENCODER_INIT_STAGE, component="t5"),
        ):
            encoder = load_text_encoder_checked(
                path, device=load_device(device), dtype=_dtype(dtype), storage=weight_dtype,
                memory=memory.PackMemory(),
            )
        record_context(profiler, t5_dtype=dtype)
        memory.note_loaded(memory.track(encoder, name=f"Wan text encoder {text_encoder}",
                                        device=resolve_device(device), modules=_encoder_modules,
                                        move=_move_encoder, may_run_on_cpu=device == "auto"))
        return (encoder,)


class WanVAELoader:
    """Loads the Wan2.1 (A14B) or Wan2.2 (TI2V-5B) video VAE; the variant is read from the file."""

    CATEGORY = T.CATEGORY
    RETURN_TYPES = (T.VAE,)
    RETURN_NAMES = ("vae",)
    # Inputs that name a model file, and the ComfyUI model folder each is looked up in.
    MODEL_FOLDERS: ClassVar[dict[str, str]] = {"vae": bridge.FOLDER_VAE}
    FUNCTION = "load"
    RECORDS_STAGES = True  # the workflow observer leaves its stages to the node (maybe_profile)
    DESCRIPTION = "Loads a Wan video VAE (wan_2.1_vae for A14B, wan2.2_vae for TI2V-5B)."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "vae": (
                    file_choices(bridge.FOLDER_VAE),
                    {"tooltip": "VAE file from models/vae: wan_2.1_vae for A14B, wan2.2_vae for TI2V-5B."},
                ),
                "dtype": (
                    list(WEIGHT_DTYPES),
                    {"default": "float32", "tooltip": "VAE dtype; the official pipelines run it in float32."},
                ),
                "device": (list(DEVICES), {"default": "auto", "tooltip": "Where the VAE runs."}),
            },
            "optional": dict(T.PROFILER_INPUT),
            "hidden": dict(T.HIDDEN_IDS),
        }

    def load(
        self, vae: str, dtype: str, device: str, profiler: Any = None, unique_id: str | None = None
    ) -> tuple[Any]:
        from ..wan_core.runtime.loading import load_vae_checked

        path = bridge.resolve_model(bridge.FOLDER_VAE, vae)
        with (
            maybe_profile(profiler, unique_id, [VAE_INIT_STAGE]),
            single_stage(*MODEL_INIT_STAGE),
            single_stage(*VAE_INIT_STAGE, component="vae"),
        ):
            compute = resolve_device(device)
            model = load_vae_checked(path, device=compute, dtype=_dtype(dtype), memory=memory.PackMemory())
        record_context(profiler, vae_dtype=dtype)
        memory.note_loaded(memory.track_module(model, name=f"Wan VAE {vae}", device=compute))
        return (model,)


def _encoder_modules(encoder: Any) -> list[Any]:
    return [encoder.encoder]


def _move_encoder(encoder: Any, device: torch.device) -> None:
    encoder.to(device)
