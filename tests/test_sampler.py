"""The sampling loop: golden pipeline parity, CFG modes, hooks, noise and argument checks."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import pytest
import torch
from conftest import assert_close_manifest, fixture_params, golden_dir, manifest_fixtures
from safetensors.torch import load_file
from wanbench.wan_core.config import DiTConfig, GuideScale, preset
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.errors import SamplingInterrupted
from wanbench.wan_core.sampler import SamplerOptions, make_noise, sample, select_expert
from wanbench.wan_core.schedulers import FlowSchedule, UniPCScheduler, make_schedule
from wanbench.wan_core.trace import use_tracer

PIPELINE_PARAMS = fixture_params(kind_prefix="pipeline")
SOLVER_NAMES = {"unipc": "unipc", "dpm++": "dpm++", "dpmpp": "dpm++"}


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models run fastest on one thread, and do not stall when other processes share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class RecordingTracer:
    def __init__(self) -> None:
        self.stages: list[tuple[str, str, dict[str, Any]]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []

    def stage(self, name: str, kind: str, facts: dict[str, Any]) -> contextlib.AbstractContextManager:
        self.stages.append((name, kind, facts))
        return contextlib.nullcontext()

    def event(self, name: str, facts: dict[str, Any]) -> None:
        self.events.append((name, facts))


# Official config switches that every Wan2.2 model has on; WanDiT always builds them (no fields).
ALWAYS_ON = ("qk_norm", "cross_attn_norm")


def dit_config(model_config: dict) -> DiTConfig:
    assert all(model_config.get(name, True) is True for name in ALWAYS_ON), model_config
    fields = {**model_config, "patch_size": tuple(model_config["patch_size"]),
              "window_size": tuple(model_config["window_size"])}
    return DiTConfig(**{k: v for k, v in fields.items() if k not in ALWAYS_ON})


def weight_files(fixture: dict) -> list[str]:
    """Weight files of a pipeline fixture, high-noise expert first."""
    files = [f["file"] for f in fixture["files"] if not f["file"].endswith(".io.safetensors")]
    if not files:
        owner = next(f for f in manifest_fixtures(kind_prefix="pipeline")
                     if f["name"] == fixture["config"]["weights_shared_with"])
        return weight_files(owner)
    return sorted(files, key=lambda name: 0 if "high_noise" in name else 1)


def load_pipeline(fixture: dict) -> tuple[list[WanDiT], dict[str, torch.Tensor], SamplerOptions]:
    cfg = fixture["config"]
    experts = []
    for file in weight_files(fixture):
        model = WanDiT(dit_config(cfg["model_config"]))
        model.load_state_dict(load_file(golden_dir() / file))
        experts.append(model.eval())
    io = load_file(golden_dir() / f"{fixture['name']}.io.safetensors")
    guide = cfg.get("guide_scale_low_high") or [cfg["guide_scale"], cfg["guide_scale"]]
    opts = SamplerOptions(solver=SOLVER_NAMES[cfg["solver"]], steps=cfg["steps"], shift=cfg["shift"],
                          guide_scale=GuideScale.from_official(guide), boundary=cfg.get("boundary"))
    return experts, io, opts


def conditioning(io: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    extra = {}
    if "inter.y" in io:
        extra["i2v_y"] = io["inter.y"]
    if "z_latent" in io:
        extra["ti2v_z"] = io["z_latent"]
    return extra


EXPERT_NAMES = {"high_noise_model": "high", "low_noise_model": "low", "model": "model"}


@pytest.mark.parametrize("fixture", PIPELINE_PARAMS)
def test_pipeline_golden(fixture: dict) -> None:
    """Final latent, every per-step latent, the schedule and the expert of every step."""
    experts, io, opts = load_pipeline(fixture)
    cfg, tol = fixture["config"], fixture["tolerance"]
    task = preset(cfg["model_config"]["model_type"], tiny=True)
    latents: list[torch.Tensor] = []
    tracer = RecordingTracer()
    noise_before = io["noise"].clone()
    with use_tracer(tracer):
        out = sample(experts, task, opts, context=io["context"], context_null=io["context_null"],
                     noise=io["noise"], callback=lambda i, n, latent: latents.append(latent.clone()),
                     **conditioning(io))
    assert torch.equal(io["noise"], noise_before), "the input noise was modified"
    final_tol = tol["final_latent"]
    assert_close_manifest(out, io["expected.final_latent"], atol=final_tol["atol"], rtol=final_tol["rtol"],
                          what=f"{fixture['name']} final latent")
    step_tol = tol["per_step"]
    for i in range(1, cfg["steps"]):
        assert_close_manifest(latents[i - 1], io[f"inter.step{i}.latent_in"], atol=step_tol["atol"],
                              rtol=step_tol["rtol"], what=f"{fixture['name']} latent into step {i}")
    inference = [facts for name, kind, facts in tracer.stages if kind == "step-inference"]
    assert [f["timestep"] for f in inference] == io["timesteps"].tolist()
    assert [f["expert"] for f in inference] == [EXPERT_NAMES[s["expert"]] for s in cfg["per_step"]]


def test_pipeline_fixtures_are_listed() -> None:
    names = {f["name"] for f in manifest_fixtures(kind_prefix="pipeline")}  # fails if the manifest is missing
    assert names >= {"pipeline_t2v_tiny", "pipeline_i2v_tiny"}


def _pick(name: str) -> dict:
    # a missing manifest (or one without pipelines) fails; a set without this one fixture skips
    fixture = next((f for f in manifest_fixtures(kind_prefix="pipeline") if f["name"] == name), None)
    if fixture is None:
        pytest.skip(f"fixture {name} not available")
    return fixture


@pytest.mark.parametrize("name", ["pipeline_t2v_tiny", "pipeline_i2v_tiny", "pipeline_ti2v_tiny_i2v"])
def test_batched_cfg_equals_sequential(name: str) -> None:
    fixture = _pick(name)
    experts, io, opts = load_pipeline(fixture)
    task = preset(fixture["config"]["model_config"]["model_type"], tiny=True)
    args = dict(context=io["context"], context_null=io["context_null"], noise=io["noise"], **conditioning(io))
    opts = dataclasses.replace(opts, steps=2)  # two steps exercise the solver history and both passes
    batched = sample(experts, task, opts, **args)
    sequential = sample(experts, task, dataclasses.replace(opts, cfg_mode="sequential"), **args)
    tol = fixture["tolerance"]["final_latent"]
    assert_close_manifest(batched, sequential, atol=tol["atol"], rtol=tol["rtol"],
                          what="batched vs sequential")


class FlowModel(torch.nn.Module):
    """A cheap stand-in with the DiT forward contract: v depends on x, t, its own context and y.

    Records the batch size and the timesteps of every forward.
    """

    def __init__(self, config: DiTConfig, scale: float = 1.0) -> None:
        super().__init__()
        self.config = config
        self.scale = torch.nn.Parameter(torch.tensor(scale))
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(config.out_dim, config.out_dim) for _ in range(2)])
        self.batches: list[int] = []
        self.timesteps: list[list[int]] = []

    def forward(self, x, t, context, *, seq_len=None, y=None):  # noqa: ANN001, ANN201
        self.batches.append(int(x.shape[0]))
        self.timesteps.append(t.tolist())
        t_mean = t.float().reshape(t.shape[0], -1).mean(1).view(-1, 1, 1, 1, 1) / 1000
        ctx = torch.stack([c.mean() for c in context]).view(-1, 1, 1, 1, 1)
        h = x.movedim(1, -1)
        for block in self.blocks:
            h = h + 0.1 * torch.tanh(block(h))
        v = self.scale * h.movedim(-1, 1) * (0.5 + t_mean) + ctx
        if y is not None:
            v = v + y.mean(1, keepdim=True)
        return v.float()


def _fake_t2v(scale: float = 1.0) -> tuple[FlowModel, Any]:
    task = preset("t2v-A14B", tiny=True)
    torch.manual_seed(0)
    return FlowModel(task.dit, scale), task


def _tiny_t2v(seed: int = 0) -> tuple[WanDiT, Any]:
    task = preset("t2v-A14B", tiny=True)
    torch.manual_seed(seed)
    return WanDiT(task.dit).eval(), task


def _contexts(task) -> dict[str, torch.Tensor]:  # noqa: ANN001
    g = torch.Generator().manual_seed(7)
    return {"context": torch.randn(5, task.dit.text_dim, generator=g),
            "context_null": torch.randn(9, task.dit.text_dim, generator=g)}


def test_guidance_one_skips_the_unconditional_pass() -> None:
    high, task = _fake_t2v(1.0)
    low, _ = _fake_t2v(0.5)
    tracer = RecordingTracer()
    opts = SamplerOptions(steps=4, shift=12.0, guide_scale=GuideScale(high=1.0, low=3.0), boundary=0.875)
    with use_tracer(tracer):
        sample([high, low], task, opts, latent_shape=(16, 1, 4, 4), **_contexts(task))
    modes = [(f["expert"], f["cfg_mode"]) for _, kind, f in tracer.stages if kind == "step-inference"]
    assert modes == [("high", "off")] * 3 + [("low", "batched")]
    assert high.batches == [1, 1, 1] and low.batches == [2]
    opts_seq = dataclasses.replace(opts, cfg_mode="sequential")
    sample([high, low], task, opts_seq, latent_shape=(16, 1, 4, 4), **_contexts(task))
    assert low.batches == [2, 1, 1]


def test_trace_stages_names_kinds_and_facts() -> None:
    model, task = _fake_t2v()
    tracer = RecordingTracer()
    opts = SamplerOptions(steps=3, shift=5.0, guide_scale=GuideScale.same(2.0), boundary=0.9)
    with use_tracer(tracer):
        sample([model, model], task, opts, latent_shape=(16, 1, 4, 4), **_contexts(task))
    names = [name for name, _, _ in tracer.stages]
    assert names == [f"Step_{i}_{part}" for i in range(3) for part in ("Loading", "Inference")]
    kinds = {kind for _, kind, _ in tracer.stages}
    assert kinds == {"step-loading", "step-inference"}
    flops = task.dit.flops_forward(task.dit.num_tokens((1, 4, 4)), batch=2)
    common = {"step", "expert", "cfg_mode", "flops", "timestep"}
    for _, kind, facts in tracer.stages:
        estimate = {"memory_estimate_bytes", "memory_estimate_device"}
        assert set(facts) == (common | estimate if kind == "step-inference"
                              else common | {"placement", "placement_requested"})
        assert facts["flops"] == (flops if kind == "step-inference" else 0.0)
        if kind == "step-loading":  # the default placement is the planner's: on the CPU that is "none"
            assert (facts["placement"], facts["placement_requested"]) == ("none", "auto")
    assert [f["expert"] for _, k, f in tracer.stages if k == "step-inference"] == ["high", "high", "low"]
    assert [name for name, _ in tracer.events] == ["memory_plan", "expert_switch"]


def test_single_step_and_seeded_noise() -> None:
    model, task = _tiny_t2v()
    opts = SamplerOptions(steps=1, shift=5.0, guide_scale=GuideScale(high=4.0, low=3.0), boundary=0.875, seed=11)
    by_seed = sample([model, model], task, opts, latent_shape=(16, 1, 4, 4), **_contexts(task))
    by_noise = sample([model, model], task, opts, noise=make_noise((16, 1, 4, 4), 11), **_contexts(task))
    assert torch.equal(by_seed, by_noise) and bool(torch.isfinite(by_seed).all())


def test_noise_generator_matches_fixture_noise() -> None:
    fixture = _pick("pipeline_t2v_tiny")
    io = load_file(golden_dir() / f"{fixture['name']}.io.safetensors")
    cfg = fixture["config"]
    assert torch.equal(make_noise(cfg["latent_shape"], cfg["noise_seed_cpu"]), io["noise"])


def test_duplicate_timesteps_in_the_loop() -> None:
    """UniPC, shift 12, 100 steps: repeated integer timesteps. The model sees every integer timestep
    of the schedule (repeats included) and the result equals UniPC driven by the sigmas alone."""
    model, task = _fake_t2v()
    opts = SamplerOptions(steps=100, shift=12.0, guide_scale=GuideScale.same(1.0), boundary=0.875)
    contexts = _contexts(task)
    out = sample([model, model], task, opts, latent_shape=(16, 1, 2, 2), **contexts)
    assert out.shape == (16, 1, 2, 2) and bool(torch.isfinite(out).all())
    schedule = make_schedule("unipc", 100, 12.0)
    expected_t = [int(s * 1000) for s in schedule.sigmas[:-1].double().tolist()]
    assert expected_t[0] == expected_t[1] == 999  # the repeat the official UniPC trips over
    assert [t[0] for t in model.timesteps] == schedule.timesteps.tolist() == expected_t

    # The same solver over the same float32 sigmas with distinct placeholder timesteps, the model
    # called by hand with the real integer timesteps: the same numbers, so repeats change nothing.
    by_sigma = UniPCScheduler(FlowSchedule(solver="unipc", shift=12.0, timesteps=torch.arange(100, 0, -1),
                                           sigmas=schedule.sigmas.clone()))
    latent = make_noise((16, 1, 2, 2), opts.seed)
    with torch.no_grad():
        for t in schedule.timesteps:
            v = model(latent[None], t.view(1), [contexts["context"]], seq_len=4)[0]
            latent = by_sigma.step(v, latent)
    assert torch.equal(out, latent)


def test_interrupt_stops_within_one_step() -> None:
    counter, task = _fake_t2v()
    seen: list[int] = []

    def callback(i: int, n: int, latent: torch.Tensor) -> None:
        seen.append(i)
        if i == 1:
            raise SamplingInterrupted("stop")

    opts = SamplerOptions(steps=5, shift=5.0, guide_scale=GuideScale.same(3.0), boundary=0.9, placement="blocks")
    with pytest.raises(SamplingInterrupted):
        sample([counter, counter], task, opts, latent_shape=(16, 1, 4, 4), callback=callback,
               **_contexts(task))
    assert seen == [0, 1] and counter.batches == [2, 2]
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in counter.blocks)


def test_interrupt_on_the_last_step_discards_the_result() -> None:
    """An interrupt always stops the run: with the last step's callback too, nothing is returned
    (the callback has seen the final latent) and the placement is undone."""
    model, task = _fake_t2v()
    opts = SamplerOptions(steps=3, shift=5.0, guide_scale=GuideScale.same(3.0), boundary=0.9, placement="blocks")
    finished = sample([model, model], task, opts, latent_shape=(16, 1, 4, 4), **_contexts(task))
    seen: list[torch.Tensor] = []

    def callback(i: int, n: int, latent: torch.Tensor) -> None:
        seen.append(latent.clone())
        if i == n - 1:
            raise SamplingInterrupted("stop")

    with pytest.raises(SamplingInterrupted):
        sample([model, model], task, opts, latent_shape=(16, 1, 4, 4), callback=callback, **_contexts(task))
    assert len(seen) == 3 and torch.equal(seen[-1], finished)
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in model.blocks)


@pytest.mark.parametrize(("device", "reason"), [(None, "no CUDA device"), ("cpu", "the compute device is the CPU")])
@pytest.mark.parametrize("kind", ["model", "blocks"])
def test_offload_placement_without_cuda_warns_and_is_recorded(
        kind: str, device: str | None, reason: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, task = _fake_t2v()
    tracer = RecordingTracer()
    opts = SamplerOptions(steps=2, shift=5.0, guide_scale=3.0, boundary=0.9, placement=kind)
    with use_tracer(tracer), caplog.at_level(logging.WARNING, logger="wanbench.wan_core.sampler"):
        out = sample([model, model], task, opts, latent_shape=(16, 1, 4, 4), device=device, **_contexts(task))
    assert out.device.type == "cpu"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"placement {kind!r} requested, 'none' applied: {reason}; every weight stays on the "
                        "CPU, where the model runs (pass a CUDA device to offload)"]
    loading = [facts for _, k, facts in tracer.stages if k == "step-loading"]
    assert [(f["placement_requested"], f["placement"]) for f in loading] == [(kind, "none")] * 2
    fallback = [e for e in tracer.events if e[0] == "placement_fallback"]
    assert fallback == [("placement_fallback", {"requested": kind, "applied": "none", "reason": reason})]
    (plan,) = [facts for name, facts in tracer.events if name == "memory_plan"]
    assert (plan["placement_requested"], plan["placement"], plan["device"]) == (kind, kind, "cpu")


def test_placement_none_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    model, task = _fake_t2v()
    opts = SamplerOptions(steps=1, shift=5.0, guide_scale=3.0, boundary=0.9)
    with caplog.at_level(logging.WARNING, logger="wanbench.wan_core.sampler"):
        sample([model, model], task, opts, latent_shape=(16, 1, 4, 4), **_contexts(task))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_guide_scale_accepts_one_number_for_both_experts() -> None:
    base = dict(steps=4, shift=5.0, boundary=0.9)
    assert SamplerOptions(**base, guide_scale=3.0).guide_scale == GuideScale(high=3.0, low=3.0)
    assert SamplerOptions(**base, guide_scale=5).guide_scale == GuideScale(high=5.0, low=5.0)
    assert SamplerOptions(**base, guide_scale=GuideScale(low=3, high=4.5)).guide_scale == \
        GuideScale(high=4.5, low=3.0)
    assert GuideScale.from_official([3, 4.5]) == GuideScale(high=4.5, low=3.0)
    assert GuideScale(high=4.5, low=3.0).official() == (3.0, 4.5)
    for bad in ("3.0", (1.0, 2.0, 3.0), True, (float("inf"), 1.0), None, float("nan"), (3.0, 4.0)):
        with pytest.raises(ValueError, match=r"guide_scale must be a finite number \(both experts\) or two"):
            SamplerOptions(**base, guide_scale=bad)  # a bare pair too: its order could be read either way
    with pytest.raises(ValueError, match="guide_scale must be finite numbers; got high=nan"):
        GuideScale(high=float("nan"), low=3.0)


def test_select_expert_and_guidance() -> None:
    assert select_expert(875, 0.875) == "high" and select_expert(874, 0.875) == "low"
    assert select_expert(900, 0.9) == "high" and select_expert(899, 0.9) == "low"
    assert select_expert(999, None) == "model"
    scale = GuideScale.from_official((3.0, 4.0))
    assert scale.for_expert("high") == 4.0 and scale.for_expert("low") == 3.0


def test_options_from_config_with_overrides() -> None:
    task = preset("t2v-A14B")
    opts = SamplerOptions.from_config(task.sampler, steps=8, boundary=0.8, cfg_mode="sequential")
    got = (opts.solver, opts.steps, opts.shift, opts.guide_scale, opts.boundary)
    assert got == ("unipc", 8, 12.0, GuideScale(high=4.0, low=3.0), 0.8)
    assert opts.boundary_timestep == 800.0 and opts.cfg_mode == "sequential"


@pytest.mark.parametrize(("field", "value", "match"), [
    ("steps", 0, "steps must be"),
    ("shift", -1.0, "shift must be"),
    ("boundary", 1.0, "boundary must lie"),
    ("boundary", 0.0, "boundary must lie"),
    ("guide_scale", (float("nan"), 3.0), "guide_scale must be"),
    ("cfg_mode", "both", "cfg_mode must be"),
    ("placement", "disk", "placement must be"),
    ("solver", "ddim", "solver must be"),
])
def test_invalid_options(field: str, value: Any, match: str) -> None:
    base = dict(steps=4, shift=5.0, guide_scale=GuideScale.same(3.0), boundary=0.9)
    with pytest.raises(ValueError, match=match):
        SamplerOptions(**{**base, field: value})


class ExplodingModel(torch.nn.Module):
    """Fails the test if the sampler computes anything before validating its arguments."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("forward ran although the arguments were invalid")


@pytest.mark.parametrize(("case", "match"), [
    ("channels", r"noise|latent_shape must be \(C=16"),
    ("no_image", "needs the image conditioning"),
    ("image_for_t2v", "only used by the i2v task"),
    ("one_expert", "needs two experts"),
    ("context_dim", "context must be"),
    ("both_noise", "exactly one of"),
    ("odd_size", "not divisible by patch"),
])
def test_invalid_arguments_fail_before_compute(case: str, match: str) -> None:
    task = preset("i2v-A14B" if case == "no_image" else "t2v-A14B", tiny=True)
    model = ExplodingModel(task.dit)
    opts = SamplerOptions(steps=2, shift=5.0, guide_scale=GuideScale.same(3.0), boundary=0.9)
    kwargs: dict[str, Any] = dict(latent_shape=(16, 1, 4, 4), **_contexts(task))
    experts = [model, model]
    if case == "channels":
        kwargs["latent_shape"] = (48, 1, 4, 4)
    elif case == "image_for_t2v":
        kwargs["i2v_y"] = torch.zeros(20, 1, 4, 4)
    elif case == "one_expert":
        experts = [model]
    elif case == "context_dim":
        kwargs["context"] = torch.zeros(5, task.dit.text_dim + 1)
    elif case == "both_noise":
        kwargs["noise"] = torch.zeros(16, 1, 4, 4)
    elif case == "odd_size":
        kwargs["latent_shape"] = (16, 1, 3, 4)
    with pytest.raises(ValueError, match=match):
        sample(experts, task, opts, **kwargs)


def test_expert_of_another_task_is_rejected() -> None:
    task = preset("t2v-A14B", tiny=True)
    wrong = ExplodingModel(preset("ti2v-5B", tiny=True).dit)
    opts = SamplerOptions(steps=2, shift=5.0, guide_scale=GuideScale.same(3.0), boundary=0.9)
    with pytest.raises(ValueError, match="does not fit task"):
        sample([wrong, wrong], task, opts, latent_shape=(16, 1, 4, 4), **_contexts(task))
