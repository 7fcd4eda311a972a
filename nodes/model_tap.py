"""Wan Model Tap: a clone of a loaded model carrying the observer's wrappers (inserted, never wired).

`prompt_rewrite.py` puts one tap after every model source (UNETLoader, ...) of a prompt that holds
a Wan Profiler or Wan Benchmark Report; everything that used the source's MODEL uses the tap's
instead. The tap returns `model.clone()` with wrappers and a callback under the key
`wanbench.observer` (ComfyUI's `comfy.patcher_extension`: clones copy them, so LoRA and
ModelSamplingSD3 nodes downstream keep them). The user's model object is never modified.

The wrappers hold no state: each looks up the observation of the prompt ComfyUI is executing
and, when there is none (a cached tap reused later), only calls on. Per run of a core sampler:

    OUTER_SAMPLE      a sampler run begins / ends (sigmas, CFG scale, the model's identity)
    PREPARE_SAMPLING  ComfyUI loads / offloads models for the run  -> Step_<first>_Loading
    SAMPLER_SAMPLE    the solver loop; its step callback marks each step's end
    PREDICT_NOISE     a model evaluation begins (opens the step's stage)
    CALC_COND_BATCH   whether the uncond pass exists (CFG off when it does not)
    APPLY_MODEL       which conds share one forward (batched CFG) or not (two passes)
    DIFFUSION_MODEL   one forward of the WanModel: FLOPs from its dims and the input shapes

Shapes: DIFFUSION_MODEL `x` (B, C, T, H, W), `context` (B, S, text_dim).
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Any

from ..wan_core.config import MODEL_TYPES, DiTConfig
from . import observer
from . import types as T
from .observed_sampling import ModelLabel, WrappedRun

log = logging.getLogger(__name__)

WRAPPER_KEY = "wanbench.observer"
_ACTIVE_RUN_KEY = "wanbench_run"  # where a run is kept in transformer_options during sampling


class WanModelTap:
    """Internal: inserted by the profiler after each model loader; returns a clone with wrappers."""

    CATEGORY = f"{T.CATEGORY}/internal"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "tap"
    DESCRIPTION = (
        "Added automatically by Wan Profiler in front of what uses a loaded model, to time the "
        "sampler steps; not needed by hand. The model itself is not changed."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The loaded model."}),
                "source_node": ("STRING", {"default": "", "tooltip": "Id of the node that loaded it."}),
                "model_file": ("STRING", {"default": "", "tooltip": "The file that node loads."}),
                "expert": ("STRING", {"default": "", "tooltip": "high / low / model, or empty if unknown."}),
            }
        }

    def tap(self, model: Any, source_node: str, model_file: str, expert: str) -> tuple[Any]:
        if not hasattr(model, "clone") or not hasattr(model, "add_wrapper_with_key"):
            raise TypeError(f"Wan Model Tap needs a ComfyUI MODEL; got {type(model).__name__}")
        clone = model.clone()
        install_wrappers(clone, ModelLabel(source_node=source_node, model_file=model_file, expert=expert))
        return (clone,)


def install_wrappers(patcher: Any, label: ModelLabel) -> None:
    """Put the observer's wrappers on `patcher` (replacing any it had under the same key)."""
    pe = importlib.import_module("comfy.patcher_extension")
    wrappers = pe.WrappersMP
    for wrapper_type in (
        wrappers.OUTER_SAMPLE,
        wrappers.PREPARE_SAMPLING,
        wrappers.SAMPLER_SAMPLE,
        wrappers.PREDICT_NOISE,
        wrappers.CALC_COND_BATCH,
        wrappers.APPLY_MODEL,
        wrappers.DIFFUSION_MODEL,
    ):
        patcher.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
    patcher.add_wrapper_with_key(wrappers.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample(label))
    patcher.add_wrapper_with_key(wrappers.PREPARE_SAMPLING, WRAPPER_KEY, _prepare_sampling)
    patcher.add_wrapper_with_key(wrappers.SAMPLER_SAMPLE, WRAPPER_KEY, _sampler_sample)
    patcher.add_wrapper_with_key(wrappers.PREDICT_NOISE, WRAPPER_KEY, _predict_noise)
    patcher.add_wrapper_with_key(wrappers.CALC_COND_BATCH, WRAPPER_KEY, _calc_cond_batch)
    patcher.add_wrapper_with_key(wrappers.APPLY_MODEL, WRAPPER_KEY, _apply_model)
    patcher.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY, _diffusion_model)


# ------------------------------------------------------------------------------------------------
# The run of the sampler node being executed (one at a time per prompt: `observation.sampler_run`)
# ------------------------------------------------------------------------------------------------
def _run() -> tuple[Any, WrappedRun | None]:
    observation = observer.current_observation()
    if observation is None:
        return None, None
    return observation, observation.sampler_run


def _outer_sample(label: ModelLabel) -> Any:
    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        observation = observer.current_observation()
        if observation is None or observation.sampler_run is not None:
            return executor(*args, **kwargs)
        run = observer.guarded(observation, "a sampler's start", lambda: _begin(observation, executor, label, args))
        if run is None:
            return executor(*args, **kwargs)
        observation.sampler_run = run
        error: BaseException | None = None
        try:
            return executor(*args, **kwargs)
        except BaseException as err:
            error = err
            raise
        finally:
            observation.sampler_run = None
            observer.guarded(observation, "a sampler's end", lambda: observation.end_sampler_run(run, error))

    return wrapper


def _begin(observation: Any, executor: Any, label: ModelLabel, args: tuple[Any, ...]) -> WrappedRun:
    guider = executor.class_obj
    sigmas = [float(s) for s in args[3].flatten().tolist()] if len(args) > 3 else []
    patcher = getattr(guider, "model_patcher", None)
    sampling = patcher.get_model_object("model_sampling") if patcher is not None else None
    sigma_max = float(sampling.sigma_max) if sampling is not None and hasattr(sampling, "sigma_max") else None
    node_id = _executing_node() or "?"
    cfg = getattr(guider, "cfg", None)
    noise = args[0] if args else None
    dtype = patcher.model_dtype() if patcher is not None and hasattr(patcher, "model_dtype") else None
    return observation.begin_sampler_run(
        node_id,
        label,
        sigmas,
        cfg=float(cfg) if isinstance(cfg, (int, float)) else None,
        sigma_max=sigma_max,
        latent_shape=tuple(int(v) for v in noise.shape) if hasattr(noise, "shape") else None,
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
    )


def _executing_node() -> str | None:
    utils = importlib.import_module("comfy_execution.utils")
    context = utils.get_executing_context()
    return None if context is None else str(context.node_id)


def _prepare_sampling(executor: Any, *args: Any, **kwargs: Any) -> Any:
    observation, run = _run()
    if run is None:
        return executor(*args, **kwargs)
    frame = observer.guarded(observation, "model loading", run.begin_loading)
    error: BaseException | None = None
    try:
        return executor(*args, **kwargs)
    except BaseException as err:
        error = err
        raise
    finally:
        if frame is not None:
            observer.guarded(observation, "model loading", lambda: run.end_loading(frame, error))


def _sampler_sample(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """Replace the step callback (4th argument) with one that marks each step's end first."""
    observation, run = _run()
    if run is None or len(args) < 4:
        return executor(*args, **kwargs)
    original = args[3]

    def callback(step: int, *rest: Any) -> Any:
        observer.guarded(observation, "a step's end", lambda: run.step_done(int(step)))
        return None if original is None else original(step, *rest)

    return executor(*args[:3], callback, *args[4:], **kwargs)


def _predict_noise(executor: Any, *args: Any, **kwargs: Any) -> Any:
    observation, run = _run()
    if run is not None:
        observer.guarded(observation, "a model evaluation", run.model_evaluation)
    return executor(*args, **kwargs)


def _calc_cond_batch(executor: Any, *args: Any, **kwargs: Any) -> Any:
    observation, run = _run()
    if run is not None:
        conds = args[1] if len(args) > 1 else kwargs.get("conds")
        has_uncond = isinstance(conds, (list, tuple)) and len(conds) > 1 and conds[1] is not None
        observer.guarded(observation, "a CFG batch", lambda: run.cond_batch(has_uncond))
    return executor(*args, **kwargs)


def _apply_model(executor: Any, *args: Any, **kwargs: Any) -> Any:
    observation, run = _run()
    if run is not None:
        options = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
        which = options.get("cond_or_uncond") if isinstance(options, dict) else None
        observer.guarded(observation, "a model call", lambda: run.model_call(which))
    return executor(*args, **kwargs)


def _diffusion_model(executor: Any, *args: Any, **kwargs: Any) -> Any:
    observation, run = _run()
    if run is not None:
        model = executor.class_obj
        observer.guarded(observation, "a forward's FLOPs", lambda: _count(observation, run, model, args, kwargs))
    return executor(*args, **kwargs)


def _count(observation: Any, run: WrappedRun, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    flops, reason, config = forward_flops(model, args, kwargs)
    run.forward(flops, reason)
    if config is not None:
        observation.saw_model(config)


# ------------------------------------------------------------------------------------------------
# FLOPs of one forward, from the loaded model's dims
# ------------------------------------------------------------------------------------------------
_DIT_ATTRS = ("patch_size", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim", "num_heads", "num_layers")


def dit_config_of(model: Any, text_len: int) -> DiTConfig | None:
    """The DiT config of a ComfyUI WanModel (dims read off the loaded weights), or None for other models."""
    if not all(hasattr(model, a) for a in _DIT_ATTRS):
        return None
    model_type = getattr(model, "model_type", "t2v")
    return DiTConfig(
        model_type=model_type if model_type in MODEL_TYPES else "t2v",  # the FLOP count does not use it
        patch_size=tuple(int(p) for p in model.patch_size),
        text_len=text_len,
        **{a: int(getattr(model, a)) for a in _DIT_ATTRS if a != "patch_size"},
    )


def forward_flops(
    model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[float | None, str | None, DiTConfig | None]:
    """(FLOPs, None, the model's DiT config) of one DIFFUSION_MODEL forward, or (None, why not, None)."""
    x = args[0] if args else kwargs.get("x")
    context = args[2] if len(args) > 2 else kwargs.get("context")
    concat = args[4] if len(args) > 4 else kwargs.get("time_dim_concat")
    if getattr(x, "dim", lambda: 0)() != 5 or getattr(context, "dim", lambda: 0)() != 3:
        return None, f"{type(model).__name__} forward without a (B, C, T, H, W) input and a text context", None
    try:
        config = dit_config_of(model, int(context.shape[1]))
    except ValueError as err:
        return None, f"the model's dims are not a Wan DiT ({err})", None
    if config is None:
        return None, f"{type(model).__name__} is not a Wan DiT (no Wan dims to count FLOPs from)", None
    b, _, t, h, w = (int(v) for v in x.shape)
    if concat is not None and getattr(concat, "dim", lambda: 0)() == 5:
        t += int(concat.shape[2])
    pt, ph, pw = config.patch_size
    tokens = math.ceil(t / pt) * math.ceil(h / ph) * math.ceil(w / pw)
    return config.flops_forward(tokens, batch=b), None, config
