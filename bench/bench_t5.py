"""Our `UMT5Encoder` vs transformers `UMT5EncoderModel` and ComfyUI's `T5`, on identical weights.

Every encoder holds the same tensors (official keys mapped with `checkpoints.t5.official_to_hf`,
which is also ComfyUI's layout; ComfyUI's module comes from a ComfyUI tree, see
`bench/comfy_peer.py`), encodes the same token ids and mask (512 positions as the pipeline runs
them, a prompt and a negative prompt, so batch 2) and must agree on the real tokens before anything
is timed. They are then called in interleaved rounds after warm-up under `inference_mode`, on three
clocks (wall, thread CPU, process CPU; `bench/common.py`); ours is compared with the best peer and
every peer, with the spread of the per-round ratios ("on par" when it contains 1). The real
UMT5-XXL (5.7 B parameters) does not fit a CPU benchmark; the sizes keep its structure (gated-GELU
FFN, per-layer relative position bias, head dim 64) at smaller widths.

FLOPs per side: the peers compute all 512 positions ("reference", `UMT5Config.flops_forward(512)`);
ours drops the positions after the batch's last real token before the first layer (their outputs
are never used), so it computes `flops_forward(real tokens)`: with a 120-token prompt that is less
work, not a faster kernel. The `*_full` cases (every position a real token) compare the kernels
without that saving.

Run: `python -m bench.bench_t5 [--cases small mid large mid_full] [--repeats 5] [--threads 1]
[--comfyui DIR|none] [--peers transformers comfyui]`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from wanbench.wan_core.checkpoints.t5 import official_to_hf
from wanbench.wan_core.config import UMT5_XXL, UMT5Config
from wanbench.wan_core.t5 import UMT5Encoder

from .bench_dit import random_init_
from .comfy_peer import NO_COMFYUI, ComfyPeer, peer_from_option
from .common import (
    compare,
    describe_speedup,
    format_table,
    interleaved_clocks,
    load_average,
    summarize_clocks,
    write_result,
)

log = logging.getLogger(__name__)
TRANSFORMERS = "transformers"


@dataclass(frozen=True, kw_only=True)
class T5Case:
    name: str
    dim: int
    num_heads: int
    dim_ffn: int
    num_layers: int
    vocab_size: int = 32000
    batch: int = 2
    num_positions: int = 512
    num_real_tokens: int = 120

    def config(self) -> UMT5Config:
        return replace(UMT5_XXL, vocab_size=self.vocab_size, dim=self.dim, dim_attn=self.dim,
                       dim_ffn=self.dim_ffn, num_heads=self.num_heads, num_layers=self.num_layers)

    @property
    def flops(self) -> float:
        """Reference FLOPs: all `num_positions` positions (what the peers compute)."""
        return self.config().flops_forward(self.num_positions, batch=self.batch)

    @property
    def executed_flops(self) -> float:
        """FLOPs ours computes: the positions up to the last real token only."""
        return self.config().flops_forward(self.num_real_tokens, batch=self.batch)


CPU_CASES: dict[str, T5Case] = {
    "small": T5Case(name="small", dim=512, num_heads=8, dim_ffn=1280, num_layers=4),
    "mid": T5Case(name="mid", dim=1024, num_heads=16, dim_ffn=2560, num_layers=3),
    "large": T5Case(name="large", dim=2048, num_heads=32, dim_ffn=5120, num_layers=2),
    # Every position a real token: no trailing padding to skip, a pure kernel comparison.
    "small_full": T5Case(name="small_full", dim=512, num_heads=8, dim_ffn=1280, num_layers=4,
                         num_real_tokens=512),
    "mid_full": T5Case(name="mid_full", dim=1024, num_heads=16, dim_ffn=2560, num_layers=3,
                       num_real_tokens=512),
    "large_full": T5Case(name="large_full", dim=2048, num_heads=32, dim_ffn=5120, num_layers=2,
                         num_real_tokens=512),
}
TINY_CASES: dict[str, T5Case] = {
    "tiny": T5Case(name="tiny", dim=64, num_heads=4, dim_ffn=128, num_layers=2, vocab_size=256,
                   num_positions=32, num_real_tokens=9),
}


def build_encoder(config: UMT5Config, *, device: torch.device | str, dtype: torch.dtype,
                  seed: int = 0) -> UMT5Encoder:
    """A `UMT5Encoder` with random weights allocated directly on `device` in `dtype`."""
    with torch.device("meta"):
        model = UMT5Encoder(config)
    model.to(dtype=dtype)  # on meta: free; the device memory is then allocated once, in `dtype`
    model.to_empty(device=device)
    return random_init_(model, seed=seed).eval()


def transformers_twin(model: UMT5Encoder) -> nn.Module:
    """transformers `UMT5EncoderModel` holding the very same tensors as `model` (no copy)."""
    try:
        from transformers import UMT5Config as HFConfig
        from transformers import UMT5EncoderModel
    except ImportError as exc:
        raise ImportError("the UMT5 comparison needs transformers: "
                          "pip install 'comfyui-wanbench[bench]'") from exc
    cfg = model.config
    hf_cfg = HFConfig(vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.head_dim, d_ff=cfg.dim_ffn,
                      num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                      relative_attention_num_buckets=cfg.num_buckets,
                      relative_attention_max_distance=cfg.max_distance, dropout_rate=0.0,
                      layer_norm_epsilon=cfg.eps, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    with torch.device("meta"):
        twin = UMT5EncoderModel(hf_cfg)
    sd = official_to_hf(model.state_dict())
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    missing, unexpected = twin.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"UMT5 -> transformers key map mismatch: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    twin.encoder.embed_tokens = twin.shared
    return twin.eval()


def make_inputs(case: T5Case, *, device: torch.device | str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids and mask: `num_real_tokens` real tokens then padding (id 0, mask 0).

    Shapes: ids (B, S) int64, mask (B, S) int64.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.zeros(case.batch, case.num_positions, dtype=torch.int64)
    ids[:, : case.num_real_tokens] = torch.randint(2, case.vocab_size, (case.batch, case.num_real_tokens),
                                                   generator=gen)
    mask = (ids != 0).long()
    return {"ids": ids.to(device), "mask": mask.to(device)}


def peer_fns(ours: UMT5Encoder, peers: Sequence[str], comfy: ComfyPeer | None,
             inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Zero-argument encodes, (B, S, D) each, for ours and the requested peers."""
    ids, mask = inputs["ids"], inputs["mask"]
    fns: dict[str, Any] = {"ours": lambda: ours(ids, mask)}
    if TRANSFORMERS in peers:
        hf = transformers_twin(ours)
        fns[TRANSFORMERS] = lambda: hf(input_ids=ids, attention_mask=mask).last_hidden_state
    if comfy is not None:
        comfy_t5 = comfy.umt5(ours)
        fns[comfy.name] = lambda: comfy_t5(ids, mask)[0]  # (hidden states, intermediate)

    def wrap(fn: Any) -> Any:
        def run() -> torch.Tensor:
            with torch.inference_mode():
                return fn()
        return run

    return {name: wrap(fn) for name, fn in fns.items()}


def check_parity(fns: dict[str, Any], num_real: int) -> dict[str, dict[str, float]]:
    """Every peer against ours on the real tokens; raises beyond 1e-3 relative (nothing is timed)."""
    reference = fns["ours"]()[:, :num_real].float()
    diffs = {}
    for name, fn in fns.items():
        if name == "ours":
            continue
        out = fn()[:, :num_real].float()
        diffs[name] = {"max_abs": (out - reference).abs().max().item(), "ref_max_abs": reference.abs().max().item()}
    bad = {n: d for n, d in diffs.items() if not d["max_abs"] <= 1e-3 * max(1.0, d["ref_max_abs"])}
    if bad:
        raise AssertionError(f"UMT5 outputs disagree with ours on the real tokens: {bad}; not timing them")
    return diffs


def run_case(case: T5Case, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             repeats: int = 5, warmup: int = 1, peers: Sequence[str] = (TRANSFORMERS,),
             comfy: ComfyPeer | None = None) -> dict[str, Any]:
    ours = build_encoder(case.config(), device=device, dtype=dtype)
    fns = peer_fns(ours, peers, comfy, make_inputs(case, device=device))
    diffs = check_parity(fns, case.num_real_tokens)
    clocks = interleaved_clocks(fns, repeats=repeats, warmup=warmup)
    stats = {name: summarize_clocks(c) for name, c in clocks.items()}
    peer_names = [name for name in fns if name != "ours"]
    best = min(peer_names, key=lambda p: stats[p]["thread_cpu_s"]["median_s"], default=None)
    executed = {name: case.executed_flops if name == "ours" else case.flops for name in fns}
    return {
        "case": asdict(case), "reference_flops": case.flops, "executed_flops": executed, "clocks": clocks,
        "stats": stats, "output_diff": diffs, "times_s": {name: c["wall_s"] for name, c in clocks.items()},
        "gflops_executed_thread_cpu": {name: executed[name] / stats[name]["thread_cpu_s"]["median_s"] / 1e9
                                       for name in fns},
        "vs": {peer: compare(clocks["ours"], clocks[peer]) for peer in peer_names}, "best_peer": best,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    all_cases = {**CPU_CASES, **TINY_CASES}
    parser.add_argument("--cases", nargs="+", default=list(CPU_CASES), choices=sorted(all_cases))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--comfyui", default=None,
                        help="ComfyUI tree to compare with (default: $COMFYUI_DIR, else the cached 0.3.75 under "
                             f".cache/comfyui/ComfyUI); '{NO_COMFYUI}' skips it")
    parser.add_argument("--peers", nargs="+", choices=(TRANSFORMERS, "comfyui"), default=[TRANSFORMERS, "comfyui"])
    parser.add_argument("--name", default="bench_t5", help="results file name (without .json)")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: bench/results")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    comfy = peer_from_option(args.comfyui) if "comfyui" in args.peers else None
    if "comfyui" in args.peers and comfy is None:
        log.warning("no ComfyUI tree given or cached (--comfyui / $COMFYUI_DIR): comparing without ComfyUI")
    load_before = load_average()
    results = []
    for name in args.cases:
        log.info("UMT5 case %s", name)
        results.append(run_case(all_cases[name], device=args.device, dtype=getattr(torch, args.dtype),
                                repeats=args.repeats, warmup=args.warmup, peers=args.peers, comfy=comfy))
    rows = []
    for r in results:
        best = r["best_peer"]
        rows.append((r["case"]["name"], r["case"]["dim"], r["case"]["num_layers"], r["case"]["num_real_tokens"],
                     r["stats"]["ours"]["thread_cpu_s"]["median_s"] * 1e3, best or "-",
                     r["stats"][best]["thread_cpu_s"]["median_s"] * 1e3 if best else None,
                     describe_speedup(r["vs"][best]["thread_cpu_s"]) if best else "-",
                     describe_speedup(r["vs"][best]["wall_s"]) if best else "-",
                     r["executed_flops"]["ours"] / r["reference_flops"],
                     max((d["max_abs"] for d in r["output_diff"].values()), default=None)))
    table = format_table(["case", "dim", "layers", "real tokens of 512", "ours ms (thread CPU)", "best peer",
                          "peer ms", "vs best peer (thread CPU)", "vs best peer (wall)",
                          "ours executed / reference FLOPs", "max |diff|"], rows)
    print(table)  # noqa: T201 - benchmark scripts print their table
    payload = {"settings": {"device": args.device, "dtype": args.dtype, "repeats": args.repeats,
                            "warmup": args.warmup, "cases": args.cases, "threads": torch.get_num_threads(),
                            "peers": args.peers, "comfyui": comfy.describe() if comfy else None,
                            "timing": "interleaved rounds after warm-up, inference_mode; wall, thread CPU and "
                                      "process CPU time per call; speed-ups are ratios of medians with the "
                                      "quartiles of per-round ratios"},
               "load_average_1m": {"before": load_before, "after": load_average()},
               "results": results, "table": table}
    path = write_result(args.name, payload, results_dir=args.results_dir)
    print(f"wrote {path}")  # noqa: T201
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
