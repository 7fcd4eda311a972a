"""Flow-matching solvers of the official Wan2.2 sampler: UniPC (default), DPM++ and Euler.

Flow convention (spec section 5): `x_sigma = (1 - sigma) * x0 + sigma * noise`; the model predicts the
velocity `v = noise - x0`, so the data prediction is `m = x - sigma * v`; `alpha = 1 - sigma` and
`lambda = log(alpha) - log(sigma)`.

A schedule holds the integer timesteps the model receives and the exact float32 sigmas the solver uses
(length steps + 1, the last is 0). All coefficient arithmetic is done on float32 0-d tensors in the
same order as the official schedulers, so trajectories match them to the last bit on a CPU.

Duplicate integer timesteps. The official UniPC finds its position by searching the timestep table
for the first timestep it is given and takes the *second* match when the value repeats; with many
steps at a large shift (e.g. shift 12 and >= 92 steps) the first two integer timesteps coincide, it
starts one step late and crashes on the last step. Here a scheduler never looks timesteps up: it
keeps its own step counter (`step_index`), so repeated integer timesteps are harmless; the model
simply sees the same integer t twice while the solver uses the two distinct float32 sigmas.

Shapes: any sample shape; `model_output` has the sample's shape.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .config import NUM_TRAIN_TIMESTEPS, SOLVERS

__all__ = ["FlowSchedule", "FlowScheduler", "UniPCScheduler", "DPMPPScheduler", "EulerScheduler",
           "make_schedule", "make_scheduler", "shift_sigma"]


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
    """Integer model timesteps and float32 solver sigmas of one run.

    Shapes: timesteps (N,) int64; sigmas (N + 1,) float32 with sigmas[N] = 0.
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


def make_schedule(solver: str, steps: int, shift: float, *,
                  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> FlowSchedule:
    """The official schedule of `solver` (spec section 5).

    UniPC: float64 linspace from float32(0.999) to 0 (steps + 1 points, last dropped), shifted once.
    DPM++ and Euler: linspace from 1 to 0, shifted (`get_sampling_sigmas`). Timesteps are
    `trunc(sigma * 1000)` as int64; sigmas are the shifted values in float32 followed by 0.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0 (e.g. 5.0); got {shift!r}")
    start = _unipc_sigma_max(num_train_timesteps) if solver == "unipc" else 1.0
    shifted = [shift_sigma(s, float(shift)) for s in _linspace_head(start, 0.0, steps + 1)]
    timesteps = torch.tensor([int(s * num_train_timesteps) for s in shifted], dtype=torch.int64)
    sigmas = torch.tensor(shifted + [0.0], dtype=torch.float32)
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"{steps} steps at shift {shift} give float32 sigmas that are not strictly "
                         "decreasing; use fewer steps or a smaller shift")
    return FlowSchedule(solver=solver, shift=float(shift), timesteps=timesteps, sigmas=sigmas)


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

    def reset(self) -> None:
        self.step_index = 0
        self._reset_history()

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
        if self.step_index > 0:
            sample = self._correct(m_now, sample)
        self._m = [*self._m, m_now][-self.solver_order:]
        order = min(self.solver_order, self.num_steps - self.step_index, self.step_index + 1)
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
    """First-order flow Euler: `x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i` (DPM++'s schedule)."""

    def _reset_history(self) -> None:
        return None

    def _step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        i = self.step_index
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return (sample.to(torch.float32) + dt * model_output.to(torch.float32)).to(sample.dtype)


_SCHEDULERS: dict[str, type[FlowScheduler]] = {
    "unipc": UniPCScheduler, "dpm++": DPMPPScheduler, "euler": EulerScheduler,
}


def make_scheduler(solver: str, steps: int, shift: float, *,
                   num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> FlowScheduler:
    """A fresh solver for one run: 'unipc' (default of the official code), 'dpm++' or 'euler'."""
    schedule = make_schedule(solver, steps, shift, num_train_timesteps=num_train_timesteps)
    return _SCHEDULERS[solver](schedule)
