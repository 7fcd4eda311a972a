"""Profiling overhead: a small WanDiT denoising loop with and without a ProfileSession, on CPU time.

Each step is wrapped exactly as the sampler does it (`Step_<i>_Loading` + `Step_<i>_Inference`
stages with expert, cfg_mode and flops facts). Two measurements:

- A/B: whole runs with profiling off and on, in adjacent pairs (alternating which goes first).
  The "on" run includes making, opening and closing the session (sampler thread start and stop,
  system facts, assembling the records). Every run is measured on three clocks (wall, thread CPU,
  process CPU; `bench/common.py`); overhead per clock = median over the pairs of (on - off) / off,
  with the spread (quartiles) of the pairs. **The < 1 % target is judged on process CPU time**: it
  counts the session's own work on every thread (the sampler thread included) and not the time
  spent waiting for a core, which on a shared machine makes wall-time pairs swing by tens of %.
- Cost model: the CPU time of one session open + close, of one empty profiled stage (enter + exit,
  same probes) and of one telemetry sample, scaled to the run (one open/close, two stages per
  step, one sample per `sample_interval_s` of wall time), over the profiling-off CPU time of the run.

It also checks that the final latents are bit-identical with and without profiling. Writes
`bench/results/profiling_overhead.json` (with the machine's load average).

Run: `python -m bench.bench_profiling [--steps 4] [--repeats 15] [--threads 1] [--latent 4x32x32]
[--device cpu|cuda]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from wanbench.profiling import ProfileSession
from wanbench.wan_core import trace
from wanbench.wan_core.config import TI2V_5B
from wanbench.wan_core.dit import WanDiT

from .common import CLOCKS, format_table, load_average, ratio_spread, summarize, synchronize, time_call, write_result

log = logging.getLogger(__name__)

LATENT_THW = (4, 32, 32)  # about 0.1 s of CPU per step at dim 256: real steps are longer still
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


def _cpu_per_call(fn: Any, repeats: int) -> dict[str, float]:
    """Thread and process CPU seconds per call of `fn` (mean over `repeats` calls)."""
    t0, p0 = time.thread_time(), time.process_time()
    for _ in range(repeats):
        fn()
    return {"thread_cpu_s": (time.thread_time() - t0) / repeats,
            "process_cpu_s": (time.process_time() - p0) / repeats}


def stage_cost(device: str, repeats: int = 2000) -> dict[str, float]:
    """CPU seconds per empty profiled stage (enter + exit) with the real probes."""
    def one() -> None:
        with trace.stage("Step_0_Inference", kind="step-inference", flops=1.0):
            pass

    with ProfileSession(case_name="stage-cost", device=device):
        return _cpu_per_call(one, repeats)


def sample_cost(device: str, repeats: int = 2000) -> tuple[dict[str, float], float]:
    """(CPU seconds per telemetry sample, the default sample interval) with the real probes."""
    session = ProfileSession(case_name="sample-cost", device=device)
    with session:
        cost = _cpu_per_call(session.sample_now, repeats)
    assert session.sample_interval_s is not None
    return cost, session.sample_interval_s


def open_close_cost(device: str, repeats: int = 20) -> dict[str, float]:
    """CPU seconds to make, open and close one empty session (sampler thread included)."""
    def one() -> None:
        with ProfileSession(case_name="open-close", device=device):
            pass

    one()  # first-call imports and caches
    return _cpu_per_call(one, repeats)


def untraced_stage_cost_s(repeats: int = 20000) -> float:
    """Seconds per `trace.stage` enter + exit with no session installed."""
    t0 = time.perf_counter()
    for _ in range(repeats):
        with trace.stage("Step_0_Inference", kind="step-inference", flops=1.0):
            pass
    return (time.perf_counter() - t0) / repeats


def overhead_by_clock(off: dict[str, list[float]], on: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Per clock: the pairs' (on - off) / off in %, their median and quartiles."""
    out = {}
    for clock in CLOCKS:
        pairs = [100.0 * (b - a) / a for a, b in zip(off[clock], on[clock], strict=True)]
        low, high = ratio_spread(pairs)
        out[clock] = {"pairs_pct": pairs, "median_pct": statistics.median(pairs), "spread_pct": [low, high],
                      "range_pct": [min(pairs), max(pairs)]}
    return out


def parse_latent(parser: argparse.ArgumentParser, text: str) -> tuple[int, ...]:
    try:
        latent_thw = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        parser.error(f"--latent must be TxHxW latent cells, e.g. 4x32x32; got {text!r}")
    if len(latent_thw) != 3:
        parser.error(f"--latent must be TxHxW latent cells, e.g. 4x32x32; got {text!r}")
    return latent_thw


def ab_runs(model: WanDiT, inputs: dict[str, Any], *, steps: int, repeats: int,
            device: torch.device) -> tuple[dict[str, list[float]], dict[str, list[float]], ProfileSession]:
    """Adjacent off/on pairs (alternating order) on all clocks; every result checked bit-identical."""
    off: dict[str, list[float]] = {clock: [] for clock in CLOCKS}
    on: dict[str, list[float]] = {clock: [] for clock in CLOCKS}
    outputs: list[torch.Tensor] = []
    sessions: list[ProfileSession] = []

    def run_off() -> None:
        outputs.append(denoise(model, inputs, steps))

    def run_on() -> None:
        session = ProfileSession(case_name="bench", device=str(device))
        with session:
            outputs.append(denoise(model, inputs, steps))
        sessions.append(session)

    with torch.inference_mode():
        reference = denoise(model, inputs, steps)  # warm-up
        for pair in range(repeats):
            order = ((run_off, off), (run_on, on)) if pair % 2 == 0 else ((run_on, on), (run_off, off))
            for fn, store in order:
                for clock, value in time_call(fn).items():
                    store[clock].append(value)
                if not torch.equal(outputs.pop(), reference):
                    raise AssertionError("results differ between runs with and without profiling")
    return off, on, sessions[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15, help="A/B pairs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--latent", default="x".join(map(str, LATENT_THW)),
                        help="latent frames x height x width of the denoised clip (larger: longer steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: bench/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    latent_thw = parse_latent(parser, args.latent)
    model, inputs = build(device, latent_thw)
    load_before = load_average()
    off, on, last = ab_runs(model, inputs, steps=args.steps, repeats=args.repeats, device=device)
    overhead = overhead_by_clock(off, on)
    per_stage = stage_cost(str(device))
    per_sample, interval = sample_cost(str(device))
    per_session = open_close_cost(str(device))
    untraced = untraced_stage_cost_s()
    off_cpu = statistics.median(off["process_cpu_s"])
    num_samples = statistics.median(on["wall_s"]) / interval
    model_cpu = (per_session["process_cpu_s"] + 2 * args.steps * per_stage["process_cpu_s"]
                 + num_samples * per_sample["process_cpu_s"])
    model_pct = 100.0 * model_cpu / off_cpu
    judged = overhead["process_cpu_s"]
    rows = [[clock, statistics.median(off[clock]) / args.steps, statistics.median(on[clock]) / args.steps,
             overhead[clock]["median_pct"], "{:.2f} .. {:.2f}".format(*overhead[clock]["spread_pct"])]
            for clock in CLOCKS]
    log.info("%s", format_table(["clock", "off s/step", "on s/step", "overhead % (median of pairs)",
                                 "spread % (quartiles)"], rows))
    log.info("cost model (process CPU): session open+close %.2f ms, stage %.1f us, sample %.1f us every %.2f s"
             " -> %.3f %% of the run", per_session["process_cpu_s"] * 1e3, per_stage["process_cpu_s"] * 1e6,
             per_sample["process_cpu_s"] * 1e6, interval, model_pct)
    log.info("target < 1 %% judged on process CPU time: median %.2f %%, spread %.2f .. %.2f %%",
             judged["median_pct"], *judged["spread_pct"])
    recorded = last.record
    assert recorded is not None
    path = write_result(
        "profiling_overhead",
        {
            "settings": {
                "steps": args.steps, "repeats": args.repeats, "device": str(device),
                "model": {"dim": model.config.dim, "num_layers": model.config.num_layers,
                          "latent_thw": latent_thw, "text_tokens": TEXT_TOKENS},
                "sample_interval_s": recorded.sample_interval_s, "torch_threads": torch.get_num_threads(),
                "on_run_includes": "session construction, open (sampler thread start) and close "
                                   "(thread stop, system facts, record assembly)",
            },
            "clocks_off": off, "clocks_on": on,
            "off_s_per_step": {clock: summarize([v / args.steps for v in off[clock]]) for clock in CLOCKS},
            "on_s_per_step": {clock: summarize([v / args.steps for v in on[clock]]) for clock in CLOCKS},
            "ab_overhead": overhead,
            "load_average_1m": {"before": load_before, "after": load_average(), "cpu_count": os.cpu_count()},
            "cost_model": {"session_open_close_cpu_s": per_session, "stage_cpu_s": per_stage,
                           "sample_cpu_s": per_sample, "samples_per_run": num_samples,
                           "run_process_cpu_s_off": off_cpu, "overhead_pct": model_pct},
            "untraced_stage_cost_us": untraced * 1e6,
            "bit_identical": True,  # every run, on and off, checked with torch.equal against the warm-up run
            "samples_in_last_profiled_run": len(recorded.samples),
            "stages_in_last_profiled_run": len(recorded.stages),
            "target": "overhead < 1 % of the run's process CPU time, session open/close included",
            "judged_on": "process_cpu_s",
            "meets_target": judged["median_pct"] < 1.0,
            "meets_target_across_spread": judged["spread_pct"][1] < 1.0,
            "meets_target_by_cost_model": model_pct < 1.0,
        },
        results_dir=args.results_dir,
    )
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
