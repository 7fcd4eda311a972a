"""Shared benchmark plumbing: machine facts, robust timing, one results JSON per benchmark.

Every benchmark prints one table and writes `bench/results/<name>.json` holding the machine, the
library versions, the settings and every raw figure (all repeats, not only the median).

Timing: every call is measured on three clocks (`CLOCKS`): wall time, the calling thread's CPU
time and the process's CPU time (all threads). On a CPU shared with other jobs, wall time
includes the time this process waited for a core; thread CPU time does not, and it is the
steadier basis for comparing two implementations run with one torch thread. Process CPU time
adds the other threads of this process (torch's pool, a profiler's sampler thread). On a GPU the
device work shows in wall time only (the CPU clocks then measure the host side).

Comparisons (`compare`): implementations are called in rounds, one call each per round, so that
load drifts hit all alike. The speed-up of A over B on a clock is the median of the per-round
ratios (B's time / A's time in the same round: paired, so a slow round slows both); its spread is
the middle half of those ratios (lower to upper quartile; min to max below 4 rounds). A speed-up
whose spread contains 1 is reported as "on par", never as a win or a loss. The ratio of the two
medians is kept next to it.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {name: _version(name) for name in ("torch", "diffusers", "transformers", "einops",
                                                         "safetensors", "comfyui-wanbench")},
        "cuda": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["cuda"] = {"device": props.name, "memory_gb": round(props.total_memory / 1e9, 2),
                        "cuda_version": torch.version.cuda, "capability": f"{props.major}.{props.minor}"}
    return info


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_it(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall times (s) of `repeats` calls after `warmup` calls, each bracketed by a device sync."""
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(repeats):
        gc.collect()
        synchronize()
        t0 = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - t0)
    return times


CLOCKS = ("wall_s", "thread_cpu_s", "process_cpu_s")
ON_PAR, FASTER, SLOWER = "on par", "faster", "slower"


def time_call(fn: Callable[[], Any]) -> dict[str, float]:
    """One call of `fn` on the three `CLOCKS` (after a gc and a device sync; synced after)."""
    gc.collect()
    synchronize()
    w0, t0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
    fn()
    synchronize()
    return {"wall_s": time.perf_counter() - w0, "thread_cpu_s": time.thread_time() - t0,
            "process_cpu_s": time.process_time() - p0}


def wall_and_cpu(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall s, process CPU s) of one `time_call` of `fn`."""
    times = time_call(fn)
    return times["wall_s"], times["process_cpu_s"]


def interleaved_clocks(fns: dict[str, Callable[[], Any]], *, repeats: int = 5,
                       warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Time several variants in rounds (one call of each per round) on all three clocks.

    Returns {variant: {clock: [one value per round]}}; round i of every variant ran back to back.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, dict[str, list[float]]] = {name: {clock: [] for clock in CLOCKS} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            for clock, value in time_call(fn).items():
                out[name][clock].append(value)
    return out


def ratio_spread(ratios: Sequence[float]) -> tuple[float, float]:
    """The middle half of per-round ratios (quartiles); min and max when there are fewer than 4."""
    ordered = sorted(ratios)
    if len(ordered) < 4:
        return ordered[0], ordered[-1]
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return q1, q3


def compare(ours: dict[str, list[float]], theirs: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Speed-up of `ours` over `theirs` per clock: per-round ratios, their median, spread, verdict.

    Both are {clock: [one value per round]} from the same `interleaved_clocks` run. speedup > 1
    means ours took less time; the verdict is "on par" when the spread contains 1.
    """
    result: dict[str, dict[str, Any]] = {}
    for clock in CLOCKS:
        a, b = ours[clock], theirs[clock]
        if len(a) != len(b) or not a:
            raise ValueError(f"compare needs the same number of rounds on both sides; got {len(a)} and {len(b)}")
        if min(a) <= 0 or min(b) <= 0:
            result[clock] = {"speedup": None, "ratio_of_medians": None, "round_ratios": None, "spread": None,
                             "verdict": "n/a (a clock read 0: the call was shorter than its resolution)"}
            continue
        rounds = [y / x for x, y in zip(a, b, strict=True)]
        low, high = ratio_spread(rounds)
        verdict = ON_PAR if low <= 1.0 <= high else (FASTER if low > 1.0 else SLOWER)
        result[clock] = {"speedup": statistics.median(rounds),
                         "ratio_of_medians": statistics.median(b) / statistics.median(a),
                         "round_ratios": rounds, "spread": [low, high], "verdict": verdict}
    return result


def describe_speedup(entry: dict[str, Any]) -> str:
    """'1.12x [1.05-1.20] faster' for a table cell; 'n/a ...' when it could not be measured."""
    if entry["speedup"] is None:
        return entry["verdict"]
    low, high = entry["spread"]
    return f"{entry['speedup']:.2f}x [{low:.2f}-{high:.2f}] {entry['verdict']}"


def summarize_clocks(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """`summarize` for every clock of one variant."""
    return {clock: summarize(values) for clock, values in times.items()}


def summarize(times: Sequence[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_s": statistics.median(ordered),
        "min_s": ordered[0],
        "max_s": ordered[-1],
        "iqr_s": (ordered[(3 * len(ordered)) // 4] - ordered[len(ordered) // 4]) if len(ordered) >= 4 else None,
        "repeats": len(ordered),
    }


def interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of several variants side by side, alternating them so drifts hit all equally."""
    clocks = interleaved_clocks(fns, repeats=repeats, warmup=warmup)
    return {name: times["wall_s"] for name, times in clocks.items()}


def write_result(name: str, payload: dict[str, Any], *, results_dir: Path | None = None) -> Path:
    """Write `<results_dir>/<name>.json` atomically, adding the machine facts."""
    folder = results_dir or RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    data = {"benchmark": name, "machine": machine_info(), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable in a terminal)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=False)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def load_average() -> float | None:
    """1-minute load average of the machine (None where the OS does not report it).

    Recorded next to CPU timings: other processes competing for the cores inflate them.
    """
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None
