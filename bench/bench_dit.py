"""Our `WanDiT` forward vs diffusers `WanTransformer3DModel`, side by side on identical weights.

Both models hold the same tensors (the diffusers twin is built on the meta device and takes our
parameters with `load_state_dict(assign=True)`), get the same inputs (context zero-padded to the
512 text rows that Wan attends to, so both do the same FLOPs) and are timed interleaved, after
warm-up, under `torch.inference_mode()`. Every case also records the largest output difference,
so a speed-up from computing something else cannot go unnoticed.

Achieved GFLOP/s use the analytic FLOPs of `DiTConfig.flops_forward` and are set against a matmul
ceiling measured in the same run (`bench_matmul`). `--profile` adds a torch.profiler table of the
top operators of each implementation for one case.

Run: `python -m bench.bench_dit [--cases small mid large] [--repeats 5] [--profile mid]`.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from wanbench.wan_core.attention import resolve_backend_for
from wanbench.wan_core.checkpoints.dit import dit_to_diffusers
from wanbench.wan_core.config import DiTConfig
from wanbench.wan_core.dit import WanDiT

from .bench_matmul import measure_matmul_ceiling
from .common import format_table, interleaved, load_average, summarize, write_result

log = logging.getLogger(__name__)

TEXT_LEN = 512


@dataclass(frozen=True, kw_only=True)
class DiTCase:
    """One benchmark size; head dim 128 as in every real Wan2.2 model."""

    name: str
    dim: int
    num_heads: int
    ffn_dim: int
    num_layers: int
    latent_thw: tuple[int, int, int]
    batch: int = 2
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    model_type: str = "t2v"

    def config(self) -> DiTConfig:
        return DiTConfig(model_type=self.model_type, in_dim=self.in_dim, out_dim=self.out_dim, dim=self.dim,
                         ffn_dim=self.ffn_dim, num_heads=self.num_heads, num_layers=self.num_layers,
                         text_dim=self.text_dim, freq_dim=self.freq_dim)

    @property
    def num_tokens(self) -> int:
        return self.config().num_tokens(self.latent_thw)

    @property
    def flops(self) -> float:
        return self.config().flops_forward(self.num_tokens, batch=self.batch)


# CPU sizes: dim 256/512/1024 with head dim 128, 1k/2k/3k tokens, batch 2 (batched CFG).
CPU_CASES: dict[str, DiTCase] = {
    "small": DiTCase(name="small", dim=256, num_heads=2, ffn_dim=1024, num_layers=4, latent_thw=(4, 32, 32)),
    "mid": DiTCase(name="mid", dim=512, num_heads=4, ffn_dim=2048, num_layers=2, latent_thw=(8, 32, 32)),
    "large": DiTCase(name="large", dim=1024, num_heads=8, ffn_dim=4096, num_layers=2,
                     latent_thw=(12, 32, 32)),
}
# Seconds-long sizes for tests.
TINY_CASES: dict[str, DiTCase] = {
    "tiny": DiTCase(name="tiny", dim=64, num_heads=4, ffn_dim=128, num_layers=2, latent_thw=(3, 8, 8),
                    text_dim=32, freq_dim=32),
}


# --------------------------------------------------------------------------------------------
# models with random weights, built directly on the target device
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def random_init_(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """Fill every parameter in place with seeded random values of a trained-like scale.

    Weights ~ N(0, 1/fan_in) (so activations keep their scale through 40 layers in bf16), biases
    ~ N(0, 0.02), norm weights 1 + N(0, 0.02), modulation tables ~ N(0, 1/dim). Runs on the
    parameters' own device (no host copy), so real-size models can be made on a GPU.
    """
    devices = {p.device for p in model.parameters()}
    if any(d.type == "meta" for d in devices):
        raise ValueError("random_init_ needs materialised parameters; call model.to_empty(device=...) first")
    device = next(iter(devices))
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "modulation" in name or "scale_shift_table" in name:
            param.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]), generator=gen)
        elif "norm" in name and name.endswith("weight"):
            param.normal_(0.0, 0.02, generator=gen).add_(1.0)
        elif param.ndim >= 2:
            fan_in = param[0].numel()
            param.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
        else:
            param.normal_(0.0, 0.02, generator=gen)
    return model


def build_wan_dit(config: DiTConfig, *, device: torch.device | str, dtype: torch.dtype,
                  seed: int = 0) -> WanDiT:
    """A `WanDiT` with random weights allocated directly on `device` in `dtype` (no host copy)."""
    with torch.device("meta"):
        model = WanDiT(config)
    model.to(dtype=dtype)  # on meta: free; the device memory is then allocated once, in `dtype`
    model.to_empty(device=device)
    return random_init_(model, seed=seed).eval()


def diffusers_twin(model: WanDiT) -> nn.Module:
    """diffusers `WanTransformer3DModel` holding the very same tensors as `model` (no copy).

    Raises ImportError when diffusers is not installed (install the `bench` extra).
    """
    try:
        from diffusers import WanTransformer3DModel
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
    except ImportError as exc:
        raise ImportError("the diffusers comparison needs diffusers: "
                          "pip install 'comfyui-wanbench[bench]'") from exc
    cfg = model.config
    device = next(model.parameters()).device
    with torch.device("meta"):
        twin = WanTransformer3DModel(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
                                     attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim,
                                     out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                                     ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
                                     qk_norm="rms_norm_across_heads", eps=cfg.eps)
    missing, unexpected = twin.load_state_dict(dit_to_diffusers(model.state_dict()), strict=False,
                                               assign=True)
    if missing or unexpected:
        raise ValueError(f"DiT -> diffusers key map mismatch: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    # The RoPE tables are non-persistent buffers: rebuild them for real on the target device.
    twin.rope = WanRotaryPosEmbed(cfg.head_dim, cfg.patch_size, twin.config.rope_max_seq_len).to(device)
    return twin.eval()


def make_inputs(case: DiTCase, *, device: torch.device | str, dtype: torch.dtype,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Latent, timesteps and a (B, 512, text_dim) context (first rows real, the rest zeros).

    Shapes: x (B, in_dim, T, h, w), t (B,), context (B, 512, text_dim).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    t_, h, w = case.latent_thw
    x = torch.randn(case.batch, case.in_dim, t_, h, w, generator=gen)
    context = torch.zeros(case.batch, TEXT_LEN, case.text_dim)
    context[:, :64] = torch.randn(case.batch, 64, case.text_dim, generator=gen)
    t = torch.full((case.batch,), 700.0)
    return {"x": x.to(device, dtype), "t": t.to(device), "context": context.to(device, dtype)}


def forward_fns(ours: WanDiT, theirs: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Zero-argument callables running one forward of each implementation on the same inputs."""
    x, t, ctx = inputs["x"], inputs["t"], inputs["context"]

    def run_ours() -> torch.Tensor:
        with torch.inference_mode():
            return ours(x, t, ctx)

    def run_diffusers() -> torch.Tensor:
        with torch.inference_mode():
            return theirs(x, t, ctx, return_dict=False)[0]

    return {"ours": run_ours, "diffusers": run_diffusers}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    diff = (a.float() - b.float()).abs()
    return {"max_abs": diff.max().item(), "ref_max_abs": b.float().abs().max().item()}


def run_case(case: DiTCase, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Time both implementations on one case; returns every raw time and the derived figures."""
    ours = build_wan_dit(case.config(), device=device, dtype=dtype)
    theirs = diffusers_twin(ours)
    inputs = make_inputs(case, device=device, dtype=dtype)
    fns = forward_fns(ours, theirs, inputs)
    diff = max_abs_diff(fns["ours"](), fns["diffusers"]())
    times = interleaved(fns, repeats=repeats, warmup=warmup)
    stats = {name: summarize(ts) for name, ts in times.items()}
    result: dict[str, Any] = {
        "case": asdict(case), "num_tokens": case.num_tokens, "flops": case.flops,
        "times_s": times, "stats": stats, "output_diff": diff,
        "gflops": {name: case.flops / s["median_s"] / 1e9 for name, s in stats.items()},
        "speedup_vs_diffusers": stats["diffusers"]["median_s"] / stats["ours"]["median_s"],
        "speedup_vs_diffusers_min": stats["diffusers"]["min_s"] / stats["ours"]["min_s"],
    }
    del ours, theirs, fns
    return result


def component_fns(ours: WanDiT, theirs: nn.Module, case: DiTCase,
                  inputs: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Per-component callables of block 0 for both implementations, on matching block inputs.

    Components: self-attention (projections, q/k norm, RoPE, attention, output), cross-attention,
    FFN, the whole block, and everything outside the blocks (one forward minus the block stack is
    not isolated; "embed" covers patch, time and text embedding).
    """
    x, t, ctx_raw = inputs["x"], inputs["t"], inputs["context"]
    dtype = next(ours.parameters()).dtype
    with torch.inference_mode():
        patches = ours.patch_embedding(x)
        grid = tuple(patches.shape[2:])
        tokens = patches.flatten(2).transpose(1, 2).float().contiguous()  # (B, L, D) float32 residual
        _, e0 = ours.embed_time(t[:, None])
        ctx = ours.embed_text(ctx_raw).to(dtype)
        rope = ours.rope.cos_sin(grid, tokens.device)
        rotary = theirs.rope(x)
        temb = theirs.condition_embedder(t, ctx_raw)[1].unflatten(1, (6, -1))
        h = tokens.to(dtype)
    ob, tb = ours.blocks[0], theirs.blocks[0]
    cfg = ours.config
    backend = resolve_backend_for(ours.attention_backend, device=tokens.device, dtype=dtype,
                                  num_heads=cfg.num_heads, head_dim=cfg.head_dim)  # as WanDiT.forward does

    def wrap(fn: Any) -> Any:
        def run() -> Any:
            with torch.inference_mode():
                return fn()
        return run

    return {
        "self_attn": {"ours": wrap(lambda: ob.self_attn.self_attention(h, rope, backend)),
                      "diffusers": wrap(lambda: tb.attn1(h, None, None, rotary))},
        "cross_attn": {"ours": wrap(lambda: ob.cross_attn.cross_attention(h, ctx, backend)),
                       "diffusers": wrap(lambda: tb.attn2(h, ctx, None, None))},
        "ffn": {"ours": wrap(lambda: ob.ffn(h)), "diffusers": wrap(lambda: tb.ffn(h))},
        "block": {"ours": wrap(lambda: ob(tokens, e0, ctx, rope, backend)),
                  "diffusers": wrap(lambda: tb(h, ctx, temb, rotary))},
        "embed": {"ours": wrap(lambda: (ours.patch_embedding(x), ours.embed_time(t[:, None]),
                                        ours.embed_text(ctx_raw))),
                  "diffusers": wrap(lambda: (theirs.patch_embedding(x), theirs.rope(x),
                                             theirs.condition_embedder(t, ctx_raw)))},
    }


def component_breakdown(case: DiTCase, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, repeats: int = 5) -> dict[str, Any]:
    """Interleaved timings of each component of block 0 (median and min over `repeats`)."""
    ours = build_wan_dit(case.config(), device=device, dtype=dtype)
    theirs = diffusers_twin(ours)
    comps = component_fns(ours, theirs, case, make_inputs(case, device=device, dtype=dtype))
    out: dict[str, Any] = {}
    for comp, fns in comps.items():
        times = interleaved(fns, repeats=repeats, warmup=1)
        out[comp] = {name: {"times_s": ts, **summarize(ts)} for name, ts in times.items()}
    return out


def profile_case(case: DiTCase, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 runs: int = 3, row_limit: int = 15) -> dict[str, Any]:
    """torch.profiler over `runs` warm forwards of each implementation (alternating, summed).

    Returns per implementation the total self time and the top operators by self time, with their
    call counts per forward, so the two can be compared op by op.
    """
    from torch.profiler import ProfilerActivity, profile

    ours = build_wan_dit(case.config(), device=device, dtype=dtype)
    theirs = diffusers_twin(ours)
    fns = forward_fns(ours, theirs, make_inputs(case, device=device, dtype=dtype))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    totals: dict[str, dict[str, list[float]]] = {name: {} for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(runs):
        for name, fn in fns.items():
            with profile(activities=activities) as prof:
                fn()
            for e in prof.key_averages():
                acc = totals[name].setdefault(e.key, [0.0, 0.0])
                acc[0] += e.count / runs
                acc[1] += e.self_cpu_time_total / runs
    out: dict[str, Any] = {"runs": runs}
    for name, ops in totals.items():
        total = sum(v[1] for v in ops.values())
        ranked = sorted(ops.items(), key=lambda kv: kv[1][1], reverse=True)
        out[name] = {"self_cpu_total_ms": total / 1e3,
                     "top": [{"op": op, "calls": round(v[0], 2), "self_cpu_ms": v[1] / 1e3,
                              "share": v[1] / total if total else None} for op, v in ranked[:row_limit]]}
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    all_cases = {**CPU_CASES, **TINY_CASES}
    parser.add_argument("--cases", nargs="+", default=list(CPU_CASES), choices=sorted(all_cases))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--profile", default=None, choices=sorted(all_cases),
                        help="also profile this case with torch.profiler")
    parser.add_argument("--breakdown", default=None, choices=sorted(all_cases),
                        help="also time the components of block 0 of this case side by side")
    parser.add_argument("--ceiling-sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--name", default="bench_dit", help="results file name (without .json)")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: bench/results")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    load_before = load_average()
    ceiling = measure_matmul_ceiling(device=args.device, dtype=args.dtype, sizes=args.ceiling_sizes,
                                     repeats=3)
    results = []
    for name in args.cases:
        log.info("DiT case %s", name)
        results.append(run_case(all_cases[name], device=args.device, dtype=dtype,
                                repeats=args.repeats, warmup=args.warmup))
    rows = [(r["case"]["name"], r["case"]["dim"], r["case"]["num_layers"], r["num_tokens"],
             r["case"]["batch"],
             r["stats"]["ours"]["median_s"] * 1e3, r["stats"]["diffusers"]["median_s"] * 1e3,
             r["speedup_vs_diffusers"], r["speedup_vs_diffusers_min"], r["gflops"]["ours"],
             r["gflops"]["ours"] / ceiling.best_gflops,
             r["output_diff"]["max_abs"]) for r in results]
    table = format_table(["case", "dim", "layers", "tokens", "batch", "ours ms", "diffusers ms", "speed-up",
                          "speed-up (min)",
                          "ours GFLOP/s", "of ceiling", "max |diff|"], rows)
    print(table)  # noqa: T201 - benchmark scripts print their table
    print(f"matmul ceiling: {ceiling.best_gflops:.1f} GFLOP/s ({args.dtype}, {args.device})")  # noqa: T201
    payload: dict[str, Any] = {
        "settings": {"device": args.device, "dtype": args.dtype, "repeats": args.repeats,
                     "warmup": args.warmup,
                     "cases": args.cases, "timing": "interleaved, median after warm-up, inference_mode"},
        "load_average_1m": {"before": load_before, "after": load_average()},
        "matmul_ceiling": ceiling.to_dict(), "results": results, "table": table,
    }
    if args.breakdown:
        parts = component_breakdown(all_cases[args.breakdown], device=args.device, dtype=dtype,
                                    repeats=args.repeats)
        payload["breakdown"] = {"case": args.breakdown, "components": parts}
        print(f"\nblock 0 components, case {args.breakdown} (ms, median / min)")  # noqa: T201
        print(format_table(["component", "ours", "diffusers", "ours min", "diffusers min"],  # noqa: T201
                           [(c, d["ours"]["median_s"] * 1e3, d["diffusers"]["median_s"] * 1e3,
                             d["ours"]["min_s"] * 1e3, d["diffusers"]["min_s"] * 1e3)
                            for c, d in parts.items()]))
    if args.profile:
        profiled = profile_case(all_cases[args.profile], device=args.device, dtype=dtype)
        payload["profile"] = {"case": args.profile, **profiled}
        for impl in ("ours", "diffusers"):
            prof = payload["profile"][impl]
            print(f"\n{impl}: top ops (self CPU), total {prof['self_cpu_total_ms']:.1f} ms")  # noqa: T201
            print(format_table(["op", "calls", "self ms", "share"],  # noqa: T201
                               [(e["op"], e["calls"], e["self_cpu_ms"], e["share"]) for e in prof["top"]]))
    path = write_result(args.name, payload, results_dir=args.results_dir)
    print(f"wrote {path}")  # noqa: T201
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
