"""Flow-matching solvers: golden parity with the official schedulers, edge cases and invariants."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_manifest, golden_dir, golden_params, load_manifest, manifest_fixtures
from safetensors.torch import load_file
from wanbench.wan_core.schedulers import FlowSchedule, UniPCScheduler, make_schedule, make_scheduler

SOLVER_NAMES = {"unipc": "unipc", "dpmpp": "dpm++"}


def _scheduler_pairs() -> list[dict]:
    pairs = []
    for fixture in manifest_fixtures(kind_prefix="scheduler"):
        for pair in fixture["config"]["pairs"]:
            pairs.append({**pair, "file": fixture["files"][0]["file"], "fixture": fixture["name"]})
    return pairs


SCHEDULER_PAIRS = golden_params(lambda: [pytest.param(p, id=f"{p['fixture']}:{p['key']}") for p in _scheduler_pairs()],
                                fail_id="golden-missing-scheduler")


@pytest.mark.parametrize("pair", SCHEDULER_PAIRS)
def test_scheduler_golden(pair: dict) -> None:
    manifest = load_manifest()
    fixture = next(f for f in manifest["fixtures"] if f["name"] == pair["fixture"])
    tol = fixture["tolerance"]
    data = load_file(golden_dir() / pair["file"])
    key, base = pair["key"], pair["key"].split(".", 1)[1]
    scheduler = make_scheduler(SOLVER_NAMES[pair["solver"]], pair["steps"], pair["shift"],
                               num_train_timesteps=fixture["config"]["num_train_timesteps"])
    assert torch.equal(scheduler.timesteps, data[f"{key}.timesteps"])
    assert_close_manifest(scheduler.sigmas, data[f"{key}.sigmas"], atol=tol["sigmas"]["atol"], rtol=0.0,
                          what=f"{key} sigmas")
    x = data[f"{base}.x_init"][None]
    outputs, expected = data[f"{base}.model_outputs"], data[f"{key}.expected.trajectory"]
    for i in range(pair["steps"]):
        x = scheduler.step(outputs[i][None], x)
        traj = tol["trajectory"]
        assert_close_manifest(x[0], expected[i], atol=traj["atol"], rtol=traj["rtol"], what=f"{key} step {i}")


def test_scheduler_fixture_is_listed() -> None:
    load_manifest()  # a missing manifest fails here with the folder and WANBENCH_GOLDEN_DIR
    assert len(_scheduler_pairs()) >= 2


@pytest.mark.parametrize(("solver", "steps", "shift", "expected"), [
    ("unipc", 6, 12.0, [999, 983, 959, 922, 856, 705]),
    ("dpm++", 6, 12.0, [1000, 983, 960, 923, 857, 705]),
    ("unipc", 6, 5.0, [999, 961, 908, 833, 713, 499]),
    ("unipc", 4, 5.0, [999, 937, 833, 624]),
])
def test_spec_reference_timesteps(solver: str, steps: int, shift: float, expected: list[int]) -> None:
    assert make_schedule(solver, steps, shift).timesteps.tolist() == expected


def test_unipc_default_schedules_match_spec_counts() -> None:
    t2v = make_schedule("unipc", 40, 12.0).timesteps
    assert int((t2v >= 875).sum()) == 26 and int(t2v[25]) == 877 and int(t2v[26]) == 865
    assert int(t2v[-1]) == 235
    i2v = make_schedule("unipc", 40, 5.0).timesteps
    assert int((i2v >= 900).sum()) == 15 and int(i2v[-1]) == 113
    ti2v = make_schedule("unipc", 50, 5.0).timesteps
    assert ti2v[:5].tolist() == [999, 995, 991, 987, 982] and ti2v[-3:].tolist() == [241, 172, 92]


def _straight_flow(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
def test_exact_velocity_recovers_x0(solver: str) -> None:
    """With the exact velocity of a straight flow every solver lands on x0."""
    x0, noise = _straight_flow((2, 3, 4), 1)
    scheduler = make_scheduler(solver, 7, 5.0)
    x = (1 - scheduler.sigmas[0]) * x0 + scheduler.sigmas[0] * noise
    for _ in range(scheduler.num_steps):
        x = scheduler.step(noise - x0, x)
    torch.testing.assert_close(x, x0, atol=2e-5, rtol=0)


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
def test_single_step_returns_data_prediction(solver: str) -> None:
    x, v = _straight_flow((4, 5), 2)
    scheduler = make_scheduler(solver, 1, 3.0)
    out = scheduler.step(v, x)
    torch.testing.assert_close(out, x - scheduler.sigmas[0] * v, atol=1e-6, rtol=0)


def test_unipc_duplicate_timesteps_run_to_the_end() -> None:
    """Shift 12 with 100 steps repeats integer timesteps; the official UniPC crashes, ours must not."""
    scheduler = make_scheduler("unipc", 100, 12.0)
    assert scheduler.schedule.has_duplicate_timesteps()
    assert int(scheduler.timesteps[0]) == int(scheduler.timesteps[1])
    x0, noise = _straight_flow((3, 4), 3)
    x = noise.clone()
    g = torch.Generator().manual_seed(4)
    for i in range(100):
        jitter = 0.01 * torch.randn(noise.shape, generator=g)
        x = scheduler.step(noise - x0 + jitter, x)
        assert bool(torch.isfinite(x).all()), f"non-finite sample after step {i}"
    assert scheduler.step_index == 100
    torch.testing.assert_close(x, x0, atol=0.05, rtol=0)


@pytest.mark.parametrize(("steps", "shift"), [(100, 12.0), (260, 5.0)])
def test_unipc_duplicate_timesteps_equal_the_sigma_only_solver(steps: int, shift: float) -> None:
    """With repeated integer timesteps, UniPC gives exactly what it gives when driven by the float32
    sigmas alone (same sigmas, distinct placeholder timesteps): the repeats never reach the math.
    The timesteps the model gets are trunc(sigma * 1000), repeats included."""
    schedule = make_schedule("unipc", steps, shift)
    expected_t = [int(s * 1000) for s in schedule.sigmas[:-1].double().tolist()]
    assert schedule.timesteps.tolist() == expected_t and schedule.has_duplicate_timesteps()
    repeats = [i for i in range(1, steps) if expected_t[i] == expected_t[i - 1]]
    assert repeats and repeats[0] == 1  # the first two coincide: where the official UniPC starts late
    assert bool((schedule.sigmas[1:] < schedule.sigmas[:-1]).all())  # the sigmas stay distinct
    by_sigma = UniPCScheduler(FlowSchedule(solver="unipc", shift=shift, timesteps=torch.arange(steps, 0, -1),
                                           sigmas=schedule.sigmas.clone()))
    real = UniPCScheduler(schedule)
    x0, noise = _straight_flow((3, 4), 3)
    x_real, x_sigma = noise.clone(), noise.clone()
    g = torch.Generator().manual_seed(4)
    for i in range(steps):
        v = noise - x0 + 0.05 * torch.randn(noise.shape, generator=g)
        x_real, x_sigma = real.step(v, x_real), by_sigma.step(v, x_sigma)
        assert torch.equal(x_real, x_sigma), f"step {i}"


def test_step_past_the_end_and_reset() -> None:
    scheduler = make_scheduler("unipc", 2, 5.0)
    x, v = _straight_flow((3,), 5)
    first = [scheduler.step(v, x), scheduler.step(v, x)]
    with pytest.raises(ValueError, match="already ran all 2 steps"):
        scheduler.step(v, x)
    scheduler.reset()
    again = [scheduler.step(v, x), scheduler.step(v, x)]
    for a, b in zip(first, again, strict=False):
        assert torch.equal(a, b)


def test_shape_mismatch_is_rejected() -> None:
    scheduler = make_scheduler("dpm++", 3, 5.0)
    with pytest.raises(ValueError, match="model_output shape"):
        scheduler.step(torch.zeros(2, 3), torch.zeros(3, 2))


@pytest.mark.parametrize(("solver", "steps", "shift", "match"), [
    ("unipc", 0, 5.0, "steps must be"),
    ("unipc", 2.5, 5.0, "steps must be"),
    ("euler", 4, -1.0, "shift must be"),
    ("dpm++", 4, float("nan"), "shift must be"),
    ("ddim", 4, 5.0, "solver must be"),
])
def test_invalid_schedule_arguments(solver: str, steps, shift: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_schedule(solver, steps, shift)


def test_schedule_shapes_and_dtypes() -> None:
    schedule = make_schedule("euler", 5, 8.0)
    assert isinstance(schedule, FlowSchedule) and schedule.num_steps == 5
    assert schedule.timesteps.dtype == torch.int64 and schedule.sigmas.dtype == torch.float32
    assert schedule.sigmas.shape == (6,)
    assert float(schedule.sigmas[-1]) == 0.0 and float(schedule.sigmas[0]) == 1.0
