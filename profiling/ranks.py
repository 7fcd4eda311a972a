"""Parallel runs in the report: the ranks of one run side by side, the critical path, communication.

Each rank of a parallel run records its own session; rank 0 gathers them and writes one report
holding every rank's run. A rank's run carries the `parallel_plan` event (rank, world size, plan,
run group) and, inside every `Step_<i>_Inference`, a `communication` event with the seconds and
bytes of that step's collectives by kind. From those this module derives, per run group:

- `label_ranks`: the rank facts in each run's context (`rank`, `world_size`, `parallel`,
  `run_group`), the case name suffixed `[rank r/N]`, and the workload facts that only rank 0 saw
  (size, frames) copied to the other ranks;
- the critical path: per top-level stage, the slowest rank and its time next to the fastest;
- per step, the slowest rank's inference split into compute and communication (by kind);
- per GPU (rank): total and step time, communication, peak memory and activity;
- the scaling efficiency against a single-GPU run of the same workload (task, size, frames,
  steps) on the same GPU model, when the report holds one: speed-up of the denoising steps
  divided by the rank count.

`check_parallel` lists inconsistencies (a missing or repeated rank, ranks that disagree on the
plan or the steps, communication longer than its step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..wan_core.config import COMMUNICATION_EVENT, PARALLEL_PLAN_EVENT
from .figures import group_label, summarize_run
from .formatting import NA, activity_label, fmt_gb, fmt_pct, fmt_s, markdown_table
from .records import TOTAL_STAGE, RunRecord, StageRecord

__all__ = ["StepCommunication", "check_parallel", "label_ranks", "parallel_groups", "parallel_sections",
           "step_communication"]

# Workload facts rank 0 learns from nodes the other ranks do not run (latent size, frames).
_SHARED_CONTEXT = ("task", "width", "height", "frames", "steps", "solver", "seed", "cfg_mode")
_KINDS_SUFFIX = "_s"
COMM_MARGIN_S = 1e-3  # communication may exceed its step by this much (separately read clocks)


@dataclass(frozen=True)
class StepCommunication:
    """What one rank spent communicating in one denoising step."""

    seconds: float = 0.0
    bytes_sent: int = 0
    by_kind: dict[str, float] = field(default_factory=dict)


def _plan_facts(run: RunRecord) -> dict | None:
    return next((e.facts for e in run.events if e.name == PARALLEL_PLAN_EVENT), None)


def label_ranks(runs: Sequence[RunRecord]) -> list[RunRecord]:
    """`runs` with the rank facts of parallel runs in their contexts (runs already labelled and
    single-process runs pass unchanged)."""
    labelled = []
    for run in runs:
        facts = _plan_facts(run)
        if facts is None or run.context.rank is not None:
            labelled.append(run)
            continue
        rank, world = int(facts["rank"]), int(facts["world_size"])
        context = dataclasses.replace(run.context, case_name=f"{run.context.case_name} [rank {rank}/{world}]",
                                      rank=rank, world_size=world, parallel=str(facts["plan"]),
                                      run_group=str(facts["run_group"]))
        labelled.append(dataclasses.replace(run, context=context))
    roots = {r.context.run_group: r.context for r in labelled if r.context.rank == 0}
    out = []
    for run in labelled:
        root = roots.get(run.context.run_group) if run.context.rank else None
        if root is not None:
            missing = {k: getattr(root, k) for k in _SHARED_CONTEXT if getattr(run.context, k) is None}
            run = dataclasses.replace(run, context=dataclasses.replace(run.context, **missing))
        out.append(run)
    return out


def parallel_groups(runs: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """The ranks of each parallel run (by run group, in first-seen order), sorted by rank."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        if run.context.run_group is not None:
            groups.setdefault(run.context.run_group, []).append(run)
    return {g: sorted(members, key=lambda r: r.context.rank or 0) for g, members in groups.items()}


def step_communication(run: RunRecord) -> dict[int, StepCommunication]:
    """Per step: the communication events recorded inside that step's `Step_<i>_Inference`."""
    out: dict[int, StepCommunication] = {}
    for stage in _step_stages(run, "step-inference").values():
        seconds, nbytes, kinds = 0.0, 0, {}
        for e in run.events:
            if e.name == COMMUNICATION_EVENT and stage.start_s <= e.t_s <= stage.end_s:
                seconds += float(e.facts.get("seconds") or 0.0)
                nbytes += int(e.facts.get("bytes") or 0)
                for key, value in e.facts.items():
                    if key.endswith(_KINDS_SUFFIX) and key != "seconds" and isinstance(value, (int, float)):
                        kind = key[: -len(_KINDS_SUFFIX)]
                        kinds[kind] = kinds.get(kind, 0.0) + float(value)
        out[stage.step] = StepCommunication(seconds, nbytes, kinds)
    return out


def _step_stages(run: RunRecord, kind: str) -> dict[int, StageRecord]:
    return {s.step: s for s in run.stages if s.kind == kind and s.step is not None and not s.cached}


def _step_time(run: RunRecord, step: int) -> float:
    """Loading plus inference of one step on one rank (0 when the rank did not run it)."""
    return sum(s.duration_s for s in run.stages
               if s.step == step and s.kind in ("step-loading", "step-inference") and not s.cached)


def steps_time(ranks: Sequence[RunRecord]) -> float:
    """The denoising steps of a parallel run: per step the slowest rank, summed."""
    steps = sorted({s for r in ranks for s in _step_stages(r, "step-inference")})
    return sum(max(_step_time(r, i) for r in ranks) for i in steps)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def parallel_sections(runs: Sequence[RunRecord]) -> list[str]:
    """One section per parallel run in `runs` (none when there is no parallel run)."""
    lines: list[str] = []
    for ranks in parallel_groups(runs).values():
        root = ranks[0].context
        base = root.case_name.rsplit(" [rank ", 1)[0]
        lines += [f"## Parallel run: {base} ({root.parallel}; {root.world_size} ranks)", ""]
        lines += _critical_path(ranks) + _steps_table(ranks) + _per_gpu(ranks) + _scaling(ranks, runs)
    return lines


def _critical_path(ranks: Sequence[RunRecord]) -> list[str]:
    names: list[str] = []
    for run in ranks:
        names += [s.name for s in run.top_level if not s.cached and s.name not in names]
    rows = []
    for name in [*names, TOTAL_STAGE]:
        times = [(r.context.rank, sum(s.duration_s for s in (*r.top_level, r.total) if s.name == name and not s.cached))
                 for r in ranks if any(s.name == name for s in (*r.top_level, r.total))]
        slow, fast = max(times, key=lambda t: t[1]), min(times, key=lambda t: t[1])
        spread = 100.0 * (slow[1] - fast[1]) / slow[1] if slow[1] > 0 and len(times) > 1 else None
        rows.append([name, str(slow[0]), fmt_s(slow[1]), str(fast[0]), fmt_s(fast[1]),
                     fmt_pct(spread) if len(times) > 1 else "rank 0 only" if times[0][0] == 0 else NA])
    return ["### Critical path (slowest rank per stage)", "",
            *markdown_table(["Stage", "Slowest rank", "Time(s)", "Fastest rank", "Time(s)", "Spread(%)"], rows), ""]


def _steps_table(ranks: Sequence[RunRecord]) -> list[str]:
    comm = {r.context.rank: step_communication(r) for r in ranks}
    inference = {r.context.rank: _step_stages(r, "step-inference") for r in ranks}
    kinds = sorted({k for per in comm.values() for c in per.values() for k in c.by_kind})
    rows = []
    for step in sorted({i for per in inference.values() for i in per}):
        rank, stage = max(((rk, st[step]) for rk, st in inference.items() if step in st), key=lambda t: t[1].duration_s)
        c = comm[rank].get(step, StepCommunication())
        share = 100.0 * c.seconds / stage.duration_s if stage.duration_s > 0 else None
        rows.append([str(step), stage.expert or NA, str(rank), fmt_s(stage.duration_s),
                     fmt_s(stage.duration_s - c.seconds), fmt_s(c.seconds), fmt_pct(share),
                     *(fmt_s(c.by_kind.get(k, 0.0)) for k in kinds), f"{c.bytes_sent / 1e6:.2f}"])
    headers = ["Step", "Expert", "Slowest rank", "Inference(s)", "Compute(s)", "Communication(s)", "Comm(%)",
               *(f"{k}(s)" for k in kinds), "Sent(MB)"]
    return ["### Step_i_Inference: compute and communication (slowest rank)", "",
            "Communication is the time the rank waited for its collectives (peers included), by kind; "
            "sent is what the rank sent in that step.", "", *markdown_table(headers, rows), ""]


def _per_gpu(ranks: Sequence[RunRecord]) -> list[str]:
    metric = ranks[0].system.activity_metric
    rows = []
    for run in ranks:
        sm = summarize_run(run)
        comm = sum(c.seconds for c in step_communication(run).values())
        rows.append([str(run.context.rank), run.system.device, fmt_s(sm.total_s),
                     fmt_s(sum(_step_time(run, i) for i in _step_stages(run, "step-inference"))), fmt_s(comm),
                     fmt_gb(sm.peak_allocated_bytes), fmt_gb(sm.rss_max_bytes), fmt_pct(sm.step_activity_pct)])
    header = f"{'Busy' if activity_label(metric) == 'GPU busy' else 'SM'}(%) steps"
    return ["### Per GPU", "",
            *markdown_table(["Rank", "Device", "Total(s)", "Steps(s)", "Communication(s)", "Peak mem(GB)",
                             "Peak RSS(GB)", header], rows), ""]


def _same_workload(single: RunRecord, rank0: RunRecord) -> bool:
    a, b = single.context, rank0.context
    keys = ("task", "width", "height", "frames", "steps")
    return all(getattr(a, k) == getattr(b, k) for k in keys) and group_label(single) == group_label(rank0)


def _scaling(ranks: Sequence[RunRecord], runs: Sequence[RunRecord]) -> list[str]:
    world = ranks[0].context.world_size or len(ranks)
    parallel = steps_time(ranks)
    singles = [r for r in runs if r.context.run_group is None and _same_workload(r, ranks[0])]
    if not singles:
        return ["### Scaling", "",
                f"- Denoising steps: {fmt_s(parallel)} s on {world} ranks (slowest rank per step). Scaling "
                f"efficiency: {NA} (no single-GPU run of the same task, size, frames and steps on "
                f"{group_label(ranks[0])} in this report; merge one in with `wanbench report`).", ""]
    single = min(singles, key=lambda r: sum(_step_time(r, i) for i in _step_stages(r, "step-inference")))
    one = sum(_step_time(single, i) for i in _step_stages(single, "step-inference"))
    speedup = one / parallel if parallel > 0 else None
    efficiency = None if speedup is None else 100.0 * speedup / world
    return ["### Scaling", "",
            f"- Denoising steps: {fmt_s(parallel)} s on {world} ranks vs {fmt_s(one)} s on one "
            f"(case {single.context.case_name!r}): speed-up "
            f"{NA if speedup is None else f'{speedup:.2f}'}x, scaling efficiency {fmt_pct(efficiency)} % "
            f"(speed-up / {world}).", ""]


# --------------------------------------------------------------------------------------------
# consistency
# --------------------------------------------------------------------------------------------
def check_parallel(runs: Sequence[RunRecord]) -> list[str]:
    """Problems with the parallel runs in `runs` ([] when consistent or when there are none)."""
    problems: list[str] = []
    for group, ranks in parallel_groups(runs).items():
        where = f"parallel run {group}"
        worlds = {r.context.world_size for r in ranks}
        plans = {r.context.parallel for r in ranks}
        numbers = [r.context.rank for r in ranks]
        if len(worlds) != 1 or len(plans) != 1:
            problems.append(f"{where}: ranks disagree on the world size {sorted(map(str, worlds))} or the plan "
                            f"{sorted(map(str, plans))}")
            continue
        world = worlds.pop() or 0
        if sorted(numbers) != list(range(world)):
            problems.append(f"{where}: holds ranks {sorted(numbers)} of a world of {world}; every rank must be there "
                            "exactly once")
        steps = {r.context.rank: sorted(_step_stages(r, "step-inference")) for r in ranks}
        if len({tuple(v) for v in steps.values()}) > 1:
            problems.append(f"{where}: ranks ran different steps: {steps}")
        for run in ranks:
            stages = _step_stages(run, "step-inference")
            for step, c in step_communication(run).items():
                if c.seconds > stages[step].duration_s + COMM_MARGIN_S:
                    problems.append(f"{where}: rank {run.context.rank} step {step} communicated {c.seconds:.4f} s "
                                    f"in a step of {stages[step].duration_s:.4f} s")
    return problems
