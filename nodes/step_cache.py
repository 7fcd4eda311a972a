"""Wan Step Cache: step caching (TeaCache- or MagCache-style) on the DiT experts, model in, model out.

One wan_core call (`runtime.step_cache.StepCacheSettings`: check and hold the settings). The output
is a new `WAN22_DIT` bundle with the same modules and the settings; the sampler applies them for
its run only, so the input bundle (cached by ComfyUI, possibly shared with other branches) never
changes. Mode `off` returns a bundle without a cache.
"""

from __future__ import annotations

from typing import Any

from ..wan_core.config import CALIBRATION_AUTO, MAGCACHE, STEP_CACHE_EXPERTS, STEP_CACHE_MODES, STEP_CACHE_OFF, TEACACHE
from . import types as T
from .validation import check_float_range, check_int_range, first_problem

MAX_THRESHOLD = 10.0
MAX_STEPS = 1000


def _calibrations() -> list[str]:
    from ..wan_core.runtime.step_cache import calibration_choices

    names = [*calibration_choices(TEACACHE), *calibration_choices(MAGCACHE)]
    return list(dict.fromkeys(names))  # `auto` once, first


class WanStepCache:
    """Reuses the last guided prediction for steps whose input barely changed (per expert)."""

    CATEGORY = T.CATEGORY
    RETURN_TYPES = (T.DIT_EXPERTS,)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    DESCRIPTION = ("Step caching for Wan Sampler: TeaCache-style (change of the time modulation) or MagCache-style "
                   "(calibrated magnitude ratios), per expert, with warm-up steps and a maximum run of reused "
                   "steps. Reused steps do no model work; the report lists them per expert.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (T.DIT_EXPERTS, {"tooltip": "From Wan Model Loader, Wan LoRA or another Wan Step Cache."}),
                "mode": (
                    list(STEP_CACHE_MODES),
                    {
                        "default": STEP_CACHE_OFF,
                        "tooltip": "off: every step runs the model (the default). teacache: reuse while the "
                        "accumulated (rescaled) change of the time modulation stays under the threshold. "
                        "magcache: reuse while the accumulated error of the calibrated magnitude ratios stays "
                        "under it.",
                    },
                ),
                "threshold": (
                    "FLOAT",
                    {
                        "default": 0.2,
                        "min": 0.0,
                        "max": MAX_THRESHOLD,
                        "step": 0.01,
                        "tooltip": "0 computes every step (same result as off). Published settings: "
                        "TeaCache 0.2 (LightX2V on Wan2.1 I2V), 0.26 for TI2V-5B; without a calibration "
                        "(A14B) the raw change needs about 10x less. MagCache 0.04-0.06 on Wan2.2.",
                    },
                ),
                "warmup_steps": (
                    "INT",
                    {
                        "default": 1,
                        "min": 0,
                        "max": MAX_STEPS,
                        "tooltip": "Steps each expert always computes first.",
                    },
                ),
                "max_skip": (
                    "INT",
                    {
                        "default": 2,
                        "min": 0,
                        "max": MAX_STEPS,
                        "tooltip": "Most reused steps in a row (per expert); the next one is computed.",
                    },
                ),
                "apply_to": (
                    list(STEP_CACHE_EXPERTS),
                    {
                        "default": STEP_CACHE_EXPERTS[0],
                        "tooltip": "Which A14B expert may reuse steps (the other computes every step). "
                        "TI2V-5B: its one model always may.",
                    },
                ),
                "calibration": (
                    _calibrations(),
                    {
                        "default": CALIBRATION_AUTO,
                        "tooltip": "auto: the published calibration for the task (TeaCache: TI2V-5B only, "
                        "A14B has none and uses the raw change; MagCache: each Wan2.2 task). Others: a "
                        "named TeaCache polynomial (wan2.1_* are placeholders for A14B) or MagCache table.",
                    },
                ),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(
        cls, threshold: float | None = None, warmup_steps: int | None = None, max_skip: int | None = None
    ) -> bool | str:
        return first_problem(
            check_float_range("threshold", threshold, 0.0, MAX_THRESHOLD),
            check_int_range("warmup_steps", warmup_steps, 0, MAX_STEPS),
            check_int_range("max_skip", max_skip, 0, MAX_STEPS),
        )

    def apply(
        self,
        model: T.DiTExperts,
        mode: str,
        threshold: float,
        warmup_steps: int,
        max_skip: int,
        apply_to: str,
        calibration: str,
    ) -> tuple[T.DiTExperts]:
        from ..wan_core.runtime.step_cache import StepCacheSettings

        problem = self.VALIDATE_INPUTS(threshold, warmup_steps, max_skip)
        if problem is not True:
            raise ValueError(problem)
        if not isinstance(model, T.DiTExperts):
            raise TypeError(
                f"model must come from Wan Model Loader, Wan LoRA or Wan Step Cache; got {type(model).__name__}"
            )
        if mode == STEP_CACHE_OFF:
            return (model.with_step_cache(None),)
        if apply_to != "all" and not model.task.is_moe:
            raise ValueError(
                f"apply_to {apply_to!r} picks an A14B expert, but {model.task.name} has one model; use 'all'"
            )
        settings = StepCacheSettings(
            mode=mode,
            threshold=float(threshold),
            warmup_steps=warmup_steps,
            max_skip=max_skip,
            apply_to=apply_to,
            calibration=calibration,
        )
        return (model.with_step_cache(settings),)
