"""Per-operator profile of one `WanDiT` block next to the matmul ceiling: where the remaining time goes.

One transformer block of ours (block 0 of a `bench_dit` case, on its real inputs: float32 residual
stream, time modulation, the embedded 512-row context compacted as the forward compacts it, RoPE
tables) runs under `torch.profiler` (CPU) for `--runs` warm calls. Every operator's self time is
grouped by name and input shapes; matrix products (addmm, mm, bmm, and the fused CPU attention
kernel) get their FLOPs from the recorded shapes, their achieved GFLOP/s and the time they would
take at the matmul ceiling measured in the same run (`bench_matmul`, square GEMMs). Everything
else (norms, RoPE, modulation, copies) does no matmul work: all of its time is gap. The summary
sets the block's time against its FLOPs at the ceiling, so the gap is visible op by op.

Run: `python -m bench.bench_dit_block [--case mid] [--runs 3] [--threads 1]`.
Writes bench/results/<name>.json (default dit_block_profile).
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from wanbench.wan_core.attention import resolve_backend_for
from wanbench.wan_core.dit import compact_text_keys

from .bench_dit import CPU_CASES, TINY_CASES, DiTCase, build_wan_dit, make_inputs
from .bench_matmul import measure_matmul_ceiling
from .common import format_table, load_average, write_result

log = logging.getLogger(__name__)


def matmul_flops(op: str, shapes: Sequence[Sequence[int]]) -> float | None:
    """FLOPs of one call of a matrix-product op from its input shapes; None for other ops."""
    try:
        if op == "aten::addmm":  # (bias, (M, K), (K, N))
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2.0 * m * k * n
        if op == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2.0 * m * k * n
        if op in ("aten::bmm", "aten::baddbmm"):
            a, b = (shapes[0], shapes[1]) if op == "aten::bmm" else (shapes[1], shapes[2])
            return 2.0 * a[0] * a[1] * a[2] * b[2]
        if op == "aten::_scaled_dot_product_flash_attention_for_cpu":  # q (B, N, Lq, Dh), k (B, N, Lk, Dh)
            q, k = shapes[0], shapes[1]
            return 4.0 * q[0] * q[1] * q[2] * k[2] * q[3]  # q k^T and p v
    except (IndexError, TypeError, ValueError):
        return None
    return None


def block_call(case: DiTCase, *, device: str, dtype: torch.dtype) -> tuple[Any, float]:
    """(a no-argument call of block 0 on its real inputs, the block's executed FLOPs)."""
    model = build_wan_dit(case.config(), device=device, dtype=dtype)
    inputs = make_inputs(case, device=device, dtype=dtype)
    cfg = model.config
    with torch.inference_mode():
        patches = model.patch_embedding(inputs["x"])
        grid = tuple(patches.shape[2:])
        tokens = patches.flatten(2).transpose(1, 2).float().contiguous()  # (B, L, D) float32 residual
        _, e0 = model.embed_time(inputs["t"][:, None])
        ctx, rows = model._embed_text(inputs["context"], None)
        ctx, bias = ctx.to(dtype), None
        backend = resolve_backend_for(model.attention_backend, device=tokens.device, dtype=dtype,
                                      num_heads=cfg.num_heads, head_dim=cfg.head_dim)
        if dtype == torch.float32 and backend.key_bias_fn is not None:
            ctx, bias = compact_text_keys(ctx, rows)  # as WanDiT.forward does
        rope = model.rope.tables(grid, tokens.device)
    block = model.blocks[0]

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return block(tokens.clone(), e0, ctx, rope, backend, context_bias=bias)

    L, D, Fd, S = tokens.shape[1], cfg.dim, cfg.ffn_dim, ctx.shape[1]
    flops = case.batch * (12 * L * D * D + 4 * S * D * D + 4 * L * L * D + 4 * L * S * D + 4 * L * D * Fd)
    return run, float(flops)


def profile_block(run: Any, runs: int) -> list[dict[str, Any]]:
    """Self CPU time per (op, input shapes) per block call, averaged over `runs` profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    run()  # warm-up
    totals: dict[tuple[str, str], dict[str, Any]] = {}
    for _ in range(runs):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            run()
        for e in prof.key_averages(group_by_input_shape=True):
            entry = totals.setdefault((e.key, str(e.input_shapes)),
                                      {"op": e.key, "shapes": e.input_shapes, "calls": 0.0, "self_s": 0.0})
            entry["calls"] += e.count / runs
            entry["self_s"] += e.self_cpu_time_total / 1e6 / runs
    return [e for e in totals.values() if e["self_s"] > 0]


def summarize_ops(groups: list[dict[str, Any]], ceiling_gflops: float) -> list[dict[str, Any]]:
    """Per op name: calls, self time, matmul FLOPs, achieved GFLOP/s, time at the ceiling, gap."""
    by_op: dict[str, dict[str, Any]] = {}
    for g in groups:
        per_call = matmul_flops(g["op"], g["shapes"])
        entry = by_op.setdefault(g["op"], {"op": g["op"], "calls": 0.0, "self_s": 0.0, "flops": 0.0,
                                          "is_matmul": per_call is not None})
        entry["calls"] += g["calls"]
        entry["self_s"] += g["self_s"]
        if per_call is not None:
            entry["flops"] += per_call * g["calls"]
    total = sum(e["self_s"] for e in by_op.values())
    out = []
    for e in sorted(by_op.values(), key=lambda e: e["self_s"], reverse=True):
        at_ceiling = e["flops"] / (ceiling_gflops * 1e9)
        out.append({**e, "share": e["self_s"] / total if total else None,
                    "gflops": e["flops"] / e["self_s"] / 1e9 if e["is_matmul"] and e["self_s"] else None,
                    "of_ceiling": (e["flops"] / e["self_s"] / 1e9 / ceiling_gflops)
                    if e["is_matmul"] and e["self_s"] else None,
                    "at_ceiling_s": at_ceiling, "gap_s": e["self_s"] - at_ceiling})
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    all_cases = {**CPU_CASES, **TINY_CASES}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="mid", choices=sorted(all_cases))
    parser.add_argument("--runs", type=int, default=3, help="profiled block calls (after one warm-up)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--ceiling-sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--rows", type=int, default=15, help="operators in the printed table")
    parser.add_argument("--name", default="dit_block_profile", help="results file name (without .json)")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: bench/results")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    load_before = load_average()
    ceiling = measure_matmul_ceiling(device="cpu", dtype=args.dtype, sizes=args.ceiling_sizes, repeats=3)
    case = all_cases[args.case]
    run, block_flops = block_call(case, device="cpu", dtype=dtype)
    ops = summarize_ops(profile_block(run, args.runs), ceiling.best_gflops)
    measured = sum(e["self_s"] for e in ops)
    ideal = block_flops / (ceiling.best_gflops * 1e9)
    matmul_s = sum(e["self_s"] for e in ops if e["is_matmul"])
    summary = {
        "block_self_s": measured, "block_flops": block_flops, "block_gflops": block_flops / measured / 1e9,
        "ceiling_gflops": ceiling.best_gflops, "at_ceiling_s": ideal, "of_ceiling": ideal / measured,
        "gap_s": measured - ideal, "matmul_s": matmul_s, "matmul_share": matmul_s / measured,
        "matmul_gap_s": sum(e["gap_s"] for e in ops if e["is_matmul"]),
        "other_ops_s": measured - matmul_s,
        "profiled_flops_vs_analytic": sum(e["flops"] for e in ops) / block_flops,
    }
    rows = [(e["op"], round(e["calls"], 2), e["self_s"] * 1e3, e["share"], e["gflops"], e["of_ceiling"],
             e["at_ceiling_s"] * 1e3, e["gap_s"] * 1e3, e["gap_s"] / summary["gap_s"] if summary["gap_s"] else None)
            for e in ops[: args.rows]]
    table = format_table(["op", "calls", "self ms", "share", "GFLOP/s", "of ceiling", "at ceiling ms",
                          "gap ms", "share of gap"], rows)
    print(table)  # noqa: T201 - benchmark scripts print their table
    print(f"block 0 of {args.case}: {measured * 1e3:.1f} ms, {block_flops / 1e9:.2f} GFLOP -> "  # noqa: T201
          f"{summary['block_gflops']:.1f} GFLOP/s = {summary['of_ceiling']:.0%} of the {ceiling.best_gflops:.1f} "
          f"GFLOP/s ceiling; at the ceiling {ideal * 1e3:.1f} ms, gap {summary['gap_s'] * 1e3:.1f} ms "
          f"(matmuls {summary['matmul_gap_s'] * 1e3:.1f} ms, other ops {summary['other_ops_s'] * 1e3:.1f} ms)")
    payload = {
        "settings": {"case": args.case, "case_config": case.__dict__, "runs": args.runs, "dtype": args.dtype,
                     "threads": torch.get_num_threads(), "device": "cpu",
                     "timing": "torch.profiler self CPU time per op, mean over runs after one warm-up"},
        "load_average_1m": {"before": load_before, "after": load_average()},
        "matmul_ceiling": ceiling.to_dict(), "summary": summary, "ops": ops, "table": table,
    }
    if not math.isfinite(summary["block_gflops"]):
        raise RuntimeError("the profile recorded no time for the block; rerun with more --runs")
    path = write_result(args.name, payload, results_dir=args.results_dir)
    print(f"wrote {path}")  # noqa: T201
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
