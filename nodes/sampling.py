"""Wan Sampler: the denoising loop (stages `Step_<i>_Loading` / `Step_<i>_Inference`).

One call of `wan_core.partial.sample_latent`. The `LATENT` input gives the video geometry and, from
Wan Image To Video, the start-image conditioning. A full run (denoise 1, start_step 0) starts from
seeded noise and does not read the latent's values; with denoise < 1 or start_step > 0 it starts
from them (video-to-video, or the second half of a split run), as ComfyUI's KSampler(Advanced) do.
The output `LATENT` holds raw latents (the VAE's space), as ComfyUI's own nodes expect, keeps the
input's conditioning, and after an early `end_step` carries the exact state so that the next Wan
Sampler continues the run bit for bit (docs/sampler.md). LoRAs and the step cache on the model input
are applied for the duration of this node's run only.

Task defaults: the node learns the task only when it runs (from the model), so `steps`, `shift`,
`boundary`, `guidance_high` and `guidance_low` take 0 to mean "the task's preset value" (T2V-A14B:
40 steps, shift 12, boundary 0.875, guidance 4 / 3; I2V and TI2V their own); with explicit
`timesteps`/`sigmas`, steps 0 takes the list's length. Any other value is used as given, so saved
workflows with explicit numbers keep them. The values that ran are recorded in the report and sent
to the UI (`ui.wanbench_sampler`), which shows them under the node. With ComfyUI's preview setting
on, each step also sends a latent preview (`nodes/previews.py`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..wan_core.config import (
    AUTO_PLACEMENT,
    BATCHED_CFG,
    PLACEMENTS,
    SEQUENTIAL_CFG,
    SOLVERS,
    TI2V_5B,
    sampling_stages,
)
from . import comfy_bridge as bridge
from . import memory
from . import types as T
from .previews import latent_previewer
from .profiler_handle import maybe_profile, record_context
from .schedule_inputs import END_OF_SCHEDULE, SCHEDULE_INPUTS, check_list_length
from .task_defaults import TASK_DEFAULT_INPUTS, resolved_settings, resolved_steps, task_settings
from .validation import check_node_inputs, check_numbers, first_problem, parse_numbers

MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_RESIDENT_BLOCKS = 64
LATENT_CONDITION = "wan_condition"  # LATENT keys the pack adds (core nodes ignore them)
LATENT_CONTINUATION = "wan_continuation"


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
                **TASK_DEFAULT_INPUTS,
                "solver": (
                    list(SOLVERS),
                    {
                        "default": TI2V_5B.sampler.solver,  # every preset's solver
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
    def VALIDATE_INPUTS(cls, timesteps: str | None = None, sigmas: str | None = None) -> bool | str:
        # Only the two schedule texts (a problem with one is shown on both, naming which); ComfyUI
        # checks every other input's range itself, on that input.
        return first_problem(check_numbers("timesteps", timesteps), check_numbers("sigmas", sigmas))

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
    ) -> dict[str, Any]:
        from ..wan_core.conditioning import I2VCondition, TI2VCondition
        from ..wan_core.partial import Continuation, sample_latent
        from ..wan_core.runtime.execution import applied, check_with_loras
        from ..wan_core.sampler import SamplerOptions

        check_node_inputs(
            WanSampler,
            seed=seed,
            steps=steps,
            shift=shift,
            boundary=boundary,
            guidance_high=guidance_high,
            guidance_low=guidance_low,
            solver=solver,
            batched_cfg=batched_cfg,
            placement=placement,
            resident_blocks=resident_blocks,
            denoise=denoise,
            start_step=start_step,
            end_step=end_step,
            add_noise=add_noise,
            timesteps=timesteps,
            sigmas=sigmas,
        )
        explicit_t, explicit_sigmas = parse_numbers("timesteps", timesteps), parse_numbers("sigmas", sigmas)
        steps = resolved_steps(steps, model.task.sampler.steps, explicit_t, explicit_sigmas)
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
            task.sampler,  # the task's defaults; every widget value other than 0 overrides its own
            solver=solver,
            steps=steps,
            **task_settings(
                task, shift=shift, boundary=boundary, guidance_high=guidance_high, guidance_low=guidance_low
            ),
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
        resolved = resolved_settings(task, opts)
        record_context(
            profiler,
            task=task.name,
            steps=opts.steps,
            shift=opts.shift,
            boundary=opts.boundary,
            guidance_high=opts.guide_scale.high if task.is_moe else None,
            guidance_low=opts.guide_scale.low,
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
        preview = latent_previewer(task.vae)

        def on_step(index: int, num_steps: int, current: torch.Tensor) -> None:
            progress(index - first + 1, preview(current) if preview is not None else None)
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
        return {"ui": {"wanbench_sampler": [resolved]}, "result": (out,)}

