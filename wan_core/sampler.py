"""The Wan2.2 denoising loop: expert switch, per-expert guidance, batched CFG, image conditioning.

One call of `sample()` runs the official loop (spec section 6) over normalised latents:

    for each step i with timestep t (integer; float for euler_distill) and float32 sigma:
        expert = high-noise if t >= boundary * 1000 else low-noise   (single-model tasks: "model")
        pred   = uncond + g_expert * (cond - uncond)                   (one pass when g == 1)
        latent = solver.step(pred, latent)

* CFG modes: "batched" (default) runs cond and uncond as one forward of batch 2 with the two text
  contexts (of different lengths) as a list; "sequential" runs two forwards of batch 1. Both give
  the same numbers. A step whose guidance scale is exactly 1 runs only the conditional pass ("off").
* I2V: the model gets `y` (mask + image latent, see `conditioning.py`) next to the latent, for both
  passes. TI2V: every step gives per-token timesteps; with an image latent `z`, frame-0 tokens get
  t = 0 and latent frame 0 is pinned to `z` before the loop and after every step.
* Noise: `make_noise(shape, seed)` draws float32 `randn` from a CPU `torch.Generator` seeded with
  `seed` and then moves it to the device, so a seed gives the same noise on every device. (The
  official code draws on the GPU, so its seeds give other noise; pass `noise=` to reproduce a run.)
* Hooks: `callback(step_index, num_steps, latent)` after every step (progress, preview, interrupt:
  raise `SamplingInterrupted`). An interrupt always stops the run and returns nothing, also when
  it comes with the last step's callback: the user asked to stop, so no result flows on to the
  decode (the callback has seen the final latent, e.g. for a preview). Trace stages
  `Step_<i>_Loading` (placement, kind "step-loading") and `Step_<i>_Inference` (forwards + solver,
  kind "step-inference") with facts step, expert, cfg_mode, flops and timestep; the loading stages
  also carry `placement` (what took effect) and `placement_requested`. Weight placement is
  delegated to `placement.py`; `model` / `blocks` on a CPU compute device move nothing, so they
  apply as `none`, with a logged warning and a `placement_fallback` event.
* Memory: before anything is allocated, `runtime.sampling_plan.plan_sampling` estimates the run on
  the compute device and compares it with what is free (`memory`, an application's
  `MemoryEnvironment`; by default the system's figures). Placement `auto` takes the fastest
  placement that fits; an explicit one that cannot fit, or a run that fits no placement, raises
  `MemoryPlanError` with the estimate, what is free and the options that would fit. The decision
  is the trace event `memory_plan`; each `Step_<i>_Inference` carries the estimate
  (`memory_estimate_bytes`) for the report to show beside the measured peak.

* Schedules and windows: `SamplerOptions` may cut the solver's schedule (`denoise` < 1) or replace
  it with explicit `timesteps` / `sigmas` (`schedulers.make_schedule`), and run only the steps
  `start_step` .. `end_step - 1` of it. A run that does not start at full noise takes its starting
  latent as `noise` (`partial.start_latent` builds it); a run that stops early returns the latent
  at `sigmas[end_step]` (leftover noise kept). `scheduler=` continues a run that stopped early
  (`FlowScheduler.resume`), so a split run equals one run; after the call it holds the state.
* LoRAs: `loras=` (`runtime.lora.ExpertLora`) are applied to the experts' weights for the duration
  of the run only (`runtime.lora.LoraPatches`), after placement and fp8 storage.
* Parallel runs: inside one rank of a parallel run (`runtime/distributed.py`) the loop is the
  same on every rank; the plan wraps the guided prediction (CFG-parallel) and the experts
  (Ulysses token split, sharded weights) for the duration of the run, and records each step's
  communication as a `communication` event.
* Step cache: `step_cache=` (`runtime.step_cache.StepCacheSettings`, None = off) wraps the guided
  prediction (the parallel plan's, in a parallel run): before each step's inference stage the
  cache decides whether the step reuses the expert's last computed prediction. A reused step
  records flops 0 and the facts `step_cache` ("computed"/"reused") and `step_cache_reason`, so the
  report never counts it as computed work. The decisions depend on the timesteps only, so every
  rank of a parallel run makes the same ones (a reused step has no collectives on any rank).

Shapes: latents (C, T, h, w) float32, C = the DiT's out_dim; contexts (S, text_dim).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn

from .conditioning import first_frame_mask, pin_first_frame, token_timesteps
from .config import (
    BATCHED_CFG,
    CFG_MODES,
    CFG_OFF,
    FLOAT_TIMESTEP_SOLVERS,
    NUM_TRAIN_TIMESTEPS,
    PLACEMENTS,
    SOLVERS,
    DiTConfig,
    GuideScale,
    SamplerConfig,
    WanConfig,
    step_stages,
)
from .placement import OFFLOAD_DEVICE, Placement, make_placement
from .runtime.distributed import Denoiser, active_parallel, parallel_sampling
from .runtime.lora import ExpertLora, LoraPatches
from .runtime.planner import MemoryEnvironment, PlacementPlan, SystemMemory, UncheckedMemory
from .runtime.sampling_plan import SamplingShape, plan_sampling
from .runtime.step_cache import NoStepCache, StepCache, StepCacheSettings, make_step_cache
from .schedulers import FULL_DENOISE, FlowSchedule, FlowScheduler, make_schedule, make_scheduler
from .trace import event, stage

log = logging.getLogger(__name__)

__all__ = ["SamplerOptions", "StepCallback", "make_noise", "select_expert", "sample"]

StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True, kw_only=True)
class SamplerOptions:
    """Settings of one sampling run. `guide_scale` is a `GuideScale(high=..., low=...)`, or one
    number for both experts (stored as `GuideScale.same(number)`).

    `boundary` is the expert switch as a fraction of the 1000 training timesteps (None for
    single-model tasks). `placement` is "auto" (the memory planner's choice), "none" (all weights
    on the device), "model" (the expert not in use waits on the CPU) or "blocks"
    (`num_resident_blocks` blocks stay, the rest stream).

    Schedule (see `schedulers.make_schedule`): `denoise` < 1 cuts the solver's schedule (ComfyUI's
    rule); `timesteps` (one per step, before the shift) or `sigmas` (steps + 1 values) replace it.
    Window: the run does steps `start_step` .. `end_step - 1` (None: to the last step).
    """

    solver: str = "unipc"
    steps: int
    shift: float
    guide_scale: GuideScale | float
    boundary: float | None = None
    seed: int = 0
    cfg_mode: str = BATCHED_CFG
    placement: str = "auto"
    num_resident_blocks: int = 0
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    denoise: float = 1.0
    start_step: int = 0
    end_step: int | None = None
    timesteps: tuple[float, ...] | None = None
    sigmas: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}; got {self.solver!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1 (e.g. 40); got {self.steps!r}")
        if not (isinstance(self.shift, (int, float)) and math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a finite number > 0 (e.g. 5.0); got {self.shift!r}")
        if self.boundary is not None and not (0.0 < self.boundary < 1.0):
            raise ValueError(f"boundary must lie in (0, 1) (e.g. 0.875); got {self.boundary}")
        object.__setattr__(self, "guide_scale", _guide_scale(self.guide_scale))
        if self.cfg_mode not in CFG_MODES:
            raise ValueError(f"cfg_mode must be one of {CFG_MODES}; got {self.cfg_mode!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}; got {self.placement!r}")
        if self.num_resident_blocks < 0:
            raise ValueError(f"num_resident_blocks must be >= 0; got {self.num_resident_blocks}")
        for name in ("timesteps", "sigmas"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        self.schedule()  # checks denoise and the explicit lists before any compute
        _check_window(self.start_step, self.end_step, self.steps)

    @property
    def boundary_timestep(self) -> float | None:
        return None if self.boundary is None else self.boundary * self.num_train_timesteps

    @property
    def last_step(self) -> int:
        """One past the last step this run does."""
        return self.steps if self.end_step is None else self.end_step

    @property
    def starts_from_noise(self) -> bool:
        """Whether the run starts at the top of the solver's full schedule (its input is pure noise)."""
        return (self.start_step == 0 and self.denoise > FULL_DENOISE and self.timesteps is None
                and self.sigmas is None)

    def schedule(self) -> FlowSchedule:
        """The schedule these options describe (`schedulers.make_schedule`)."""
        return make_schedule(self.solver, self.steps, self.shift, num_train_timesteps=self.num_train_timesteps,
                             denoise=self.denoise, timesteps=self.timesteps, sigmas=self.sigmas)

    def make_scheduler(self) -> FlowScheduler:
        """A fresh solver for this run, positioned at `start_step`."""
        return make_scheduler(self.solver, self.steps, self.shift, num_train_timesteps=self.num_train_timesteps,
                              denoise=self.denoise, timesteps=self.timesteps,
                              sigmas=self.sigmas).start_at(self.start_step)

    @classmethod
    def from_config(cls, cfg: SamplerConfig, *, solver: str | None = None, steps: int | None = None,
                    shift: float | None = None, guide_scale: GuideScale | float | None = None,
                    boundary: float | None = None, seed: int = 0, cfg_mode: str = BATCHED_CFG,
                    placement: str = "auto", num_resident_blocks: int = 0, denoise: float = 1.0,
                    start_step: int = 0, end_step: int | None = None,
                    timesteps: Sequence[float] | None = None,
                    sigmas: Sequence[float] | None = None) -> SamplerOptions:
        """A task's sampler defaults with the given overrides (None keeps the default)."""
        return cls(solver=cfg.solver if solver is None else solver,
                   steps=cfg.steps if steps is None else steps,
                   shift=cfg.shift if shift is None else shift,
                   guide_scale=cfg.guide_scale if guide_scale is None else guide_scale,
                   boundary=cfg.boundary if boundary is None else boundary,
                   seed=seed, cfg_mode=cfg_mode, placement=placement,
                   num_resident_blocks=num_resident_blocks, num_train_timesteps=cfg.num_train_timesteps,
                   denoise=denoise, start_step=start_step, end_step=end_step,
                   timesteps=None if timesteps is None else tuple(timesteps),
                   sigmas=None if sigmas is None else tuple(sigmas))


def _check_window(start_step: int, end_step: int | None, steps: int) -> None:
    if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step < steps:
        raise ValueError(f"start_step must be an integer in [0, steps - 1] = [0, {steps - 1}]; got {start_step!r} "
                         "(a later start would run no step)")
    if end_step is None:
        return
    if isinstance(end_step, bool) or not isinstance(end_step, int) or not start_step < end_step <= steps:
        raise ValueError(f"end_step must be an integer in (start_step, steps] = ({start_step}, {steps}]; "
                         f"got {end_step!r}")


def _guide_scale(value: object) -> GuideScale:
    """A `GuideScale` as given, or one number for both experts; a clear error otherwise (a bare pair
    is refused: its order could be read either way)."""
    if isinstance(value, GuideScale):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return GuideScale.same(value)
    raise ValueError(f"guide_scale must be a finite number (both experts) or two finite numbers as "
                     f"GuideScale(high=..., low=...), e.g. 5.0 or GuideScale(high=4.0, low=3.0); got {value!r}")


def make_noise(shape: Sequence[int], seed: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded float32 standard normal noise, drawn on the CPU and moved to `device`.

    Shapes: -> `shape` (e.g. (C, T, h, w)).
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)


def select_expert(t: float, boundary: float | None, *, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> str:
    """'high' if t >= boundary * num_train_timesteps else 'low'; 'model' without a boundary."""
    if boundary is None:
        return "model"
    return "high" if t >= boundary * num_train_timesteps else "low"


@dataclass(frozen=True)
class _Run:
    """Validated inputs of one run (all on the compute device)."""

    latent: torch.Tensor  # (C, T, h, w)
    context: torch.Tensor
    context_null: torch.Tensor
    y: torch.Tensor | None  # (C_y, T, h, w)
    z: torch.Tensor | None  # (C, 1, h, w)
    seq_len: int
    per_token_t: bool
    flops_one: float  # one forward, batch 1


def sample(experts: Sequence[nn.Module], task: WanConfig, opts: SamplerOptions, *,
           context: torch.Tensor, context_null: torch.Tensor, noise: torch.Tensor | None = None,
           latent_shape: Sequence[int] | None = None, i2v_y: torch.Tensor | None = None,
           ti2v_z: torch.Tensor | None = None, callback: StepCallback | None = None,
           device: torch.device | str | None = None, scheduler: FlowScheduler | None = None,
           loras: Sequence[ExpertLora] = (), memory: MemoryEnvironment | None = None,
           on_plan: Callable[[PlacementPlan], None] | None = None,
           step_cache: StepCacheSettings | None = None) -> torch.Tensor:
    """Run the denoising loop and return the final normalised latent.

    `experts` is [high_noise, low_noise] for two-expert tasks and [model] for TI2V-5B; each is a
    `WanDiT` (or anything with its forward contract and a `.config`). Either `noise` or
    `latent_shape` (then the noise is `make_noise(latent_shape, opts.seed)`) is given.
    `device` (where the forwards run) defaults to the experts' device, or to CUDA when there is
    one and the placement is "model" or "blocks" (those keep experts on the CPU between runs).
    All arguments are checked and the memory plan is made (`memory`: how the application reports
    and frees memory; `on_plan(plan)` hears the decision) before any compute or large allocation.
    On exit (errors and interrupts included) the placement's hooks are removed; with
    "model"/"blocks" every expert is back on the CPU. When the compute device is the CPU (e.g. no
    CUDA device), "model"/"blocks" move nothing: a warning is logged and the trace records
    placement "none" next to the requested one.

    Windows: with `opts.start_step` > 0, `denoise` < 1 or explicit timesteps/sigmas, `noise` is the
    latent at the window's first sigma (`partial.start_latent`). `scheduler` continues an earlier
    run (`opts.make_scheduler().resume(state)`; its schedule and position must be the options');
    after the call it holds the solver state at `opts.last_step`. `loras` are applied for this call
    only (`runtime.lora.LoraPatches`); `step_cache` (None: off) may reuse steps (module docstring).

    Shapes: context (S, text_dim), context_null (S', text_dim); noise (C, T, h, w); i2v_y
    (in_dim - C, T, h, w) normalised mask + image latent; ti2v_z (C, 1, h, w) normalised.
    Returns (C, T, h, w) float32 on `device`.
    """
    experts = list(experts)
    names = _expert_names(experts, task, opts)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable(step_index, num_steps, latent); got {type(callback)}")
    requested_device = device
    if device is None:
        device = _default_device(experts[0], opts.placement)
    if active_parallel() is not None:  # each rank holds a share: the single-process estimate does not apply
        memory = UncheckedMemory("a parallel run: per-rank memory is not estimated (placement auto is 'none')")
    plan = _memory_plan(experts, task, opts, torch.device(device), memory or SystemMemory(), noise=noise,
                        latent_shape=latent_shape, contexts=(context, context_null), image=ti2v_z, loras=loras)
    if on_plan is not None:
        on_plan(plan)
    opts = replace(opts, placement=plan.placement, num_resident_blocks=plan.num_resident_blocks)
    applied, reason = _effective_placement(opts.placement, torch.device(device),
                                           defaulted=requested_device is None)
    if not opts.starts_from_noise and noise is None:
        raise ValueError("a run that does not start at full noise (start_step > 0, denoise < 1 or explicit "
                         "timesteps/sigmas) needs its starting latent as `noise` (partial.start_latent)")
    scheduler = _run_scheduler(scheduler, opts)
    run = _prepare(experts, task, opts, context=context, context_null=context_null, noise=noise,
                   latent_shape=latent_shape, i2v_y=i2v_y, ti2v_z=ti2v_z, device=torch.device(device))
    if scheduler.schedule.has_duplicate_timesteps():
        log.info("%d %s steps at shift %g repeat some integer timesteps; the solver follows its own step "
                 "counter and the distinct float32 sigmas", opts.steps, opts.solver, opts.shift)
    if reason is not None:
        log.warning("placement %r requested, %r applied: %s; every weight stays on the CPU, where the "
                    "model runs (pass a CUDA device to offload)", opts.placement, applied, reason)
        event("placement_fallback", requested=opts.placement, applied=applied, reason=reason)
    placement = make_placement(experts, opts.placement, device=run.latent.device,
                               num_resident_blocks=opts.num_resident_blocks)
    placement_facts = {"placement": applied, "placement_requested": plan.requested}
    patches = LoraPatches(experts, loras, keep_on_device=applied != "blocks")
    cache = make_step_cache(step_cache, model_type=task.dit.model_type, num_steps=scheduler.num_steps,
                            last_step=opts.last_step, has_image=run.z is not None)
    # the parallel plan first (sharded weights before placement), LoRA hooks after placement's
    with _parallel_scope(experts, opts, loras) as denoiser, placement, patches, torch.no_grad():
        return _loop(placement, names, scheduler, run, opts, callback, placement_facts, denoiser,
                     plan.estimate.facts(), cache)


def _parallel_scope(experts: list[nn.Module], opts: SamplerOptions,
                    loras: Sequence[ExpertLora]) -> AbstractContextManager[Denoiser]:
    """The guided prediction of this run: the sampler's own, or, inside a parallel run (a rank
    started by `wanbench run --nproc N`), the plan's (`runtime/distributed.py`), which applies
    itself to the experts until the run ends and says which share of each step this rank computes."""
    runtime = active_parallel()
    if runtime is None:
        return contextlib.nullcontext(Denoiser(_guided_prediction))
    return parallel_sampling(runtime, experts, placement=opts.placement, single=_guided_prediction,
                             has_loras=bool(loras))


def _run_scheduler(scheduler: FlowScheduler | None, opts: SamplerOptions) -> FlowScheduler:
    """The options' fresh scheduler, or a given one checked to be at the options' schedule and start."""
    if scheduler is None:
        return opts.make_scheduler()
    expected = opts.schedule()
    if scheduler.solver != opts.solver or not torch.equal(scheduler.sigmas, expected.sigmas):
        raise ValueError(f"the scheduler to continue runs {scheduler.solver} over other sigmas than these options "
                         f"({opts.solver}, {opts.steps} steps); continue with the same solver and schedule")
    if scheduler.step_index != opts.start_step:
        raise ValueError(f"the scheduler to continue is at step {scheduler.step_index}; set start_step to it "
                         f"(got {opts.start_step})")
    return scheduler


def _loop(placement: Placement, names: list[str], scheduler: FlowScheduler, run: _Run,
          opts: SamplerOptions, callback: StepCallback | None, placement_facts: dict[str, str],
          denoiser: Denoiser, estimate_facts: dict[str, int | str],
          cache: StepCache | NoStepCache) -> torch.Tensor:
    if run.z is not None:
        mask = first_frame_mask(tuple(run.latent.shape), device=run.latent.device)
        latent = pin_first_frame(run.latent, run.z, mask)
    else:
        # text-only TI2V gives every token t; the other tasks take one timestep per sample
        mask = torch.ones_like(run.latent) if run.per_token_t else None
        latent = run.latent
    num_steps = scheduler.num_steps
    float_t = opts.solver in FLOAT_TIMESTEP_SOLVERS
    previous = None
    for i in range(scheduler.step_index, opts.last_step):
        t = scheduler.timesteps[i]
        t_value = float(t) if float_t else int(t)  # what the model gets (float32 or int64)
        name = select_expert(t_value, opts.boundary, num_train_timesteps=opts.num_train_timesteps)
        g = opts.guide_scale.for_expert(name)
        cfg_mode = CFG_OFF if g == 1.0 else opts.cfg_mode
        passes = 1 if cfg_mode == CFG_OFF else 2
        facts = dict(step=i, expert=name, cfg_mode=cfg_mode, timestep=t_value)
        if name != previous and previous is not None:
            event("expert_switch", step=i, expert=name, timestep=t_value)
        previous = name
        loading, inference = step_stages(i)
        with stage(loading.name, kind=loading.kind, flops=0.0, **facts, **placement_facts):
            model = placement.activate(names.index(name))
        if run.per_token_t:
            t_model = token_timesteps(t.to(latent.device), mask, patch_size=model.config.patch_size,
                                      seq_len=run.seq_len)  # (1, seq_len) float32
        else:
            t_model = t.view(1).to(latent.device)  # (1,) int64, float32 for float-timestep solvers
        decision = cache.decide(i, name, model, t_model, passes=passes)
        # this process's share of the step; a reused step does no model work
        flops = 0.0 if decision.reuse else passes * run.flops_one * denoiser.share(cfg_mode)
        step_facts = {**facts, **estimate_facts, **decision.facts()}
        with stage(inference.name, kind=inference.kind, flops=flops, **step_facts):
            denoise = partial(denoiser.predict, model, latent, t_model, run, g, cfg_mode)
            pred = cache.predict(decision, name, denoise)
            latent = scheduler.step(pred, latent)
            if run.z is not None:
                latent = pin_first_frame(latent, run.z, mask)
        if callback is not None:
            callback(i, num_steps, latent)
    return latent


def _guided_prediction(model: nn.Module, latent: torch.Tensor, t_model: torch.Tensor, run: _Run,
                       g: float, cfg_mode: str) -> torch.Tensor:
    """`uncond + g * (cond - uncond)` from one batched forward, two forwards, or cond alone (g == 1).

    Shapes: latent (C, T, h, w); t_model (1,) or (1, seq_len) -> (C, T, h, w) float32.
    """
    x = latent[None]  # (1, C, T, h, w)
    y = None if run.y is None else run.y[None]
    if cfg_mode == CFG_OFF:
        return model(x, t_model, [run.context], seq_len=run.seq_len, y=y)[0].float()
    if cfg_mode == BATCHED_CFG:
        t2 = t_model.expand(2, *t_model.shape[1:])
        y2 = None if y is None else y.expand(2, -1, -1, -1, -1)
        out = model(x.expand(2, -1, -1, -1, -1), t2, [run.context, run.context_null], seq_len=run.seq_len,
                    y=y2).float()  # (2, C, T, h, w)
        cond, uncond = out[0], out[1]
    else:
        cond = model(x, t_model, [run.context], seq_len=run.seq_len, y=y)[0].float()
        uncond = model(x, t_model, [run.context_null], seq_len=run.seq_len, y=y)[0].float()
    return uncond + g * (cond - uncond)


def _expert_names(experts: list[nn.Module], task: WanConfig, opts: SamplerOptions) -> list[str]:
    if opts.boundary is None:
        if len(experts) != 1:
            raise ValueError(f"without a boundary one model is used; got {len(experts)} experts "
                             "(set a boundary, e.g. 0.875, to use a high- and a low-noise expert)")
        return ["model"]
    if len(experts) != 2:
        raise ValueError(f"a boundary ({opts.boundary}) needs two experts [high_noise, low_noise]; got "
                         f"{len(experts)} (pass the same model twice to use one model for all steps)")
    return ["high", "low"]


def _memory_plan(experts: list[nn.Module], task: WanConfig, opts: SamplerOptions, device: torch.device,
                 memory: MemoryEnvironment, *, noise: torch.Tensor | None, latent_shape: Sequence[int] | None,
                 contexts: tuple[torch.Tensor, torch.Tensor], image: torch.Tensor | None,
                 loras: Sequence[ExpertLora]) -> PlacementPlan:
    """The placement this run uses, planned before anything large is allocated (`MemoryPlanError`
    when nothing fits); traced as the event `memory_plan`."""
    dit = _check_experts(experts, task)
    if (noise is None) == (latent_shape is None):
        raise ValueError("give exactly one of `noise` (the initial latent) or `latent_shape` (seeded noise)")
    shape = tuple(int(s) for s in (noise.shape if noise is not None else latent_shape))
    _check_latent_shape(shape, dit.out_dim, "noise" if noise is not None else "latent_shape")
    guided = any(opts.guide_scale.for_expert(n) != 1.0 for n in (("model",) if opts.boundary is None
                                                                  else ("high", "low")))
    sampling = SamplingShape(latent_shape=shape, batch=2 if guided and opts.cfg_mode == BATCHED_CFG else 1,
                             text_rows=max(int(c.shape[0]) for c in contexts),
                             token_time="per_token" if image is not None else "uniform",
                             temporal_stride=task.vae.temporal_stride,
                             conditioning_channels=dit.in_dim - dit.out_dim if dit.model_type == "i2v" else 0)
    plan = plan_sampling(experts, sampling, device=device, placement=opts.placement,
                         num_resident_blocks=opts.num_resident_blocks, memory=memory, loras=loras)
    event("memory_plan", **plan.facts())
    return plan


def _default_device(module: nn.Module, placement: str) -> torch.device:
    """The experts' device; for the offloading placements (which park experts on the CPU between
    runs, and `auto`, which may choose one) the first CUDA device when there is one."""
    if placement != "none" and torch.cuda.is_available():
        return torch.device("cuda")
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _effective_placement(requested: str, device: torch.device, *, defaulted: bool) -> tuple[str, str | None]:
    """(placement that takes effect, why it differs from the request or None).

    `model` and `blocks` move weights between the CPU and the compute device; when the compute
    device is the CPU itself they move nothing, so what applies is `none`.
    """
    if requested == "none" or device.type != OFFLOAD_DEVICE.type:
        return requested, None
    reason = "no CUDA device" if defaulted else f"the compute device is the {device.type.upper()}"
    return "none", reason


def _prepare(experts: list[nn.Module], task: WanConfig, opts: SamplerOptions, *, context: torch.Tensor,
             context_null: torch.Tensor, noise: torch.Tensor | None, latent_shape: Sequence[int] | None,
             i2v_y: torch.Tensor | None, ti2v_z: torch.Tensor | None, device: torch.device) -> _Run:
    """Check every argument against the task and the experts; build the starting latent."""
    dit = _check_experts(experts, task)
    if (noise is None) == (latent_shape is None):
        raise ValueError("give exactly one of `noise` (the initial latent) or `latent_shape` (seeded noise)")
    shape = tuple(int(s) for s in (noise.shape if noise is not None else latent_shape))
    _check_latent_shape(shape, dit.out_dim, "noise" if noise is not None else "latent_shape")
    thw = shape[1:]
    num_tokens = dit.num_tokens(thw)
    for name, ctx in (("context", context), ("context_null", context_null)):
        if ctx.ndim != 2 or ctx.shape[1] != dit.text_dim or not 0 < ctx.shape[0] <= dit.text_len:
            raise ValueError(f"{name} must be (S, {dit.text_dim}) with 1 <= S <= {dit.text_len}; "
                             f"got {tuple(ctx.shape)}")
    y_channels = dit.in_dim - dit.out_dim
    if dit.model_type == "i2v":
        if i2v_y is None:
            raise ValueError(f"task {task.name} needs the image conditioning i2v_y ({y_channels}, T, h, w); "
                             "build it with conditioning.i2v_condition(image, ...)")
        if tuple(i2v_y.shape) != (y_channels, *thw):
            raise ValueError(f"i2v_y must be {(y_channels, *thw)}; got {tuple(i2v_y.shape)}")
        i2v_y = i2v_y.to(device=device, dtype=torch.float32)
    elif i2v_y is not None:
        raise ValueError(f"i2v_y is only used by the i2v task; this is {task.name}")
    if ti2v_z is not None:
        if dit.model_type != "ti2v":
            raise ValueError(f"ti2v_z (a first-frame latent) is only used by the ti2v task; "
                             f"this is {task.name}")
        if tuple(ti2v_z.shape) != (dit.out_dim, 1, *thw[1:]):
            raise ValueError(f"ti2v_z must be {(dit.out_dim, 1, *thw[1:])}; got {tuple(ti2v_z.shape)}")
        ti2v_z = ti2v_z.to(device=device, dtype=torch.float32)
    if noise is None:
        noise = make_noise(shape, opts.seed, device=device)
    noise = noise.to(device=device, dtype=torch.float32)
    return _Run(latent=noise, context=context.to(device), context_null=context_null.to(device), y=i2v_y,
                z=ti2v_z, seq_len=num_tokens, per_token_t=dit.model_type == "ti2v",
                flops_one=dit.flops_forward(num_tokens, per_token_time=dit.model_type == "ti2v"))


def _check_experts(experts: list[nn.Module], task: WanConfig) -> DiTConfig:
    """Every expert fits the task and they share one config; returns it."""
    dit = getattr(experts[0], "config", None)
    want = (task.dit.model_type, task.dit.in_dim, task.dit.out_dim)
    for k, expert in enumerate(experts):
        cfg = getattr(expert, "config", None)
        got = None if cfg is None else (cfg.model_type, cfg.in_dim, cfg.out_dim)
        if got != want:
            raise ValueError(f"expert {k} does not fit task {task.name}: (model_type, in_dim, out_dim) = "
                             f"{got}, expected {want}")
        if cfg != dit:
            raise ValueError(f"the experts must share one DiTConfig; expert {k} has {cfg}, expert 0 {dit}")
    return dit


def _check_latent_shape(shape: tuple[int, ...], channels: int, what: str) -> None:
    if len(shape) != 4 or shape[0] != channels or min(shape) < 1:
        raise ValueError(f"{what} must be (C={channels}, T, h, w) for this model (the latent of one "
                         f"video, normalised); got {shape}")
