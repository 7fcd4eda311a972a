"""Wan Sampler's task-default settings: `steps`, `shift`, `boundary`, `guidance_high`, `guidance_low`.

The node learns the task only when it runs (from the model), so these widgets take 0
(`TASK_DEFAULT`) to mean "the task's preset value" (`wan_core.config` presets: T2V-A14B 40 steps,
shift 12, boundary 0.875, guidance 4 / 3; I2V and TI2V their own); any other value is used as given.
This module holds the widget definitions and turns the widget values into the sampler's settings.

Shapes: none (no tensors).
"""

from __future__ import annotations

from typing import Any

from ..wan_core.config import I2V_A14B, T2V_A14B, TI2V_5B, GuideScale

MAX_STEPS = 1000
MAX_GUIDANCE = 30.0
MAX_SHIFT = 100.0
TASK_DEFAULT = 0  # the widget value of steps/shift/boundary/guidance that means "the task's preset"
# Tooltips quote the presets.
TI2V, I2V, T2V = TI2V_5B.sampler, I2V_A14B.sampler, T2V_A14B.sampler

TASK_DEFAULT_INPUTS: dict[str, Any] = {
    "steps": (
        "INT",
        {
            "default": TASK_DEFAULT,
            "min": 0,
            "max": MAX_STEPS,
            "tooltip": f"Denoising steps. 0 = the task's: {T2V.steps} for T2V-A14B, "
            f"{I2V.steps} for I2V-A14B, {TI2V.steps} for TI2V-5B.",
        },
    ),
    "shift": (
        "FLOAT",
        {
            "default": float(TASK_DEFAULT),
            "min": 0.0,
            "max": MAX_SHIFT,
            "step": 0.01,
            "tooltip": f"Flow-matching sigma shift. 0 = the task's: {T2V.shift} for T2V, "
            f"{I2V.shift} for I2V, {TI2V.shift} for TI2V-5B.",
        },
    ),
    "boundary": (
        "FLOAT",
        {
            "default": float(TASK_DEFAULT),
            "min": 0.0,
            "max": 0.999,
            "step": 0.001,
            "tooltip": "A14B expert switch: steps with t >= boundary x 1000 use the high-noise "
            f"expert. 0 = the task's: {T2V.boundary:.3f} T2V, {I2V.boundary:.3f} I2V. "
            "Unused by TI2V-5B.",
        },
    ),
    "guidance_high": (
        "FLOAT",
        {
            "default": float(TASK_DEFAULT),
            "min": 0.0,
            "max": MAX_GUIDANCE,
            "step": 0.1,
            "tooltip": "CFG scale of the high-noise expert (TI2V-5B: its only scale). "
            f"0 = the task's: {T2V.guide_scale.high} T2V, {I2V.guide_scale.high} I2V, "
            f"{TI2V.guide_scale.high} TI2V-5B. 1.0 runs the conditional pass only.",
        },
    ),
    "guidance_low": (
        "FLOAT",
        {
            "default": float(TASK_DEFAULT),
            "min": 0.0,
            "max": MAX_GUIDANCE,
            "step": 0.1,
            "tooltip": "CFG scale of the low-noise expert. 0 = the task's: "
            f"{T2V.guide_scale.low} T2V, {I2V.guide_scale.low} I2V. Unused by TI2V-5B.",
        },
    ),
}


def task_settings(
    task: Any, *, shift: float, boundary: float, guidance_high: float, guidance_low: float
) -> dict[str, Any]:
    """`SamplerOptions.from_config` overrides for the widgets: 0 keeps the preset (None), others override."""
    preset = task.sampler
    high = preset.guide_scale.high if guidance_high == TASK_DEFAULT else guidance_high
    low = preset.guide_scale.low if guidance_low == TASK_DEFAULT else guidance_low
    return {
        "shift": None if shift == TASK_DEFAULT else shift,
        # a single-model task (TI2V-5B) has one scale: the high-noise widget, as its tooltip says
        "guide_scale": GuideScale(high=high, low=low) if task.is_moe else GuideScale.same(high),
        # None keeps the preset's (None for TI2V-5B)
        "boundary": None if boundary == TASK_DEFAULT or not task.is_moe else boundary,
    }


def resolved_steps(
    steps: int, preset_steps: int, timesteps: tuple[float, ...] | None, sigmas: tuple[float, ...] | None
) -> int:
    """The steps widget with 0 resolved: an explicit list's length, else the task's preset."""
    if steps != TASK_DEFAULT:
        return steps
    if timesteps is not None:
        return len(timesteps)
    if sigmas is not None:
        return len(sigmas) - 1
    return preset_steps


def resolved_settings(task: Any, opts: Any) -> dict[str, Any]:
    """The settings a run used, for the UI: task defaults filled in, unused ones left out."""
    settings: dict[str, Any] = {"task": task.name, "steps": opts.steps, "shift": opts.shift, "solver": opts.solver}
    if task.is_moe:
        settings |= {
            "boundary": opts.boundary,
            "guidance_high": opts.guide_scale.high,
            "guidance_low": opts.guide_scale.low,
        }
    else:
        settings["guidance"] = opts.guide_scale.low
    return settings
