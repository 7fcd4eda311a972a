"""Regional torch.compile of the DiT blocks: compile time, steady-state speed-up, recompiles.

The model is compiled from outside (`wan_core.compile.apply_compile`); the first compiled forward
is the `Compile` stage and is excluded from the steady-state figures. Eager and compiled
forwards are then timed interleaved on the same model. A second input size shows what a shape
change costs (a recompile, counted and timed separately).

Run: `python -m bench.bench_compile [--case small] [--backend inductor] [--mode ...]`.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from wanbench.wan_core.compile import CompileConfig, apply_compile

from .bench_dit import CPU_CASES, TINY_CASES, DiTCase, build_wan_dit, make_inputs
from .common import format_table, interleaved, load_average, summarize, synchronize, write_result

log = logging.getLogger(__name__)

COMPILE_CASES: dict[str, DiTCase] = {
    "small": replace(CPU_CASES["small"], num_layers=2),
    "mid": CPU_CASES["mid"],
    **TINY_CASES,
}


def run(case: DiTCase, config: CompileConfig, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
        repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Compile `case`'s DiT regionally and compare it with eager execution of the same model."""
    model = build_wan_dit(case.config(), device=device, dtype=dtype)
    inputs = make_inputs(case, device=device, dtype=dtype)
    x, t, ctx = inputs["x"], inputs["t"], inputs["context"]
    with torch.inference_mode():
        reference = model(x, t, ctx)
    handle = apply_compile(model, config)
    try:
        with torch.inference_mode():
            compiled_out = handle.warm_up(lambda: model(x, t, ctx))
        after_warmup = handle.stats()

        def run_compiled() -> torch.Tensor:
            with torch.inference_mode():
                return model(x, t, ctx)

        def run_eager() -> torch.Tensor:
            # The eager call of each block bypasses the compiled wrapper; same weights, same inputs.
            with torch.inference_mode(), torch.compiler.set_stance("force_eager"):
                return model(x, t, ctx)

        times = interleaved({"eager": run_eager, "compiled": run_compiled}, repeats=repeats, warmup=warmup)
        steady = handle.stats()
        # A new latent size: a guard fails and the regions recompile (timed on its own).
        other = replace(case, latent_thw=(case.latent_thw[0] + 1, *case.latent_thw[1:]))
        other_inputs = make_inputs(other, device=device, dtype=dtype)
        synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(other_inputs["x"], other_inputs["t"], other_inputs["context"])
        synchronize()
        new_shape_s = time.perf_counter() - t0
        final = handle.stats()
    finally:
        handle.remove()
    stats = {name: summarize(ts) for name, ts in times.items()}
    return {
        "case": asdict(case), "compile_config": asdict(config), "num_tokens": case.num_tokens,
        "compile_time_s": after_warmup.compile_time_s, "graphs_compiled_in_warmup": after_warmup.num_compiles,
        "times_s": times, "stats": stats,
        "speedup_vs_eager": stats["eager"]["median_s"] / stats["compiled"]["median_s"],
        "recompiles_in_steady_state": steady.recompiles_after_warmup,
        "new_shape_first_call_s": new_shape_s,
        "recompiles_after_new_shape": final.recompiles_after_warmup - steady.recompiles_after_warmup,
        "compile_ids": list(final.compile_ids),
        "max_abs_diff_vs_eager": (compiled_out.float() - reference.float()).abs().max().item(),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="small", choices=sorted(COMPILE_CASES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="bench_compile", help="results file name (without .json)")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: bench/results")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = CompileConfig(backend=args.backend, mode=args.mode)
    load_before = load_average()
    torch._dynamo.reset()
    result = run(COMPILE_CASES[args.case], config, device=args.device, dtype=getattr(torch, args.dtype),
                 repeats=args.repeats)
    table = format_table(
        ["case", "backend", "compile s", "eager ms", "compiled ms", "speed-up", "recompiles (steady)",
         "new-shape call s", "recompiles (new shape)", "max |diff|"],
        [(args.case, args.backend, result["compile_time_s"], result["stats"]["eager"]["median_s"] * 1e3,
          result["stats"]["compiled"]["median_s"] * 1e3, result["speedup_vs_eager"],
          result["recompiles_in_steady_state"], result["new_shape_first_call_s"],
          result["recompiles_after_new_shape"], result["max_abs_diff_vs_eager"])])
    print(table)  # noqa: T201 - benchmark scripts print their table
    payload = {"settings": {"device": args.device, "dtype": args.dtype, "repeats": args.repeats,
                            "timing": "interleaved eager/compiled on one model, median after warm-up"},
               "load_average_1m": {"before": load_before, "after": load_average()},
               "result": result, "table": table}
    path = write_result(args.name, payload, results_dir=args.results_dir)
    print(f"wrote {path}")  # noqa: T201
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
