"""Measured matmul ceiling: the best dense GEMM throughput this machine reaches with torch.

Model throughput (GFLOP/s of a DiT forward, MFU) is judged against this number, measured on the
same machine in the same run, not against a datasheet. On a GPU the datasheet dense peak is
reported next to it when the device is known (`wanbench.profiling.gpus`).

Run: `python -m bench.bench_matmul [--device cuda] [--dtype bfloat16] [--sizes 1024 2048 4096]`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from wanbench.profiling.gpus import lookup_gpu

from .common import format_table, summarize, time_it, write_result

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class MatmulPoint:
    """One square GEMM size: (n x n) @ (n x n), 2 n^3 FLOPs per call."""

    n: int
    times_s: tuple[float, ...]
    median_s: float
    gflops: float


@dataclass(frozen=True, kw_only=True)
class MatmulCeiling:
    device: str
    dtype: str
    points: tuple[MatmulPoint, ...]

    @property
    def best_gflops(self) -> float:
        return max(p.gflops for p in self.points)

    def to_dict(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "best_gflops": self.best_gflops,
                "points": [asdict(p) for p in self.points]}


def dense_peak_tflops(device_name: str, dtype: str) -> float | None:
    """Datasheet dense bf16/fp16 peak of a GPU (`profiling.gpus`), or None if unknown or another dtype."""
    spec = lookup_gpu(device_name)
    if spec is None or dtype not in ("bfloat16", "float16"):
        return None
    return spec.dense_bf16_tflops


def measure_matmul_ceiling(*, device: str = "cpu", dtype: str = "float32",
                           sizes: Sequence[int] = (512, 1024, 2048), repeats: int = 5,
                           warmup: int = 2) -> MatmulCeiling:
    """Time square matmuls of each size and return GFLOP/s per size (median over `repeats`).

    Shapes: a (n, n) @ b (n, n) -> (n, n), for each n in `sizes`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    if not sizes:
        raise ValueError("sizes must name at least one matrix size, e.g. (1024, 2048)")
    torch_dtype = DTYPES[dtype]
    gen = torch.Generator(device="cpu").manual_seed(0)
    points = []
    for n in sizes:
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=torch_dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=torch_dtype)
        out = torch.empty(n, n, device=device, dtype=torch_dtype)
        times = time_it(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), repeats=repeats, warmup=warmup)
        med = summarize(times)["median_s"]
        points.append(MatmulPoint(n=n, times_s=tuple(times), median_s=med, gflops=2.0 * n**3 / med / 1e9))
        del a, b, out
    return MatmulCeiling(device=device, dtype=dtype, points=tuple(points))


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="square sizes; default 1024 2048 4096 on CPU, 4096 8192 16384 on CUDA")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="bench_matmul", help="results file name (without .json)")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: bench/results")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    on_cuda = args.device.startswith("cuda")
    dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    sizes = args.sizes or ((4096, 8192, 16384) if on_cuda else (1024, 2048, 4096))
    ceiling = measure_matmul_ceiling(device=args.device, dtype=dtype, sizes=sizes, repeats=args.repeats)
    peak = dense_peak_tflops(torch.cuda.get_device_name(0), dtype) if on_cuda else None
    rows = [(p.n, dtype, p.median_s * 1e3, p.gflops) for p in ceiling.points]
    table = format_table(["n", "dtype", "median ms", "GFLOP/s"], rows)
    log.info("matmul ceiling on %s", args.device)
    print(table)  # noqa: T201 - benchmark scripts print their table
    print(f"best: {ceiling.best_gflops:.1f} GFLOP/s"  # noqa: T201
          + (f" = {ceiling.best_gflops / 1e3 / peak:.1%} of the {peak:.0f} TFLOP/s datasheet peak"
             if peak else ""))
    payload = {"settings": {"device": args.device, "dtype": dtype, "sizes": list(sizes),
                            "repeats": args.repeats},
               "ceiling": ceiling.to_dict(), "datasheet_peak_tflops": peak, "table": table}
    path = write_result(args.name, payload, results_dir=args.results_dir)
    print(f"wrote {path}")  # noqa: T201
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
