"""The Wan Sampler's schedule inputs (added after the first release, so optional): partial denoise,
the step window, noise on the input latent, and explicit timesteps or sigmas.

Their meaning is wan_core's (`SamplerOptions`, `partial.sample_latent`; docs/sampler.md); this module
holds the widget definitions and the check that an explicit list agrees with the steps widget.
"""

from __future__ import annotations

from typing import Any

END_OF_SCHEDULE = 10000  # end_step default: to the last step (ComfyUI's end_at_step default)


def check_list_length(steps: int, timesteps: tuple[float, ...] | None, sigmas: tuple[float, ...] | None) -> None:
    """An explicit schedule decides the step count; the steps widget must agree with it."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("give timesteps or sigmas, not both (clear one of the two)")
    if timesteps is not None and len(timesteps) != steps:
        raise ValueError(f"steps is {steps} but timesteps lists {len(timesteps)} steps; set steps to "
                         f"{len(timesteps)} (one timestep per step)")
    if sigmas is not None and len(sigmas) != steps + 1:
        raise ValueError(f"steps is {steps} but sigmas lists {len(sigmas)} values; give steps + 1 = {steps + 1} "
                         f"sigmas (ending with 0) or set steps to {len(sigmas) - 1}")


SCHEDULE_INPUTS: dict[str, Any] = {
    "denoise": (
        "FLOAT",
        {
            "default": 1.0,
            "min": 0.01,
            "max": 1.0,
            "step": 0.01,
            "tooltip": "Below 1: start from the input latent (e.g. an encoded video) at this noise level "
            "(ComfyUI's rule: the last steps of a longer schedule). 1 starts from pure noise.",
        },
    ),
    "start_step": (
        "INT",
        {
            "default": 0,
            "min": 0,
            "max": END_OF_SCHEDULE,
            "tooltip": "First step to run (KSamplerAdvanced's start_at_step). Above 0 the input latent is "
            "continued: from a Wan Sampler that stopped at this step, exactly.",
        },
    ),
    "end_step": (
        "INT",
        {
            "default": END_OF_SCHEDULE,
            "min": 1,
            "max": END_OF_SCHEDULE,
            "tooltip": "Stop before this step, keeping the leftover noise for a second sampler with "
            "start_step = end_step. 10000 (or any value >= steps) runs to the end.",
        },
    ),
    "add_noise": (
        "BOOLEAN",
        {
            "default": True,
            "tooltip": "Add seeded noise to the input latent at the first step's level (KSamplerAdvanced's "
            "add_noise). Turn off when continuing a latent with leftover noise (start_step > 0).",
        },
    ),
    "timesteps": (
        "STRING",
        {
            "default": "",
            "tooltip": "Explicit training timesteps, one per step, before the shift (e.g. '1000, 750, 500, "
            "250' = LightX2V's 4-step list at shift 5). Empty: the solver's schedule.",
        },
    ),
    "sigmas": (
        "STRING",
        {
            "default": "",
            "tooltip": "Explicit sigmas, steps + 1 values ending with 0, used as given (no shift). Empty: "
            "the solver's schedule.",
        },
    ),
}
