"""Run every benchmark, each in its own process, and summarise what ran and what it wrote.

Each benchmark prints its own table and writes its own `bench/results/<name>.json`; this runner
records per benchmark the exit status, the wall time and the results files it wrote, and
writes `bench/results/run_all.json`. A benchmark whose script is missing or fails is reported as
such (status and the tail of its output), never dropped from the summary.

On a machine with CUDA the GPU benchmark runs at real size; otherwise its `--tiny` CPU twin runs.

Run: `python -m bench.run_all [--quick] [--only bench_dit bench_t5 ...]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .common import RESULTS_DIR, format_table, write_result

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, kw_only=True)
class Bench:
    """One benchmark script: its module, arguments for a full and a quick run, and whether it
    accepts `--results-dir` (benchmarks without it always write to bench/results)."""

    module: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ()
    takes_results_dir: bool = False
    gpu_args: tuple[str, ...] | None = None  # replaces `args` when CUDA is present


def benches(*, has_cuda: bool) -> list[Bench]:
    return [
        Bench(module="bench_matmul", quick_args=("--sizes", "512", "1024", "--repeats", "3"),
              takes_results_dir=True),
        Bench(module="bench_dit", args=("--threads", "1", "--profile", "mid", "--breakdown", "mid"),
              quick_args=("--cases", "small", "--repeats", "3"), takes_results_dir=True,
              gpu_args=("--device", "cuda", "--dtype", "bfloat16", "--profile", "mid")),
        Bench(module="bench_dit_block", args=("--threads", "1"), quick_args=("--case", "small", "--runs", "1"),
              takes_results_dir=True),
        Bench(module="bench_t5", args=("--threads", "1"), quick_args=("--cases", "small", "--repeats", "3"),
              takes_results_dir=True),
        Bench(module="bench_vae", args=("--threads", "1"),
              quick_args=("--sizes", "32x32x5", "--sweep-frame-size", "64x64x1", "--tiles", "4", "--repeats", "2",
                          "--no-memory"), takes_results_dir=True),
        Bench(module="bench_sampler", quick_args=("--dim", "128", "--layers", "2", "--repeats", "2")),
        Bench(module="bench_profiling", args=("--threads", "1"), quick_args=("--repeats", "3", "--latent", "2x16x16"),
              takes_results_dir=True),
        Bench(module="bench_compile", quick_args=("--case", "tiny", "--repeats", "3"),
              takes_results_dir=True),
        Bench(module="bench_weights", args=("--threads", "1"),
              quick_args=("--dim", "256", "--layers", "1", "--text-dim", "64", "--latent", "2", "8", "8",
                          "--repeats", "2"), takes_results_dir=True,
              gpu_args=("--device", "cuda", "--dim", "5120", "--layers", "2", "--latent", "21", "60", "104")),
        Bench(module="bench_lora", quick_args=("--dim", "128", "--ffn-dim", "256", "--tokens", "64", "--repeats", "3"),
              takes_results_dir=True,
              gpu_args=("--device", "cuda", "--dtype", "bfloat16", "--real-size", "--tokens", "32760")),
        Bench(module="bench_step_cache", args=("--threads", "1"),
              quick_args=("--dim", "64", "--layers", "1", "--steps", "6", "--repeats", "2"), takes_results_dir=True),
        Bench(module="bench_gpu", args=() if has_cuda else ("--tiny",),
              quick_args=("--max-steps", "2", "--repeats", "2") + (() if has_cuda else ("--tiny",)),
              takes_results_dir=True),
    ]


def _exists(module: str) -> bool:
    return importlib.util.find_spec(f"bench.{module}") is not None


def run_bench(bench: Bench, *, quick: bool, results_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Run one benchmark in a subprocess; returns its status, wall time and results files."""
    if not _exists(bench.module):
        return {"module": bench.module, "status": "missing", "wall_s": None, "files": [],
                "detail": f"bench/{bench.module}.py does not exist in this checkout"}
    args = list(bench.quick_args if quick else (bench.gpu_args if bench.gpu_args is not None
                                                  and torch.cuda.is_available() else bench.args))
    if bench.takes_results_dir:
        args += ["--results-dir", str(results_dir)]
    watched = {results_dir, RESULTS_DIR}
    before = {p: p.stat().st_mtime for d in watched if d.is_dir() for p in d.glob("*.json")}
    cmd = [sys.executable, "-m", f"bench.{bench.module}", *args]
    log.info("running %s", " ".join(cmd[2:]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired as exc:
        return {"module": bench.module, "status": "timeout", "wall_s": time.perf_counter() - t0, "files": [],
                "args": args, "detail": f"no result within {timeout_s:.0f} s",
                "output_tail": (exc.stdout or "")[-2000:] if isinstance(exc.stdout, str) else ""}
    wall = time.perf_counter() - t0
    written = sorted(str(p) for d in watched if d.is_dir() for p in d.glob("*.json")
                     if p.name != "run_all.json" and before.get(p) != p.stat().st_mtime)
    output = proc.stdout + proc.stderr
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    return {"module": bench.module, "status": status,
            "wall_s": wall, "args": args, "files": written, "output_tail": output[-3000:]}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    has_cuda = torch.cuda.is_available()
    known = [b.module for b in benches(has_cuda=has_cuda)]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats (minutes, not tens)")
    parser.add_argument("--only", nargs="+", default=None, choices=known)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per benchmark")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: bench/results")
    args = parser.parse_args(argv)
    results_dir = args.results_dir or RESULTS_DIR
    results_dir.mkdir(parents=True, exist_ok=True)
    selected = [b for b in benches(has_cuda=has_cuda) if args.only is None or b.module in args.only]
    runs = [run_bench(b, quick=args.quick, results_dir=results_dir, timeout_s=args.timeout) for b in selected]
    for run in runs:
        if run["status"] == "ok":
            print(run["output_tail"].strip().split("wrote ")[0].strip()[-4000:] + "\n")  # noqa: T201
    table = format_table(["benchmark", "status", "wall s", "results"],
                         [(r["module"], r["status"], r["wall_s"],
                           ", ".join(Path(f).name for f in r["files"]) or "-") for r in runs])
    print(table)  # noqa: T201 - benchmark scripts print their table
    payload = {"settings": {"quick": args.quick, "only": args.only, "cuda": has_cuda}, "runs": runs,
               "table": table}
    path = write_result("run_all", payload, results_dir=results_dir)
    print(f"wrote {path}")  # noqa: T201
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
