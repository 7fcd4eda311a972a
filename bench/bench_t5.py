"""Our `UMT5Encoder` vs transformers `UMT5EncoderModel`, side by side on identical weights.

Both encoders hold the same tensors (official keys mapped with `wan_core.t5.official_to_hf`),
encode the same token ids and mask (512 positions as the pipeline runs them, a prompt and a
negative prompt, so batch 2) and are timed interleaved after warm-up under `inference_mode`.
The real UMT5-XXL (5.7 B parameters) does not fit a CPU benchmark; the sizes keep its structure
(gated-GELU FFN, per-layer relative position bias, head dim 64) at smaller widths.

GFLOP/s are "effective": the FLOPs of all 512 positions over the measured time. An encoder that
skips trailing padding (ours does; its real rows are unchanged) does less work than that count;
the `mid_full` case (every position a real token) compares the kernels without that saving.

Run: `python -m bench.bench_t5 [--cases small mid large] [--repeats 5]`.
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
from .common import format_table, interleaved, load_average, summarize, write_result

log = logging.getLogger(__name__)


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
        return self.config().flops_forward(self.num_positions, batch=self.batch)


CPU_CASES: dict[str, T5Case] = {
    "small": T5Case(name="small", dim=512, num_heads=8, dim_ffn=1280, num_layers=4),
    "mid": T5Case(name="mid", dim=1024, num_heads=16, dim_ffn=2560, num_layers=3),
    "large": T5Case(name="large", dim=2048, num_heads=32, dim_ffn=5120, num_layers=2),
    # Every position a real token: no trailing padding to skip, a pure kernel comparison.
    "mid_full": T5Case(name="mid_full", dim=1024, num_heads=16, dim_ffn=2560, num_layers=3,
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


def run_case(case: T5Case, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    ours = build_encoder(case.config(), device=device, dtype=dtype)
    theirs = transformers_twin(ours)
    inputs = make_inputs(case, device=device)
    ids, mask = inputs["ids"], inputs["mask"]

    def run_ours() -> torch.Tensor:
        with torch.inference_mode():
            return ours(ids, mask)

    def run_transformers() -> torch.Tensor:
        with torch.inference_mode():
            return theirs(input_ids=ids, attention_mask=mask).last_hidden_state

    fns = {"ours": run_ours, "transformers": run_transformers}
    n = case.num_real_tokens
    a, b = run_ours()[:, :n].float(), run_transformers()[:, :n].float()
    diff = {"max_abs": (a - b).abs().max().item(), "ref_max_abs": b.abs().max().item()}
    times = interleaved(fns, repeats=repeats, warmup=warmup)
    stats = {name: summarize(ts) for name, ts in times.items()}
    return {
        "case": asdict(case), "flops": case.flops, "times_s": times, "stats": stats, "output_diff": diff,
        "attn_implementation": getattr(theirs.config, "_attn_implementation", None),
        "gflops": {name: case.flops / s["median_s"] / 1e9 for name, s in stats.items()},
        "speedup_vs_transformers": stats["transformers"]["median_s"] / stats["ours"]["median_s"],
        "speedup_vs_transformers_min": stats["transformers"]["min_s"] / stats["ours"]["min_s"],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    all_cases = {**CPU_CASES, **TINY_CASES}
    parser.add_argument("--cases", nargs="+", default=list(CPU_CASES), choices=sorted(all_cases))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--name", default="bench_t5", help="results file name (without .json)")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: bench/results")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    results = []
    for name in args.cases:
        log.info("UMT5 case %s", name)
        results.append(run_case(all_cases[name], device=args.device, dtype=getattr(torch, args.dtype),
                                repeats=args.repeats, warmup=args.warmup))
    rows = [(r["case"]["name"], r["case"]["dim"], r["case"]["num_layers"], r["case"]["num_positions"],
             r["case"]["batch"], r["stats"]["ours"]["median_s"] * 1e3,
             r["stats"]["transformers"]["median_s"] * 1e3,
             r["speedup_vs_transformers"], r["speedup_vs_transformers_min"], r["gflops"]["ours"],
             r["output_diff"]["max_abs"]) for r in results]
    table = format_table(["case", "dim", "layers", "positions", "batch", "ours ms", "transformers ms",
                          "speed-up",
                          "speed-up (min)", "ours eff. GFLOP/s", "max |diff|"], rows)
    print(table)  # noqa: T201 - benchmark scripts print their table
    payload = {"settings": {"device": args.device, "dtype": args.dtype, "repeats": args.repeats,
                            "warmup": args.warmup, "cases": args.cases,
                            "timing": "interleaved, median after warm-up, inference_mode"},
               "load_average_1m": {"before": load_before, "after": load_average()},
               "results": results, "table": table}
    path = write_result(args.name, payload, results_dir=args.results_dir)
    print(f"wrote {path}")  # noqa: T201
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
