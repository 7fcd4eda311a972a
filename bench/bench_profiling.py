"""Profiling overhead: step time of a small WanDiT denoising loop with and without a ProfileSession.

Each step is wrapped exactly as the sampler does it (`Step_<i>_Loading` + `Step_<i>_Inference`
stages with expert, cfg_mode and flops facts). Two measurements:

- A/B: the whole loop with profiling off and on (real clock, real probes, sampler thread at the
  default 0.1 s) in adjacent pairs, alternating which goes first; overhead = median over the pairs
  of (on - off) / off.
- Cost model: the time of one empty profiled stage (enter + exit, same probes) times the two
  stages per step, plus one sampler-thread sample per `sample_interval_s`, over the median step
  time. This isolates the session's own cost from the machine's noise, which on a shared CPU can
  exceed the overhead itself.

It also checks that the final latents are bit-identical with and without profiling. Writes
`bench/results/profiling_overhead.json`.

Run: `python -m bench.bench_profiling [--steps 4] [--repeats 7] [--device cpu|cuda] [--latent 4x32x32]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from dataclasses import replace
from typing import Any

import torch
from wanbench.profiling import ProfileSession
from wanbench.wan_core import trace
from wanbench.wan_core.config import TI2V_5B
from wanbench.wan_core.dit import WanDiT

from .common import format_table, summarize, synchronize, write_result

log = logging.getLogger(__name__)

LATENT_THW = (2, 16, 16)
TEXT_TOKENS = 64


def build(device: torch.device,
          latent_thw: tuple[int, ...] = LATENT_THW) -> tuple[WanDiT, dict[str, Any]]:
    torch.manual_seed(0)
    config = replace(TI2V_5B.dit.tiny(), dim=256, ffn_dim=1024, num_heads=2, num_layers=2)
    model = WanDiT(config, device=device).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "x": torch.randn(1, config.in_dim, *latent_thw, generator=g).to(device),
        "context": [torch.randn(TEXT_TOKENS, config.text_dim, generator=g).to(device)],
    }
    return model, inputs


def denoise(model: WanDiT, inputs: dict[str, Any], steps: int) -> torch.Tensor:
    """A plain Euler loop over `steps` with the sampler's stage names and facts."""
    cfg = model.config
    flops = cfg.flops_forward(cfg.num_tokens(tuple(inputs["x"].shape[2:])))
    x = inputs["x"].clone()
    for i in range(steps):
        t = torch.tensor([1000.0 * (1 - i / steps)], device=x.device)
        facts = dict(step=i, expert="model", cfg_mode="off")
        with trace.stage(f"Step_{i}_Loading", kind="step-loading", flops=0.0, **facts):
            pass
        with trace.stage(f"Step_{i}_Inference", kind="step-inference", flops=flops, **facts):
            v = model(x, t, inputs["context"])
            x = x - v / steps
    synchronize()
    return x


def stage_cost_s(device: str, repeats: int = 2000) -> float:
    """Seconds per empty profiled stage (enter + exit) with the real probes."""
    with ProfileSession(case_name="stage-cost", device=device):
        t0 = time.perf_counter()
        for _ in range(repeats):
            with trace.stage("Step_0_Inference", kind="step-inference", flops=1.0):
                pass
        return (time.perf_counter() - t0) / repeats


def sample_cost_s(device: str, repeats: int = 2000) -> tuple[float, float]:
    """(seconds per telemetry sample, the default sample interval) with the real probes."""
    session = ProfileSession(case_name="sample-cost", device=device)
    with session:
        t0 = time.perf_counter()
        for _ in range(repeats):
            session.sample_now()
        cost = (time.perf_counter() - t0) / repeats
    assert session.sample_interval_s is not None
    return cost, session.sample_interval_s


def untraced_stage_cost_s(repeats: int = 20000) -> float:
    """Seconds per `trace.stage` enter + exit with no session installed."""
    t0 = time.perf_counter()
    for _ in range(repeats):
        with trace.stage("Step_0_Inference", kind="step-inference", flops=1.0):
            pass
    return (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15, help="A/B pairs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--latent", default="x".join(map(str, LATENT_THW)),
                        help="latent frames x height x width of the denoised clip (larger: longer steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        latent_thw = tuple(int(v) for v in args.latent.lower().split("x"))
    except ValueError:
        parser.error(f"--latent must be TxHxW latent cells, e.g. 4x32x32; got {args.latent!r}")
    if len(latent_thw) != 3:
        parser.error(f"--latent must be TxHxW latent cells, e.g. 4x32x32; got {args.latent!r}")
    model, inputs = build(device, latent_thw)
    off_times: list[float] = []
    on_times: list[float] = []
    sessions: list[ProfileSession] = []

    def run_off() -> torch.Tensor:
        t0 = time.perf_counter()
        out = denoise(model, inputs, args.steps)
        off_times.append((time.perf_counter() - t0) / args.steps)
        return out

    def run_on() -> torch.Tensor:
        session = ProfileSession(case_name="bench", device=str(device))
        t0 = time.perf_counter()
        with session:
            out = denoise(model, inputs, args.steps)
        on_times.append((time.perf_counter() - t0) / args.steps)
        sessions.append(session)
        return out

    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        reference = denoise(model, inputs, args.steps)  # warm-up
        for pair in range(args.repeats):
            order = (run_off, run_on) if pair % 2 == 0 else (run_on, run_off)
            for fn in order:
                if not torch.equal(fn(), reference):
                    raise AssertionError("results differ between runs with and without profiling")
    per_stage = stage_cost_s(str(device))
    per_sample, interval = sample_cost_s(str(device))
    untraced = untraced_stage_cost_s()
    off, on = statistics.median(off_times), statistics.median(on_times)
    pair_pct = [100.0 * (b - a) / a for a, b in zip(off_times, on_times, strict=True)]
    ab_pct = statistics.median(pair_pct)
    stage_pct = 100.0 * (2 * per_stage + per_sample * off / interval) / off
    recorded = sessions[-1].record
    rows = [["off", off, None], ["on", on, ab_pct]]
    log.info("A/B pairs (on - off) / off %%: %s", ", ".join(f"{p:.1f}" for p in pair_pct))
    log.info("%s", format_table(["profiling", "s/step (median)", "overhead %"], rows))
    log.info(
        "empty stage %.1f us, sample %.1f us every %.2f s -> %.4f %% of a %.3f s step (2 stages per step)",
        per_stage * 1e6,
        per_sample * 1e6,
        interval,
        stage_pct,
        off,
    )
    log.info("stage without a session: %.3f us", untraced * 1e6)
    path = write_result(
        "profiling_overhead",
        {
            "settings": {
                "steps": args.steps,
                "repeats": args.repeats,
                "device": str(device),
                "model": {
                    "dim": model.config.dim,
                    "num_layers": model.config.num_layers,
                    "latent_thw": latent_thw,
                    "text_tokens": TEXT_TOKENS,
                },
                "sample_interval_s": recorded.sample_interval_s,
            },
            "off_s_per_step": summarize(off_times),
            "on_s_per_step": summarize(on_times),
            "off_raw_s_per_step": off_times,
            "on_raw_s_per_step": on_times,
            "ab_pair_overhead_pct": pair_pct,
            "ab_overhead_pct": ab_pct,
            "ab_pair_spread_pct": [min(pair_pct), max(pair_pct)],
            "load_average_1m": {
                "before": load_before,
                "after": os.getloadavg()[0],
                "cpu_count": os.cpu_count(),
            },
            "stage_cost_us": per_stage * 1e6,
            "sample_cost_us": per_sample * 1e6,
            "cost_model_overhead_pct": stage_pct,
            "untraced_stage_cost_us": untraced * 1e6,
            "torch_threads": torch.get_num_threads(),
            "bit_identical": True,  # every run, on and off, checked with torch.equal against the warm-up run
            "samples_in_last_profiled_run": len(recorded.samples),
            "stages_in_last_profiled_run": len(recorded.stages),
            "target": "overhead < 1 % of step time",
            "meets_target_by_cost_model": stage_pct < 1.0,
            "meets_target_by_ab": ab_pct < 1.0,
        },
    )
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
