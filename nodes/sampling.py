"""Wan Sampler: the denoising loop (stages `Step_<i>_Loading` / `Step_<i>_Inference`).

One call of `wan_core.partial.sample_latent`. The `LATENT` input gives the video geometry and, from
Wan Image To Video, the start-image conditioning. A full run (denoise 1, start_step 0) starts from
seeded noise and does not read the latent's values; with denoise < 1 or start_step > 0 it starts
from them (video-to-video, or the second half of a split run), as ComfyUI's KSampler(Advanced) do.
The output `LATENT` holds raw latents (the VAE's space), as ComfyUI's own nodes expect, keeps the
input's conditioning, and after an early `end_step` carries the exact state so that the next Wan
Sampler continues the run bit for bit (docs/sampler.md). LoRAs and the step cache on the model input
are applied for the duration of this node's run only.
"""

from __future__ import annotations

from typing import Any

import torch

from ..wan_core.config import (
    AUTO_PLACEMENT,
    BATCHED_CFG,
    I2V_A14B,
    PLACEMENTS,
    SEQUENTIAL_CFG,
    SOLVERS,
    T2V_A14B,
    TI2V_5B,
    GuideScale,
    sampling_stages,
)
from . import comfy_bridge as bridge
from . import memory
from . import types as T
from .profiler_handle import maybe_profile, record_context
from .schedule_inputs import END_OF_SCHEDULE, SCHEDULE_INPUTS, check_list_length
from .validation import (
    check_float_range,
    check_int_range,
    check_numbers,
    check_open_unit,
    first_problem,
    parse_numbers,
)

MAX_STEPS = 1000
MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_GUIDANCE = 30.0
MAX_SHIFT = 100.0
MAX_RESIDENT_BLOCKS = 64
LATENT_CONDITION = "wan_condition"  # LATENT keys the pack adds (core nodes ignore them)
LATENT_CONTINUATION = "wan_continuation"
# Widget defaults: the sampler preset of TI2V-5B (the task of the default 1280x704x121 latent);
# the expert switch, which TI2V-5B does not use, defaults to T2V-A14B's. Tooltips quote the presets.
TI2V, I2V, T2V = TI2V_5B.sampler, I2V_A14B.sampler, T2V_A14B.sampler
DEFAULTS = TI2V
DEFAULT_BOUNDARY = T2V.boundary


class WanSampler:
    """Runs the Wan2.2 sampling loop: expert switch at the boundary, per-expert guidance, CFG."""

    CATEGORY = T.CATEGORY
    RETURN_TYPES = (T.LATENT,)
    RETURN_NAMES = ("latent",)
    FUNCTION = "sample"
    RECORDS_STAGES = True  # the workflow observer leaves its stages to the node (maybe_profile)
    DESCRIPTION = "Denoises from seeded noise with the Wan2.2 flow-matching solvers (UniPC by default)."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (T.DIT_EXPERTS, {"tooltip": "From Wan Model Loader."}),
                "text_embeds": (T.TEXT_EMBEDS, {"tooltip": "From Wan Text Encode."}),
                "latent": (
                    T.LATENT,
                    {
                        "tooltip": "From Wan Empty Latent or Wan Image To Video (geometry and "
                        "start-image conditioning)."
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": MAX_SEED,
                        "control_after_generate": True,
                        "tooltip": "Noise seed (CPU generator: the same noise on every device).",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": DEFAULTS.steps,
                        "min": 1,
                        "max": MAX_STEPS,
                        "tooltip": f"Denoising steps: {TI2V.steps} for TI2V-5B, {T2V.steps} for A14B.",
                    },
                ),
                "shift": (
                    "FLOAT",
                    {
                        "default": DEFAULTS.shift,
                        "min": 0.01,
                        "max": MAX_SHIFT,
                        "step": 0.01,
                        "tooltip": f"Flow-matching sigma shift: {TI2V.shift} for TI2V-5B, {I2V.shift} for I2V, "
                        f"{T2V.shift} for T2V.",
                    },
                ),
                "boundary": (
                    "FLOAT",
                    {
                        "default": DEFAULT_BOUNDARY,
                        "min": 0.001,
                        "max": 0.999,
                        "step": 0.001,
                        "tooltip": "A14B expert switch: steps with t >= boundary x 1000 use the "
                        f"high-noise expert ({T2V.boundary:.3f} T2V, {I2V.boundary:.3f} I2V). Unused by TI2V-5B.",
                    },
                ),
                "guidance_high": (
                    "FLOAT",
                    {
                        "default": DEFAULTS.guide_scale.high,
                        "min": 0.0,
                        "max": MAX_GUIDANCE,
                        "step": 0.1,
                        "tooltip": "CFG scale of the high-noise expert (TI2V-5B: its only "
                        "scale). 1.0 runs the conditional pass only.",
                    },
                ),
                "guidance_low": (
                    "FLOAT",
                    {
                        "default": DEFAULTS.guide_scale.low,
                        "min": 0.0,
                        "max": MAX_GUIDANCE,
                        "step": 0.1,
                        "tooltip": f"CFG scale of the low-noise expert ({T2V.guide_scale.low} T2V, "
                        f"{I2V.guide_scale.low} I2V). Unused by TI2V-5B.",
                    },
                ),
                "solver": (
                    list(SOLVERS),
                    {
                        "default": DEFAULTS.solver,
                        "tooltip": "Flow-matching solver: unipc (official default), dpm++, euler; "
                        "euler_distill for the 4-step distill LoRAs (steps 4, shift 5, guidance 1).",
                    },
                ),
                "batched_cfg": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Run cond and uncond as one batch-2 forward (same "
                        "numbers as two passes, usually faster).",
                    },
                ),
                "placement": (
                    list(PLACEMENTS),
                    {
                        "default": AUTO_PLACEMENT,
                        "tooltip": "Weights placement: auto = the fastest that fits in free GPU memory "
                        "(planned before anything is allocated); none = all on the GPU; model = the expert "
                        "not in use waits on the CPU; blocks = stream transformer blocks from pinned CPU "
                        "memory. A choice that cannot fit is refused with the estimate and what would fit.",
                    },
                ),
                "resident_blocks": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": MAX_RESIDENT_BLOCKS,
                        "tooltip": "With placement 'blocks': blocks kept on the GPU.",
                    },
                ),
            },
            "optional": {**T.PROFILER_INPUT, **SCHEDULE_INPUTS},
            "hidden": dict(T.HIDDEN_IDS),
        }

    @classmethod
    def VALIDATE_INPUTS(
        cls,
        steps: int | None = None,
        shift: float | None = None,
        boundary: float | None = None,
        guidance_high: float | None = None,
        guidance_low: float | None = None,
        denoise: float | None = None,
        start_step: int | None = None,
        end_step: int | None = None,
        timesteps: str | None = None,
        sigmas: str | None = None,
    ) -> bool | str:
        return first_problem(
            check_int_range("steps", steps, 1, MAX_STEPS),
            check_float_range("shift", shift, 0.01, MAX_SHIFT),
            check_open_unit("boundary", boundary),
            check_float_range("guidance_high", guidance_high, 0.0, MAX_GUIDANCE),
            check_float_range("guidance_low", guidance_low, 0.0, MAX_GUIDANCE),
            check_float_range("denoise", denoise, 0.01, 1.0),
            check_int_range("start_step", start_step, 0, END_OF_SCHEDULE),
            check_int_range("end_step", end_step, 1, END_OF_SCHEDULE),
            check_numbers("timesteps", timesteps),
            check_numbers("sigmas", sigmas),
        )

    def sample(
        self,
        model: T.DiTExperts,
        text_embeds: T.TextEmbeds,
        latent: dict[str, Any],
        seed: int,
        steps: int,
        shift: float,
        boundary: float,
        guidance_high: float,
        guidance_low: float,
        solver: str,
        batched_cfg: bool,
        placement: str,
        resident_blocks: int,
        profiler: Any = None,
        unique_id: str | None = None,
        denoise: float = 1.0,
        start_step: int = 0,
        end_step: int = END_OF_SCHEDULE,
        add_noise: bool = True,
        timesteps: str = "",
        sigmas: str = "",
    ) -> tuple[dict[str, Any]]:
        from ..wan_core.conditioning import I2VCondition, TI2VCondition
        from ..wan_core.partial import Continuation, sample_latent
        from ..wan_core.runtime.execution import applied, check_with_loras
        from ..wan_core.sampler import SamplerOptions

        problem = self.VALIDATE_INPUTS(steps, shift, boundary, guidance_high, guidance_low, denoise,
                                       start_step, end_step, timesteps, sigmas)
        if problem is not True:
            raise ValueError(problem)
        explicit_t, explicit_sigmas = parse_numbers("timesteps", timesteps), parse_numbers("sigmas", sigmas)
        check_list_length(steps, explicit_t, explicit_sigmas)
        check_with_loras(model.execution, len(model.loras))
        task = model.task
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor) or samples.dim() != 5:
            got = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
            raise ValueError(
                f"latent must be a video LATENT {{'samples': (B, C, T, h, w)}}; got {got} (an image "
                "latent?). Feed it from Wan Empty Latent or Wan Image To Video"
            )
        if samples.shape[0] != 1 or samples.shape[1] != task.dit.out_dim:
            raise ValueError(
                f"{task.name} samples one video of {task.dit.out_dim} latent channels; got a latent "
                f"of shape {tuple(samples.shape)}. Use the VAE of the task and batch size 1"
            )
        condition = latent.get("wan_condition")
        if task.dit.model_type == "i2v" and not isinstance(condition, I2VCondition):
            raise ValueError(
                f"{task.name} needs a start image: feed the latent from Wan Image To Video "
                f"with the Wan2.1 VAE"
            )
        opts = SamplerOptions.from_config(
            task.sampler,  # the task's defaults; every widget value overrides its own
            solver=solver,
            steps=steps,
            shift=shift,
            # a single-model task (TI2V-5B) has one scale: the high-noise widget, as its tooltip says
            guide_scale=GuideScale(high=guidance_high, low=guidance_low) if task.is_moe
            else GuideScale.same(guidance_high),
            boundary=boundary if task.is_moe else None,  # None keeps the preset's (None for TI2V-5B)
            seed=seed,
            cfg_mode=BATCHED_CFG if batched_cfg else SEQUENTIAL_CFG,
            placement=placement,
            num_resident_blocks=resident_blocks,
            denoise=denoise,
            start_step=start_step,
            end_step=None if end_step >= steps else end_step,
            timesteps=explicit_t,
            sigmas=explicit_sigmas,
        )
        record_context(
            profiler,
            task=task.name,
            steps=steps,
            placement=placement,
            solver=solver,
            seed=seed,
            cfg_mode=opts.cfg_mode,
            attention_backend=model.attention,
            loras=model.lora_descriptions() or None,
            step_cache=None
            if model.step_cache is None
            else model.step_cache.describe(task.dit.model_type, has_image=isinstance(condition, TI2VCondition)),
        )
        first, last = opts.start_step, opts.last_step
        progress = bridge.make_progress(last - first, "Wan Sampler")

        def on_step(index: int, num_steps: int, current: torch.Tensor) -> None:
            progress(index - first + 1)
            bridge.check_interrupt()

        def on_plan(plan: Any) -> None:  # the placement the memory plan chose (before any allocation)
            record_context(profiler, placement=plan.placement)

        continuation = latent.get(LATENT_CONTINUATION)
        with maybe_profile(profiler, unique_id, sampling_stages(last, first=first)), applied(
            model.experts, model.execution
        ):
            result = sample_latent(
                model.experts,
                task,
                opts,
                context=text_embeds.context[0],
                context_null=text_embeds.context_null[0],
                samples=samples,
                add_noise=add_noise,
                continuation=continuation if isinstance(continuation, Continuation) else None,
                i2v_y=condition.y if isinstance(condition, I2VCondition) else None,
                ti2v_z=condition.z if isinstance(condition, TI2VCondition) else None,
                callback=on_step,
                loras=model.loras,
                device=model.device,
                memory=memory.PackMemory(),
                on_plan=on_plan,
                step_cache=model.step_cache,
            )
        # experts left on the GPU (placement none) are listed with ComfyUI, which may move them off later
        memory.note_loaded(*(r for r in map(memory.resident_of, model.experts) if r is not None))
        out: dict[str, Any] = {"samples": result.samples}  # (1, C, T, h, w) raw
        if condition is not None:
            out[LATENT_CONDITION] = condition  # a second sampler (split run) needs it too
        if result.continuation is not None:
            out[LATENT_CONTINUATION] = result.continuation
        return (out,)
