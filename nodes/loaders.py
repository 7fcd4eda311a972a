"""Loader nodes: Wan Model Loader (DiT experts), Wan Text Encoder Loader, Wan VAE Loader.

Each makes one wan_core load call, which first checks from the file headers that the weights fit
where they go (`runtime.loading`: refused with the figures otherwise, before anything is read);
files come from ComfyUI's model folders (plain paths outside ComfyUI). With a profiler wired, the
load is recorded as an `init` stage.

Device "auto" with a GPU: the DiT and the text encoder are read into host memory and move to the
GPU when their stage runs (the sampler's memory plan decides how, for the DiT); the VAE is loaded
onto the GPU. Every loaded model is listed with ComfyUI's memory manager (`memory.py`), which
moves it off the GPU when memory is needed, or on `POST /free`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..wan_core.attention import BACKEND_CHOICES, check_backend_name
from ..wan_core.config import (
    COMPILE_CHOICES,
    COMPILE_OFF,
    DEFAULT_STORAGE,
    DIT_INIT_STAGE,
    FP8_MATMUL_STORAGE,
    MODEL_INIT_STAGE,
    TASK_BY_MODEL_TYPE,
    TEXT_ENCODER_INIT_STAGE,
    VAE_INIT_STAGE,
    WEIGHT_DTYPES,
    WEIGHT_STORAGES,
)
from ..wan_core.config import weight_dtype as _dtype  # `weight_dtype` names the storage input below
from . import comfy_bridge as bridge
from . import memory
from . import types as T
from .profiler_handle import maybe_profile, record_context, single_stage

NONE_FILE = "none"
DEVICES = ("auto", "cuda", "cpu")

# Each loader records one piece of `Model_Initialization` with its own load as the child stage;
# the profiling session joins consecutive pieces into one Model_Initialization (the total init
# time) and keeps the per-loader children. A loader served from ComfyUI's cache is reported by
# its child stage name.


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


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")


def _file_choices(folder: str, *, optional: bool = False) -> list[str]:
    names = bridge.list_models(folder)
    return [NONE_FILE, *names] if optional else names


class WanModelLoader:
    """Loads the DiT: one file (TI2V-5B) or the high-noise and low-noise experts (A14B)."""

    CATEGORY = T.CATEGORY
    RETURN_TYPES = (T.DIT_EXPERTS,)
    RETURN_NAMES = ("model",)
    # Inputs that name a model file, and the ComfyUI model folder each is looked up in.
    MODEL_FOLDERS: ClassVar[dict[str, str]] = {
        "model_high": bridge.FOLDER_DIT,
        "model_low": bridge.FOLDER_DIT,
    }
    FUNCTION = "load"
    RECORDS_STAGES = True  # the workflow observer leaves its stages to the node (maybe_profile)
    DESCRIPTION = "Loads Wan2.2 DiT weights (ComfyUI, official or diffusers layouts; fp16/bf16/fp8-scaled)."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model_high": (
                    _file_choices(bridge.FOLDER_DIT),
                    {
                        "tooltip": "DiT file from models/diffusion_models: the high-noise expert for A14B "
                        "tasks, or the single TI2V-5B model."
                    },
                ),
                "model_low": (
                    _file_choices(bridge.FOLDER_DIT, optional=True),
                    {
                        "default": NONE_FILE,
                        "tooltip": "Low-noise expert for A14B tasks (same task as model_high); "
                        "'none' for TI2V-5B.",
                    },
                ),
                "dtype": (
                    list(WEIGHT_DTYPES),
                    {
                        "default": "bfloat16",
                        "tooltip": "Compute dtype of the DiT weights (fp8 files are dequantised "
                        "to it). float32 is the exact reference path.",
                    },
                ),
                "attention": (
                    list(BACKEND_CHOICES),
                    {
                        "default": "sdpa",
                        "tooltip": "Attention backend: sdpa (always available, the reference), "
                        "flash_attn or sage "
                        "when installed, auto picks the fastest available one.",
                    },
                ),
                "device": (
                    list(DEVICES),
                    {
                        "default": "auto",
                        "tooltip": "Where the DiT computes: auto = the GPU if present (the weights wait in "
                        "host memory and the sampler's placement moves them); cuda = loaded onto the GPU; "
                        "cpu = everything on the CPU.",
                    },
                ),
            },
            "optional": {
                **T.PROFILER_INPUT,
                "weight_dtype": (
                    list(WEIGHT_STORAGES),
                    {
                        "default": DEFAULT_STORAGE,
                        "tooltip": STORAGE_TOOLTIP + "fp8_e4m3fn_scaled_mm: scaled fp8 multiplied as fp8 "
                        "(torch._scaled_mm; GPUs with fp8 tensor cores, compute capability 8.9+; no LoRA).",
                    },
                ),
                "compile": (
                    list(COMPILE_CHOICES),
                    {
                        "default": COMPILE_OFF,
                        "tooltip": "Regional torch.compile of the transformer blocks while sampling (mode). "
                        "The first forward compiles (reported as the Compile stage); recompiles are counted.",
                    },
                ),
                "tf32": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "TF32 tensor cores for float32 matmuls while sampling (CUDA, Ampere and "
                        "newer; no effect with bf16/fp16 compute or on the CPU).",
                    },
                ),
            },
            "hidden": dict(T.HIDDEN_IDS),
        }

    def load(
        self,
        model_high: str,
        model_low: str,
        dtype: str,
        attention: str,
        device: str,
        profiler: Any = None,
        unique_id: str | None = None,
        weight_dtype: str = DEFAULT_STORAGE,
        compile: str = COMPILE_OFF,
        tf32: bool = False,
    ) -> tuple[T.DiTExperts]:
        from ..wan_core.runtime.execution import ExecutionOptions
        from ..wan_core.runtime.loading import load_experts_checked

        if model_low == model_high:
            raise ValueError(
                f"model_low must differ from model_high (got {model_low!r} twice); "
                f"choose the low_noise file, or 'none' for TI2V-5B"
            )
        if attention not in BACKEND_CHOICES:
            raise ValueError(f"attention must be one of {BACKEND_CHOICES}; got {attention!r}")
        check_backend_name(attention)  # raises with the install hint when the package is missing
        _check_choice("weight_dtype", weight_dtype, WEIGHT_STORAGES)
        execution = ExecutionOptions(compile_mode=compile, tf32=bool(tf32))  # checked before loading
        high = bridge.resolve_model(bridge.FOLDER_DIT, model_high)
        low = None if model_low == NONE_FILE else bridge.resolve_model(bridge.FOLDER_DIT, model_low)
        with (
            maybe_profile(profiler, unique_id, [DIT_INIT_STAGE]),
            single_stage(*MODEL_INIT_STAGE),
            single_stage(*DIT_INIT_STAGE, component="dit"),
        ):
            experts = load_experts_checked(
                high,
                low,
                device=load_device(device),
                dtype=_dtype(dtype),
                attention=attention,
                storage=weight_dtype,
                memory=memory.PackMemory(),
            )
        model_type = experts[0].config.model_type
        task = TASK_BY_MODEL_TYPE[model_type]
        if task.is_moe and len(experts) != 2:
            raise ValueError(
                f"{task.name} needs two experts; got only {model_high!r}. "
                f"Choose the low_noise file as model_low"
            )
        if not task.is_moe and len(experts) != 1:
            raise ValueError(f"{task.name} is a single model; set model_low to 'none' (got {model_low!r})")
        record_context(
            profiler,
            task=task.name,
            dit_dtype=dtype,
            attention_backend=attention,
            weight_dtype=weight_dtype,
            compile=execution.compiles,
            tf32=execution.tf32,
        )
        compute = resolve_device(device)
        memory.note_loaded(*(memory.track_module(expert, name=f"Wan DiT {name}", device=compute)
                             for name, expert in zip(task.expert_names, experts, strict=False)))
        return (T.DiTExperts(experts=tuple(experts), task=task, storage=weight_dtype, execution=execution,
                             device=compute),)


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
                    _file_choices(bridge.FOLDER_TEXT_ENCODERS),
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

        _check_choice("weight_dtype", weight_dtype, TEXT_ENCODER_STORAGES)
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
                    _file_choices(bridge.FOLDER_VAE),
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
