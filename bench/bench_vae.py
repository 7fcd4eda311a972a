"""Wan2.1 / Wan2.2 VAE decode: ours vs diffusers `AutoencoderKLWan` on identical weights, and memory vs tile.

For each VAE (`--vaes`) and video size (`--sizes`), both decoders hold the same random real-width
weights (ours converted to diffusers names),
decode the same latent, and are timed interleaved after a warm-up (medians over repeats). Ours runs
twice: with the default per-frame decode (`chunk_frames=1`, one latent frame per decoder call, as
the official code) and with `chunk_frames=None` (the whole clip in one call: more memory, fewer
calls). Peak
memory is the growth of the process's resident set during one decode (sampled every 2 ms by a
thread), measured in a fresh child process per variant (CPU has no allocator peak counter): the
decode's own working set plus its output. Tiled variants are
our decode with `VAETiling(tile_size=N, overlap=...)` for each N of `--tiles` at a larger frame
size (`--sweep-frame-size`), so that the tiles actually cut it; their error against our untiled
decode is recorded too.

Run: `python -m bench.bench_vae [--vaes wan2.1 wan2.2] [--sizes 32x32x5 64x64x9] [--threads 1]
[--sweep-frame-size 96x96x5] [--tiles 4 8 16]
[--overlap 2]`.
Writes bench/results/vae_decode.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from wanbench.wan_core.checkpoints.vae import diffusers_config, to_diffusers
from wanbench.wan_core.config import WAN21_VAE, WAN22_VAE, VAEConfig
from wanbench.wan_core.flops import vae_flops
from wanbench.wan_core.vae import WanVAE
from wanbench.wan_core.vae_tiling import VAETiling

from .common import format_table, interleaved, load_average, summarize, write_result

log = logging.getLogger(__name__)
SEED = 1234
REPO_ROOT = Path(__file__).resolve().parents[1]


def random_vae(config: VAEConfig) -> WanVAE:
    """Seeded weights shaped like trained ones: N(0, 1/fan_in) convs, small biases, gammas near 1."""
    torch.manual_seed(SEED)
    model = WanVAE(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
            else:
                p.normal_(0.0, 1.0 / max(1, p[0].numel()) ** 0.5)
    return model.eval()


def diffusers_twin(model: WanVAE) -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    kwargs = {k: v for k, v in diffusers_config(model.config).items() if not k.startswith("_")}
    twin = AutoencoderKLWan(**kwargs)
    twin.load_state_dict(to_diffusers(model.state_dict(), model.config), strict=True)
    return twin.eval()


def parse_size(text: str) -> tuple[int, int, int]:
    """'WxHxF' -> (W, H, F)."""
    try:
        w, h, f = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"size must be WIDTHxHEIGHTxFRAMES, e.g. 128x128x5; got {text!r}"
        ) from e
    return w, h, f


def latent_for(config: VAEConfig, size: tuple[int, int, int]) -> torch.Tensor:
    w, h, f = size
    s = config.spatial_stride
    torch.manual_seed(SEED + 1)
    return torch.randn(1, config.z_dim, config.latent_frames(f), h // s, w // s)


IMPLS = ("ours", "ours-whole-clip", "diffusers")
IMPL_LABELS = {"ours": "ours (chunk 1 frame)", "ours-whole-clip": "ours (whole clip)", "diffusers": "diffusers"}


def decoder_fn(impl: str, model: WanVAE, latent: torch.Tensor, tile: int | None, overlap: int):
    """A no-argument decode: "ours" (one latent frame per call), "ours-whole-clip"
    (`chunk_frames=None`) or "diffusers"."""
    if impl == "diffusers":
        twin = diffusers_twin(model)

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return twin.decode(latent).sample

        return run
    tiling = None if tile is None else VAETiling(tile_size=tile, overlap=overlap)
    chunk_frames = None if impl == "ours-whole-clip" else 1
    return lambda: model.decode(latent, tiling=tiling, chunk_frames=chunk_frames)


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("VmRSS not found in /proc/self/status")


VAES = {"wan2.1": WAN21_VAE, "wan2.2": WAN22_VAE}


def child_peak(impl: str, size: tuple[int, int, int], tile: int | None, overlap: int,
               vae: str = "wan2.1") -> dict[str, Any]:
    """In a fresh process: highest resident set (sampled every 2 ms) minus the one before one decode."""
    model = random_vae(VAES[vae])
    latent = latent_for(model.config, size)
    run = decoder_fn(impl, model, latent, tile, overlap)
    gc.collect()
    before = _rss_kib()
    highest = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            highest.append(_rss_kib())
            stop.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out = run()
    finally:
        stop.set()
        sampler.join()
    highest.append(_rss_kib())
    return {
        "peak_growth_gib": (max(highest) - before) / 2**20,
        "rss_before_gib": before / 2**20,
        "num_rss_samples": len(highest),
        "output_gib": out.numel() * out.element_size() / 2**30,
    }


def measure_peak(impl: str, size: tuple[int, int, int], tile: int | None, overlap: int,
                 vae: str = "wan2.1") -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "bench.bench_vae",
        "--child",
        impl,
        "--size",
        "x".join(map(str, size)),
        "--overlap",
        str(overlap),
        "--vae",
        vae,
    ] + (["--child-tile", str(tile)] if tile else [])
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"memory child {impl} tile={tile} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_at(model: WanVAE, size: tuple[int, int, int], *, repeats: int,
               vae: str) -> tuple[list[dict[str, Any]], list[list[Any]], dict[str, float]]:
    """Ours (frame by frame, and whole clip) vs diffusers at one video size, interleaved."""
    latent = latent_for(model.config, size)
    runs = {impl: decoder_fn(impl, model, latent, None, 0) for impl in IMPLS}
    reference = runs["diffusers"]().clamp(-1, 1)
    max_diffs = {impl: (runs[impl]() - reference).abs().max().item() for impl in IMPLS if impl != "diffusers"}
    times = interleaved(runs, repeats=repeats, warmup=1)
    flops = vae_flops(model.config, "decode", tuple(latent.shape))
    theirs = summarize(times["diffusers"])["median_s"]
    rows, results = [], []
    for impl in IMPLS:
        stats = summarize(times[impl])
        memory = measure_peak(impl, size, None, 0, vae)
        entry = {
            "vae": vae,
            "impl": impl,
            "chunk_frames": None if impl == "ours-whole-clip" else 1,  # diffusers decodes frame by frame
            "size": size,
            "latent_shape": tuple(latent.shape),
            "tile": None,
            "times_s": times[impl],
            **stats,
            **memory,
            "tflop": flops / 1e12,
            "gflop_per_s": flops / stats["median_s"] / 1e9,
            "speedup_vs_diffusers": theirs / stats["median_s"],
        }
        results.append(entry)
        rows.append([vae, IMPL_LABELS[impl], "x".join(map(str, size)), "none", stats["median_s"],
                     entry["speedup_vs_diffusers"], entry["gflop_per_s"], memory["peak_growth_gib"]])
    return results, rows, max_diffs


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(32, 32, 5), (64, 64, 9)],
                        help="ours vs diffusers at each video size WxHxF")
    parser.add_argument("--size", type=parse_size, default=(32, 32, 5), help=argparse.SUPPRESS)  # child runs
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    parser.add_argument("--sweep-frame-size", "--tile-size", dest="sweep_frame_size", type=parse_size,
                        default=(96, 96, 5), help="video size (WxHxF) decoded in the tile sweep")
    parser.add_argument("--tiles", type=int, nargs="*", default=[4, 8, 16],
                        help="tile sizes of the sweep, in latent cells")
    parser.add_argument("--overlap", type=int, default=2, help="tile overlap in latent cells")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results-dir", type=Path, default=None, help="where vae_decode.json goes")
    parser.add_argument("--vaes", nargs="+", choices=sorted(VAES), default=["wan2.1", "wan2.2"],
                        help="VAEs compared with diffusers (the tile sweep uses wan2.1)")
    parser.add_argument("--vae", choices=sorted(VAES), default="wan2.1", help=argparse.SUPPRESS)  # child runs
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--child-tile", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    small = [tile for tile in args.tiles if not 0 <= args.overlap < tile]
    if small:
        parser.error(f"every tile size must exceed --overlap ({args.overlap}); got {small} "
                     f"(e.g. --tiles 2 --overlap 1)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_peak(args.child, args.size, args.child_tile, args.overlap, args.vae)))  # noqa: T201
        return {}

    rows, results, max_diffs = [], [], {}
    for vae in args.vaes:
        model = random_vae(VAES[vae])
        for size in args.sizes:
            size_results, size_rows, size_diffs = compare_at(model, size, repeats=args.repeats, vae=vae)
            results += size_results
            rows += size_rows
            max_diffs[f"{vae} " + "x".join(map(str, size))] = size_diffs
    model = random_vae(WAN21_VAE)  # the tile sweep runs on the Wan2.1 VAE

    tile_latent = latent_for(model.config, args.sweep_frame_size)
    reference: torch.Tensor | None = None
    for tile in [None, *args.tiles]:
        plan = None if tile is None else VAETiling(tile_size=tile, overlap=args.overlap)
        run = decoder_fn("ours", model, tile_latent, tile, args.overlap)
        start = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - start
        reference = out if reference is None else reference
        error = None if tile is None else (out - reference).abs()
        memory = measure_peak("ours", args.sweep_frame_size, tile, args.overlap)
        entry = {
            "vae": "wan2.1",
            "impl": "ours",
            "chunk_frames": 1,
            "size": args.sweep_frame_size,
            "tile": tile,
            "overlap": args.overlap if tile else None,
            "num_tiles": 1 if plan is None else len(plan.tiles(*tile_latent.shape[-2:])),
            "time_s": seconds,
            "repeats": 1,
            **memory,
            "error_vs_untiled": None
            if error is None
            else {
                "max": error.max().item(),
                "mean": error.mean().item(),
                "p99": error.flatten().quantile(0.99).item(),
            },
        }
        results.append(entry)
        rows.append(
            [
                "wan2.1",
                IMPL_LABELS["ours"],
                "x".join(map(str, args.sweep_frame_size)),
                "none" if tile is None else f"{tile}/{args.overlap}",
                seconds,
                None,
                None,
                memory["peak_growth_gib"],
            ]
        )

    print(format_table(["vae", "impl", "WxHxF", "tile/overlap", "median s", "vs diffusers", "GFLOP/s",  # noqa: T201
                        "peak growth GiB"], rows))  # noqa: T201
    payload = {
        "settings": {
            "vae": "real-width Wan2.1 / Wan2.2 VAEs, random weights (tile sweep: Wan2.1)",
            "vaes": args.vaes,
            "dtype": "float32",
            "seed": SEED,
            "sizes": args.sizes,
            "threads": torch.get_num_threads(),
            "sweep_frame_size": args.sweep_frame_size,
            "tiles": args.tiles,
            "overlap": args.overlap,
            "repeats": args.repeats,
            "warmup": 1,
            "load_average": load_average(),
            "max_abs_diff_vs_diffusers": max_diffs,
        },
        "results": results,
    }
    path = write_result("vae_decode", payload, results_dir=args.results_dir)
    log.info("wrote %s", path)
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
