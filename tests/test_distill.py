"""The 4-step distilled recipe (Wan2.2-Lightning / LightX2V): timesteps, one Euler step, float model
timesteps, the uncond pass skipped at guidance 1, the expert split; explicit timesteps and sigmas.

Expected values are computed here with NumPy float32 arithmetic (the published schedulers' order of
operations), independently of the pack's torch code, and pinned as literals.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest
import torch
from wanbench.wan_core.config import (
    DISTILL_SOLVER,
    I2V_A14B,
    SOLVERS,
    T2V_A14B,
    GuideScale,
    distilled_sampler,
)
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.sampler import SamplerOptions, sample
from wanbench.wan_core.schedulers import make_schedule, make_scheduler
from wanbench.wan_core.trace import use_tracer

# The training timesteps of the Lightning LoRAs (github.com/ModelTC/LightX2V-Wan2.2-Lightning issue 3:
# "1000.0000, 937.5001, 833.3333, 625.0000") and their sigmas, as float32.
LIGHTNING_TIMESTEPS = [1000.0, 937.5, 833.3333129882812, 625.0]
LIGHTNING_SIGMAS = [1.0, 0.9375, 0.8333333134651184, 0.625, 0.0]


def numpy_distill_schedule(steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Wan2.2-Lightning `fm_solvers_euler`: float32 linspace(1000, 0), /1000, shift, *1000."""
    t0 = np.linspace(1000, 0, steps + 1, dtype=np.float32)
    s = t0 / np.float32(1000)
    shifted = np.float32(shift) * s / (np.float32(1) + np.float32(shift - 1) * s)
    return (shifted * np.float32(1000))[:-1].astype(np.float32), shifted.astype(np.float32)


def test_distill_schedule_pins_the_lightning_timesteps() -> None:
    schedule = make_schedule(DISTILL_SOLVER, 4, 5.0)
    assert schedule.timesteps.dtype == torch.float32
    assert schedule.timesteps.tolist() == LIGHTNING_TIMESTEPS
    assert schedule.sigmas.tolist() == LIGHTNING_SIGMAS
    want_t, want_s = numpy_distill_schedule(4, 5.0)
    assert schedule.timesteps.numpy().tobytes() == want_t.tobytes()
    assert schedule.sigmas.numpy().tobytes() == want_s.tobytes()


@pytest.mark.parametrize("steps,shift", [(2, 5.0), (6, 5.0), (8, 3.0), (13, 7.5)])
def test_distill_schedule_matches_float32_reference_arithmetic(steps: int, shift: float) -> None:
    schedule = make_schedule(DISTILL_SOLVER, steps, shift)
    want_t, want_s = numpy_distill_schedule(steps, shift)
    assert schedule.timesteps.numpy().tobytes() == want_t.tobytes()
    assert schedule.sigmas.numpy().tobytes() == want_s.tobytes()


def test_lightx2v_step_list_gives_the_same_sigmas() -> None:
    """LightX2V's `denoising_step_list` [1000, 750, 500, 250] is in unshifted units; at shift 5 it is
    the same schedule (and ComfyUI's `simple` scheduler at shift 5, 4 steps gives these sigmas too)."""
    listed = make_schedule(DISTILL_SOLVER, 4, 5.0, timesteps=[1000, 750, 500, 250])
    assert listed.sigmas.tolist() == LIGHTNING_SIGMAS and listed.timesteps.tolist() == LIGHTNING_TIMESTEPS
    given = make_schedule(DISTILL_SOLVER, 4, 5.0, sigmas=LIGHTNING_SIGMAS)
    assert given.sigmas.tolist() == LIGHTNING_SIGMAS


def test_one_distilled_euler_step() -> None:
    """x_next = x + (sigma_next - sigma) * v in float32 (Lightning `EulerScheduler.step`)."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    scheduler = make_scheduler(DISTILL_SOLVER, 4, 5.0)
    out0 = scheduler.step(v, x)
    dt = np.float32(0.9375) - np.float32(1.0)
    assert out0.numpy().tobytes() == (x.numpy() + dt * v.numpy()).astype(np.float32).tobytes()
    out1 = scheduler.step(v, out0)
    dt1 = np.float32(LIGHTNING_SIGMAS[2]) - np.float32(0.9375)
    assert out1.numpy().tobytes() == (out0.numpy() + dt1 * v.numpy()).astype(np.float32).tobytes()


def test_distilled_sampler_presets() -> None:
    for task, boundary in ((T2V_A14B, 0.875), (I2V_A14B, 0.9)):
        cfg = distilled_sampler(task)
        assert (cfg.solver, cfg.steps, cfg.shift, cfg.guide_scale, cfg.boundary) == (
            DISTILL_SOLVER, 4, 5.0, GuideScale.same(1.0), boundary)
    assert DISTILL_SOLVER in SOLVERS


class _Recorder(torch.nn.Module):
    """Wraps a DiT and records the timesteps and batch of every forward."""

    def __init__(self, model: WanDiT, calls: list[tuple[str, Any, int]], name: str) -> None:
        super().__init__()
        self.model, self.calls, self.name, self.config = model, calls, name, model.config

    def forward(self, x, t, context, **kw):
        self.calls.append((self.name, t.detach().clone(), x.shape[0]))
        return self.model(x, t, context, **kw)


class _Tracer:
    def __init__(self) -> None:
        self.stages: list[tuple[str, dict[str, Any]]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []

    def stage(self, name: str, kind: str, facts: dict[str, Any]):
        self.stages.append((name, facts))
        return contextlib.nullcontext()

    def event(self, name: str, facts: dict[str, Any]) -> None:
        self.events.append((name, facts))


@pytest.mark.parametrize("task", [T2V_A14B, I2V_A14B], ids=["t2v", "i2v"])
def test_recipe_runs_two_high_then_two_low_steps_with_one_pass_each(task) -> None:
    tiny = task.tiny()
    torch.manual_seed(0)
    calls: list[tuple[str, Any, int]] = []
    experts = [_Recorder(WanDiT(tiny.dit).eval(), calls, "high"), _Recorder(WanDiT(tiny.dit).eval(), calls, "low")]
    cfg = distilled_sampler(task)
    opts = SamplerOptions.from_config(cfg, seed=1)
    shape = (16, 2, 4, 4)
    y = torch.randn(tiny.dit.in_dim - 16, *shape[1:]) if task is I2V_A14B else None
    tracer = _Tracer()
    with use_tracer(tracer):
        sample(experts, tiny, opts, context=torch.randn(3, tiny.dit.text_dim),
               context_null=torch.randn(3, tiny.dit.text_dim), latent_shape=shape, i2v_y=y)
    assert [name for name, _, _ in calls] == ["high", "high", "low", "low"]
    assert all(batch == 1 for _, _, batch in calls), "guidance 1: the uncond pass is skipped"
    assert [float(t) for _, t, _ in calls] == LIGHTNING_TIMESTEPS
    assert all(t.dtype == torch.float32 for _, t, _ in calls)
    inference = [facts for name, facts in tracer.stages if name.endswith("_Inference")]
    assert [f["cfg_mode"] for f in inference] == ["off"] * 4
    assert [f["timestep"] for f in inference] == LIGHTNING_TIMESTEPS
    switches = [e for e in tracer.events if e[0] != "memory_plan"]  # the memory plan comes first
    assert switches == [("expert_switch", {"step": 2, "expert": "low", "timestep": LIGHTNING_TIMESTEPS[2]})]
    (plan,) = [facts for name, facts in tracer.events if name == "memory_plan"]
    assert plan["placement"] == "none" and plan["device"] == "cpu"


def test_explicit_lists_are_checked() -> None:
    with pytest.raises(ValueError, match="strictly decreasing"):
        make_schedule("euler", 3, 5.0, timesteps=[1000, 500, 600])
    with pytest.raises(ValueError, match="must list 4 values"):
        make_schedule("euler", 4, 5.0, timesteps=[1000, 500])
    with pytest.raises(ValueError, match=r"sigmas\[0\] = 1.5 is outside"):
        make_schedule("euler", 2, 5.0, sigmas=[1.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="only the last may be 0"):
        make_schedule("euler", 2, 5.0, sigmas=[1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="not both"):
        make_schedule("euler", 2, 5.0, sigmas=[1.0, 0.5, 0.0], timesteps=[1000, 500])
    with pytest.raises(ValueError, match="explicit"):
        make_schedule("euler", 2, 5.0, sigmas=[1.0, 0.5, 0.0], denoise=0.5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_runs_an_explicit_schedule_from_sigma_one(solver: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, generator=g)
    scheduler = make_scheduler(solver, 4, 5.0, sigmas=[1.0, 0.7, 0.4, 0.1, 0.0])
    for _ in range(4):
        x = scheduler.step(torch.randn(4, 4, generator=g), x)
    assert torch.isfinite(x).all()
    want = [1000.0, 700.0, 400.0, 100.0] if solver == DISTILL_SOLVER else [1000, 700, 400, 100]
    assert scheduler.timesteps.tolist() == want
    assert scheduler.timesteps.dtype == (torch.float32 if solver == DISTILL_SOLVER else torch.int64)
