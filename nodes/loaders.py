"""Wan Model Loader: the DiT experts of a Wan2.2 task (one file per expert).

How every loader loads, profiles and hands its model to ComfyUI's memory manager:
`loader_options.py`.

Device "auto" with a GPU: the experts are read into host memory and move to the GPU when sampling
runs (the sampler's memory plan decides how).
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..wan_core.attention import BACKEND_CHOICES, check_backend_name
from ..wan_core.config import (
    COMPILE_CHOICES,
    COMPILE_OFF,
    DEFAULT_STORAGE,
    DIT_INIT_STAGE,
    MODEL_INIT_STAGE,
    TASK_BY_MODEL_TYPE,
    WEIGHT_DTYPES,
    WEIGHT_STORAGES,
)
from ..wan_core.config import weight_dtype as _dtype  # `weight_dtype` names the storage input below
from . import comfy_bridge as bridge
from . import memory
from . import types as T
from .loader_options import (
    DEVICES,
    NONE_FILE,
    STORAGE_TOOLTIP,
    check_choice,
    file_choices,
    load_device,
    resolve_device,
)
from .profiler_handle import maybe_profile, record_context, single_stage


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
                    file_choices(bridge.FOLDER_DIT),
                    {
                        "tooltip": "DiT file from models/diffusion_models: the high-noise expert for A14B "
                        "tasks, or the single TI2V-5B model."
                    },
                ),
                "model_low": (
                    file_choices(bridge.FOLDER_DIT, optional=True),
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
        check_choice("weight_dtype", weight_dtype, WEIGHT_STORAGES)
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
