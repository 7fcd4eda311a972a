"""Wan LoRA: one LoRA file from `models/loras` on the DiT experts, chainable (model in, model out).

One wan_core call (`runtime.lora.load_expert_lora`: read the file, match it to the experts, pair it
with the strengths). The output is a new `WAN22_DIT` bundle with the same modules and one more
LoRA; the weights are patched only while a Wan Sampler runs, so the input bundle (cached by ComfyUI,
possibly shared with other branches) is never changed and re-running never applies a LoRA twice.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..wan_core.config import LORA_INIT_STAGE, MODEL_INIT_STAGE
from . import comfy_bridge as bridge
from . import types as T
from .profiler_handle import maybe_profile, record_context, single_stage
from .validation import check_float_range, first_problem

MAX_STRENGTH = 100.0  # ComfyUI's LoraLoader range


class WanLora:
    """Adds a LoRA to the high- and low-noise experts (A14B) or to the single model (TI2V-5B)."""

    CATEGORY = T.CATEGORY
    RETURN_TYPES = (T.DIT_EXPERTS,)
    RETURN_NAMES = ("model",)
    # Inputs that name a model file, and the ComfyUI model folder each is looked up in.
    MODEL_FOLDERS: ClassVar[dict[str, str]] = {"lora_name": bridge.FOLDER_LORAS}
    FUNCTION = "apply"
    RECORDS_STAGES = True  # the workflow observer leaves its stages to the node (maybe_profile)
    DESCRIPTION = ("Adds a LoRA (kohya, ComfyUI, diffusers/PEFT or LightX2V layout) to the Wan2.2 experts, "
                   "with a strength per expert. Chain several; the weights are patched only while sampling.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (T.DIT_EXPERTS, {"tooltip": "From Wan Model Loader or another Wan LoRA."}),
                "lora_name": (
                    bridge.list_models(bridge.FOLDER_LORAS),
                    {"tooltip": "LoRA file from models/loras (e.g. the 4-step lightx2v LoRA of one expert)."},
                ),
                "strength_high": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -MAX_STRENGTH,
                        "max": MAX_STRENGTH,
                        "step": 0.01,
                        "tooltip": "Strength on the high-noise expert (TI2V-5B: its only strength). "
                        "0 leaves the expert unchanged.",
                    },
                ),
                "strength_low": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -MAX_STRENGTH,
                        "max": MAX_STRENGTH,
                        "step": 0.01,
                        "tooltip": "Strength on the low-noise expert. Unused by TI2V-5B. A LoRA made for "
                        "one expert (e.g. *_high_noise) gets 0 here.",
                    },
                ),
            },
            "optional": dict(T.PROFILER_INPUT),
            "hidden": dict(T.HIDDEN_IDS),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, strength_high: float | None = None, strength_low: float | None = None) -> bool | str:
        return first_problem(
            check_float_range("strength_high", strength_high, -MAX_STRENGTH, MAX_STRENGTH),
            check_float_range("strength_low", strength_low, -MAX_STRENGTH, MAX_STRENGTH),
        )

    def apply(
        self,
        model: T.DiTExperts,
        lora_name: str,
        strength_high: float,
        strength_low: float,
        profiler: Any = None,
        unique_id: str | None = None,
    ) -> tuple[T.DiTExperts]:
        from ..wan_core.runtime.lora import load_expert_lora

        problem = self.VALIDATE_INPUTS(strength_high, strength_low)
        if problem is not True:
            raise ValueError(problem)
        if not isinstance(model, T.DiTExperts):
            raise TypeError(f"model must come from Wan Model Loader or Wan LoRA; got {type(model).__name__}")
        path = bridge.resolve_model(bridge.FOLDER_LORAS, lora_name)
        strengths = (strength_high, strength_low) if model.task.is_moe else (strength_high,)
        with (
            maybe_profile(profiler, unique_id, [LORA_INIT_STAGE]),
            single_stage(*MODEL_INIT_STAGE),
            single_stage(*LORA_INIT_STAGE, component="lora"),
        ):
            lora = load_expert_lora(path, model.experts, strengths)
        out = model.with_lora(lora)
        record_context(profiler, loras=out.lora_descriptions())
        return (out,)
