"""Communication per step and expected 8-GPU scaling of parallel runs: computed, not measured.

For TI2V-5B at 1280x704x121 and A14B at 1280x720x81 (bf16 activations and weights), every plan of
`wanbench run --nproc N --parallel ...`: the bytes one rank sends per denoising step
(`wan_core.runtime.volume.step_volume`, which the multi-process tests check against the bytes the
runtime counts), the time that takes at the link's one-way bandwidth, and the step time it leads
to: compute split N ways at the single-GPU efficiency, plus the communication, not overlapped
(the runtime issues its collectives on the compute stream). Against the FLOP floor (FLOPs per
step / N / dense bf16 peak).

Assumptions (each a parameter below): H100 SXM dense bf16 peak 989.4 TFLOP/s; single-GPU MFU 0.5
(A14B at 720p: ~13 PFLOP per CFG step in ~26 s on one H100 with the official code); NVLink 4 at
450 GB/s per direction per GPU (900 GB/s both ways), PCIe 5.0 x16 at 64 GB/s and PCIe 4.0 x16 at
32 GB/s per direction, all-to-all and all-gather at that link rate (an upper bound for PCIe,
where GPUs also share host bridges).

    python -m bench.distributed_estimate      # prints the tables, writes bench/results/distributed_estimate.json
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from wanbench.wan_core.config import I2V_A14B, T2V_A14B, TI2V_5B, WanConfig
from wanbench.wan_core.runtime.distributed import ParallelPlan
from wanbench.wan_core.runtime.volume import step_volume

from .common import RESULTS_DIR, machine_info

PEAK_TFLOPS = 989.4
MFU_ONE_GPU = 0.5
LINKS_GBPS = {"NVLink 4 (450 GB/s)": 450.0, "PCIe 5.0 x16 (64 GB/s)": 64.0, "PCIe 4.0 x16 (32 GB/s)": 32.0}
CASES = (("TI2V-5B 1280x704x121", TI2V_5B, (1280, 704, 121)), ("A14B 1280x720x81", T2V_A14B, (1280, 720, 81)))
PLANS = (("ulysses", 2, False), ("ulysses", 4, False), ("ulysses", 8, False), ("cfg", 2, False),
         ("cfg+ulysses", 4, False), ("cfg+ulysses", 8, False), ("ulysses", 8, True), ("cfg+ulysses", 8, True))


def estimate(task: WanConfig, size: tuple[int, int, int], mode: str, world: int, shard: bool) -> dict:
    plan = ParallelPlan(world_size=world, mode=mode, shard_weights=shard)
    latent = task.latent_shape(*size)
    volume = step_volume(task.dit, latent[1:], cfg_degree=plan.cfg_degree, ulysses_degree=plan.ulysses_degree,
                         shard_ranks=world if shard else 1)
    flops = task.flops_per_step(*size)
    one_gpu_s = flops / (PEAK_TFLOPS * 1e12 * MFU_ONE_GPU)
    floor_s = flops / world / (PEAK_TFLOPS * 1e12)
    row = {"plan": plan.describe(), "world": world, "bytes": asdict(volume), "total_bytes": volume.total,
           "one_gpu_s": one_gpu_s, "floor_s": floor_s, "links": {}}
    for link, gbps in LINKS_GBPS.items():
        comm_s = volume.total / (gbps * 1e9)
        step_s = one_gpu_s / world + comm_s
        row["links"][link] = {"comm_s": comm_s, "step_s": step_s, "efficiency_pct": 100 * one_gpu_s / (world * step_s)}
    return row


def main() -> int:
    rows = {name: [estimate(task, size, *plan) for plan in PLANS] for name, task, size in CASES}
    assert I2V_A14B.dit.num_heads == T2V_A14B.dit.num_heads  # the A14B rows hold for I2V too
    out = sys.stdout
    for name, estimates in rows.items():
        out.write(f"\n{name}: {estimates[0]['one_gpu_s']:.1f} s/step on one GPU at MFU {MFU_ONE_GPU}\n")
        links = " | ".join(f"{k}: comm s, step s, eff %" for k in LINKS_GBPS)
        out.write(f"| plan | GPUs | sent/rank/step (GB) | {links} | floor s |\n")
        for r in estimates:
            cells = [f"{v['comm_s']:.2f}, {v['step_s']:.2f}, {v['efficiency_pct']:.0f}" for v in r["links"].values()]
            out.write(f"| {r['plan']} | {r['world']} | {r['total_bytes'] / 1e9:.2f} | " + " | ".join(cells)
                      + f" | {r['floor_s']:.2f} |\n")
    RESULTS_DIR.mkdir(exist_ok=True)
    document = {"computed_not_measured": True, "machine": machine_info(), "peak_tflops": PEAK_TFLOPS,
                "mfu_one_gpu": MFU_ONE_GPU, "links_gbps": LINKS_GBPS, "estimates": rows}
    (RESULTS_DIR / "distributed_estimate.json").write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
