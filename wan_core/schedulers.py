"""Flow-matching solvers: UniPC (default), DPM++ and Euler of the official sampler, and Euler over
the step-distilled schedule of Wan2.2-Lightning / LightX2V (`euler_distill`).

Flow convention (spec section 5): `x_sigma = (1 - sigma) * x0 + sigma * noise`; the model predicts the
velocity `v = noise - x0`, so the data prediction is `m = x - sigma * v`; `alpha = 1 - sigma` and
`lambda = log(alpha) - log(sigma)`.

A schedule holds the timesteps the model receives and the exact float32 sigmas the solver uses
(length steps + 1; the last is 0 for a full run). All coefficient arithmetic is done on float32 0-d
tensors in the same order as the official schedulers, so trajectories match them to the last bit on
a CPU. Schedules come from a solver's own rule (`make_schedule(solver, steps, shift)`), optionally
cut for partial denoising (`denoise`, ComfyUI's rule), or from an explicit list of training
timesteps (shifted) or of final sigmas (docs/sampler.md).

Duplicate integer timesteps. The official UniPC finds its position by searching the timestep table
for the first timestep it is given and takes the *second* match when the value repeats; with many
steps at a large shift (e.g. shift 12 and >= 92 steps) the first two integer timesteps coincide, it
starts one step late and crashes on the last step. Here a scheduler never looks timesteps up: it
keeps its own step counter (`step_index`), so repeated integer timesteps are harmless; the model
simply sees the same integer t twice while the solver uses the two distinct float32 sigmas.

Windows and continuation. A scheduler may start at any step (`start_at`): its multistep history is
then empty and it runs its first step at order 1. `state()` captures the position and the history
after a run that stopped early; `resume(state)` continues it, so a run split at step k gives the
same numbers as one run.

Shapes: any sample shape; `model_output` has the sample's shape.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from .config import DISTILL_SOLVER, FLOAT_TIMESTEP_SOLVERS, NUM_TRAIN_TIMESTEPS, SOLVERS

__all__ = ["FlowSchedule", "FlowScheduler", "UniPCScheduler", "DPMPPScheduler", "EulerScheduler",
           "SolverState", "make_schedule", "make_scheduler", "shift_sigma"]

# ComfyUI treats denoise above this as a full run (`KSampler.set_steps`); kept for identical schedules.
FULL_DENOISE = 0.9999


def shift_sigma(sigma: float, shift: float) -> float:
    """The flow shift `s' = shift * s / (1 + (shift - 1) * s)` in float64."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _linspace_head(start: float, stop: float, num: int) -> list[float]:
    """The first `num - 1` values of a float64 linspace with `num` points (NumPy's arithmetic)."""
    step = (stop - start) / (num - 1)
    return [i * step + start for i in range(num - 1)]


def _unipc_sigma_max(num_train_timesteps: int) -> float:
    """float32(1 - 1/num_train_timesteps) as a Python float: the top of the fp32 training table."""
    return float(torch.tensor(1.0 - 1.0 / num_train_timesteps, dtype=torch.float64).float())


@dataclass(frozen=True)
class FlowSchedule:
    """Model timesteps and float32 solver sigmas of one run.

    Shapes: timesteps (N,) int64, or float32 for the solvers in `FLOAT_TIMESTEP_SOLVERS`; sigmas
    (N + 1,) float32, strictly decreasing; sigmas[N] is 0 except for explicit sigmas that end above 0.
    """

    solver: str
    shift: float
    timesteps: torch.Tensor
    sigmas: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def has_duplicate_timesteps(self) -> bool:
        return bool((self.timesteps[1:] == self.timesteps[:-1]).any())


def make_schedule(solver: str, steps: int, shift: float, *, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                  denoise: float = 1.0, timesteps: Sequence[float] | None = None,
                  sigmas: Sequence[float] | None = None) -> FlowSchedule:
    """The schedule of one run of `solver` with `steps` steps.

    - By default the solver's own rule (spec section 5). UniPC: float64 linspace from float32(0.999)
      to 0 (steps + 1 points, last dropped), shifted once. DPM++ and Euler: linspace from 1 to 0,
      shifted (`get_sampling_sigmas`). Timesteps are `trunc(sigma * 1000)` as int64; sigmas are the
      shifted values in float32 followed by 0. `euler_distill`: Wan2.2-Lightning's
      `fm_solvers_euler` in float32 arithmetic: t0 = float32 linspace(1000, 0, steps + 1),
      sigma = shift(t0 / 1000), model timesteps sigma * 1000 unrounded (4 steps at shift 5:
      1000, 937.5, 833.33, 625).
    - `denoise` < 1 (ComfyUI's rule): the last `steps + 1` sigmas of the schedule for
      `int(steps / denoise)` steps, so `steps` steps run from a lower noise level.
    - `timesteps`: `steps` training timesteps in (0, 1000], decreasing, before the shift (LightX2V's
      `denoising_step_list`, e.g. 1000, 750, 500, 250); sigma = shift(t / 1000), then 0.
    - `sigmas`: `steps + 1` final sigmas in [0, 1], decreasing, used as given (`shift` is not applied).
    Model timesteps of explicit lists follow the solver's rule (truncated, or float for `euler_distill`).
    """
    _check_solver_steps_shift(solver, steps, shift)
    if timesteps is not None and sigmas is not None:
        raise ValueError("give explicit timesteps or explicit sigmas, not both")
    if not (isinstance(denoise, (int, float)) and math.isfinite(denoise) and 0.0 < denoise <= 1.0):
        raise ValueError(f"denoise must lie in (0, 1] (1 = start from pure noise); got {denoise!r}")
    explicit = timesteps is not None or sigmas is not None
    if explicit and denoise <= FULL_DENOISE:
        raise ValueError(f"denoise ({denoise}) applies to the solver's own schedule; with explicit "
                         "timesteps or sigmas, list the lower noise levels you want (or use start_step)")
    if sigmas is not None:
        values = _explicit_values("sigmas", sigmas, steps + 1, upper=1.0, allow_zero_last=True)
        return _schedule(solver, shift, values, num_train_timesteps)
    if timesteps is not None:
        values = _explicit_values("timesteps", timesteps, steps, upper=float(num_train_timesteps))
        if solver in FLOAT_TIMESTEP_SOLVERS:  # float32 arithmetic, as LightX2V's step-distill scheduler
            shifted = _shift_float32(torch.tensor(values, dtype=torch.float32) / num_train_timesteps, float(shift))
            return _schedule(solver, shift, torch.cat([shifted, shifted.new_zeros(1)]), num_train_timesteps)
        shifted64 = [shift_sigma(v / num_train_timesteps, float(shift)) for v in values]
        return _schedule(solver, shift, [*shifted64, 0.0], num_train_timesteps)
    if denoise <= FULL_DENOISE:
        full = make_schedule(solver, int(steps / denoise), shift, num_train_timesteps=num_train_timesteps)
        return FlowSchedule(solver=solver, shift=float(shift), timesteps=full.timesteps[-steps:],
                            sigmas=full.sigmas[-(steps + 1):])
    if solver == DISTILL_SOLVER:
        t0 = torch.tensor([*_linspace_head(float(num_train_timesteps), 0.0, steps + 1), 0.0],
                          dtype=torch.float64).float()  # NumPy's float32 linspace, stop exact
        return _schedule(solver, shift, _shift_float32(t0 / num_train_timesteps, float(shift)),
                         num_train_timesteps)
    start = _unipc_sigma_max(num_train_timesteps) if solver == "unipc" else 1.0
    shifted = [shift_sigma(s, float(shift)) for s in _linspace_head(start, 0.0, steps + 1)]
    model_t = torch.tensor([int(s * num_train_timesteps) for s in shifted], dtype=torch.int64)
    sigmas_f32 = torch.tensor(shifted + [0.0], dtype=torch.float32)
    _check_decreasing(sigmas_f32, f"{steps} steps at shift {shift}",
                      "use fewer steps or a smaller shift")
    return FlowSchedule(solver=solver, shift=float(shift), timesteps=model_t, sigmas=sigmas_f32)


def _check_solver_steps_shift(solver: str, steps: int, shift: float) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0 (e.g. 5.0); got {shift!r}")


def _shift_float32(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """`shift * s / (1 + (shift - 1) * s)` in float32 tensor arithmetic (Wan2.2-Lightning, LightX2V)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _schedule(solver: str, shift: float, sigmas: torch.Tensor | Sequence[float],
              num_train_timesteps: int) -> FlowSchedule:
    """A schedule from its N + 1 sigmas: float32 values, or Python floats (float64) cast to float32.

    Model timesteps by the solver's rule: float32 sigma * 1000, or trunc(sigma * 1000) as int64
    computed from the float64 values when given (the official rule: 0.7 gives 700, not 699).
    """
    sigmas32 = sigmas if isinstance(sigmas, torch.Tensor) else torch.tensor(list(sigmas), dtype=torch.float32)
    _check_decreasing(sigmas32, "the sigmas", "give strictly decreasing values")
    if solver in FLOAT_TIMESTEP_SOLVERS:
        model_t = sigmas32[:-1] * num_train_timesteps  # float32
    elif isinstance(sigmas, torch.Tensor):
        model_t = (sigmas32[:-1].double() * num_train_timesteps).to(torch.int64)
    else:
        model_t = torch.tensor([int(s * num_train_timesteps) for s in list(sigmas)[:-1]], dtype=torch.int64)
    return FlowSchedule(solver=solver, shift=float(shift), timesteps=model_t, sigmas=sigmas32)


def _check_decreasing(sigmas: torch.Tensor, what: str, fix: str) -> None:
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"{what} give float32 sigmas that are not strictly decreasing "
                         f"({[round(float(s), 6) for s in sigmas[:8]]}...); {fix}")


def _explicit_values(what: str, values: Sequence[float], count: int, *, upper: float,
                     allow_zero_last: bool = False) -> list[float]:
    """Check an explicit list: `count` finite numbers, decreasing, in (0, upper] ([0, upper] for the last
    of a sigma list)."""
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be numbers; got {values!r}") from e
    if len(numbers) != count:
        unit = "one per step" if what == "timesteps" else "steps + 1 values, the last usually 0"
        raise ValueError(f"{what} must list {count} values ({unit}); got {len(numbers)}: {numbers}")
    for i, v in enumerate(numbers):
        lowest_ok = allow_zero_last and i == len(numbers) - 1
        if not math.isfinite(v) or v > upper or v < 0 or (v == 0 and not lowest_ok):
            bound = f"[0, {upper:g}] (only the last may be 0)" if allow_zero_last else f"(0, {upper:g}]"
            raise ValueError(f"{what}[{i}] = {v} is outside {bound}")
    if any(b >= a for a, b in zip(numbers, numbers[1:], strict=False)):
        raise ValueError(f"{what} must be strictly decreasing; got {numbers}")
    return numbers


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class SolverState:
    """Where a run that stopped early is, to continue it exactly (`FlowScheduler.resume`).

    `history` holds the solver's multistep memory (read-only tensors; empty for Euler).
    """

    solver: str
    sigmas: torch.Tensor  # (N + 1,) the schedule the run used
    step_index: int  # the next step to run
    history: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


class FlowScheduler(ABC):
    """One run of a multistep flow solver. Create a new one (or `reset()`) for every run.

    `step(model_output, sample)` consumes the model output for the current step and returns the
    sample for the next one; the position is an internal counter, never a timestep lookup.
    """

    def __init__(self, schedule: FlowSchedule) -> None:
        self.schedule = schedule
        self.sigmas = schedule.sigmas
        self.timesteps = schedule.timesteps
        self._alphas = 1 - self.sigmas
        self._lambdas = torch.log(self._alphas) - torch.log(self.sigmas)  # +inf at sigma 0
        self.step_index = 0

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def solver(self) -> str:
        return self.schedule.solver

    def reset(self) -> None:
        self.step_index = 0
        self._reset_history()

    def start_at(self, index: int) -> FlowScheduler:
        """Start a fresh run at step `index` (no history: the first step runs at order 1); returns self."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_steps:
            raise ValueError(f"start step must be an integer in [0, {self.num_steps - 1}]; got {index!r}")
        self.reset()
        self.step_index = index
        return self

    def state(self) -> SolverState:
        """The position and multistep history after the steps run so far (see `resume`)."""
        return SolverState(solver=self.solver, sigmas=self.sigmas, step_index=self.step_index,
                           history=MappingProxyType(self._history()))

    def resume(self, state: SolverState) -> FlowScheduler:
        """Continue the run `state` was taken from; the schedule must be the same. Returns self."""
        if state.solver != self.solver or not torch.equal(state.sigmas, self.sigmas):
            raise ValueError(f"cannot continue a {state.solver} run over sigmas "
                             f"{[round(float(s), 4) for s in state.sigmas]} with a {self.solver} run over "
                             f"{[round(float(s), 4) for s in self.sigmas]}; use the same solver and schedule")
        if not 0 <= state.step_index < self.num_steps:
            raise ValueError(f"the saved run stopped at step {state.step_index}; nothing is left of the "
                             f"{self.num_steps} steps")
        self.step_index = state.step_index
        self._load_history(state.history)
        return self

    def data_prediction(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x0 estimate `m = x - sigma * v` at the current step."""
        return sample - self.sigmas[self.step_index] * model_output

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Advance one step. Shapes: model_output and sample (B, ...) alike; returns the same shape."""
        if self.step_index >= self.num_steps:
            raise ValueError(f"scheduler already ran all {self.num_steps} steps; call reset() for a new run")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} != sample shape "
                             f"{tuple(sample.shape)}")
        out = self._step(model_output, sample)
        self.step_index += 1
        return out

    @abstractmethod
    def _step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _reset_history(self) -> None: ...

    @abstractmethod
    def _history(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load_history(self, history: Mapping[str, Any]) -> None: ...


class UniPCScheduler(FlowScheduler):
    """UniPC, order 2, B(h) = expm1 (bh2), data prediction, lower order at the end (spec 5.1)."""

    solver_order = 2

    def __init__(self, schedule: FlowSchedule) -> None:
        super().__init__(schedule)
        self._reset_history()

    def _reset_history(self) -> None:
        self._m: list[torch.Tensor] = []  # data predictions, newest last (at most solver_order)
        self._last_sample: torch.Tensor | None = None
        self._last_order = 0

    def _history(self) -> dict[str, Any]:
        return {"m": tuple(self._m), "last_sample": self._last_sample, "last_order": self._last_order}

    def _load_history(self, history: Mapping[str, Any]) -> None:
        self._m = list(history["m"])
        self._last_sample = history["last_sample"]
        self._last_order = int(history["last_order"])

    def _coefficients(self, i_to: int, i_from: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h, hh = -h, phi = expm1(hh)) for the interval sigma[i_from] -> sigma[i_to]."""
        h = self._lambdas[i_to] - self._lambdas[i_from]
        hh = -h
        return h, hh, torch.expm1(hh)

    def _corrector_rhos(self, rks: list[torch.Tensor], hh: torch.Tensor, phi: torch.Tensor,
                        order: int) -> torch.Tensor:
        """Solve R rho = b with R[a][c] = r_c^a (r_order = 1), b_a = g_a (a+1)! / B(h)."""
        r = torch.stack([*rks, torch.ones((), dtype=torch.float32)])
        g = phi / hh - 1
        factorial = 1
        rows, b = [], []
        for a in range(1, order + 1):
            rows.append(torch.pow(r, a - 1))
            b.append(g * factorial / phi)
            factorial *= a + 1
            g = g / hh - 1 / factorial
        return torch.linalg.solve(torch.stack(rows), torch.stack(b))

    def _correct(self, m_now: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """UniC: refine the sample of this step with its new data prediction (not fed back to the model)."""
        i, order = self.step_index, self._last_order
        m0 = self._m[-1]
        _, hh, phi = self._coefficients(i, i - 1)
        h = -hh
        rks, d1s = [], []
        for k in range(1, order):
            rk = (self._lambdas[i - 1 - k] - self._lambdas[i - 1]) / h
            rks.append(rk)
            d1s.append((self._m[-(k + 1)] - m0) / rk)
        if order == 1:
            rhos = torch.tensor([0.5], dtype=torch.float32)
        else:
            rhos = self._corrector_rhos(rks, hh, phi, order)
        alpha_t, sigma_t, sigma_s0 = self._alphas[i], self.sigmas[i], self.sigmas[i - 1]
        base = sigma_t / sigma_s0 * self._last_sample - alpha_t * phi * m0
        corr = sum((rhos[k] * d for k, d in enumerate(d1s)), torch.zeros((), dtype=sample.dtype))
        return (base - alpha_t * phi * (corr + rhos[-1] * (m_now - m0))).to(sample.dtype)

    def _predict(self, sample: torch.Tensor, order: int) -> torch.Tensor:
        """UniP: x_{i+1} from the corrected x_i and the stored data predictions."""
        i = self.step_index
        m0 = self._m[-1]
        h, hh, phi = self._coefficients(i + 1, i)
        alpha_t, sigma_t, sigma_s0 = self._alphas[i + 1], self.sigmas[i + 1], self.sigmas[i]
        x_next = sigma_t / sigma_s0 * sample - alpha_t * phi * m0
        if order == 2:
            r1 = (self._lambdas[i - 1] - self._lambdas[i]) / h
            d1 = (self._m[-2] - m0) / r1
            x_next = x_next - alpha_t * phi * (0.5 * d1)
        return x_next.to(sample.dtype)

    def _step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        m_now = self.data_prediction(model_output, sample)
        if self._m:  # a previous step of this run exists (not at the first step, nor after start_at)
            sample = self._correct(m_now, sample)
        self._m = [*self._m, m_now][-self.solver_order:]
        order = min(self.solver_order, self.num_steps - self.step_index, len(self._m))
        self._last_sample = sample
        self._last_order = order
        return self._predict(sample, order)


class DPMPPScheduler(FlowScheduler):
    """DPM-Solver++ (2M, midpoint), first order on the first and the last step (spec 5.2)."""

    def __init__(self, schedule: FlowSchedule) -> None:
        super().__init__(schedule)
        self._reset_history()

    def _reset_history(self) -> None:
        self._m_prev: torch.Tensor | None = None

    def _history(self) -> dict[str, Any]:
        return {"m_prev": self._m_prev}

    def _load_history(self, history: Mapping[str, Any]) -> None:
        self._m_prev = history["m_prev"]

    def _step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        i = self.step_index
        m0 = self.data_prediction(model_output, sample)
        x = sample.to(torch.float32)
        sigma_t, sigma_s0, alpha_t = self.sigmas[i + 1], self.sigmas[i], self._alphas[i + 1]
        h = self._lambdas[i + 1] - self._lambdas[i]
        coef = alpha_t * (torch.exp(-h) - 1.0)
        if self._m_prev is None or i == self.num_steps - 1:
            out = (sigma_t / sigma_s0) * x - coef * m0
        else:
            r0 = (self._lambdas[i] - self._lambdas[i - 1]) / h
            d1 = (1.0 / r0) * (m0 - self._m_prev)
            out = (sigma_t / sigma_s0) * x - coef * m0 - 0.5 * coef * d1
        self._m_prev = m0
        return out.to(model_output.dtype)


class EulerScheduler(FlowScheduler):
    """First-order flow Euler: `x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i` in float32.

    `euler` runs it over DPM++'s schedule with integer model timesteps; `euler_distill` over the
    step-distilled schedule with float timesteps (Wan2.2-Lightning's `EulerScheduler.step`).
    """

    def _reset_history(self) -> None:
        return None

    def _history(self) -> dict[str, Any]:
        return {}

    def _load_history(self, history: Mapping[str, Any]) -> None:
        return None

    def _step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        i = self.step_index
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return (sample.to(torch.float32) + dt * model_output.to(torch.float32)).to(sample.dtype)


_SCHEDULERS: dict[str, type[FlowScheduler]] = {
    "unipc": UniPCScheduler, "dpm++": DPMPPScheduler, "euler": EulerScheduler, DISTILL_SOLVER: EulerScheduler,
}


def make_scheduler(solver: str, steps: int, shift: float, *, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                   denoise: float = 1.0, timesteps: Sequence[float] | None = None,
                   sigmas: Sequence[float] | None = None) -> FlowScheduler:
    """A fresh solver for one run: 'unipc' (default of the official code), 'dpm++', 'euler' or
    'euler_distill', over `make_schedule(...)` with the same arguments."""
    schedule = make_schedule(solver, steps, shift, num_train_timesteps=num_train_timesteps, denoise=denoise,
                             timesteps=timesteps, sigmas=sigmas)
    return _SCHEDULERS[solver](schedule)
