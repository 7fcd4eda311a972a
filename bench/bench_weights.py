"""Weight formats side by side: load time, resident memory, forward time and output deviation.

One random DiT (trained-like scales, `bench_dit.random_init_`) is written once per file format and
loaded with each storage choice of the loader (`config.WEIGHT_STORAGES`):

| format | file | storage | what the blocks hold |
| --- | --- | --- | --- |
| bf16 | bf16 safetensors | default | bf16 |
| fp8-resident | fp8-scaled safetensors (ComfyUI layout) | as_stored | fp8 + scale, decoded per block |
| fp8-matmul | the same fp8 file | fp8_e4m3fn_scaled_mm | fp8, multiplied as fp8 (`_scaled_mm`) |
| gguf-Q8_0 | GGUF Q8_0 | default (kept quantised) | Q8_0 blocks, decoded per block |
| gguf-Q4_K_M | GGUF Q4_K_M (v and ffn.2 in Q6_K) | default | Q4_K / Q6_K blocks, decoded per block |

Loads and forwards are timed interleaved (format after format, repeated), each with wall time and
the process's CPU time (all threads), and reported as median and IQR. The deviation is the relative
L2 difference of each format's output from the bf16 output on the same inputs (bf16's own deviation
from a float32 model is given for scale). Resident memory is the bytes the loaded model holds
(`runtime.compact.resident_bytes`: compact weights at their stored size). The machine's 1-minute
load average before and after is recorded: on a shared machine the times are noisy, the memory and
deviation figures are exact. On a CPU the decode per block is extra work and fp8 matmul runs
torch's CPU `_scaled_mm` (slow); their speed is a GPU measurement (`--device cuda`).

Run: `python -m bench.bench_weights [--dim 1024 --layers 2 --latent 4 32 32] [--repeats 5]`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from wanbench.wan_core.checkpoints.dit import load_dit, save_dit
from wanbench.wan_core.config import DiTConfig
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.runtime.compact import resident_bytes

from .bench_dit import random_init_
from .common import format_table, load_average, synchronize, write_result

log = logging.getLogger(__name__)

# format name -> (file kind, storage)
FORMATS: dict[str, tuple[str, str]] = {
    "bf16": ("bf16", "default"),
    "fp8-resident": ("fp8", "as_stored"),
    "fp8-matmul": ("fp8", "fp8_e4m3fn_scaled_mm"),
    "gguf-Q8_0": ("Q8_0", "default"),
    "gguf-Q4_K_M": ("Q4_K_M", "default"),
}


def write_files(model: WanDiT, folder: Path, kinds: Sequence[str]) -> dict[str, Path]:
    files = {}
    for kind in dict.fromkeys(kinds):
        if kind == "bf16":
            files[kind] = save_dit(model, folder / "dit_bf16.safetensors", dtype=torch.bfloat16)
        elif kind == "fp8":
            files[kind] = save_dit(model, folder / "dit_fp8_scaled.safetensors", dtype=torch.bfloat16,
                                   fp8_scaled=True)
        else:
            files[kind] = save_dit(model, folder / f"dit_{kind}.gguf", layout="gguf", gguf_type=kind)
    return files


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    """(result, wall seconds, process CPU seconds) of one call between device synchronisations."""
    synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def spread(values: Sequence[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else None
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "iqr": None if quartiles is None else quartiles[2] - quartiles[0]}


def relative_deviation(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.float() - reference.float()).norm() / reference.float().norm())


def run(config: DiTConfig, latent_thw: tuple[int, int, int], *, formats: Sequence[str], device: str,
        repeats: int, batch: int = 2) -> dict[str, Any]:
    dev = torch.device(device)
    model = random_init_(WanDiT(config).eval(), seed=0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_dim, *latent_thw, generator=gen).to(dev)
    t = torch.full((batch,), 700.0, device=dev)
    ctx = [torch.randn(64, config.text_dim, generator=gen).to(dev) for _ in range(batch)]
    with torch.inference_mode():
        fp32_out = model.to(dev)(x, t, ctx)
    results: dict[str, dict[str, Any]] = {name: {"load_wall_s": [], "load_cpu_s": [], "forward_wall_s": [],
                                                 "forward_cpu_s": []} for name in formats}
    with tempfile.TemporaryDirectory() as folder:
        files = write_files(model.cpu(), Path(folder), [FORMATS[name][0] for name in formats])
        models: dict[str, WanDiT] = {}
        for _ in range(repeats):  # loads, interleaved; the last load of each format is kept
            for name in formats:
                kind, storage = FORMATS[name]
                models.pop(name, None)
                loaded, wall, cpu = timed(lambda k=kind, s=storage: load_dit(
                    files[k], device=dev, dtype=torch.bfloat16, storage=s), dev)
                models[name] = loaded
                results[name]["load_wall_s"].append(wall)
                results[name]["load_cpu_s"].append(cpu)
        for name in formats:
            results[name]["file_bytes"] = files[FORMATS[name][0]].stat().st_size
            results[name]["resident_bytes"] = resident_bytes(models[name])
        outputs = {}
        with torch.inference_mode():
            for name in formats:  # warm-up, and the output compared below
                outputs[name] = models[name](x, t, ctx)
            for _ in range(repeats):
                for name in formats:
                    _, wall, cpu = timed(lambda n=name: models[n](x, t, ctx), dev)
                    results[name]["forward_wall_s"].append(wall)
                    results[name]["forward_cpu_s"].append(cpu)
    reference = outputs.get("bf16", fp32_out)
    for name in formats:
        results[name]["deviation_vs_bf16"] = relative_deviation(outputs[name], reference)
        results[name]["deviation_vs_fp32"] = relative_deviation(outputs[name], fp32_out)
        for key in ("load_wall_s", "load_cpu_s", "forward_wall_s", "forward_cpu_s"):
            results[name][key.replace("_s", "")] = spread(results[name][key])
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    def ms(figure: dict[str, float | None]) -> str:
        iqr = figure["iqr"]
        return f"{figure['median'] * 1e3:.1f}" + ("" if iqr is None else f" ± {iqr * 1e3:.1f}")

    rows = []
    for name, r in results.items():
        rows.append([name, f"{r['file_bytes'] / 1e6:.1f}", f"{r['resident_bytes'] / 1e6:.1f}",
                     ms(r["load_wall"]), ms(r["load_cpu"]), ms(r["forward_wall"]), ms(r["forward_cpu"]),
                     f"{r['deviation_vs_bf16']:.2e}", f"{r['deviation_vs_fp32']:.2e}"])
    headers = ["format", "file MB", "resident MB", "load wall ms (median ± IQR)", "load CPU ms",
               "forward wall ms", "forward CPU ms", "rel. dev. vs bf16", "rel. dev. vs fp32"]
    return format_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--dim", type=int, default=1024, help="model width (a multiple of 256 for K-quants)")
    parser.add_argument("--ffn", type=int, default=None, help="FFN width (default 4 x dim)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--text-dim", type=int, default=4096)
    parser.add_argument("--latent", type=int, nargs=3, default=(4, 32, 32), metavar=("T", "H", "W"))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default="bench_weights")
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dim % 128:
        parser.error(f"--dim must be a multiple of 128 (head dim 128); got {args.dim}")
    config = DiTConfig(model_type="t2v", in_dim=16, out_dim=16, dim=args.dim, ffn_dim=args.ffn or 4 * args.dim,
                       num_heads=args.dim // 128, num_layers=args.layers, text_dim=args.text_dim)
    load_before = load_average()
    results = run(config, tuple(args.latent), formats=args.formats, device=args.device, repeats=args.repeats)
    load_after = load_average()
    settings = {"dim": args.dim, "ffn_dim": config.ffn_dim, "layers": args.layers, "text_dim": args.text_dim,
                "latent_thw": list(args.latent), "tokens": config.num_tokens(tuple(args.latent)), "batch": 2,
                "compute_dtype": "bfloat16", "device": args.device, "repeats": args.repeats,
                "flops_per_forward": config.flops_forward(config.num_tokens(tuple(args.latent)), batch=2),
                "params": config.num_params(), "torch_threads": torch.get_num_threads()}
    text = table(results)
    print(text)  # noqa: T201 - the benchmark's table
    path = write_result(args.name, {"settings": settings, "load_average_before": load_before,
                                    "load_average_after": load_after, "results": results, "table": text},
                        results_dir=args.results_dir)
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
