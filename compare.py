"""Suite comparisons: two cases of a benchmark suite that ran the same job, side by side.

A suite lists `comparisons: [{"title", "baseline", "candidate"}]` naming its cases (e.g. ComfyUI's
native Wan nodes as the baseline, this pack's nodes as the candidate). After the cases ran,
`compare_cases` reads each case's report run and, when both used the same noise and solver, the
difference between their output videos (decoded with PyAV to 8-bit RGB frames); the section is
rendered by `profiling.comparison`.

Shapes: frames (F, H, W, 3) uint8.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .profiling import load_runs
from .profiling.comparison import Comparison, OutputDifference, output_comparable


def check_comparisons(suite: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    """The suite's comparisons, each naming two of its cases; ValueError otherwise."""
    raw = suite.get("comparisons", [])
    names = {case["name"] for case in suite["cases"]}
    if not isinstance(raw, list):
        raise ValueError(f"{where}: 'comparisons' must be a list of {{'title', 'baseline', 'candidate'}}")
    out = []
    for item in raw:
        if not isinstance(item, dict) or not {"baseline", "candidate"} <= set(item):
            raise ValueError(f"{where}: a comparison needs 'baseline' and 'candidate' case names; got {item!r}")
        missing = [item[k] for k in ("baseline", "candidate") if item[k] not in names]
        if missing:
            raise ValueError(
                f"{where}: comparison {item.get('title', '?')!r} names no case {missing}; cases: {sorted(names)}"
            )
        out.append(
            {
                "title": str(item.get("title") or f"{item['baseline']} vs {item['candidate']}"),
                "baseline": item["baseline"],
                "candidate": item["candidate"],
            }
        )
    return out


def read_frames(path: str | Path) -> np.ndarray:
    """Every frame of a video's first stream as RGB uint8: (F, H, W, 3)."""
    import av

    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])]
    if not frames:
        raise ValueError(f"{path}: the video holds no frames")
    return np.stack(frames)


def video_difference(a: str | Path, b: str | Path) -> OutputDifference:
    """PSNR (dB, over every channel value) and the largest absolute difference of two videos."""
    x, y = read_frames(a).astype(np.int16), read_frames(b).astype(np.int16)
    if x.shape != y.shape:
        raise ValueError(f"the videos differ in shape: {Path(a).name} {x.shape} vs {Path(b).name} {y.shape}")
    diff = x - y
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    psnr = math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
    return OutputDifference(psnr_db=psnr, max_abs=int(np.abs(diff).max()), num_frames=int(x.shape[0]))


def compare_cases(spec: Mapping[str, str], files: Mapping[str, Mapping[str, Sequence[str]]]) -> Comparison | str:
    """The comparison `spec` names, from each case's files ({"reports", "videos"}); or why it cannot be made."""
    runs = {}
    for role in ("baseline", "candidate"):
        case = spec[role]
        reports = files.get(case, {}).get("reports", [])
        if not reports:
            return f"{spec['title']}: case {case} wrote no report (it failed or has no Wan Benchmark Report)"
        (runs[role],) = load_runs(reports[0])
    baseline, candidate = runs["baseline"], runs["candidate"]
    reason = output_comparable(baseline, candidate)
    output = None
    if reason is None:
        videos = [files[spec[role]].get("videos", []) for role in ("baseline", "candidate")]
        if not all(len(v) == 1 for v in videos):
            reason = f"each case must save exactly one video to compare outputs; got {[len(v) for v in videos]}"
        else:
            try:
                output = video_difference(videos[0][0], videos[1][0])
            except ValueError as err:
                reason = str(err)
    return Comparison(
        title=spec["title"], baseline=baseline, candidate=candidate, output=output, output_na_reason=reason
    )
