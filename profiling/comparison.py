"""Runtimes side by side: the same job run twice (e.g. ComfyUI's native nodes, then this pack's).

`render_comparisons` is a pure function from pairs of run records (and, when measured, the
difference between their output videos) to a Markdown section: time per phase, s/step, peak
memory and the speed-up of the candidate over the baseline, plus the output difference so that a
speed-up cannot hide a different result. A phase that either run served from a cache, or did not
run, has no speed-up (`n/a`), never a ratio of a measured time to a missing one.

Phases are stage kinds (init, encode, preprocess, step-loading, step-inference, decode, other),
summed over the run's top-level stages; the output difference (PSNR in dB over 8-bit frames, and
the largest absolute difference of one channel value) is given only when both runs used the same
noise (seed) and the same solver, else `n/a` with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .figures import summarize_run
from .formatting import NA, fmt_gb, fmt_s
from .records import RunRecord

PHASES = (
    ("init", "Model initialization"),
    ("encode", "Text encoding"),
    ("preprocess", "Preprocess (latent / image)"),
    ("step-loading", "Step loading"),
    ("step-inference", "Step inference"),
    ("decode", "VAE decoding"),
    ("other", "Other nodes"),
)
# Solvers that compute the same schedule and update: (this pack's name, ComfyUI's sampler/scheduler).
EQUIVALENT_SOLVERS = frozenset({("euler", "euler/simple")})
JOB_FIELDS = ("task", "width", "height", "frames", "steps", "seed")


@dataclass(frozen=True, kw_only=True)
class OutputDifference:
    """How far apart two output videos are (8-bit frames, all channels)."""

    psnr_db: float  # inf when identical
    max_abs: int
    num_frames: int
    source: str = "videos"  # "frames": lossless PNG frames; "videos": the saved videos (lossy)


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """One job run by two runtimes, and the difference of their outputs (or why it is n/a)."""

    title: str
    baseline: RunRecord
    candidate: RunRecord
    output: OutputDifference | None = None
    output_na_reason: str | None = None


def same_solver(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    return a == b or (a, b) in EQUIVALENT_SOLVERS or (b, a) in EQUIVALENT_SOLVERS


def job_differences(a: RunRecord, b: RunRecord) -> list[str]:
    """Where two runs are known to differ as a job (a field unknown in either run is not compared)."""
    out = []
    for name in JOB_FIELDS:
        x, y = getattr(a.context, name), getattr(b.context, name)
        if x is not None and y is not None and x != y:
            out.append(f"{name} {x} vs {y}")
    sa, sb = a.context.solver, b.context.solver
    if sa is not None and sb is not None and not same_solver(sa, sb):
        out.append(f"solver {sa} vs {sb}")
    return out


def output_comparable(a: RunRecord, b: RunRecord) -> str | None:
    """None when both runs used the same noise and solver, else why their outputs cannot be compared."""
    if a.context.seed is None or b.context.seed is None:
        return "the seed of a run is not known"
    if a.context.seed != b.context.seed:
        return f"different seeds ({a.context.seed} vs {b.context.seed}): different noise"
    if not same_solver(a.context.solver, b.context.solver):
        return f"different solvers ({a.context.solver or NA} vs {b.context.solver or NA})"
    if a.context.steps != b.context.steps:
        return f"different step counts ({a.context.steps} vs {b.context.steps})"
    return None


def _phase(run: RunRecord, kind: str) -> tuple[float | None, bool]:
    """(seconds, served from a cache) of one phase's top-level stages; None when it did not run."""
    stages = [s for s in run.top_level if s.kind == kind]
    if not stages:
        return None, False
    if any(s.cached for s in stages):
        return None, True
    return sum(s.duration_s for s in stages), False


def _cell(seconds: float | None, cached: bool) -> str:
    return "cached" if cached else fmt_s(seconds)


def speedup(baseline: float | None, candidate: float | None) -> float | None:
    """baseline / candidate; None unless both were measured and the candidate took time."""
    if baseline is None or candidate is None or candidate <= 0:
        return None
    return baseline / candidate


def _x(value: float | None) -> str:
    return NA if value is None else f"{value:.2f}x"


def _row(label: str, a: float | None, b: float | None, a_cached: bool = False, b_cached: bool = False) -> str:
    ratio = None if a_cached or b_cached else speedup(a, b)
    return f"| {label} | {_cell(a, a_cached)} | {_cell(b, b_cached)} | {_x(ratio)} |"


def _output_line(c: Comparison) -> str:
    if c.output is None:
        return f"- **Output difference**: n/a ({c.output_na_reason or 'not measured'})"
    o = c.output
    psnr = "identical (PSNR inf)" if math.isinf(o.psnr_db) else f"PSNR {o.psnr_db:.2f} dB"
    what = (
        "decoded frames saved as PNG, 8-bit, lossless"
        if o.source == "frames"
        else "frames of the saved videos, 8-bit, lossy encoding included"
    )
    return f"- **Output difference** ({o.num_frames} {what}): {psnr}, max abs {o.max_abs} of 255"


def _comparison_lines(c: Comparison) -> list[str]:
    a, b = c.baseline, c.candidate
    sa, sb = summarize_run(a), summarize_run(b)
    names = (a.context.case_name, b.context.case_name)
    lines = [f"### {c.title}", "", f"Baseline **{names[0]}** ({a.status}), candidate **{names[1]}** ({b.status}).", ""]
    differences = job_differences(a, b)
    if differences:
        lines += [f"- **Not the same job**: {'; '.join(differences)}: the speed-up compares different work.", ""]
    lines += [f"| Phase | {names[0]} (s) | {names[1]} (s) | Speed-up |", "| :--- | :--- | :--- | :--- |"]
    for kind, label in PHASES:
        (ta, ca), (tb, cb) = _phase(a, kind), _phase(b, kind)
        if ta is None and tb is None and not (ca or cb):
            continue
        lines.append(_row(label, ta, tb, ca, cb))
    lines.append(_row("Outside stages", sa.outside_s, sb.outside_s))
    lines.append(_row("**Total_Execution**", sa.total_s, sb.total_s))
    lines.append(_row("s/step", sa.s_per_step, sb.s_per_step))
    lines += [
        "",
        f"- **Steps**: {sa.num_steps_recorded} vs {sb.num_steps_recorded} recorded; "
        f"CFG {', '.join(sa.cfg_modes) or NA} vs {', '.join(sb.cfg_modes) or NA}",
        f"- **Peak memory**: CUDA allocator {fmt_gb(sa.peak_allocated_bytes)} vs {fmt_gb(sb.peak_allocated_bytes)} GB; "
        f"process RSS {fmt_gb(sa.rss_max_bytes)} vs {fmt_gb(sb.rss_max_bytes)} GB",
        _output_line(c),
        "",
    ]
    return lines


def render_comparisons(comparisons: Sequence[Comparison]) -> str:
    """The Markdown section that puts each pair side by side (speed-up = baseline / candidate)."""
    if not comparisons:
        raise ValueError("render_comparisons needs at least one comparison")
    lines = [
        "## Runtimes side by side",
        "",
        "Each table runs one job twice. Speed-up = baseline time / candidate time (above 1: the "
        "candidate is faster). Phases sum the top-level stages of one kind; `cached` = served from "
        "ComfyUI's cache in that run (no time to compare); `n/a` = not measured or not run.",
        "",
    ]
    for c in comparisons:
        lines += _comparison_lines(c)
    return "\n".join(lines).rstrip() + "\n"
