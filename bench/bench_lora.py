"""Cost of a LoRA patch on one DiT transformer block: the forward with and without `LoraPatches`.

The patch hooks add, per forward of a block, one `(out, rank) @ (rank, in)` product per matrix and an
elementwise pass over the block's weights (float32 copy, add, cast back); this benchmark times that
against the block's own forward at a chosen width and token count, both variants interleaved, and
reports wall time and process CPU time with their spread. The extra work is real work ("more
work", not a slowdown of the same work): its FLOPs are given next to the block's. The patch's own
time per block forward is also measured on its own, as the difference of the two variants at one
token (where the block's compute is negligible), so it can be set against any step time.

The question it answers (docs/performance.md): does a rank-64 LoRA on a 14B expert cost more than
~2 % of a step, and does it need more than one block's worth of extra memory? A 14B block is
dim 5120, ffn 13824, 40 heads (`--real-size`); at 832x480x81 one forward sees 32760 tokens. That
size needs a GPU (`--device cuda --dtype bfloat16`); on a CPU the default is a small block, which
shows the mechanics and the ratio's trend, not the 14B figure. Peak extra memory is measured on
CUDA (allocator peak, with minus without); on a CPU it is n/a (torch does not track host
allocations).

    .venv/bin/python -m bench.bench_lora [--device cuda] [--real-size] [--tokens 32760] [--rank 64] ...

Prints one table and writes `bench/results/bench_lora.json` (or `--name`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from wanbench.wan_core.attention import resolve_backend_for
from wanbench.wan_core.checkpoints.lora import LoraFile, LoraPair, LoraTerms
from wanbench.wan_core.config import T2V_A14B, DiTConfig
from wanbench.wan_core.dit import WanBlock
from wanbench.wan_core.rope import RopeCache
from wanbench.wan_core.runtime.lora import ExpertLora, LoraPatches

from bench.common import format_table, load_average, summarize, wall_and_cpu, write_result

log = logging.getLogger(__name__)

RESULT_NAME = "bench_lora"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT_ROWS = 512  # the text context of a Wan2.2 forward


def block_config(args: argparse.Namespace) -> DiTConfig:
    if args.real_size:
        return replace(T2V_A14B.dit, num_layers=1)
    return replace(T2V_A14B.dit, dim=args.dim, ffn_dim=args.ffn_dim, num_heads=args.dim // 128 or 1,
                   num_layers=1)


def block_lora(block: WanBlock, rank: int, *, seed: int) -> ExpertLora:
    """A rank-`rank` float32 LoRA on every matrix of the block (what the 4-step LoRAs patch)."""
    g = torch.Generator().manual_seed(seed)
    targets = {}
    for name, p in block.named_parameters():
        if p.dim() == 2:
            down = torch.randn(rank, p.shape[1], generator=g) / p.shape[1] ** 0.5
            up = torch.randn(p.shape[0], rank, generator=g) * 0.01
            targets[f"blocks.0.{name}"] = LoraTerms(pairs=(LoraPair(up=up, down=down, scale=1.0),))
    lora = LoraFile(name=f"random_rank{rank}", layout="comfy", kinds=("lora_up/lora_down",), targets=targets,
                    num_keys=2 * len(targets), num_matched=2 * len(targets), unmatched=(), num_image_keys=0,
                    dtype="float32")
    return ExpertLora(lora=lora, strengths=(1.0,))


class _OneBlock(torch.nn.Module):
    """`blocks.0` of a DiT, so LoRA names resolve as in a real expert."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([WanBlock(cfg)])


def lora_flops(block: WanBlock, rank: int) -> float:
    """Multiply-add FLOPs of the patch: one (out, r) @ (r, in) per matrix."""
    return float(sum(2 * rank * p.numel() for p in block.parameters() if p.dim() == 2))


def block_flops(cfg: DiTConfig, tokens: int) -> float:
    """The block's share of `DiTConfig.flops_forward` (spec section 8) at `tokens` video tokens."""
    L, D, Fd, S = tokens, cfg.dim, cfg.ffn_dim, TEXT_ROWS
    return float(12 * L * D * D + 4 * S * D * D + 4 * L * L * D + 4 * L * S * D + 4 * L * D * Fd)


def _peak_extra_bytes(model: _OneBlock, lora: ExpertLora, run: Callable[[], Any], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    run()
    base_peak = torch.cuda.max_memory_allocated(device) - start
    with LoraPatches([model], [lora]):
        run()  # factors copied to the device on first use: measured in the next run
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start_lora = torch.cuda.memory_allocated(device)
        run()
        lora_peak = torch.cuda.max_memory_allocated(device) - start_lora
    return int(lora_peak - base_peak)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = block_config(args)
    torch.manual_seed(0)
    model = _OneBlock(cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)
    block = model.blocks[0]
    lora = block_lora(block, args.rank, seed=1)
    g = torch.Generator().manual_seed(2)
    side = max(1, int(args.tokens ** 0.5))
    grid = (args.tokens // (side * side) or 1, side, side)
    tokens = grid[0] * grid[1] * grid[2]
    x = torch.randn(1, tokens, cfg.dim, generator=g).to(device)
    e0 = torch.randn(1, 1, 6, cfg.dim, generator=g).to(device)
    ctx = torch.randn(1, TEXT_ROWS, cfg.dim, generator=g).to(device=device, dtype=dtype)
    rope = RopeCache(cfg.head_dim).tables(grid, device)
    backend = resolve_backend_for("sdpa", device=device, dtype=dtype, num_heads=cfg.num_heads, head_dim=cfg.head_dim)

    x1 = x[:, :1]
    rope1 = RopeCache(cfg.head_dim).tables((1, 1, 1), device)

    def run() -> None:
        with torch.no_grad():
            block(x, e0, ctx, rope, backend)

    def run_one_token() -> None:  # the block's fixed costs: with LoRA, mostly the patch itself
        with torch.no_grad():
            block(x1, e0, ctx, rope1, backend)

    patches = LoraPatches([model], [lora])

    def patched(fn: Callable[[], None]) -> Callable[[], None]:
        def call() -> None:
            with patches:
                fn()
        return call

    variants: dict[str, Callable[[], None]] = {"base": run, "lora": patched(run),
                                               "base_1_token": run_one_token, "lora_1_token": patched(run_one_token)}
    for fn in variants.values():
        for _ in range(args.warmup):
            fn()
    raw: dict[str, dict[str, list[float]]] = {k: {"wall_s": [], "cpu_s": []} for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            wall, cpu = wall_and_cpu(fn)
            raw[name]["wall_s"].append(wall)
            raw[name]["cpu_s"].append(cpu)
    weights = sum(p.numel() * p.element_size() for p in block.parameters())
    return {"config": {"dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "num_heads": cfg.num_heads, "tokens": tokens,
                       "grid": list(grid), "text_rows": TEXT_ROWS, "rank": args.rank, "dtype": args.dtype,
                       "device": str(device), "real_size": args.real_size},
            "raw": raw, "block_weight_bytes": weights,
            "lora_factor_bytes": sum(t.numel() * t.element_size() for terms in lora.lora.targets.values()
                                     for pair in terms.pairs for t in (pair.up, pair.down)),
            "peak_extra_bytes": _peak_extra_bytes(model, lora, run, device),
            "flops_block": block_flops(cfg, tokens), "flops_lora": lora_flops(block, args.rank),
            "load_average": load_average()}


def summarize_result(result: dict[str, Any]) -> dict[str, Any]:
    """Medians, spreads and the overhead of the patch (lora over base) for wall and CPU time."""
    out: dict[str, Any] = {}
    for clock in ("wall_s", "cpu_s"):
        base, lora = summarize(result["raw"]["base"][clock]), summarize(result["raw"]["lora"][clock])
        out[clock] = {"base": base, "lora": lora,
                      "overhead_pct": 100.0 * (lora["median_s"] - base["median_s"]) / base["median_s"]}
        one = {k: summarize(result["raw"][k][clock])["median_s"] for k in ("base_1_token", "lora_1_token")}
        out[clock]["patch_s"] = one["lora_1_token"] - one["base_1_token"]  # per forward of the block
    out["flops_ratio_pct"] = 100.0 * result["flops_lora"] / result["flops_block"]
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--real-size", action="store_true", help="a 14B block: dim 5120, ffn 13824, 40 heads")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ffn-dim", type=int, default=1536)
    parser.add_argument("--tokens", type=int, default=1024, help="video tokens per forward (832x480x81: 32760)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default=RESULT_NAME)
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args)
    summary = summarize_result(result)
    rows = []
    for clock in ("wall_s", "cpu_s"):
        s = summary[clock]
        rows.append([clock[:-2], s["base"]["median_s"], s["base"]["iqr_s"], s["lora"]["median_s"], s["lora"]["iqr_s"],
                     f"{s['overhead_pct']:+.2f} %", s["patch_s"]])
    headers = ["clock", "block s", "IQR", "block+LoRA s", "IQR", "overhead", "patch s (1-token diff)"]
    log.info("\n%s", format_table(headers, rows))
    cfg = result["config"]
    log.info("dim %d, ffn %d, %d tokens, rank %d, %s on %s: LoRA FLOPs %.3g = %.2f %% of the block's %.3g; "
             "factors %.1f MB, block weights %.1f MB; extra peak memory %s", cfg["dim"], cfg["ffn_dim"],
             cfg["tokens"], cfg["rank"], cfg["dtype"], cfg["device"], result["flops_lora"],
             summary["flops_ratio_pct"], result["flops_block"], result["lora_factor_bytes"] / 1e6,
             result["block_weight_bytes"] / 1e6,
             "n/a (CPU)" if result["peak_extra_bytes"] is None else f"{result['peak_extra_bytes'] / 1e6:.1f} MB")
    payload = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "result": result, "summary": summary}
    write_result(args.name, payload, results_dir=args.results_dir)
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
