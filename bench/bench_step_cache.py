"""Cost and effect of step caching: the decision's own time, and a sampler run with and without it.

Two questions (docs/performance.md):

1. What does deciding cost per step? TeaCache runs the expert's time MLP (`embed_time`) on the
   distinct timesteps of the step and compares with the previous step; MagCache only multiplies
   calibrated ratios. Timed at a real expert's width (`--task`: the time embedding and projection
   of T2V-A14B or TI2V-5B, with TI2V-5B's per-token timesteps over a 1280x704x121 latent) next to
   the analytic FLOPs of one real step, whose time on a GPU is at least FLOPs / peak.
2. What does a cached run do? The sampler on a small DiT, interleaved: no cache; TeaCache at
   threshold 0 (every step computed: the pure overhead of the wrapper); MagCache at a threshold
   large enough to reuse the most `max_skip` allows. The last variant is faster because it does
   less work (reused steps run no transformer); its deviation from the uncached latent is reported.

    .venv/bin/python -m bench.bench_step_cache [--task t2v-A14B] [--dim 256] [--layers 4] [--steps 10] ...

Prints one table and writes `bench/results/bench_step_cache.json` (or `--name`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from wanbench.wan_core.config import STEP_CACHE_FACT, STEP_REUSED, preset
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.runtime.step_cache import StepCacheSettings, relative_change, time_signal
from wanbench.wan_core.sampler import SamplerOptions, sample
from wanbench.wan_core.trace import use_tracer

from bench.common import format_table, load_average, summarize, wall_and_cpu, write_result

log = logging.getLogger(__name__)

RESULT_NAME = "bench_step_cache"
VARIANTS = {
    "off": None,
    "teacache_threshold_0": StepCacheSettings(mode="teacache", threshold=0.0, warmup_steps=1, max_skip=2),
    "magcache_max_reuse": StepCacheSettings(mode="magcache", threshold=1e9, warmup_steps=1, max_skip=2),
}


class _TimeMlp(nn.Module):
    """The time embedding and projection of a real expert (all `embed_time` reads), nothing else."""

    def __init__(self, task_name: str) -> None:
        super().__init__()
        cfg = preset(task_name).dit
        self.dit = WanDiT(replace(cfg, num_layers=0), device="meta")
        self.dit.time_embedding.to_empty(device="cpu")
        self.dit.time_projection.to_empty(device="cpu")
        for p in [*self.dit.time_embedding.parameters(), *self.dit.time_projection.parameters()]:
            nn.init.normal_(p, std=p.shape[-1] ** -0.5)
        self.config = cfg

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dit.embed_time(t)


def decision_cost(task_name: str, repeats: int) -> dict[str, Any]:
    """TeaCache's decision at a real expert's width: one time signal and one relative change."""
    task = preset(task_name)
    mlp = _TimeMlp(task_name)
    width, height = task.default_size
    _, t_frames, h, w = task.latent_shape(width, height, task.frame_num)
    tokens = task.dit.num_tokens((t_frames, h, w))
    if task.dit.model_type == "ti2v":  # frame-0 tokens at t = 0 (a start image), the rest at t
        first = tokens // t_frames

        def t_of(value: float) -> torch.Tensor:
            return torch.cat((torch.zeros(first), torch.full((tokens - first,), value)))[None]
    else:
        def t_of(value: float) -> torch.Tensor:
            return torch.tensor([value])

    previous = time_signal(mlp, t_of(999.0), "e0")

    def decide() -> None:
        relative_change(time_signal(mlp, t_of(972.0), "e0"), previous)

    for _ in range(2):
        decide()
    times = [wall_and_cpu(decide) for _ in range(repeats)]
    flops_step = task.dit.flops_forward(tokens, batch=2, per_token_time=task.dit.model_type == "ti2v")
    return {"task": task_name, "tokens": tokens, "wall_s": [t[0] for t in times], "cpu_s": [t[1] for t in times],
            "flops_real_step": flops_step,
            "time_mlp_params": sum(p.numel() for m in (mlp.dit.time_embedding, mlp.dit.time_projection)
                                   for p in m.parameters())}


def cached_runs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler on a small TI2V-shaped DiT with each variant, interleaved."""
    base = preset("ti2v-5B", tiny=True)
    cfg = replace(base.dit, dim=args.dim, ffn_dim=4 * args.dim, num_heads=max(1, args.dim // 64),
                  num_layers=args.layers)
    task = replace(base, dit=cfg)
    torch.manual_seed(0)
    model = WanDiT(cfg).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    context = torch.randn(16, cfg.text_dim, generator=g)
    context_null = torch.randn(16, cfg.text_dim, generator=g)
    opts = SamplerOptions.from_config(task.sampler, steps=args.steps, seed=3)
    shape = (cfg.out_dim, args.latent[0], args.latent[1], args.latent[2])
    outputs: dict[str, torch.Tensor] = {}
    computed: dict[str, int] = {}

    def run(name: str) -> Callable[[], None]:
        def call() -> None:
            outputs[name] = sample([model], task, opts, context=context, context_null=context_null,
                                   latent_shape=shape, step_cache=VARIANTS[name])
        return call

    for name in VARIANTS:  # the warm-up run, traced: which steps ran the model
        counter = _StepCounter()
        with use_tracer(counter):
            run(name)()
        computed[name] = counter.computed

    raw: dict[str, dict[str, list[float]]] = {k: {"wall_s": [], "cpu_s": []} for k in VARIANTS}
    for _ in range(args.repeats):
        for name in VARIANTS:
            wall, cpu = wall_and_cpu(run(name))
            raw[name]["wall_s"].append(wall)
            raw[name]["cpu_s"].append(cpu)
    reference = outputs["off"].double()
    deviation = {name: float((out.double() - reference).norm() / reference.norm()) for name, out in outputs.items()}
    return {"config": {"dim": cfg.dim, "layers": cfg.num_layers, "steps": args.steps, "latent": list(shape),
                       "tokens": cfg.num_tokens(shape[1:])},
            "raw": raw, "latent_rel_l2": deviation, "computed_steps": computed}


class _StepCounter:
    """A tracer that counts the inference steps that ran the model (not reused from the cache)."""

    def __init__(self) -> None:
        self.computed = 0

    def stage(self, name: str, kind: str, facts: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
        if kind == "step-inference" and facts.get(STEP_CACHE_FACT) != STEP_REUSED:
            self.computed += 1
        return contextlib.nullcontext()

    def event(self, name: str, facts: dict[str, Any]) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="t2v-A14B", choices=["t2v-A14B", "i2v-A14B", "ti2v-5B"])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--latent", type=int, nargs=3, default=(3, 16, 16), metavar=("T", "H", "W"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default=RESULT_NAME)
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.no_grad():
        decision = decision_cost(args.task, args.repeats)
        runs = cached_runs(args)
    summary = {"decision": {clock: summarize(decision[clock]) for clock in ("wall_s", "cpu_s")},
               "runs": {name: {clock: summarize(runs["raw"][name][clock]) for clock in ("wall_s", "cpu_s")}
                        for name in VARIANTS}}
    off = summary["runs"]["off"]["wall_s"]["median_s"]
    rows = [[name, s["wall_s"]["median_s"], s["wall_s"]["iqr_s"], s["cpu_s"]["median_s"],
             f"{off / s['wall_s']['median_s']:.2f}x", runs["computed_steps"][name],
             f"{runs['latent_rel_l2'][name]:.2e}"]
            for name, s in summary["runs"].items()]
    log.info("\n%s", format_table(["variant", "wall s", "IQR", "CPU s", "speed-up", "computed steps",
                                   "latent rel L2 vs off"], rows))
    d = summary["decision"]["wall_s"]
    log.info("teacache decision at %s width (%d tokens, %.0fM time-MLP parameters, CPU float32): median %.4f s; "
             "one real step is %.3g FLOPs (%.2f s at 989 TFLOP/s, an H100's dense bf16 peak)", args.task,
             decision["tokens"], decision["time_mlp_params"] / 1e6, d["median_s"], decision["flops_real_step"],
             decision["flops_real_step"] / 989.4e12)
    payload = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "decision": decision, "runs": runs, "summary": summary, "load_average": load_average()}
    write_result(args.name, payload, results_dir=args.results_dir)
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
