"""Step caching: exactness at threshold 0, the skip limits, pinned decisions, MagCache tables,
per-expert state, the profiler's marks and the Wan Step Cache node."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytest
import torch
from wanbench.nodes.step_cache import WanStepCache
from wanbench.nodes.types import DiTExperts
from wanbench.profiling import FakeClock, ProfileSession, render_markdown, summarize_run
from wanbench.profiling.memory import CpuDevice
from wanbench.wan_core.config import GuideScale, preset
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.runtime.step_cache import (
    StepCache,
    StepCacheSettings,
    relative_change,
    time_signal,
)
from wanbench.wan_core.runtime.step_cache_tables import MAGCACHE_RATIOS, TEACACHE_COEFFICIENTS
from wanbench.wan_core.sampler import SamplerOptions, sample
from wanbench.wan_core.trace import use_tracer

LATENT = (16, 1, 4, 4)


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class RecordingTracer:
    def __init__(self) -> None:
        self.stages: list[tuple[str, str, dict[str, Any]]] = []

    def stage(self, name: str, kind: str, facts: dict[str, Any]) -> contextlib.AbstractContextManager:
        self.stages.append((name, kind, facts))
        return contextlib.nullcontext()

    def event(self, name: str, facts: dict[str, Any]) -> None:
        pass


def _experts(task_name: str = "t2v-A14B") -> tuple[list[WanDiT], Any]:
    task = preset(task_name, tiny=True)
    torch.manual_seed(0)
    high = WanDiT(task.dit).eval()
    low = WanDiT(task.dit).eval()
    return ([high, low] if task.is_moe else [high]), task


def _contexts(task) -> dict[str, torch.Tensor]:  # noqa: ANN001
    g = torch.Generator().manual_seed(7)
    return {"context": torch.randn(5, task.dit.text_dim, generator=g),
            "context_null": torch.randn(9, task.dit.text_dim, generator=g)}


def _opts(task, steps: int = 6) -> SamplerOptions:  # noqa: ANN001
    return SamplerOptions.from_config(task.sampler, steps=steps, seed=3)


def _decisions(tracer: RecordingTracer) -> list[tuple[int, str, str]]:
    return [(f["step"], f["expert"], f["step_cache"]) for _, kind, f in tracer.stages if kind == "step-inference"]


@pytest.mark.parametrize("mode", ["teacache", "magcache"])
def test_threshold_zero_is_bit_identical_to_no_cache(mode: str) -> None:
    experts, task = _experts()
    opts = _opts(task)
    plain = sample(experts, task, opts, latent_shape=LATENT, **_contexts(task))
    tracer = RecordingTracer()
    settings = StepCacheSettings(mode=mode, threshold=0.0, warmup_steps=0, max_skip=5)
    with use_tracer(tracer):
        cached = sample(experts, task, opts, latent_shape=LATENT, step_cache=settings, **_contexts(task))
    assert torch.equal(plain, cached)
    assert {d for _, _, d in _decisions(tracer)} == {"computed"}


def test_threshold_zero_with_per_token_timesteps_and_a_start_image() -> None:
    experts, task = _experts("ti2v-5B")
    opts = _opts(task, steps=4)
    shape = (task.dit.out_dim, 2, 4, 4)
    z = torch.randn(task.dit.out_dim, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    plain = sample(experts, task, opts, latent_shape=shape, ti2v_z=z, **_contexts(task))
    settings = StepCacheSettings(mode="teacache", threshold=0.0, warmup_steps=0)
    cached = sample(experts, task, opts, latent_shape=shape, ti2v_z=z, step_cache=settings, **_contexts(task))
    assert torch.equal(plain, cached)


@pytest.mark.parametrize("mode", ["teacache", "magcache"])
def test_huge_threshold_reuses_the_most_allowed(mode: str) -> None:
    experts, task = _experts("ti2v-5B")
    tracer = RecordingTracer()
    settings = StepCacheSettings(mode=mode, threshold=1e9, warmup_steps=1, max_skip=2)
    with use_tracer(tracer):
        out = sample(experts, task, _opts(task, steps=9), latent_shape=(48, 1, 4, 4), step_cache=settings,
                     **_contexts(task))
    assert bool(torch.isfinite(out).all())
    # warm-up 0; then two reused, one computed (max skip) ...; the last step is always computed
    assert [d for _, _, d in _decisions(tracer)] == ["computed", "reused", "reused", "computed", "reused",
                                                      "reused", "computed", "reused", "computed"]
    reasons = [f.get("step_cache_reason") for _, k, f in tracer.stages if k == "step-inference"]
    assert reasons == ["warm-up", None, None, "max skip", None, None, "max skip", None, "last step"]
    flops = [f["flops"] for _, k, f in tracer.stages if k == "step-inference"]
    assert all((f == 0.0) == (d == "reused") for f, (_, _, d) in zip(flops, _decisions(tracer), strict=True))


def test_each_expert_warms_up_and_apply_to_excludes_the_other() -> None:
    experts, task = _experts()
    tracer = RecordingTracer()
    settings = StepCacheSettings(mode="magcache", threshold=1e9, warmup_steps=2, max_skip=10, apply_to="low")
    opts = dataclasses.replace(_opts(task, steps=10), shift=3.0)  # t 999 963 922 | 874 ... 249: 3 high, 7 low
    with use_tracer(tracer):
        sample(experts, task, opts, latent_shape=LATENT, step_cache=settings, **_contexts(task))
    decisions = _decisions(tracer)
    high = [d for _, e, d in decisions if e == "high"]
    low = [(s, d) for s, e, d in decisions if e == "low"]
    assert len(high) == 3 and set(high) == {"computed"}  # excluded: every step runs the model
    assert [d for _, d in low[:2]] == ["computed", "computed"]  # the low expert's own warm-up
    assert all(d == "reused" for _, d in low[2:-1]) and low[-1][1] == "computed"


class SignalModel(torch.nn.Module):
    """embed_time returns a fixed signal per timestep (e and e0 alike), so the changes are known."""

    def __init__(self, signal: dict[int, float]) -> None:
        super().__init__()
        self.signal = signal

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.tensor([[self.signal[int(v)] for v in t[0]]], dtype=torch.float32)  # (1, U)
        e = values[..., None].expand(1, t.shape[1], 4)
        return e, e[:, :, None, :].expand(1, t.shape[1], 6, 4)


def test_teacache_decisions_for_a_fixed_signal_are_pinned() -> None:
    # raw change (no polynomial): rel = |s - s_prev| / |s_prev|; threshold 0.1, warm-up 1, max skip 2
    signals = [1.0, 1.1, 1.15, 1.2, 1.6, 1.62, 1.64, 1.66, 2.0, 2.01]
    model = SignalModel({i: v for i, v in enumerate(signals)})
    cache = StepCache(StepCacheSettings(mode="teacache", threshold=0.1, calibration="none"),
                      model_type="t2v", num_steps=10, last_step=10)
    got = []
    for step in range(10):
        decision = cache.decide(step, "high", model, torch.tensor([step]), passes=2)
        cache.predict(decision, "high", lambda: torch.zeros(1))
        got.append("R" if decision.reuse else f"C:{decision.reason}")
    assert got == ["C:warm-up", "C:change", "R", "R", "C:max skip", "R", "R", "C:max skip", "C:change",
                   "C:last step"]


def test_magcache_decisions_on_the_published_t2v_table_are_pinned() -> None:
    cache = StepCache(StepCacheSettings(mode="magcache", threshold=0.06, warmup_steps=4, max_skip=2,
                                        calibration="wan2.2_t2v_A14B"),
                      model_type="t2v", num_steps=40, last_step=40)
    pattern = ""
    for step in range(40):
        decision = cache.decide(step, "high", None, torch.tensor([0]), passes=2)  # magcache reads no model
        cache.predict(decision, "high", lambda: torch.zeros(1))
        pattern += "R" if decision.reuse else "C"
    # Warm-up 4; two reuses at most between computed steps; at step 25 the ratio of the expert switch
    # (0.655) breaks the threshold; the errors grow as the ratios fall away from 1 at the end.
    assert pattern == "CCCCRRCRRCRRCRRCRRCRRCRRCRCRRCRRCRCRCCCC"


def test_magcache_tables_resample_by_nearest_calibrated_step() -> None:
    table = MAGCACHE_RATIOS["wan2.2_t2v_A14B"]
    same = StepCache(StepCacheSettings(mode="magcache", threshold=0.1, calibration="wan2.2_t2v_A14B"),
                     model_type="t2v", num_steps=40, last_step=40)
    assert same._gammas == (list(table.branch(0)), list(table.branch(1)))
    ten = StepCache(StepCacheSettings(mode="magcache", threshold=0.1), model_type="t2v", num_steps=10,
                    last_step=10)
    assert ten._gammas[0] == [table.branch(0)[round(i * 39 / 9)] for i in range(10)]
    assert ten._gammas[0][0] == 1.0 and ten._gammas[1][-1] == table.branch(1)[-1]


def test_per_token_signal_change_matches_the_full_token_computation() -> None:
    experts, task = _experts("ti2v-5B")
    model = experts[0]
    t_prev = torch.tensor([[0.0] * 3 + [900.0] * 5])
    t_now = torch.tensor([[0.0] * 3 + [850.0] * 5])
    change = relative_change(time_signal(model, t_now, "e0"), time_signal(model, t_prev, "e0"))
    with torch.no_grad():
        full_now, full_prev = model.embed_time(t_now)[1], model.embed_time(t_prev)[1]  # (1, 8, 6, D)
    expected = float((full_now - full_prev).abs().mean() / full_prev.abs().mean())
    assert change == pytest.approx(expected, rel=1e-6)


def test_teacache_needs_a_time_embedding() -> None:
    cache = StepCache(StepCacheSettings(mode="teacache", threshold=0.1), model_type="t2v", num_steps=4,
                      last_step=4)
    with pytest.raises(TypeError, match="embed_time.*magcache"):
        cache.decide(0, "high", torch.nn.Linear(2, 2), torch.tensor([999]), passes=2)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("mode", "off", "no settings = no cache"),
    ("mode", "fastcache", "mode must be one of"),
    ("threshold", -0.1, "finite number >= 0"),
    ("threshold", float("nan"), "finite number >= 0"),
    ("warmup_steps", 1.5, "integer"),
    ("max_skip", -1, "integer in"),
    ("apply_to", "both", "apply_to must be one of"),
    ("calibration", "wan2.2_t2v_A14B", "teacache calibration must be one of"),
])
def test_invalid_settings_name_the_problem(field: str, value: Any, match: str) -> None:
    args = {"mode": "teacache", "threshold": 0.1, field: value}
    with pytest.raises(ValueError, match=match):
        StepCacheSettings(**args)


def test_auto_calibrations_and_description() -> None:
    tea = StepCacheSettings(mode="teacache", threshold=0.26)
    assert tea.resolve_calibration("ti2v") == "wan2.2_ti2v_5B"
    assert tea.resolve_calibration("t2v") == "none"  # no published Wan2.2 A14B coefficients
    mag = StepCacheSettings(mode="magcache", threshold=0.06)
    assert mag.resolve_calibration("ti2v", has_image=True) == "wan2.2_ti2v_5B_i2v"
    assert mag.resolve_calibration("i2v") == "wan2.2_i2v_A14B"
    assert "calibration wan2.2_ti2v_5B (e)" in tea.describe("ti2v")
    assert TEACACHE_COEFFICIENTS["wan2.2_ti2v_5B"].signal == "e"


def test_profiled_run_marks_reused_steps_and_keeps_mfu_to_computed_work() -> None:
    experts, task = _experts("ti2v-5B")
    settings = StepCacheSettings(mode="magcache", threshold=1e9, warmup_steps=1, max_skip=1)
    session = ProfileSession(case_name="cache", sample_interval_s=None, clock=FakeClock(), device_probe=CpuDevice())
    with session:
        session.set_context(steps=5, step_cache=settings.describe("ti2v"))
        sample(experts, task, _opts(task, steps=5), latent_shape=(48, 1, 4, 4), step_cache=settings,
               **_contexts(task))
    run = session.record
    steps = [s for s in run.stages if s.kind == "step-inference"]
    assert [s.facts["step_cache"] for s in steps] == ["computed", "reused", "computed", "reused", "computed"]
    assert all((s.flops == 0.0) == (s.facts["step_cache"] == "reused") for s in steps)
    summary = summarize_run(run)
    assert summary.num_steps_recorded == 5 and summary.num_steps_reused == 2
    computed_flops = sum(s.flops for s in steps)
    assert summary.flops_steps == computed_flops
    assert run.total.flops == computed_flops  # reused steps add no FLOPs to the run either
    text = render_markdown([run])
    assert "2 of 5 steps reused" in text and "model: computed 0, 2, 4" in text
    assert "reused 1, 3" in text and "5 (2 reused)" in text


def _bundle(task_name: str = "t2v-A14B") -> DiTExperts:
    experts, task = _experts(task_name)
    return DiTExperts(experts=tuple(experts), task=task)


def test_node_returns_a_new_bundle_and_leaves_the_input_alone() -> None:
    base = _bundle()
    (cached,) = WanStepCache().apply(base, "magcache", 0.05, 1, 2, "all", "auto")
    assert base.step_cache is None and cached.experts is base.experts
    assert cached.step_cache == StepCacheSettings(mode="magcache", threshold=0.05)
    (again,) = WanStepCache().apply(cached, "teacache", 0.2, 2, 3, "high", "wan2.1_t2v_14B_e")
    assert again.step_cache.mode == "teacache" and cached.step_cache.mode == "magcache"
    (off,) = WanStepCache().apply(again, "off", 0.2, 2, 3, "all", "auto")
    assert off.step_cache is None and off.experts is base.experts


@pytest.mark.parametrize(("args", "match"), [
    (("teacache", 0.2, 1, 2, "high", "auto"), "one model"),
    (("teacache", 11.0, 1, 2, "all", "auto"), "threshold must be between"),
    (("magcache", 0.2, 1, 2, "all", "wan2.2_ti2v_5B"), "magcache calibration must be one of"),
])
def test_node_rejects_bad_settings(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        WanStepCache().apply(_bundle("ti2v-5B"), *args)


def test_guidance_one_uses_the_conditional_ratios_only() -> None:
    experts, task = _experts()
    tracer = RecordingTracer()
    settings = StepCacheSettings(mode="magcache", threshold=1e9, max_skip=3)
    opts = dataclasses.replace(_opts(task, steps=5), guide_scale=GuideScale.same(1.0))
    with use_tracer(tracer):
        sample(experts, task, opts, latent_shape=LATENT, step_cache=settings, **_contexts(task))
    assert "reused" in {d for _, _, d in _decisions(tracer)}


def test_reused_steps_leave_s_per_step_and_mfu_to_the_computed_work() -> None:
    from wanbench.profiling import FakeDevice, FakeNvml, lookup_gpu
    from wanbench.wan_core import trace

    clock = FakeClock()
    session = ProfileSession(case_name="gpu_cache", sample_interval_s=None, clock=clock, device_probe=FakeDevice(),
                             gpu=FakeNvml(name="NVIDIA H100 80GB HBM3"))
    flops = 4.0e14  # one computed step
    plan = ["computed", "reused", "computed", "reused", "computed"]
    with session:
        session.set_context(steps=len(plan))
        for i, kind in enumerate(plan):
            with trace.stage(f"Step_{i}_Loading", kind="step-loading", step=i, expert="model", flops=0.0):
                clock.advance(0.01)
            facts = {"step_cache": kind} | ({"step_cache_reason": "change"} if kind == "computed" else {})
            with trace.stage(f"Step_{i}_Inference", kind="step-inference", step=i, expert="model",
                             flops=0.0 if kind == "reused" else flops, **facts):
                clock.advance(2.0 if kind == "computed" else 0.05)
    summary = summarize_run(session.record)
    peak = lookup_gpu("NVIDIA H100 80GB HBM3").dense_bf16_tflops
    assert summary.num_steps_recorded == 5 and summary.num_steps_reused == 2
    assert summary.s_per_step == pytest.approx(2.01)  # the computed steps: a reused one is not a fast step
    assert summary.reused_total_s == pytest.approx(2 * 0.06)
    assert summary.reuse_saved_estimate_s == pytest.approx(2 * (2.01 - 0.06))
    assert summary.flops_steps == 3 * flops
    assert summary.mfu_pct == pytest.approx(100 * (3 * flops / 6.0 / 1e12) / peak)  # no credit for reused steps
    text = render_markdown([session.record])
    assert "2 of 5 steps reused the expert's last prediction" in text and "estimated saving 3.90 s" in text
