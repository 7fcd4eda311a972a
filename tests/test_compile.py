"""Regional torch.compile applied from outside: same outputs, Compile stage, compile/recompile counts."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from wanbench.wan_core.compile import CompileConfig, apply_compile
from wanbench.wan_core.trace import use_tracer


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.nn.functional.gelu(self.fc(self.norm(x)), approximate="tanh")


class _Stack(nn.Module):
    def __init__(self, dim: int = 16, num_layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(num_layers))
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class _RecordingTracer:
    def __init__(self) -> None:
        self.stages: list[tuple[str, str, dict]] = []
        self.events: list[tuple[str, dict]] = []

    def stage(self, name, kind, facts):
        self.stages.append((name, kind, facts))
        return contextlib.nullcontext()

    def event(self, name, facts):
        self.events.append((name, facts))


@pytest.fixture()
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_regions_match_eager_and_keep_state_dict(fresh_dynamo, backend):
    model = _Stack().eval()
    keys_before = list(model.state_dict())
    x = torch.randn(2, 5, 16)
    with torch.inference_mode():
        ref = model(x)
    handle = apply_compile(model, CompileConfig(backend=backend))
    try:
        assert list(model.state_dict()) == keys_before
        with torch.inference_mode():
            out = handle.warm_up(lambda: model(x))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        stats = handle.stats()
        assert stats.num_regions == 3
        # One graph serves all three identical blocks.
        assert stats.num_compiles == 1 and stats.num_recompiles == 0
        assert stats.compile_time_s is not None and stats.compile_time_s > 0
    finally:
        handle.remove()


def test_compile_stage_is_recorded_and_recompiles_after_warmup_are_counted(fresh_dynamo):
    model = _Stack().eval()
    tracer = _RecordingTracer()
    handle = apply_compile(model, CompileConfig(backend="eager", dynamic=False))
    try:
        with use_tracer(tracer), torch.inference_mode():
            handle.warm_up(lambda: model(torch.randn(2, 5, 16)))
            model(torch.randn(2, 5, 16))  # same shapes: no recompile
            assert handle.stats().recompiles_after_warmup == 0
            model(torch.randn(2, 7, 16))  # new token count with dynamic=False: a recompile
        stats = handle.stats()
    finally:
        handle.remove()
    assert [(name, kind) for name, kind, _ in tracer.stages] == [("Compile", "init")]
    assert tracer.stages[0][2]["num_regions"] == 3
    assert stats.recompiles_after_warmup == 1 and stats.num_recompiles == 1
    assert [name for name, _ in tracer.events] == ["Recompile"]


def test_remove_restores_eager_and_stops_counting(fresh_dynamo):
    model = _Stack().eval()
    handle = apply_compile(model, CompileConfig(backend="eager"))
    with torch.inference_mode():
        handle.warm_up(lambda: model(torch.randn(1, 3, 16)))
    handle.remove()
    assert all(block._compiled_call_impl is None for block in model.blocks)
    with torch.inference_mode():
        model(torch.randn(1, 9, 16))
    assert handle.stats().num_compiles == 1
    with pytest.raises(RuntimeError, match="removed"):
        handle.warm_up(lambda: None)


def test_bad_region_and_mode_are_rejected():
    with pytest.raises(ValueError, match="non-empty nn.ModuleList"):
        apply_compile(nn.Linear(2, 2), CompileConfig(backend="eager"))
    with pytest.raises(ValueError, match="compile mode"):
        CompileConfig(mode="fastest")
