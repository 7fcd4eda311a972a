"""Partial denoising on ComfyUI LATENTs: start from an input latent, stop early, continue exactly.

The schedule side of the sampler (the guidance/denoiser side is `sampler._guided_prediction`).
`sample_latent` is what Wan Sampler calls: raw latent in, raw latent out, with ComfyUI's
conventions for flow models (`comfy/model_sampling.py` CONST, `comfy/samplers.py`), so LATENTs move
between this pack's sampler and core samplers such as KSamplerAdvanced:

* Start. A run whose window starts at the top of the solver's full schedule starts from seeded noise
  and does not read the input values (denoise 1, start_step 0). Otherwise, with z the input latent
  (normalised) and sigma_s the window's first sigma,
      x = sigma_s * noise + (1 - sigma_s) * z      (add_noise, e.g. video-to-video with denoise < 1)
      x = (1 - sigma_s) * z                        (add_noise off: z holds leftover noise, below)
* Stop. A run that ends at sigma_e > 0 (end_step before the last step) keeps the leftover noise and
  returns x / (1 - sigma_e), ComfyUI's `inverse_noise_scaling`, so that `(1 - sigma_e) * latent`
  at the next start gives x back (to float rounding, through the raw <-> normalised conversion).
* Exact continuation. Such a LATENT also carries a `Continuation` (the exact normalised x and the
  solver's state, `schedulers.SolverState`). A sampler that starts at that step with add_noise off,
  the same solver and the same schedule continues from it exactly: `end_step = k` then
  `start_step = k` gives the same numbers as one run, for every solver (UniPC and DPM++ keep their
  multistep history). Otherwise (the LATENT went through another node, or the settings differ) the
  LATENT's values are used as above and a multistep solver restarts at order 1, as ComfyUI's do.

Shapes: raw latents (1, C, T, h, w); normalised ones (C, T, h, w).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import WanConfig
from .latents import denormalize_latent, normalize_latent
from .runtime.lora import ExpertLora
from .runtime.planner import MemoryEnvironment, PlacementPlan
from .runtime.step_cache import StepCacheSettings
from .sampler import SamplerOptions, StepCallback, make_noise, sample
from .schedulers import SolverState

log = logging.getLogger(__name__)

__all__ = ["Continuation", "SampledLatent", "sample_latent", "start_latent"]


@dataclass(frozen=True, eq=False)
class Continuation:
    """Where a run that stopped with leftover noise is, exactly (see the module docstring).

    `samples` is the raw latent tensor handed on next to it: the continuation applies only while the
    LATENT still holds that very tensor.
    """

    latent: torch.Tensor  # (C, T, h, w) normalised x at solver_state.step_index, float32
    solver_state: SolverState
    samples: torch.Tensor  # (1, C, T, h, w)


@dataclass(frozen=True)
class SampledLatent:
    """What `sample_latent` gives back: the raw latent, and its continuation when noise is left."""

    samples: torch.Tensor  # (1, C, T, h, w) raw, float32, on the CPU
    continuation: Continuation | None
    sigma_end: float


def start_latent(opts: SamplerOptions, z: torch.Tensor, noise: torch.Tensor, *, add_noise: bool) -> torch.Tensor:
    """The latent at the window's first sigma: `sigma * noise + (1 - sigma) * z`, or `(1 - sigma) * z`
    without `add_noise`; pure `noise` when the run starts at the top of the full schedule.

    Shapes: z, noise (C, T, h, w) -> (C, T, h, w) float32.
    """
    if opts.starts_from_noise and add_noise:
        return noise.float()
    sigma = opts.schedule().sigmas[opts.start_step]  # float32 0-d
    start = (1 - sigma) * z.float()
    return sigma * noise.float() + start if add_noise else start


def sample_latent(experts: Sequence[nn.Module], task: WanConfig, opts: SamplerOptions, *,
                  context: torch.Tensor, context_null: torch.Tensor, samples: torch.Tensor,
                  add_noise: bool = True, continuation: Continuation | None = None,
                  i2v_y: torch.Tensor | None = None, ti2v_z: torch.Tensor | None = None,
                  callback: StepCallback | None = None,
                  loras: Sequence[ExpertLora] = (), device: torch.device | str | None = None,
                  memory: MemoryEnvironment | None = None,
                  on_plan: Callable[[PlacementPlan], None] | None = None,
                  step_cache: StepCacheSettings | None = None) -> SampledLatent:
    """Sample the window of `opts` from a raw LATENT tensor; returns the raw result (see module docstring).

    `continuation` is the one the input LATENT carries (None if none); it is used when it fits.
    `loras` and `step_cache` go to `sampler.sample` as they are; so do `device`, `memory` and
    `on_plan` (the compute device and the memory plan; the starting latent, a few latent-sized CPU
    tensors, is made before the plan).
    Shapes: samples (1, C, T, h, w) raw; context (S, text_dim); i2v_y, ti2v_z as in `sampler.sample`.
    """
    if samples.dim() != 5 or samples.shape[0] != 1:
        raise ValueError(f"samples must be one raw latent (1, C, T, h, w); got {tuple(samples.shape)}")
    schedule = opts.schedule()
    scheduler = opts.make_scheduler()
    resumed = _usable(continuation, samples, opts, add_noise, schedule.sigmas)
    if resumed is not None:
        scheduler.resume(resumed.solver_state)
        start = resumed.latent
    else:
        z = normalize_latent(samples[0].float(), task.vae)  # (C, T, h, w)
        noise = make_noise(tuple(z.shape), opts.seed)
        start = start_latent(opts, z, noise, add_noise=add_noise)
    out = sample(list(experts), task, opts, context=context, context_null=context_null, noise=start,
                 i2v_y=i2v_y, ti2v_z=ti2v_z, callback=callback, scheduler=scheduler, loras=loras, device=device,
                 memory=memory, on_plan=on_plan, step_cache=step_cache)
    sigma_end = schedule.sigmas[opts.last_step]
    out = out.float().cpu()
    if float(sigma_end) == 0.0:
        return SampledLatent(samples=denormalize_latent(out, task.vae)[None], continuation=None, sigma_end=0.0)
    raw = denormalize_latent(out / (1 - sigma_end), task.vae)[None]  # (1, C, T, h, w)
    return SampledLatent(samples=raw, continuation=Continuation(latent=out, solver_state=scheduler.state(),
                                                                samples=raw), sigma_end=float(sigma_end))


def _usable(continuation: Continuation | None, samples: torch.Tensor, opts: SamplerOptions, add_noise: bool,
            sigmas: torch.Tensor) -> Continuation | None:
    """The continuation when it belongs to `samples` and these options continue its run, else None."""
    if continuation is None:
        return None
    state = continuation.solver_state
    reasons = []
    if continuation.samples is not samples:
        reasons.append("the LATENT's values were replaced after the run that left it")
    if add_noise:
        reasons.append("add_noise is on")
    if state.step_index != opts.start_step:
        reasons.append(f"start_step is {opts.start_step}, the run stopped at step {state.step_index}")
    if state.solver != opts.solver or not torch.equal(state.sigmas, sigmas):
        reasons.append("the solver or its schedule differ")
    if reasons:
        log.info("the input LATENT's exact continuation is not used (%s); starting from its values",
                 "; ".join(reasons))
        return None
    return continuation
