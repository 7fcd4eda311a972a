"""One command for the GPU: `python -m bench.gpu_check` (or `--tiny` on a CPU).

On one H100/H200, in well under 8 minutes (a time budget is enforced: parts that would start
after it are reported as not run), it checks:

1. `tests`: the `gpu`-marked tests (`pytest -m gpu`), counts of passed / failed / skipped;
2. `ti2v_step`: one real-size TI2V-5B step at 1280x704x121 with random weights made on the device
   (meta init + random fill, no download), placement `auto` (the memory planner's choice), profiled
   (report written and checked), and one batched-CFG forward of ours against diffusers holding the
   same tensors (the ratio; `n/a` with the reason when diffusers is not installed);
3. `a14b_steps`: T2V-A14B at 832x480x81, two steps through both experts (boundary 0.95, so that
   the second step runs the low-noise expert), placement `auto`;
4. `nvml`: SM activity (NVML GPM; "GPU busy" where GPM is missing) above 90 % during a long matmul
   loop and below 5 % when idle, read by the profiler's own monitor;
5. `profiler_overhead`: the process CPU time of a loop of profiled stages against the same loop
   unprofiled (interleaved), with the wall times.

It writes `bench/results/gpu_check_<gpu>.json` (every figure, the machine, the settings) and
`gpu_check_<gpu>.md`, and prints one table. `--tiny` runs the same parts at the tiny twins' sizes on
the CPU (the NVML part is `n/a` there); a test runs it. A part that fails is recorded as failed with
its error and the others still run: the file always says what ran and what did not.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from wanbench.profiling import ProfileSession, open_gpu_monitor
from wanbench.profiling.memory import CudaDevice
from wanbench.profiling.system import nvml_target
from wanbench.util.atomic import atomic_write_text
from wanbench.wan_core.config import preset
from wanbench.wan_core.trace import stage

from .bench_gpu import GpuCase, run_case
from .common import RESULTS_DIR, format_table, load_average, write_result

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480.0  # the limit: the whole check in under 8 minutes
TI2V_CASE = GpuCase(name="ti2v-5B_1280x704x121", task="ti2v-5B", width=1280, height=704, frames=121, steps=1,
                    placement="auto")
A14B_CASE = GpuCase(name="t2v-A14B_832x480x81", task="t2v-A14B", width=832, height=480, frames=81, steps=2,
                    placement="auto", boundary=0.95)  # t = 999 (high), 923 (low) at shift 12
BUSY_MIN_PCT, IDLE_MAX_PCT = 90.0, 5.0
NA = "n/a"


def _tiny(case: GpuCase) -> GpuCase:
    task = preset(case.task, tiny=True)
    width, height = task.default_size
    return GpuCase(name=case.name.split("_")[0] + "-tiny", task=case.task, width=width, height=height,
                   frames=task.frame_num, steps=case.steps, placement=case.placement, boundary=case.boundary)


def part_tests(paths: list[str], timeout_s: float) -> dict[str, Any]:
    """`pytest -m gpu` on `paths` in a child process; the counts from its summary line."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *paths]
    done = subprocess.run(cmd, cwd=REPO_ROOT / "tests", capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail)}
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    status = "failed" if done.returncode not in (0, 5) or failed else "ok"  # 5: nothing collected
    return {"status": status, "returncode": done.returncode, "counts": counts, "summary": tail,
            "command": " ".join(cmd)}


def part_steps(case: GpuCase, *, device: str, tiny: bool, out_dir: Path) -> dict[str, Any]:
    """A profiled sampling run of `case` (bench_gpu.run_case) and the forward ratio against diffusers."""
    with_diffusers = importlib.util.find_spec("diffusers") is not None
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    result = run_case(case, device=device, dtype=dtype, tiny=tiny, max_steps=case.steps, repeats=2,
                      compile_config=None, with_diffusers=with_diffusers, out_dir=out_dir)
    forward = result["forward"]
    return {
        "status": "ok" if not result["report_problems"] else "failed",
        "placement": result["placement_chosen"], "experts": result["experts_run"],
        "memory_estimate_bytes": result["memory_estimate_bytes"],
        "peak_allocated_bytes": result["peak_allocated_bytes"], "s_per_step": result["s_per_step"],
        "mfu_pct": result["mfu_pct"], "step_activity_pct": result["step_activity_pct"],
        "forward_ours_s": forward["stats"]["ours"]["median_s"],
        "forward_diffusers_s": forward["stats"]["diffusers"]["median_s"] if with_diffusers else None,
        "speedup_vs_diffusers": forward.get("speedup_vs_diffusers"),
        "diffusers": None if with_diffusers else "diffusers is not installed here (pip install diffusers, or "
                                                  "carry its wheel in .whl/ on the GPU machine)",
        "report": result["report_files"]["json"], "report_problems": result["report_problems"],
    }


def part_nvml(device: str, *, busy_s: float = 3.0, idle_s: float = 2.0, interval_s: float = 0.25) -> dict[str, Any]:
    """NVML activity during a long matmul loop (expected > 90 %) and idle (expected < 5 %)."""
    if not device.startswith("cuda"):
        return {"status": NA, "reason": "no CUDA device: NVML reads GPU activity"}
    opened = open_gpu_monitor(**nvml_target(CudaDevice(torch.device(device))))  # as the profiler finds it
    monitor = opened.monitor
    if monitor is None:
        return {"status": NA, "reason": opened.reason}
    try:
        torch.cuda.synchronize()
        idle = _readings(monitor, idle_s, interval_s)
        stop = threading.Event()
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)

        def spin() -> None:
            while not stop.is_set():
                for _ in range(16):
                    torch.mm(a, a)
                torch.cuda.synchronize()

        worker = threading.Thread(target=spin, daemon=True)
        worker.start()
        time.sleep(0.5)  # the queue fills before the first reading that counts
        monitor.read()
        busy = _readings(monitor, busy_s, interval_s)
        stop.set()
        worker.join()
    finally:
        monitor.close()
    if not busy or not idle:
        return {"status": NA, "reason": f"NVML gave no {monitor.activity_metric} readings",
                "metric": monitor.activity_metric}
    busy_mean, idle_mean = sum(busy) / len(busy), sum(idle) / len(idle)
    ok = busy_mean > BUSY_MIN_PCT and idle_mean < IDLE_MAX_PCT
    return {"status": "ok" if ok else "failed", "metric": monitor.activity_metric, "busy_pct": busy_mean,
            "idle_pct": idle_mean, "busy_readings": busy, "idle_readings": idle,
            "expected": f"busy > {BUSY_MIN_PCT:g} %, idle < {IDLE_MAX_PCT:g} %"}


def _readings(monitor: Any, seconds: float, interval_s: float) -> list[float]:
    monitor.read()  # starts the interval the next reading covers
    values = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        time.sleep(interval_s)
        reading = monitor.read()
        if reading.activity_pct is not None:
            values.append(float(reading.activity_pct))
    return values


def part_profiler_overhead(device: str, *, stages: int = 200, repeats: int = 3) -> dict[str, Any]:
    """Process CPU time and wall time of `stages` profiled stages vs the same loop unprofiled."""
    size = 256 if device == "cpu" else 2048
    x = torch.randn(size, size, device=device)

    def loop() -> None:
        for i in range(stages):
            with stage(f"Step_{i}_Inference", kind="step-inference", flops=2.0 * size**3):
                torch.mm(x, x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def plain() -> None:
        loop()

    def profiled() -> None:
        with ProfileSession(case_name="overhead", device=device, sample_interval_s=0.1):
            loop()

    times: dict[str, list[tuple[float, float]]] = {"plain": [], "profiled": []}
    plain()  # warm-up
    for _ in range(repeats):
        for name, fn in (("plain", plain), ("profiled", profiled)):
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append((time.process_time() - c0, time.perf_counter() - w0))
    cpu = {k: min(c for c, _ in v) for k, v in times.items()}
    wall = {k: min(w for _, w in v) for k, v in times.items()}
    return {"status": "ok", "stages": stages, "raw_cpu_wall_s": times,
            "cpu_overhead_pct": 100.0 * (cpu["profiled"] - cpu["plain"]) / cpu["plain"],
            "wall_overhead_pct": 100.0 * (wall["profiled"] - wall["plain"]) / wall["plain"],
            "cpu_per_stage_us": 1e6 * (cpu["profiled"] - cpu["plain"]) / stages}


def _run_part(name: str, fn: Callable[[], dict[str, Any]], *, started: float, budget_s: float) -> dict[str, Any]:
    elapsed = time.perf_counter() - started
    if elapsed > budget_s:
        return {"status": "not run", "reason": f"the {budget_s:.0f} s budget was used up ({elapsed:.0f} s)"}
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as err:  # noqa: BLE001 - one failing part is recorded and the others still run
        log.exception("gpu_check part %s failed", name)
        out = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    out["seconds"] = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def _figures(name: str, part: dict[str, Any]) -> str:
    keys = {"tests": ("counts",), "nvml": ("metric", "busy_pct", "idle_pct"),
            "profiler_overhead": ("cpu_overhead_pct", "wall_overhead_pct", "cpu_per_stage_us")}.get(
        name, ("placement", "experts", "s_per_step", "speedup_vs_diffusers", "peak_allocated_bytes"))
    shown = []
    for key in keys:
        value = part.get(key)
        shown.append(f"{key}={NA if value is None else (f'{value:.3g}' if isinstance(value, float) else value)}")
    reason = part.get("reason") or part.get("error") or part.get("diffusers")
    return "; ".join(shown) + (f" ({reason})" if reason else "")


def gpu_slug(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu_tiny"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(torch.device(device)).lower()).strip("_")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny twins on the CPU (what a test runs)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--tests", nargs="*", default=["."], help="paths (under tests/) for pytest -m gpu")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="parts starting later are not run")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("gpu_check needs a CUDA device; use --tiny to run its tiny version on the CPU")
    started = time.perf_counter()
    slug = gpu_slug(device)
    reports = args.results_dir / f"gpu_check_{slug}_reports"
    cases = [_tiny(c) for c in (TI2V_CASE, A14B_CASE)] if args.tiny else [TI2V_CASE, A14B_CASE]
    parts: dict[str, dict[str, Any]] = {}
    plan: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("tests", lambda: part_tests(args.tests, timeout_s=max(30.0, args.budget_s / 3))),
        ("ti2v_step", lambda: part_steps(cases[0], device=device, tiny=args.tiny, out_dir=reports)),
        ("a14b_steps", lambda: part_steps(cases[1], device=device, tiny=args.tiny, out_dir=reports)),
        ("nvml", lambda: part_nvml(device)),
        ("profiler_overhead", lambda: part_profiler_overhead(device)),
    ]
    for name, fn in plan:
        log.info("gpu_check: %s", name)
        parts[name] = _run_part(name, fn, started=started, budget_s=args.budget_s)
    rows = [(name, part["status"], f"{part['seconds']:.1f}" if "seconds" in part else NA, _figures(name, part))
            for name, part in parts.items()]
    table = format_table(["part", "status", "seconds", "figures"], rows)
    print(table)  # noqa: T201 - benchmark scripts print their table
    total_s = time.perf_counter() - started
    payload = {"settings": {"device": device, "tiny": args.tiny, "budget_s": args.budget_s, "tests": args.tests,
                            "cases": [c.__dict__ for c in cases]},
               "load_average_1m": load_average(), "total_s": total_s, "parts": parts, "table": table}
    path = write_result(f"gpu_check_{slug}", payload, results_dir=args.results_dir)
    markdown = (f"# GPU check ({slug})\n\nTotal {total_s:.0f} s (budget {args.budget_s:.0f} s).\n\n{table}\n\n"
                f"Raw figures: `{path.name}`; profiler reports: `{reports.name}/`.\n")
    atomic_write_text(path.with_suffix(".md"), markdown)
    print(f"wrote {path} and {path.with_suffix('.md').name}")  # noqa: T201
    return json.loads(path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
