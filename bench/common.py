"""Shared benchmark plumbing: machine facts, robust timing, one results JSON per benchmark.

Every benchmark prints one table and writes `bench/results/<name>.json` holding the machine, the
library versions, the settings and every raw figure (all repeats, not only the median).
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
    """Time several variants side by side, alternating them so drifts hit all equally."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name].extend(time_it(fn, repeats=1, warmup=0))
    return out


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
