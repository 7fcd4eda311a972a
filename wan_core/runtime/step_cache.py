"""Step caching: reuse the last guided prediction for steps whose input barely changed (off by default).

Applied from outside the model and the solver. Before a step's inference the sampler asks
`StepCache.decide(...)`; the step then either runs the denoiser (every transformer forward of the
step, CFG included, combined into the guided prediction) or reuses the guided prediction of the
last computed step of the same expert. The solver gets a prediction either way.

Rules. Every expert has its own state: its own warm-up, skip run and accumulator.

* A step is always computed when it is one of the expert's first `warmup_steps` steps (or the
  expert has no stored prediction yet), the run's last step, the step after `max_skip` reused
  steps in a row, a step of an expert outside `apply_to`, or the threshold is 0 (which therefore
  gives exactly the run without a cache).
* `teacache`: s is the time signal the calibration names (e: time embedding, e0: time projection,
  `WanDiT.embed_time`); rel = mean|s - s_prev| / mean|s_prev| (over all tokens and channels; s_prev
  is the expert's signal at its previous step, computed or not); acc += max(0, poly(rel)) with
  the published polynomial, or acc += rel without one (calibration `none`); the step is reused
  while acc < threshold, and a computed step sets acc back to 0.
* `magcache`: with gamma_b the calibrated magnitude ratio of CFG branch b at this step (resampled
  to the run's step count by the nearest calibrated step), ratio_b *= gamma_b and
  err_b += |1 - ratio_b| for each branch the step runs; the step is reused while max_b err_b <
  threshold; a computed step sets ratio_b back to 1 and err_b to 0.

Where this differs from the published methods (also in docs/sampler.md): what is reused is the
guided prediction, not the residual of the transformer blocks (the originals keep running the patch
embedding and the head); one decision covers both CFG branches (TeaCache's signal is the same for
both; MagCache needs both under the threshold); the warm-up is a number of steps per expert; and a
rescaled change below 0 (the polynomials dip below 0 for very small changes) counts as 0.

The time signal depends only on the timesteps and the expert's time-embedding weights, and the
MagCache ratios only on the step, so the decisions of a run are the same for every prompt and seed.
Shapes: t_model (1,) or (1, seq_len) as the DiT receives it; predictions (C, T, h, w).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import (
    CALIBRATION_AUTO,
    MAGCACHE,
    STEP_CACHE_EXPERTS,
    STEP_CACHE_FACT,
    STEP_CACHE_MODES,
    STEP_CACHE_OFF,
    STEP_CACHE_REASON_FACT,
    STEP_COMPUTED,
    STEP_REUSED,
    TEACACHE,
)
from .step_cache_tables import (
    AUTO_MAGCACHE,
    AUTO_TEACACHE,
    MAGCACHE_RATIOS,
    RAW_CHANGE,
    TEACACHE_COEFFICIENTS,
    TIME_EMBEDDING,
    TIME_PROJECTION,
)

log = logging.getLogger(__name__)

__all__ = ["StepCacheSettings", "StepDecision", "StepCache", "NoStepCache", "make_step_cache", "calibration_choices"]

MAX_WARMUP_STEPS = 1000
MAX_SKIP = 1000


def calibration_choices(mode: str) -> tuple[str, ...]:
    """The calibration names a mode accepts (`auto` first)."""
    if mode == TEACACHE:
        return (CALIBRATION_AUTO, RAW_CHANGE, *TEACACHE_COEFFICIENTS)
    if mode == MAGCACHE:
        return (CALIBRATION_AUTO, *MAGCACHE_RATIOS)
    return (CALIBRATION_AUTO,)


@dataclass(frozen=True, kw_only=True)
class StepCacheSettings:
    """How a run may reuse steps (see the module docstring). `mode` is `teacache` or `magcache`
    (no settings object at all means no cache); `apply_to` is `all`, `high` or `low`."""

    mode: str
    threshold: float
    warmup_steps: int = 1
    max_skip: int = 2
    apply_to: str = "all"
    calibration: str = CALIBRATION_AUTO

    def __post_init__(self) -> None:
        if self.mode not in STEP_CACHE_MODES or self.mode == STEP_CACHE_OFF:
            raise ValueError(f"step cache mode must be one of {STEP_CACHE_MODES[1:]} (no settings = no cache); "
                             f"got {self.mode!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"step cache threshold must be a finite number >= 0 (0 computes every step); "
                             f"got {self.threshold!r}")
        for name, top in (("warmup_steps", MAX_WARMUP_STEPS), ("max_skip", MAX_SKIP)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
                raise ValueError(f"step cache {name} must be an integer in [0, {top}]; got {value!r}")
        if self.apply_to not in STEP_CACHE_EXPERTS:
            raise ValueError(f"step cache apply_to must be one of {STEP_CACHE_EXPERTS}; got {self.apply_to!r}")
        choices = calibration_choices(self.mode)
        if self.calibration not in choices:
            raise ValueError(f"{self.mode} calibration must be one of {list(choices)}; got {self.calibration!r}")

    def resolve_calibration(self, model_type: str, *, has_image: bool = False) -> str:
        """The calibration a run of `model_type` uses (`auto` resolved)."""
        if self.calibration != CALIBRATION_AUTO:
            return self.calibration
        if self.mode == TEACACHE:
            return AUTO_TEACACHE[model_type]
        key = "ti2v+image" if model_type == "ti2v" and has_image else model_type
        return AUTO_MAGCACHE[key]

    def describe(self, model_type: str | None = None, *, has_image: bool = False) -> str:
        """One line for the report: 'teacache, threshold 0.2, warm-up 1, max skip 2, ...'."""
        calibration = self.calibration if model_type is None else self.resolve_calibration(
            model_type, has_image=has_image)
        if self.mode == TEACACHE:
            signal = TIME_PROJECTION if calibration in (RAW_CHANGE, CALIBRATION_AUTO) \
                else TEACACHE_COEFFICIENTS[calibration].signal
            calibration = f"{calibration} ({signal})" if calibration != CALIBRATION_AUTO else calibration
        experts = "all experts" if self.apply_to == "all" else f"{self.apply_to}-noise expert only"
        return (f"{self.mode}, threshold {self.threshold:g}, warm-up {self.warmup_steps}, "
                f"max skip {self.max_skip}, {experts}, calibration {calibration}")


@dataclass(frozen=True)
class StepDecision:
    """What a step does: reuse the stored prediction, or compute (and why)."""

    reuse: bool
    reason: str | None = None  # why it was computed (config.STEP_CACHE_REASONS)
    score: float | None = None  # the accumulated change the threshold was compared with

    def facts(self) -> dict[str, str]:
        """The facts the step's inference stage records (none for a run without a cache)."""
        if self.reuse:
            return {STEP_CACHE_FACT: STEP_REUSED}
        if self.reason is None:
            return {}
        return {STEP_CACHE_FACT: STEP_COMPUTED, STEP_CACHE_REASON_FACT: self.reason}


UNCACHED = StepDecision(reuse=False)  # a step of a run without a cache


@dataclass
class _ExpertState:
    steps_seen: int = 0
    run: int = 0  # reused steps in a row
    accumulated: float = 0.0  # teacache
    ratio: list[float] = field(default_factory=lambda: [1.0, 1.0])  # magcache, per CFG branch
    error: list[float] = field(default_factory=lambda: [0.0, 0.0])
    signal: tuple[torch.Tensor, torch.Tensor] | None = None  # teacache: (values (U, X), inverse (Lt,))
    prediction: torch.Tensor | None = None


class StepCache:
    """The cache of one sampling run; `decide` then `predict` once per step, in step order."""

    def __init__(self, settings: StepCacheSettings, *, model_type: str, num_steps: int, last_step: int,
                 has_image: bool = False) -> None:
        self.settings = settings
        self.calibration = settings.resolve_calibration(model_type, has_image=has_image)
        self.num_steps = num_steps
        self.last_step = last_step
        self.decisions: list[tuple[int, str, StepDecision]] = []
        self._states: dict[str, _ExpertState] = {}
        self._gammas = self._resampled_ratios() if settings.mode == MAGCACHE else None
        log.info("step cache: %s", settings.describe(model_type, has_image=has_image))

    # ---------------------------------------------------------------- decisions
    def decide(self, step: int, expert: str, model: nn.Module, t_model: torch.Tensor, *,
               passes: int) -> StepDecision:
        """Decide step `step` of `expert` (`passes`: 2 with CFG, 1 without); records the decision."""
        state = self._states.setdefault(expert, _ExpertState())
        change = self._teacache_change(state, model, t_model) if self.settings.mode == TEACACHE else None
        reason = self._forced(state, step, expert)
        score = None
        if reason is None:
            score = self._accumulate(state, step, change, passes)
            reason = None if score < self.settings.threshold else "change"
        decision = StepDecision(reuse=reason is None, reason=reason, score=score)
        if decision.reuse:
            state.run += 1
        else:
            state.run, state.accumulated = 0, 0.0
            state.ratio, state.error = [1.0, 1.0], [0.0, 0.0]
        state.steps_seen += 1
        self.decisions.append((step, expert, decision))
        return decision

    def predict(self, decision: StepDecision, expert: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The step's guided prediction: the stored one when reused, else `compute()` (then stored).
        The solvers never modify a prediction in place, so the stored tensor is kept as is."""
        state = self._states[expert]
        if decision.reuse:
            assert state.prediction is not None, "a reused step always has a stored prediction"
            return state.prediction
        state.prediction = compute()
        return state.prediction

    def _forced(self, state: _ExpertState, step: int, expert: str) -> str | None:
        """Why this step must be computed whatever the change (None when it may be reused)."""
        s = self.settings
        if s.apply_to != "all" and expert not in (s.apply_to, "model"):
            return "expert excluded"
        if state.steps_seen < s.warmup_steps or state.prediction is None:
            return "warm-up"
        if step == self.last_step - 1:
            return "last step"
        if state.run >= s.max_skip:
            return "max skip"
        if s.threshold == 0:
            return "threshold 0"
        return None

    def _accumulate(self, state: _ExpertState, step: int, change: float | None, passes: int) -> float:
        """Add this step's change to the expert's accumulator; returns the score to compare."""
        if self.settings.mode == TEACACHE:
            assert change is not None
            state.accumulated += self._rescale(change)
            return state.accumulated
        assert self._gammas is not None
        for branch in range(passes):
            state.ratio[branch] *= self._gammas[branch][step]
            state.error[branch] += abs(1.0 - state.ratio[branch])
        return max(state.error[:passes])

    # ---------------------------------------------------------------- teacache
    def _teacache_change(self, state: _ExpertState, model: nn.Module, t_model: torch.Tensor) -> float | None:
        """Relative change of the expert's time signal since its previous step (None at its first)."""
        signal = time_signal(model, t_model, self._signal_name())
        previous, state.signal = state.signal, signal
        return None if previous is None else relative_change(signal, previous)

    def _signal_name(self) -> str:
        if self.calibration == RAW_CHANGE:
            return TIME_PROJECTION
        return TEACACHE_COEFFICIENTS[self.calibration].signal

    def _rescale(self, change: float) -> float:
        if self.calibration == RAW_CHANGE:
            return change
        value = 0.0
        for c in TEACACHE_COEFFICIENTS[self.calibration].poly:  # Horner, highest degree first
            value = value * change + c
        return max(0.0, value)

    # ---------------------------------------------------------------- magcache
    def _resampled_ratios(self) -> tuple[list[float], list[float]]:
        """Per branch, the calibrated ratio of each step of this run (nearest calibrated step)."""
        table = MAGCACHE_RATIOS[self.calibration]
        out = []
        for branch in (0, 1):
            values = table.branch(branch)
            n, size = self.num_steps, len(values)
            index = [0] * n if n == 1 else [round(i * (size - 1) / (n - 1)) for i in range(n)]
            out.append([values[j] for j in index])
        if self.num_steps != table.steps:
            log.info("magcache: %s is calibrated for %d steps; its ratios are resampled to %d steps",
                     self.calibration, table.steps, self.num_steps)
        return out[0], out[1]


@torch.no_grad()
def time_signal(model: nn.Module, t_model: torch.Tensor, signal: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The TeaCache signal of `model` at `t_model`, once per distinct timestep.

    Shapes: t_model (1,) or (1, Lt) -> values (U, X) float32 (X = D for e, 6 D for e0), inverse
    (Lt,) int64 mapping each token (or the one sample) to its row of values.
    """
    embed_time = getattr(model, "embed_time", None)
    if embed_time is None:
        raise TypeError(f"teacache reads the model's time embedding (WanDiT.embed_time); "
                        f"{type(model).__name__} has none. Use magcache for this model")
    values, inverse = torch.unique(t_model.reshape(-1), return_inverse=True)
    e, e0 = embed_time(values[None])  # (1, U, D), (1, U, 6, D)
    chosen = e if signal == TIME_EMBEDDING else e0
    return chosen[0].flatten(1).float(), inverse


def relative_change(current: tuple[torch.Tensor, torch.Tensor],
                    previous: tuple[torch.Tensor, torch.Tensor]) -> float:
    """mean|s - s_prev| / mean|s_prev| over every token and channel, from per-timestep rows.

    Shapes: each (values (U, X), inverse (Lt,)) from `time_signal`, with the same Lt.
    """
    values, inverse = current
    prev_values, prev_inverse = previous
    if inverse.shape != prev_inverse.shape:
        raise ValueError(f"the timestep layout changed within a run ({tuple(prev_inverse.shape)} -> "
                         f"{tuple(inverse.shape)})")
    pair = (values[:, None, :] - prev_values[None, :, :]).abs().mean(-1)  # (U, U_prev)
    numerator = pair[inverse, prev_inverse].mean()
    denominator = prev_values.abs().mean(-1)[prev_inverse].mean()
    if float(denominator) == 0.0:
        return math.inf
    return float(numerator / denominator)


class NoStepCache:
    """Every step computed, nothing recorded: what a run without a cache uses."""

    @property
    def decisions(self) -> list[tuple[int, str, StepDecision]]:
        return []

    def decide(self, step: int, expert: str, model: nn.Module, t_model: torch.Tensor, *,
               passes: int) -> StepDecision:
        return UNCACHED

    def predict(self, decision: StepDecision, expert: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return compute()


NO_STEP_CACHE = NoStepCache()


def make_step_cache(settings: StepCacheSettings | None, *, model_type: str, num_steps: int, last_step: int,
                    has_image: bool = False) -> StepCache | NoStepCache:
    """The run's cache, or the no-op one when `settings` is None."""
    if settings is None:
        return NO_STEP_CACHE
    if not isinstance(settings, StepCacheSettings):
        raise TypeError(f"step_cache must be StepCacheSettings or None; got {type(settings).__name__}")
    return StepCache(settings, model_type=model_type, num_steps=num_steps, last_step=last_step,
                     has_image=has_image)
