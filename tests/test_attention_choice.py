"""`auto` attention by measurement: the selection logic with fake kernels and a fake clock, and the
real SDPA kernels of the CPU build chosen, checked and reported."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from wanbench.wan_core import attention as attn_mod
from wanbench.wan_core.attention import BACKENDS, attention, resolve_backend, resolve_backend_for
from wanbench.wan_core.attention_choice import (
    ACCURACY_ROWS,
    AttentionSelector,
    Candidate,
    ShapeClass,
    attention_flops,
)
from wanbench.wan_core.config import ATTENTION_CHOICE_EVENT, preset
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.trace import use_tracer


class FakeClock:
    """Each kernel call advances time by what that kernel is set to take."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class EventLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def stage(self, name: str, kind: str, facts: dict[str, Any]) -> Any:  # pragma: no cover - unused
        raise AssertionError("no stage expected")

    def event(self, name: str, facts: dict[str, Any]) -> None:
        self.events.append((name, facts))


SHAPE = ShapeClass.for_sizes("cpu", torch.bfloat16, batch=1, num_queries=100, num_keys=100, num_heads=2,
                             head_dim=8, key_bias=False, padded_keys=False)


def fake(name: str, seconds: float, error: float, clock: FakeClock, calls: dict[str, int], *,
         exact: bool = True, raises: Exception | None = None) -> tuple[Candidate, float]:
    def run() -> torch.Tensor:
        calls[name] = calls.get(name, 0) + 1
        if raises is not None:
            raise raises
        clock.now += seconds
        return torch.full((1,), error)  # the "output" carries its own error for the fake accuracy
    return Candidate(name, run, exact), error


def choose(selector: AttentionSelector, candidates: list[Candidate], *, reference_error: float = 0.01) -> Any:
    return selector.choose(SHAPE, candidates, reference_error=reference_error,
                           accuracy=lambda out: float(out[0]), flops=2e12, device=torch.device("cpu"))


def test_fastest_accurate_candidate_wins_and_is_cached() -> None:
    clock, calls = FakeClock(), {}
    selector = AttentionSelector(clock=clock, iterations=3)
    candidates = [fake("slow", 0.004, 0.01, clock, calls)[0], fake("fast", 0.001, 0.015, clock, calls)[0],
                  fake("middle", 0.002, 0.0, clock, calls)[0]]
    choice = choose(selector, candidates)
    assert choice.name == "fast" and choice.seconds == pytest.approx(0.001)
    assert choice.tflops == pytest.approx(2e12 / 0.001 / 1e12)
    assert calls == {"slow": 4, "fast": 4, "middle": 4}  # one warm-up and three timed calls each
    again = choose(selector, candidates)
    assert again is choice and calls == {"slow": 4, "fast": 4, "middle": 4}  # cached: nothing re-run


def test_inaccurate_and_failing_candidates_are_rejected_with_reasons() -> None:
    clock, calls = FakeClock(), {}
    selector = AttentionSelector(clock=clock, iterations=2)
    candidates = [fake("wrong", 0.0005, 0.5, clock, calls)[0],  # fastest, but 50x the reference's error
                  fake("broken", 0.0001, 0.0, clock, calls, raises=RuntimeError("no kernel image"))[0],
                  fake("approx", 0.0008, 0.08, clock, calls, exact=False)[0],  # within 10x: allowed
                  fake("exact", 0.002, 0.02, clock, calls)[0]]
    choice = choose(selector, candidates)
    assert choice.name == "approx"
    by_name = {m.name: m for m in choice.measurements}
    assert "relative error 0.5 > 0.02" in by_name["wrong"].rejected
    assert "RuntimeError: no kernel image" in by_name["broken"].rejected
    assert by_name["exact"].rejected is None and by_name["approx"].rejected is None
    facts = choice.facts(cached=False)
    assert facts["kernel"] == "approx" and "broken: rejected (RuntimeError" in facts["candidates"]


def test_no_acceptable_candidate_is_an_error() -> None:
    clock, calls = FakeClock(), {}
    selector = AttentionSelector(clock=clock)
    with pytest.raises(RuntimeError, match="no attention kernel passed its check.*only: relative error"):
        choose(selector, [fake("only", 0.001, 1.0, clock, calls)[0]])


def test_each_profiler_is_told_once_and_later_ones_see_the_cached_choice() -> None:
    clock, calls = FakeClock(), {}
    selector = AttentionSelector(clock=clock)
    first, second = EventLog(), EventLog()
    candidates = [fake("k", 0.001, 0.0, clock, calls)[0]]
    with use_tracer(first):
        choose(selector, candidates)
        choose(selector, candidates)
    with use_tracer(second):
        choose(selector, candidates)
    assert [(n, f["kernel"], f["cached"]) for n, f in first.events] == [(ATTENTION_CHOICE_EVENT, "k", False)]
    assert [(n, f["cached"]) for n, f in second.events] == [(ATTENTION_CHOICE_EVENT, True)]
    assert second.events[0][1]["tflops"] == pytest.approx(2e12 / 0.001 / 1e12)


def test_shape_classes_round_lengths_up_to_powers_of_two() -> None:
    def cls(lq: int, lk: int) -> ShapeClass:
        return ShapeClass.for_sizes("cpu", torch.float32, batch=2, num_queries=lq, num_keys=lk, num_heads=4,
                                    head_dim=16, key_bias=False, padded_keys=False)
    assert cls(300, 20) == cls(512, 32) and cls(300, 20) != cls(513, 20)
    assert cls(300, 20).describe() == "B2 Lq<=512 Lk<=32 N4 Dh16 float32 cpu"


@pytest.fixture
def fresh_selector(monkeypatch: pytest.MonkeyPatch) -> AttentionSelector:
    selector = AttentionSelector()
    monkeypatch.setattr(attn_mod, "_SELECTOR", selector)  # as in a fresh process
    return selector


def _qkv(lq: int = 300, lk: int = 300) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    return tuple(torch.randn(2, n, 2, 16, generator=g) for n in (lq, lk, lk))


def test_auto_measures_the_real_cpu_kernels_and_checks_them(fresh_selector: AttentionSelector) -> None:
    q, k, v = _qkv()
    log = EventLog()
    with use_tracer(log):
        chosen = resolve_backend("auto", q, k, v)
    assert chosen.name in ("sdpa_flash", "sdpa_math")
    (name, facts), = log.events
    assert name == ATTENTION_CHOICE_EVENT and facts["kernel"] == chosen.name and facts["tflops"] > 0
    measured = facts["candidates"]
    assert "sdpa_flash:" in measured and "sdpa_math:" in measured
    assert "sdpa_cudnn" not in measured and "flash_attn" not in measured  # cannot run on a CPU: not tried
    torch.testing.assert_close(attention(q, k, v, backend="auto"), attention(q, k, v), rtol=1e-5, atol=1e-6)
    assert ACCURACY_ROWS < q.shape[1]  # the check compared a slice of the rows, the timing ran all of them


def test_auto_with_key_bias_picks_among_backends_that_take_one(fresh_selector: AttentionSelector,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = _qkv(40, 12)
    bias = torch.randn(2, 12)
    plain = BACKENDS["sdpa_flash"].__class__  # AttentionBackend
    no_bias = plain("no_bias_kernel", BACKENDS["sdpa"].fn, BACKENDS["sdpa"].supports, None, "-", exact=True)
    monkeypatch.setattr(attn_mod, "BACKENDS", {**attn_mod.BACKENDS, "no_bias_kernel": no_bias})
    chosen = resolve_backend("auto", q, k, v, key_bias=bias)
    assert chosen.key_bias_fn is not None
    choice = fresh_selector.cached(ShapeClass.of(q, k, key_bias=True, padded_keys=False))
    assert "no_bias_kernel" not in {m.name for m in choice.measurements}


def test_resolve_for_a_shape_measures_once_on_seeded_inputs(fresh_selector: AttentionSelector,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    spec = dict(device=torch.device("cpu"), dtype=torch.float32, num_heads=2, head_dim=16, batch=1,
                num_queries=64, num_keys=64)
    first = resolve_backend_for("auto", **spec)
    monkeypatch.setattr(torch, "randn", None)  # a cached shape allocates nothing
    assert resolve_backend_for("auto", **spec) is first
    with pytest.raises(ValueError, match="pass num_queries and num_keys"):
        resolve_backend_for("auto", device=torch.device("cpu"), dtype=torch.float32, num_heads=2, head_dim=16)


@torch.no_grad()
def test_auto_model_reports_both_attention_sites_and_matches_sdpa(fresh_selector: AttentionSelector) -> None:
    torch.manual_seed(0)
    cfg = preset("t2v", tiny=True).dit
    ref = WanDiT(cfg).eval()
    auto = WanDiT(cfg, attention="auto").eval()
    auto.load_state_dict(ref.state_dict())
    x, t, ctx = torch.randn(1, 16, 2, 8, 8), torch.tensor([500]), [torch.randn(5, cfg.text_dim)]
    log = EventLog()
    with use_tracer(log):
        out = auto(x, t, ctx)
        auto(x, t, ctx)
    shapes = [f["shape"] for _, f in log.events]
    assert len(shapes) == 2 and any("key bias" in s for s in shapes)  # self- and cross-attention, once each
    torch.testing.assert_close(out, ref(x, t, ctx), rtol=1e-5, atol=1e-5)


def test_attention_flops_count_qk_and_pv() -> None:
    q, k, _ = _qkv(10, 7)
    assert attention_flops(q, k) == 4 * 2 * 2 * 10 * 7 * 16


def test_iterations_must_be_positive() -> None:
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        AttentionSelector(iterations=0)


