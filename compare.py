"""Suite comparisons: two cases of a benchmark suite that ran the same job, side by side.

A suite lists `comparisons: [{"title", "baseline", "candidate"}]` naming its cases (e.g. ComfyUI's
native Wan nodes as the baseline, this pack's nodes as the candidate). After the cases ran,
`compare_cases` reads each case's report run and, when both used the same noise and solver, the
difference between their outputs. On a server each compared case also saves its decoded frames as
PNG (`add_frame_saver`: a core SaveImage after the graph's one VAE decode node), so the difference
is measured on lossless 8-bit frames; otherwise (in-process runs, or no single decode node) on the
saved videos, decoded with PyAV, lossy encoding included (for noise-like content two h264 encodes
of near-identical frames differ far more than the frames do). The section is rendered by
`profiling.comparison`.

Shapes: frames (F, H, W, 3) uint8.
"""

from __future__ import annotations

import copy
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


DECODE_NODES = frozenset({"VAEDecode", "VAEDecodeTiled", "WanBenchVAEDecode", "WanVideoDecode"})
FRAMES_FOLDER = "wanbench_compare"  # where compared cases save their PNG frames (output subfolder)


def add_frame_saver(prompt: Mapping[str, Any], case: str) -> dict[str, Any]:
    """`prompt` plus a core SaveImage of its one VAE decode node's frames (unchanged without exactly one)."""
    out = copy.deepcopy(dict(prompt))
    decodes = [k for k, node in out.items() if node.get("class_type") in DECODE_NODES]
    if len(decodes) != 1:
        return out
    node_id = "wanbench_compare_frames"
    while node_id in out:
        node_id += "_"
    out[node_id] = {
        "class_type": "SaveImage",
        "inputs": {"images": [decodes[0], 0], "filename_prefix": f"{FRAMES_FOLDER}/{case}/frame"},
        "_meta": {"title": "Save frames for the comparison"},
    }
    return out


def frames_of(files: Mapping[str, Sequence[str]], case: str) -> list[str]:
    """The PNG frames `add_frame_saver` made a case save, in order."""
    marker = f"{FRAMES_FOLDER}/{case}/"
    return sorted(p for p in files.get("other", []) if marker in Path(p).as_posix() and p.endswith(".png"))


def read_png_frames(paths: Sequence[str | Path]) -> np.ndarray:
    from PIL import Image

    if not paths:
        raise ValueError("no frames to read")
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


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
    return frames_difference(read_frames(a), read_frames(b), source="videos", names=(Path(a).name, Path(b).name))


def frames_difference(x: np.ndarray, y: np.ndarray, *, source: str, names: tuple[str, str]) -> OutputDifference:
    if x.shape != y.shape:
        raise ValueError(f"the outputs differ in shape: {names[0]} {x.shape} vs {names[1]} {y.shape}")
    diff = x.astype(np.int16) - y.astype(np.int16)
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    psnr = math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
    return OutputDifference(psnr_db=psnr, max_abs=int(np.abs(diff).max()), num_frames=int(x.shape[0]), source=source)


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
        try:
            output = _output_difference(spec, files)
        except ValueError as err:
            reason = str(err)
    return Comparison(
        title=spec["title"], baseline=baseline, candidate=candidate, output=output, output_na_reason=reason
    )


def _output_difference(spec: Mapping[str, str], files: Mapping[str, Mapping[str, Sequence[str]]]) -> OutputDifference:
    """From the PNG frames both cases saved, else from their videos; ValueError when neither fits."""
    cases = (spec["baseline"], spec["candidate"])
    frames = [frames_of(files[case], case) for case in cases]
    if all(frames):
        return frames_difference(read_png_frames(frames[0]), read_png_frames(frames[1]), source="frames", names=cases)
    videos = [files[case].get("videos", []) for case in cases]
    if not all(len(v) == 1 for v in videos):
        raise ValueError(f"each case must save exactly one video to compare outputs; got {[len(v) for v in videos]}")
    return video_difference(videos[0][0], videos[1][0])
