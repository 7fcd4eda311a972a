"""Our `WanDiT` forward vs diffusers `WanTransformer3DModel` and ComfyUI's `WanModel`, on identical weights.

Every model holds the same tensors (the peers are built on the meta device and take our
parameters with `load_state_dict(assign=True)`; ComfyUI's from a ComfyUI tree, see
`bench/comfy_peer.py`), gets the same inputs and must give the same output before anything is timed
(parity: largest difference within `parity_tolerance`). The forwards are then called in
interleaved rounds after warm-up under `torch.inference_mode()`, on three clocks (wall, thread CPU,
process CPU; `bench/common.py`); ours is compared with the best peer (lowest median thread CPU
time) and every peer, with the spread of the per-round ratios ("on par" when it contains 1).

Text: the context is zero-padded to the 512 rows Wan attends to. A real prompt fills few of them
(`num_text_rows`, 64 in the default cases); the `*_full` cases make all 512 rows real. Ours
compacts the duplicate padding rows in cross-attention (`dit.compact_text_keys`), i.e. does less
work on padded text; the peers compute all 512 rows. So the FLOPs are reported per side:
"reference" (`DiTConfig.flops_forward`, all 512 text rows: what the peers compute) and "executed"
(what ours computes: the kept text rows only); GFLOP/s use each side's own executed count.

The matmul ceiling is measured in the same run (`bench_matmul`). `--profile` adds a torch.profiler
table of the top operators of each implementation for one case; `--breakdown` times block 0
component by component (ours vs diffusers).

Run: `python -m bench.bench_dit [--cases small mid large small_full mid_full large_full]
[--repeats 5] [--threads 1] [--comfyui DIR|none] [--peers diffusers comfyui] [--profile mid]`.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from wanbench.wan_core.attention import resolve_backend_for
from wanbench.wan_core.checkpoints.dit import dit_to_diffusers
from wanbench.wan_core.config import DiTConfig
from wanbench.wan_core.dit import WanDiT

from .bench_matmul import measure_matmul_ceiling
from .comfy_peer import NO_COMFYUI, ComfyPeer, peer_from_option
from .common import (
    compare,
    describe_speedup,
    format_table,
    interleaved,
    interleaved_clocks,
    load_average,
    summarize,
    summarize_clocks,
    write_result,
)

log = logging.getLogger(__name__)

TEXT_LEN = 512
DIFFUSERS = "diffusers"


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
    num_text_rows: int = 64  # real (non-zero) text rows of the 512; the rest is zero padding

    def config(self) -> DiTConfig:
        return DiTConfig(model_type=self.model_type, in_dim=self.in_dim, out_dim=self.out_dim, dim=self.dim,
                         ffn_dim=self.ffn_dim, num_heads=self.num_heads, num_layers=self.num_layers,
                         text_dim=self.text_dim, freq_dim=self.freq_dim)

    @property
    def num_tokens(self) -> int:
        return self.config().num_tokens(self.latent_thw)

    @property
    def flops(self) -> float:
        """Reference FLOPs: all `text_len` text rows computed (what the peers do)."""
        return self.config().flops_forward(self.num_tokens, batch=self.batch)

    @property
    def executed_flops(self) -> float:
        """FLOPs ours computes: the real text rows plus one padding row (`compact_text_keys`) in
        the text MLP and cross-attention, in float32 with the sdpa backend; all rows otherwise."""
        cfg = self.config()
        rows = min(cfg.text_len, self.num_text_rows + 1)
        return cfg.flops_forward(self.num_tokens, batch=self.batch, num_text_rows=rows)


# CPU sizes: dim 256/512/1024 with head dim 128, 1k/2k/3k tokens, batch 2 (batched CFG); each with a
# padded prompt (64 real text rows of 512) and, as `<name>_full`, with all 512 text rows real.
_SIZES: dict[str, DiTCase] = {
    "small": DiTCase(name="small", dim=256, num_heads=2, ffn_dim=1024, num_layers=4, latent_thw=(4, 32, 32)),
    "mid": DiTCase(name="mid", dim=512, num_heads=4, ffn_dim=2048, num_layers=2, latent_thw=(8, 32, 32)),
    "large": DiTCase(name="large", dim=1024, num_heads=8, ffn_dim=4096, num_layers=2,
                     latent_thw=(12, 32, 32)),
}
CPU_CASES: dict[str, DiTCase] = {
    **_SIZES,
    **{f"{n}_full": replace(c, name=f"{n}_full", num_text_rows=TEXT_LEN) for n, c in _SIZES.items()},
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
    """Latent, timesteps and a (B, 512, text_dim) context (`case.num_text_rows` real, the rest zeros).

    Shapes: x (B, in_dim, T, h, w), t (B,), context (B, 512, text_dim).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    t_, h, w = case.latent_thw
    x = torch.randn(case.batch, case.in_dim, t_, h, w, generator=gen)
    context = torch.zeros(case.batch, TEXT_LEN, case.text_dim)
    rows = case.num_text_rows
    context[:, :rows] = torch.randn(case.batch, rows, case.text_dim, generator=gen)
    t = torch.full((case.batch,), 700.0)
    return {"x": x.to(device, dtype), "t": t.to(device), "context": context.to(device, dtype)}


def build_peers(ours: WanDiT, peers: Sequence[str], comfy: ComfyPeer | None) -> dict[str, nn.Module]:
    """The requested peer models holding `ours`' tensors: "diffusers" and/or ComfyUI's."""
    out: dict[str, nn.Module] = {}
    if DIFFUSERS in peers:
        out[DIFFUSERS] = diffusers_twin(ours)
    if comfy is not None:
        out[comfy.name] = comfy.dit(ours)
    return out


def forward_fns(ours: WanDiT, peers: dict[str, nn.Module], inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Zero-argument callables running one forward of each implementation on the same inputs."""
    x, t, ctx = inputs["x"], inputs["t"], inputs["context"]

    def run(model: nn.Module, name: str) -> Any:
        def forward() -> torch.Tensor:
            with torch.inference_mode():
                if name == DIFFUSERS:
                    return model(x, t, ctx, return_dict=False)[0]
                return model(x, t, ctx)  # ours and ComfyUI's WanModel: (x, timestep, context)
        return forward

    return {"ours": run(ours, "ours"), **{name: run(model, name) for name, model in peers.items()}}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    diff = (a.float() - b.float()).abs()
    return {"max_abs": diff.max().item(), "ref_max_abs": b.float().abs().max().item()}


def parity_tolerance(dtype: torch.dtype) -> float:
    """Largest |difference| allowed between two implementations, relative to the output's max."""
    return 1e-3 if dtype == torch.float32 else 5e-2


def check_parity(fns: dict[str, Any], dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Each peer's output against ours; raises when one is beyond `parity_tolerance` (not timed)."""
    reference = fns["ours"]()
    diffs = {name: max_abs_diff(fn(), reference) for name, fn in fns.items() if name != "ours"}
    bad = {name: d for name, d in diffs.items()
           if not d["max_abs"] <= parity_tolerance(dtype) * max(1.0, d["ref_max_abs"])}
    if bad:
        raise AssertionError(f"DiT outputs disagree with ours: {bad}; not timing them")
    return diffs


def run_case(case: DiTCase, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             repeats: int = 5, warmup: int = 1, peers: Sequence[str] = (DIFFUSERS,),
             comfy: ComfyPeer | None = None) -> dict[str, Any]:
    """Parity, then interleaved rounds of every implementation on one case; all raw times kept."""
    ours = build_wan_dit(case.config(), device=device, dtype=dtype)
    fns = forward_fns(ours, build_peers(ours, peers, comfy), make_inputs(case, device=device, dtype=dtype))
    diffs = check_parity(fns, dtype)
    clocks = interleaved_clocks(fns, repeats=repeats, warmup=warmup)
    stats = {name: summarize_clocks(c) for name, c in clocks.items()}
    peer_names = [name for name in fns if name != "ours"]
    best = min(peer_names, key=lambda p: stats[p]["thread_cpu_s"]["median_s"], default=None)
    executed = {name: case.executed_flops if name == "ours" else case.flops for name in fns}
    result: dict[str, Any] = {
        "case": asdict(case), "num_tokens": case.num_tokens, "reference_flops": case.flops,
        "executed_flops": executed, "clocks": clocks, "stats": stats, "output_diff": diffs,
        "times_s": {name: c["wall_s"] for name, c in clocks.items()},
        "gflops_executed_thread_cpu": {name: executed[name] / stats[name]["thread_cpu_s"]["median_s"] / 1e9
                                       for name in fns},
        "vs": {peer: compare(clocks["ours"], clocks[peer]) for peer in peer_names}, "best_peer": best,
    }
    del ours, fns
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
                 runs: int = 3, row_limit: int = 15, peers: Sequence[str] = (DIFFUSERS,),
                 comfy: ComfyPeer | None = None) -> dict[str, Any]:
    """torch.profiler over `runs` warm forwards of each implementation (alternating, summed).

    Returns per implementation the total self time and the top operators by self time, with their
    call counts per forward, so the implementations can be compared op by op.
    """
    from torch.profiler import ProfilerActivity, profile

    ours = build_wan_dit(case.config(), device=device, dtype=dtype)
    fns = forward_fns(ours, build_peers(ours, peers, comfy), make_inputs(case, device=device, dtype=dtype))
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


def result_rows(results: list[dict[str, Any]], ceiling_gflops: float) -> list[tuple[Any, ...]]:
    rows = []
    for r in results:
        best = r["best_peer"]
        stats = r["stats"]
        peer_ms = stats[best]["thread_cpu_s"]["median_s"] * 1e3 if best else None
        rows.append((r["case"]["name"], r["case"]["dim"], r["num_tokens"], r["case"]["num_text_rows"],
                     stats["ours"]["thread_cpu_s"]["median_s"] * 1e3, best or "-", peer_ms,
                     describe_speedup(r["vs"][best]["thread_cpu_s"]) if best else "-",
                     describe_speedup(r["vs"][best]["wall_s"]) if best else "-",
                     r["executed_flops"]["ours"] / r["reference_flops"],
                     r["gflops_executed_thread_cpu"]["ours"] / ceiling_gflops,
                     max((d["max_abs"] for d in r["output_diff"].values()), default=None)))
    return rows


def build_parser(all_cases: dict[str, DiTCase]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CPU_CASES), choices=sorted(all_cases))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--comfyui", default=None,
                        help="ComfyUI tree to compare with (default: $COMFYUI_DIR, else the cached 0.3.75 under "
                             f".cache/comfyui/ComfyUI); '{NO_COMFYUI}' skips it")
    parser.add_argument("--peers", nargs="+", choices=(DIFFUSERS, "comfyui"), default=[DIFFUSERS, "comfyui"])
    parser.add_argument("--profile", default=None, choices=sorted(all_cases),
                        help="also profile this case with torch.profiler")
    parser.add_argument("--breakdown", default=None, choices=sorted(all_cases),
                        help="also time the components of block 0 of this case side by side (ours vs diffusers)")
    parser.add_argument("--ceiling-sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--name", default="bench_dit", help="results file name (without .json)")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: bench/results")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    all_cases = {**CPU_CASES, **TINY_CASES}
    args = build_parser(all_cases).parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    comfy = peer_from_option(args.comfyui) if "comfyui" in args.peers else None
    if "comfyui" in args.peers and comfy is None:
        log.warning("no ComfyUI tree given or cached (--comfyui / $COMFYUI_DIR): comparing without ComfyUI")

    load_before = load_average()
    ceiling = measure_matmul_ceiling(device=args.device, dtype=args.dtype, sizes=args.ceiling_sizes,
                                     repeats=3)
    results = []
    for name in args.cases:
        log.info("DiT case %s", name)
        results.append(run_case(all_cases[name], device=args.device, dtype=dtype, repeats=args.repeats,
                                warmup=args.warmup, peers=args.peers, comfy=comfy))
    table = format_table(["case", "dim", "tokens", "real text rows", "ours ms (thread CPU)", "best peer",
                          "peer ms", "vs best peer (thread CPU)", "vs best peer (wall)",
                          "ours executed / reference FLOPs", "ours of ceiling", "max |diff|"],
                         result_rows(results, ceiling.best_gflops))
    print(table)  # noqa: T201 - benchmark scripts print their table
    print(f"matmul ceiling: {ceiling.best_gflops:.1f} GFLOP/s ({args.dtype}, {args.device})")  # noqa: T201
    payload: dict[str, Any] = {
        "settings": {"device": args.device, "dtype": args.dtype, "repeats": args.repeats,
                     "warmup": args.warmup, "cases": args.cases, "threads": torch.get_num_threads(),
                     "peers": args.peers, "comfyui": comfy.describe() if comfy else None,
                     "timing": "interleaved rounds after warm-up, inference_mode; wall, thread CPU and "
                               "process CPU time per call; speed-ups are ratios of medians with the "
                               "quartiles of per-round ratios"},
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
        profiled = profile_case(all_cases[args.profile], device=args.device, dtype=dtype, peers=args.peers,
                                comfy=comfy)
        payload["profile"] = {"case": args.profile, **profiled}
        for impl, prof in profiled.items():
            if impl == "runs":
                continue
            print(f"\n{impl}: top ops (self CPU), total {prof['self_cpu_total_ms']:.1f} ms")  # noqa: T201
            print(format_table(["op", "calls", "self ms", "share"],  # noqa: T201
                               [(e["op"], e["calls"], e["self_cpu_ms"], e["share"]) for e in prof["top"]]))
    path = write_result(args.name, payload, results_dir=args.results_dir)
    print(f"wrote {path}")  # noqa: T201
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
