"""Step caching in a run's records: which steps reused a prediction, per expert, and what that saved.

A step-inference stage whose fact `step_cache` is "reused" did no model work (the sampler records
flops 0 for it). The figures keep such steps apart: step statistics, throughput and MFU cover the
computed steps only, so a cached run's s/step and MFU describe the work it actually did. The time a
reused step saved is an estimate, said so wherever it is shown: the median time (loading +
inference) of the same expert's computed steps, minus what the reused step itself took.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..wan_core.config import STEP_CACHE_FACT, STEP_CACHE_REASON_FACT, STEP_COMPUTED, STEP_REUSED
from .formatting import secs
from .records import RunRecord, StageRecord
from .stats import percentile


@dataclass(frozen=True, kw_only=True)
class ExpertReuse:
    """One expert's steps in a run with a step cache."""

    expert: str
    computed: tuple[int, ...]
    reused: tuple[int, ...]
    reasons: dict[str, tuple[int, ...]]  # why computed steps were computed: reason -> steps
    computed_median_s: float | None  # median loading + inference of its computed steps
    saved_estimate_s: float | None  # sum over reused steps of (that median - the step's own time)


def is_reused(stage: StageRecord) -> bool:
    return stage.facts.get(STEP_CACHE_FACT) == STEP_REUSED


def has_step_cache(run: RunRecord) -> bool:
    """Whether the run's steps carry step-cache decisions."""
    return any(STEP_CACHE_FACT in s.facts for s in run.stages if s.kind == "step-inference")


def _step_times(run: RunRecord) -> dict[int, float]:
    """Loading + inference seconds of every step run now (not served from ComfyUI's cache)."""
    times: dict[int, float] = {}
    for s in run.stages:
        if s.kind in ("step-loading", "step-inference") and s.step is not None and not s.cached:
            times[s.step] = times.get(s.step, 0.0) + s.duration_s
    return times


def expert_reuse(run: RunRecord) -> list[ExpertReuse]:
    """Per expert (in order of first use): computed and reused steps and the estimated time saved."""
    times = _step_times(run)
    by_expert: dict[str, list[StageRecord]] = {}
    for s in sorted(run.stages, key=lambda st: st.start_s):
        if s.kind == "step-inference" and s.step is not None and not s.cached:
            by_expert.setdefault(s.expert or "model", []).append(s)
    out = []
    for expert, stages in by_expert.items():
        computed = tuple(s.step for s in stages if not is_reused(s))
        reused = tuple(s.step for s in stages if is_reused(s))
        reasons: dict[str, list[int]] = {}
        for s in stages:
            if s.facts.get(STEP_CACHE_FACT) == STEP_COMPUTED:
                reasons.setdefault(str(s.facts.get(STEP_CACHE_REASON_FACT, "change")), []).append(s.step)
        median = percentile([times[i] for i in computed], 50) if computed else None
        saved = None if median is None else sum(median - times[i] for i in reused)
        out.append(ExpertReuse(expert=expert, computed=computed, reused=reused,
                               reasons={k: tuple(v) for k, v in reasons.items()},
                               computed_median_s=median, saved_estimate_s=saved if reused else 0.0))
    return out


def _steps_text(steps: tuple[int, ...]) -> str:
    return ", ".join(str(i) for i in steps) if steps else "none"


def step_cache_lines(run: RunRecord, *, num_recorded: int, reused_total_s: float,
                     saved_estimate_s: float | None) -> list[str]:
    """The report's step-cache lines of one run (nothing for a run without a cache)."""
    if not has_step_cache(run):
        return []
    reuse = expert_reuse(run)
    num_reused = sum(len(r.reused) for r in reuse)
    lines = [
        f"- **Step cache**: {run.context.step_cache or 'settings not recorded'}; {num_reused} of {num_recorded} "
        f"steps reused the expert's last prediction (no model work, {secs(reused_total_s)} in total); estimated "
        f"saving {secs(saved_estimate_s)} (per reused step: the median computed step of the same expert minus "
        "the reused step's own time). The step figures below cover the computed steps only.",
    ]
    for r in reuse:
        why = "; ".join(f"{reason}: {_steps_text(steps)}" for reason, steps in r.reasons.items())
        lines.append(f"  - {r.expert}: computed {_steps_text(r.computed)} ({why or 'no reason recorded'}); "
                     f"reused {_steps_text(r.reused)}; estimated saving {secs(r.saved_estimate_s)}")
    return lines
