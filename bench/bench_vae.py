"""Wan2.1 / Wan2.2 VAE decode: ours vs diffusers and ComfyUI on identical weights, and memory vs tile.

For each VAE (`--vaes`) and video size (`--sizes`), every decoder holds the same random real-width
weights (ours; diffusers' `AutoencoderKLWan` through the key map; ComfyUI's own `WanVAE` imported
from a ComfyUI tree, see `bench/comfy_peer.py`), decodes the same latent, and must give the same
frames before anything is timed (parity: largest difference below `PARITY_ATOL`). The decoders are
then called in interleaved rounds after a warm-up, on three clocks (wall, thread CPU, process CPU;
`bench/common.py`). Ours runs twice: the default per-frame decode (`chunk_frames=1`) and
`chunk_frames=None` (the whole clip in one call). Each of ours is compared with the best peer (the
one with the lowest median thread CPU time) and with every peer, with the spread of the per-round
ratios; a ratio whose spread contains 1 is "on par".

FLOPs: "reference" is `flops.vae_flops`, the official computation that diffusers and ComfyUI 0.3.75
carry out; "executed" is what each implementation actually ran, counted by
`torch.utils.flop_counter` on the meta device. Ours executes less (vae_conv.py: the first-chunk
kernel slice and the upsampling conv as 2x2 phase convs), ComfyUI 0.33 a little less (its own
first-chunk slice): that part of a speed-up is less work, named as such.

Peak memory is the growth of the process's resident set during one decode (sampled every 2 ms by a
thread), measured in a fresh child process per variant. The tile sweep decodes a larger video
(`--sweep-frame-size`) with ours and `VAETiling(tile_size=N, overlap=...)` for each N of `--tiles`
and records the error against our untiled decode.

Run: `python -m bench.bench_vae [--vaes wan2.1 wan2.2] [--sizes 64x64x5 128x128x9] [--threads 1]
[--comfyui DIR|none] [--peers diffusers comfyui] [--repeats 3] [--sweep-frame-size 96x96x5]
[--tiles 4 8 16] [--overlap 2] [--name vae_decode]`. Writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from wanbench.wan_core.checkpoints.vae import diffusers_config, to_diffusers
from wanbench.wan_core.config import WAN21_VAE, WAN22_VAE, VAEConfig
from wanbench.wan_core.flops import vae_flops
from wanbench.wan_core.vae import WanVAE
from wanbench.wan_core.vae_tiling import VAETiling

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
SEED = 1234
REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_ATOL = 1e-3  # float32 decoders of the same weights agree to ~1e-5; anything above is a bug
OURS, OURS_WHOLE, DIFFUSERS = "ours", "ours-whole-clip", "diffusers"
OUR_IMPLS = (OURS, OURS_WHOLE)
VAES = {"wan2.1": WAN21_VAE, "wan2.2": WAN22_VAE}
Decode = Callable[[torch.Tensor], torch.Tensor]


def random_vae(config: VAEConfig, *, device: str | torch.device = "cpu") -> WanVAE:
    """Seeded weights shaped like trained ones: N(0, 1/fan_in) convs, small biases, gammas near 1."""
    torch.manual_seed(SEED)
    model = WanVAE(config, device=device)
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


def decoders(model: WanVAE, peers: Sequence[str], comfy: ComfyPeer | None) -> dict[str, Decode]:
    """name -> decode(raw latent) returning the video, for ours and the requested peers.

    Ours and diffusers clamp to [-1, 1] (their default); ComfyUI's module returns the raw decoder
    output (its VAE wrapper clamps afterwards), so parity is checked on clamped frames.
    """
    fns: dict[str, Decode] = {
        OURS: lambda z: model.decode(z, chunk_frames=1),
        OURS_WHOLE: lambda z: model.decode(z, chunk_frames=None),
    }
    if DIFFUSERS in peers:
        twin = diffusers_twin(model)
        fns[DIFFUSERS] = lambda z: twin.decode(z).sample
    if comfy is not None:
        comfy_vae = comfy.vae(model)
        fns[comfy.name] = comfy_vae.decode  # raw latent in, like ours
    return fns


def decoder_fn(impl: str, model: WanVAE, latent: torch.Tensor, tile: int | None, overlap: int,
               comfy: ComfyPeer | None = None) -> Callable[[], torch.Tensor]:
    """A no-argument decode of `latent` by `impl` (tiles apply to ours only)."""
    if impl in OUR_IMPLS and tile is not None:
        plan = VAETiling(tile_size=tile, overlap=overlap)
        return lambda: model.decode(latent, tiling=plan, chunk_frames=1 if impl == OURS else None)
    fn = decoders(model, [impl], comfy)[impl]

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return fn(latent)

    return run


def executed_flops(model: WanVAE, impl: str, latent_shape: tuple[int, ...], comfy: ComfyPeer | None) -> Any:
    """FLOPs `impl` executes for one decode, counted by torch's flop counter on the meta device.

    Returns a float, or an 'n/a: ...' string when the implementation does not run on meta.
    """
    meta = WanVAE(model.config, device="meta")
    latent = torch.empty(latent_shape, device="meta")
    try:
        if impl in OUR_IMPLS:
            run: Decode = decoders(meta, [], None)[impl]
        elif impl == DIFFUSERS:
            from diffusers import AutoencoderKLWan

            kwargs = {k: v for k, v in diffusers_config(model.config).items() if not k.startswith("_")}
            with torch.device("meta"):
                twin = AutoencoderKLWan(**kwargs)
            run = lambda z: twin.decode(z).sample  # noqa: E731
        else:
            assert comfy is not None
            run = comfy.vae(meta).decode
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            run(latent)
        return float(counter.get_total_flops())
    except (NotImplementedError, RuntimeError) as exc:
        return f"n/a: {impl} does not run on the meta device ({type(exc).__name__}: {str(exc)[:120]})"


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("VmRSS not found in /proc/self/status")


def child_peak(impl: str, size: tuple[int, int, int], tile: int | None, overlap: int,
               vae: str = "wan2.1", comfyui: str | None = None) -> dict[str, Any]:
    """In a fresh process: highest resident set (sampled every 2 ms) minus the one before one decode."""
    model = random_vae(VAES[vae])
    latent = latent_for(model.config, size)
    comfy = peer_from_option(comfyui) if impl.startswith("comfyui") else None
    run = decoder_fn(impl, model, latent, tile, overlap, comfy)
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
                 vae: str = "wan2.1", comfyui: str | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.bench_vae", "--child", impl, "--size", "x".join(map(str, size)),
           "--overlap", str(overlap), "--vae", vae, "--comfyui", comfyui or NO_COMFYUI,
           "--threads", str(torch.get_num_threads())] + (["--child-tile", str(tile)] if tile else [])
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"memory child {impl} tile={tile} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_parity(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest |difference| of every decoder's frames (clamped to [-1, 1]) from ours; raises above
    `PARITY_ATOL`."""
    reference = outputs[OURS].clamp(-1.0, 1.0)
    diffs = {}
    for impl, out in outputs.items():
        if out.shape != reference.shape:
            raise AssertionError(f"{impl} decoded shape {tuple(out.shape)}, ours {tuple(reference.shape)}")
        diffs[impl] = (out.float().clamp(-1.0, 1.0) - reference).abs().max().item()
    bad = {impl: d for impl, d in diffs.items() if not d <= PARITY_ATOL}
    if bad:
        raise AssertionError(f"decoders disagree with ours beyond {PARITY_ATOL}: {bad}; not timing them")
    return diffs


def compare_at(model: WanVAE, size: tuple[int, int, int], *, repeats: int, vae: str, peers: Sequence[str],
               comfy: ComfyPeer | None, measure_memory: bool = True) -> dict[str, Any]:
    """Parity, then interleaved rounds of every decoder at one video size; comparisons vs the peers."""
    latent = latent_for(model.config, size)
    fns = decoders(model, peers, comfy)
    with torch.inference_mode():
        diffs = check_parity({impl: fn(latent) for impl, fn in fns.items()})
    runs = {impl: (lambda fn=fn: fn(latent)) for impl, fn in fns.items()}
    with torch.inference_mode():
        clocks = interleaved_clocks(runs, repeats=repeats, warmup=1)
    peer_names = [impl for impl in fns if impl not in OUR_IMPLS]
    best = min(peer_names, key=lambda p: sorted(clocks[p]["thread_cpu_s"])[len(clocks[p]["thread_cpu_s"]) // 2],
               default=None)
    reference_flops = vae_flops(model.config, "decode", tuple(latent.shape))
    entries = []
    for impl in fns:
        stats = summarize_clocks(clocks[impl])
        flops = executed_flops(model, impl, tuple(latent.shape), comfy)
        entry: dict[str, Any] = {
            "vae": vae, "impl": impl, "size": size, "latent_shape": tuple(latent.shape), "tile": None,
            "chunk_frames": {OURS: 1, OURS_WHOLE: None}.get(impl, "the implementation's own"),
            "clocks": clocks[impl], "stats": stats, "max_abs_diff_vs_ours": diffs[impl],
            "reference_flops": reference_flops, "executed_flops": flops,
            "executed_share_of_reference": flops / reference_flops if isinstance(flops, float) else None,
            "reference_gflop_per_s_thread_cpu": reference_flops / stats["thread_cpu_s"]["median_s"] / 1e9,
        }
        if impl in OUR_IMPLS:
            entry["vs"] = {peer: compare(clocks[impl], clocks[peer]) for peer in peer_names}
            entry["best_peer"] = best
        if measure_memory:
            entry.update(measure_peak(impl, size, None, 0, vae, str(comfy.root) if comfy else None))
        entries.append(entry)
    return {"entries": entries, "best_peer": best}


def tile_sweep(model: WanVAE, size: tuple[int, int, int], tiles: Sequence[int], overlap: int) -> list[dict[str, Any]]:
    """Ours untiled and with each tile size at one (larger) video size: time, memory, seam error."""
    latent = latent_for(model.config, size)
    reference: torch.Tensor | None = None
    entries = []
    for tile in [None, *tiles]:
        plan = None if tile is None else VAETiling(tile_size=tile, overlap=overlap)
        run = decoder_fn(OURS, model, latent, tile, overlap)
        start = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - start
        reference = out if reference is None else reference
        error = None if tile is None else (out - reference).abs()
        entries.append({
            "vae": model.config.variant, "impl": OURS, "chunk_frames": 1, "size": size, "tile": tile,
            "overlap": overlap if tile else None,
            "num_tiles": 1 if plan is None else len(plan.tiles(*latent.shape[-2:])),
            "time_s": seconds, "repeats": 1, **measure_peak(OURS, size, tile, overlap, model.config.variant),
            "error_vs_untiled": None if error is None else {
                "max": error.max().item(), "mean": error.mean().item(),
                "p99": error.flatten().quantile(0.99).item()},
        })
    return entries


def comparison_rows(entries: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for e in entries:
        best = e.get("best_peer")
        vs_best = describe_speedup(e["vs"][best]["thread_cpu_s"]) if best else "-"
        vs_best_wall = describe_speedup(e["vs"][best]["wall_s"]) if best else "-"
        executed = e["executed_share_of_reference"]
        rows.append([e["vae"], "x".join(map(str, e["size"])), e["impl"], e["stats"]["thread_cpu_s"]["median_s"],
                     e["stats"]["wall_s"]["median_s"], f"{best}: {vs_best}" if best else "-", vs_best_wall,
                     "n/a" if executed is None else f"{executed:.2f}", e.get("peak_growth_gib"),
                     f"{e['max_abs_diff_vs_ours']:.1e}"])
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(64, 64, 5), (128, 128, 9)],
                        help="video sizes WxHxF compared with the peers")
    parser.add_argument("--size", type=parse_size, default=(32, 32, 5), help=argparse.SUPPRESS)  # child runs
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    parser.add_argument("--comfyui", default=None,
                        help="ComfyUI tree to compare with (default: $COMFYUI_DIR, else the cached 0.3.75 under "
                             f".cache/comfyui/ComfyUI); '{NO_COMFYUI}' skips it")
    parser.add_argument("--peers", nargs="+", choices=(DIFFUSERS, "comfyui"), default=[DIFFUSERS, "comfyui"])
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory child processes")
    parser.add_argument("--sweep-frame-size", "--tile-size", dest="sweep_frame_size", type=parse_size,
                        default=(96, 96, 5), help="video size (WxHxF) decoded in the tile sweep")
    parser.add_argument("--tiles", type=int, nargs="*", default=[4, 8, 16],
                        help="tile sizes of the sweep, in latent cells (none: no sweep)")
    parser.add_argument("--overlap", type=int, default=2, help="tile overlap in latent cells")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--name", default="vae_decode", help="results file name (without .json)")
    parser.add_argument("--results-dir", type=Path, default=None, help="where the results go (default bench/results)")
    parser.add_argument("--vaes", nargs="+", choices=sorted(VAES), default=["wan2.1", "wan2.2"],
                        help="VAEs compared with the peers (the tile sweep uses wan2.1)")
    parser.add_argument("--vae", choices=sorted(VAES), default="wan2.1", help=argparse.SUPPRESS)  # child runs
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-tile", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    small = [tile for tile in args.tiles if not 0 <= args.overlap < tile]
    if small:
        parser.error(f"every tile size must exceed --overlap ({args.overlap}); got {small} "
                     f"(e.g. --tiles 2 --overlap 1)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_peak(args.child, args.size, args.child_tile, args.overlap, args.vae,  # noqa: T201
                                    args.comfyui)))
        return {}
    comfy = peer_from_option(args.comfyui) if "comfyui" in args.peers else None
    if "comfyui" in args.peers and comfy is None:
        log.warning("no ComfyUI tree given or cached (--comfyui / $COMFYUI_DIR): comparing without ComfyUI")
    load_before = load_average()
    results, best_peers = [], {}
    for vae in args.vaes:
        model = random_vae(VAES[vae])
        for size in args.sizes:
            log.info("VAE %s, %s", vae, "x".join(map(str, size)))
            at = compare_at(model, size, repeats=args.repeats, vae=vae, peers=args.peers, comfy=comfy,
                            measure_memory=not args.no_memory)
            results += at["entries"]
            best_peers[f"{vae} " + "x".join(map(str, size))] = at["best_peer"]
    table = format_table(["vae", "WxHxF", "impl", "thread CPU s", "wall s", "vs best peer (thread CPU)",
                          "vs best peer (wall)", "executed / reference FLOPs", "peak growth GiB", "max |diff|"],
                         comparison_rows(results))
    print(table)  # noqa: T201
    sweep = tile_sweep(random_vae(WAN21_VAE), args.sweep_frame_size, args.tiles, args.overlap) if args.tiles else []
    if sweep:
        print(format_table(["tile/overlap", "tiles", "s", "peak growth GiB", "max error vs untiled"],  # noqa: T201
                           [["none" if e["tile"] is None else f"{e['tile']}/{e['overlap']}", e["num_tiles"],
                             e["time_s"], e["peak_growth_gib"],
                             None if e["error_vs_untiled"] is None else e["error_vs_untiled"]["max"]]
                            for e in sweep]))
    payload = {
        "settings": {
            "vae": "real-width Wan2.1 / Wan2.2 VAEs, random weights (tile sweep: Wan2.1)",
            "vaes": args.vaes, "dtype": "float32", "seed": SEED, "sizes": args.sizes,
            "threads": torch.get_num_threads(), "peers": args.peers,
            "comfyui": comfy.describe() if comfy else None,
            "sweep_frame_size": args.sweep_frame_size, "tiles": args.tiles, "overlap": args.overlap,
            "repeats": args.repeats, "warmup": 1, "parity_atol": PARITY_ATOL,
            "timing": "interleaved rounds after 1 warm-up, inference_mode; wall, thread CPU and process CPU "
                      "time per call; speed-ups are ratios of medians with the quartiles of per-round ratios",
            "cpu_count": os.cpu_count(),
        },
        "load_average_1m": {"before": load_before, "after": load_average()},
        "best_peer": best_peers, "results": results, "tile_sweep": sweep, "table": table,
    }
    path = write_result(args.name, payload, results_dir=args.results_dir)
    log.info("wrote %s", path)
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
