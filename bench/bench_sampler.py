"""Step time of the sampler: batched vs sequential CFG, and each weight placement.

Runs a small random-weight two-expert t2v DiT (CPU-feasible by default) through `sample()` and
reports the median time per denoising step after a warm-up, all variants interleaved. Prints one
table and writes `bench/results/sampler_cfg_placement.json`.

    .venv/bin/python -m bench.bench_sampler [--device cuda] [--dim 256] [--layers 4] [--threads 1] ...

On a CPU every placement moves nothing (the offload device is the compute device), so the placement
rows there measure only the cost of the policy's bookkeeping and hooks; transfers show on CUDA.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import replace

import torch
from wanbench.wan_core.config import DiTConfig, GuideScale, preset
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.sampler import SamplerOptions, make_noise, sample

from bench.common import format_table, interleaved, summarize, write_result

log = logging.getLogger(__name__)

RESULT_NAME = "sampler_cfg_placement"


def build_case(args: argparse.Namespace) -> tuple[list[WanDiT], object, dict, DiTConfig]:
    base = preset("t2v-A14B", tiny=True)
    dit = replace(base.dit, dim=args.dim, ffn_dim=2 * args.dim, num_heads=args.dim // 64,
                  num_layers=args.layers, text_len=args.text_len)
    task = replace(base, dit=dit)
    torch.manual_seed(0)
    experts = [WanDiT(dit).eval(), WanDiT(dit).eval()]
    g = torch.Generator().manual_seed(1)
    inputs = {
        "context": torch.randn(args.text_len // 2, dit.text_dim, generator=g),
        "context_null": torch.randn(args.text_len, dit.text_dim, generator=g),
        "noise": make_noise((dit.out_dim, args.frames, args.height, args.width), 2),
    }
    return experts, task, inputs, dit


def variants(args: argparse.Namespace) -> dict[str, SamplerOptions]:
    # shift 12 with 4 steps: steps 0-2 high-noise, step 3 low-noise, so "model" placement swaps once
    base = SamplerOptions(steps=args.steps, shift=12.0, guide_scale=GuideScale(high=4.0, low=3.0), boundary=0.875)
    out = {
        "cfg=batched placement=none": base,
        "cfg=sequential placement=none": replace(base, cfg_mode="sequential"),
        "cfg=batched placement=model": replace(base, placement="model"),
        "cfg=batched placement=blocks(0 resident)": replace(base, placement="blocks", num_resident_blocks=0),
        f"cfg=batched placement=blocks({args.layers // 2} resident)":
            replace(base, placement="blocks", num_resident_blocks=args.layers // 2),
    }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--frames", type=int, default=4, help="latent frames")
    parser.add_argument("--height", type=int, default=32, help="latent height")
    parser.add_argument("--width", type=int, default=32, help="latent width")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    experts, task, inputs, dit = build_case(args)
    device = torch.device(args.device)
    num_tokens = dit.num_tokens((args.frames, args.height, args.width))
    runs: dict[str, Callable[[], object]] = {
        name: (lambda opts=opts: sample(experts, task, opts, device=device, **inputs))
        for name, opts in variants(args).items()
    }
    load_before = os.getloadavg()
    times = interleaved(runs, repeats=args.repeats, warmup=args.warmup)
    load_after = os.getloadavg()
    rows, figures = [], {}
    for name, samples in times.items():
        per_step = [t / args.steps for t in samples]
        stats = summarize(per_step)
        figures[name] = {"per_step_s": per_step, **stats}
        rows.append([name, stats["median_s"] * 1e3, stats["min_s"] * 1e3, stats["max_s"] * 1e3])
    reference = figures["cfg=batched placement=none"]["median_s"]
    for row in rows:
        row.append(row[1] / 1e3 / reference)
    table = format_table(["variant", "median ms/step", "min ms/step", "max ms/step", "vs batched/none"], rows)
    log.info("%s", table)
    flops_step = dit.flops_forward(num_tokens, batch=2)
    settings = {
        "device": str(device), "dit": {"dim": dit.dim, "ffn_dim": dit.ffn_dim, "num_heads": dit.num_heads,
                                       "num_layers": dit.num_layers, "text_len": dit.text_len},
        "latent_shape": [dit.out_dim, args.frames, args.height, args.width], "num_tokens": num_tokens,
        "context_lens": [inputs["context"].shape[0], inputs["context_null"].shape[0]],
        "steps_per_run": args.steps, "repeats": args.repeats, "warmup_runs": args.warmup,
        "solver": "unipc", "shift": 12.0, "boundary": 0.875, "flops_per_step_cfg": flops_step,
        "timing": "wall time of one sample() call divided by its steps, variants interleaved",
        "torch_threads": torch.get_num_threads(),
        "load_average_before_after": [list(load_before), list(load_after)],
    }
    path = write_result(RESULT_NAME, {"settings": settings, "figures": figures, "table": table})
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
