"""Optimisation ladders: a baseline and configurations that change it, compared in one table.

A pure module: the ladder document (JSON, schema `LADDER_SCHEMA`) holds, per row, what it changed,
whether it was measured, skipped (with the reason) or failed, the figures taken from its run
report (`row_figures`), and the deviation of its output from the baseline's (`deviation.py`).
`render_ladder` turns it into Markdown in the shape of the published comparison tables (load time,
inference time, peak GPU memory, speed-up, and the output), and `check_ladder` recomputes what
the document derives (speed-up, work ratio) and the Markdown from the raw figures.

Definitions:
- Inference (s): every denoising step of the run (Step_i_Loading + Step_i_Inference, computed and
  reused steps); Load (s): the Model_Initialization time (loaders). Speed-up = the baseline's
  inference time / the row's, both measured in the same ladder run.
- Work: the model FLOPs of the row's computed steps relative to the baseline's. A speed-up that
  comes from less work (fewer steps, steps reused from the step cache, guidance 1 without an
  unconditional pass) is named so.
- Expected: a figure from the document the ladder reproduces, shown beside the measured one and
  never used in place of it; an expected time below the measured GPU's FLOP floor for the row's
  work is marked impossible.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..wan_core.config import CFG_OFF, COMPILE_STAGE, MODEL_INIT_STAGE
from .figures import summarize_run
from .formatting import NA, fmt_gb, fmt_pct, fmt_s
from .records import RunRecord

LADDER_SCHEMA = "wanbench.ladder/1"
MEASURED, SKIPPED, FAILED = "measured", "skipped", "failed"
STATUSES = (MEASURED, SKIPPED, FAILED)
SAME_WORK_TOLERANCE = 0.01  # work ratios within 1 % of 1 are "same work"


@dataclass(frozen=True, kw_only=True)
class RowFigures:
    """What the ladder shows of one row's run (None: not measured)."""

    load_s: float | None
    inference_s: float | None
    total_s: float
    s_per_step: float | None
    peak_allocated_bytes: int | None
    mfu_pct: float | None
    flops_steps: float | None  # model FLOPs of the computed steps
    steps_floor_s: float | None  # those FLOPs at the GPU's dense peak
    num_steps: int
    num_reused: int
    cfg_modes: list[str] = field(default_factory=list)
    compile_s: float | None = None  # torch.compile time inside the steps (None: nothing compiled)


@dataclass(frozen=True, kw_only=True)
class Deviation:
    """How far the row's output is from the baseline's; `note` says why a figure is n/a."""

    latent_rel_l2: float | None = None
    psnr_db: float | None = None  # None with video_identical True: the frames are equal
    video_identical: bool | None = None
    note: str | None = None


@dataclass(frozen=True, kw_only=True)
class Expected:
    """A figure of the reproduced document for this row (cumulative against its baseline)."""

    speedup: float | None = None
    time_s: float | None = None
    source: str = ""


@dataclass(frozen=True, kw_only=True)
class LadderRow:
    id: str  # the case name and folder of the row
    name: str
    baseline: bool
    changes: dict[str, Any]  # settings changed relative to the baseline
    status: str
    dropped: list[str] = field(default_factory=list)  # settings of the rows it extends that could not run here
    reason: str | None = None  # why skipped or failed
    report: str | None = None  # report JSON, relative to the ladder file
    video: str | None = None
    latent: str | None = None
    figures: RowFigures | None = None
    deviation: Deviation | None = None
    expected: Expected | None = None


@dataclass(frozen=True, kw_only=True)
class Ladder:
    suite: str
    description: str
    source: str  # the document the ladder reproduces
    execution: str  # how rows were isolated (fresh process, or server caches cleared)
    machine: str
    random_weights: bool
    baseline_settings: dict[str, Any]
    rows: list[LadderRow]
    notes: list[str] = field(default_factory=list)  # e.g. baseline settings without effect on this machine
    schema: str = LADDER_SCHEMA

    @property
    def baseline(self) -> LadderRow:
        return self.rows[0]


# -------------------------------------------------------------------------------------------- figures
def row_figures(run: RunRecord) -> RowFigures:
    """The ladder's figures of one run report."""
    sm = summarize_run(run)
    init = [s for s in run.top_level if s.name == MODEL_INIT_STAGE.name]
    load = None if not init or any(s.cached for s in init) else sum(s.duration_s for s in init)
    steps = sm.loading_total_s + sm.inference_total_s + sm.reused_total_s
    compiles = [s.duration_s for s in run.stages if s.name == COMPILE_STAGE.name and not s.cached]
    return RowFigures(
        load_s=load,
        inference_s=steps if sm.num_steps_recorded else None,
        total_s=sm.total_s,
        s_per_step=sm.s_per_step,
        peak_allocated_bytes=sm.peak_allocated_bytes,
        mfu_pct=sm.mfu_pct,
        flops_steps=sm.flops_steps,
        steps_floor_s=sm.steps_floor_s,
        num_steps=sm.num_steps_recorded,
        num_reused=sm.num_steps_reused,
        cfg_modes=list(sm.cfg_modes),
        compile_s=sum(compiles) if compiles else None,
    )


def speedup(ladder: Ladder, row: LadderRow) -> float | None:
    """The baseline's inference time / the row's (None unless both were measured)."""
    base = ladder.baseline.figures
    own = row.figures
    if base is None or own is None or not base.inference_s or not own.inference_s:
        return None
    return base.inference_s / own.inference_s


def speedup_without_compile(ladder: Ladder, row: LadderRow) -> float | None:
    """The speed-up with torch.compile's one-off compile time taken out of both inference times
    (None when neither row compiled, or a figure is missing)."""
    base, own = ladder.baseline.figures, row.figures
    if base is None or own is None or not base.inference_s or not own.inference_s:
        return None
    if base.compile_s is None and own.compile_s is None:
        return None
    steady_base = base.inference_s - (base.compile_s or 0.0)
    steady_own = own.inference_s - (own.compile_s or 0.0)
    return steady_base / steady_own if steady_base > 0 and steady_own > 0 else None


def work_ratio(ladder: Ladder, row: LadderRow) -> float | None:
    base, own = ladder.baseline.figures, row.figures
    if base is None or own is None or not base.flops_steps or own.flops_steps is None:
        return None
    return own.flops_steps / base.flops_steps


def work_note(ladder: Ladder, row: LadderRow) -> str:
    """'same work', or 'less work: 10 % of the baseline's model FLOPs (4 steps instead of 40)'."""
    ratio = work_ratio(ladder, row)
    if ratio is None:
        return NA
    if abs(ratio - 1.0) <= SAME_WORK_TOLERANCE:
        return "same work"
    base, own = ladder.baseline.figures, row.figures
    assert base is not None and own is not None
    why = []
    if own.num_steps != base.num_steps:
        why.append(f"{own.num_steps} steps instead of {base.num_steps}")
    if own.num_reused:
        why.append(f"{own.num_reused} of {own.num_steps} steps reused from the step cache")
    if CFG_OFF in own.cfg_modes and CFG_OFF not in base.cfg_modes:
        why.append("guidance 1: no unconditional pass")
    kind = "less" if ratio < 1.0 else "more"
    return f"{kind} work: {100.0 * ratio:.0f} % of the baseline's model FLOPs" + (f" ({'; '.join(why)})" if why else "")


def expected_note(ladder: Ladder, row: LadderRow) -> str:
    """The document's figure for the row, and whether the measured GPU could reach it at all."""
    exp = row.expected
    if exp is None or (exp.speedup is None and exp.time_s is None):
        return ""
    parts = []
    if exp.speedup is not None:
        parts.append(f"{exp.speedup:.2f}x")
    if exp.time_s is not None:
        parts.append(f"{exp.time_s:g} s")
    text = " / ".join(parts)
    floor = row.figures.steps_floor_s if row.figures is not None else None
    base = ladder.baseline.figures
    implied = [exp.time_s] if exp.time_s is not None else []
    if exp.speedup and base is not None and base.inference_s:
        implied.append(base.inference_s / exp.speedup)
    if floor is not None and implied and min(implied) < floor:
        text += f" (impossible here: below the {fmt_s(floor)} s FLOP floor of this row's steps on this GPU)"
    return text


# -------------------------------------------------------------------------------------------- document
def ladder_document(ladder: Ladder) -> dict[str, Any]:
    """The JSON document: the raw rows plus what is derived from them (checked by `check_ladder`)."""
    doc = dataclasses.asdict(ladder)
    for data, row in zip(doc["rows"], ladder.rows, strict=True):
        data["derived"] = {"speedup": speedup(ladder, row), "work_ratio": work_ratio(ladder, row),
                           "speedup_without_compile": speedup_without_compile(ladder, row)}
    return doc


def _build(cls: type, data: Mapping[str, Any], what: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{what}: unknown fields {sorted(unknown)} (schema {LADDER_SCHEMA})")
    return cls(**data)


def ladder_from_document(doc: Mapping[str, Any]) -> Ladder:
    """Inverse of `ladder_document` (the derived block is dropped; `check_ladder` compares it)."""
    if doc.get("schema") != LADDER_SCHEMA:
        raise ValueError(f"ladder schema is {doc.get('schema')!r}; expected {LADDER_SCHEMA!r}")
    rows = []
    for data in doc.get("rows", []):
        row = {k: v for k, v in data.items() if k != "derived"}
        for key, cls in (("figures", RowFigures), ("deviation", Deviation), ("expected", Expected)):
            if row.get(key) is not None:
                row[key] = _build(cls, row[key], f"row {data.get('id')!r} {key}")
        rows.append(_build(LadderRow, row, f"row {data.get('id')!r}"))
    body = {k: v for k, v in doc.items() if k != "rows"}
    return _build(Ladder, {**body, "rows": rows}, "ladder")


# -------------------------------------------------------------------------------------------- Markdown
def _changes(row: LadderRow) -> str:
    if row.baseline:
        return "baseline"
    text = "; ".join(f"{k} {_value(v)}" for k, v in row.changes.items()) or "(same settings as the baseline)"
    if row.dropped:
        text += f" (without {', '.join(row.dropped)}: skipped above)"
    return text


def _value(value: Any) -> str:
    if isinstance(value, dict) and {"file", "strength_high", "strength_low"} <= set(value):  # a LoRA entry
        return f"{value['file']} ({value['strength_high']:g} / {value['strength_low']:g})"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {_value(v)}" for k, v in value.items()) + ")"
    if isinstance(value, list):
        return " + ".join(_value(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _deviation_cells(row: LadderRow) -> list[str]:
    if row.baseline:
        return ["reference", "reference"]
    dev = row.deviation
    if dev is None:
        return [NA, NA]
    l2 = dev.latent_rel_l2
    l2_text = NA if l2 is None else ("0 (identical)" if l2 == 0 else f"{l2:.3e}")
    if dev.video_identical:
        psnr = "identical"
    else:
        psnr = NA if dev.psnr_db is None else f"{dev.psnr_db:.2f}"
    return [l2_text, psnr]


def _row_cells(ladder: Ladder, index: int, row: LadderRow, with_expected: bool) -> list[str]:
    f = row.figures
    status = row.status if row.reason is None else f"{row.status}: {row.reason}"
    ratio = speedup(ladder, row)
    steady = speedup_without_compile(ladder, row)
    speed = NA if ratio is None else f"{ratio:.2f}x"
    if steady is not None:
        speed += f" ({steady:.2f}x without compiling)"
    cells = [
        str(index),
        f"{row.name} ({row.id})",
        _changes(row),
        status.replace("|", "/"),
        NA if f is None else fmt_s(f.load_s),
        NA if f is None else fmt_s(f.inference_s),
        NA if f is None else fmt_s(f.s_per_step),
        NA if f is None else fmt_gb(f.peak_allocated_bytes),
        NA if f is None else fmt_pct(f.mfu_pct),
        NA if f is None or f.compile_s is None else fmt_s(f.compile_s),
        speed,
        "baseline" if row.baseline else work_note(ladder, row),
        *_deviation_cells(row),
    ]
    if with_expected:
        cells.append(expected_note(ladder, row) or "-")
    cells.append(f"[mp4]({row.video})" if row.video else NA)
    return cells


HEADERS = ["#", "Configuration", "Changes", "Status", "Load (s)", "Inference (s)", "s/step", "Peak GPU mem (GB)",
           "MFU (%)", "Compile (s)", "Speed-up", "Work vs baseline", "Latent rel. L2", "PSNR (dB)"]


def render_ladder(ladder: Ladder) -> str:
    """The ladder's Markdown report (a pure function of the document)."""
    with_expected = any(r.expected is not None for r in ladder.rows)
    headers = [*HEADERS, *(["Expected (document)"] if with_expected else []), "Video"]
    lines = [f"# Optimisation ladder: {ladder.suite}", "", ladder.description, ""]
    if ladder.source:
        lines += [f"- **Reproduces**: {ladder.source}"]
    lines += [
        f"- **Machine**: {ladder.machine}",
        f"- **Rows run**: {ladder.execution}",
        f"- **Baseline settings**: {_value(ladder.baseline_settings) if ladder.baseline_settings else 'as shipped'}",
        *[f"- Note: {note}" for note in ladder.notes],
        "",
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join(":---" for _ in headers) + " |",
    ]
    lines += ["| " + " | ".join(_row_cells(ladder, i, r, with_expected)) + " |" for i, r in enumerate(ladder.rows)]
    notes = [f"- {r.id}: {r.deviation.note}" for r in ladder.rows if r.deviation is not None and r.deviation.note]
    if notes:
        lines += ["", "Deviation not measured:", "", *notes]
    sources = sorted({r.expected.source for r in ladder.rows if r.expected is not None and r.expected.source})
    lines += ["", *_legend(ladder, with_expected)]
    lines += [f"- Expected figures from: {source}" for source in sources]
    return "\n".join(lines).rstrip() + "\n"


def _legend(ladder: Ladder, with_expected: bool) -> list[str]:
    lines = [
        "- **Inference (s)**: every denoising step (loading + inference, computed and reused); **Load (s)**: the "
        "model loaders (Model_Initialization). **s/step** and **MFU** cover the steps that ran the model "
        "(report legend). `n/a` = not measured; GPU memory and MFU need a CUDA GPU.",
        "- **Speed-up** = the baseline's inference time / the row's, measured in this ladder run on this machine, "
        "never copied from a document. A row that compiles (torch.compile) spends **Compile (s)** inside its "
        "first steps: the speed-up counts it (one run, as a user waits for it), and the figure in brackets "
        "leaves it out (what later runs of a warm process would see). **Work vs baseline** compares the model "
        "FLOPs of the computed steps: a speed-up from less work (fewer steps, reused steps, no unconditional "
        "pass) is not a faster kernel.",
        "- **Deviation** from the baseline's output: relative L2 of the final latent, and PSNR of the decoded "
        "frames as saved in the mp4 (lossy h264, so identical latents give identical frames, and small "
        "differences include compression noise). It is numeric (same noise, same weights unless the row "
        "changes them), not a judgement of visual quality.",
    ]
    if ladder.random_weights:
        lines.append("- These runs use random-weight tiny models: the videos are noise patterns, so only the numbers "
                     "mean anything; they check that each configuration runs and how far it moves the output.")
    if with_expected:
        lines.append("- **Expected (document)**: the speed-up (cumulative, against its baseline) and time the "
                     "reproduced document claims, beside the measured ones; a claim that would need the steps to "
                     "run faster than the GPU's dense peak allows is marked impossible.")
    lines.append("- Skipped rows could not run here (the reason says what is missing); failed rows raised (the "
                 "error is shown). Neither is dropped.")
    return lines


# -------------------------------------------------------------------------------------------- checks
def check_ladder(doc: Mapping[str, Any], *, markdown: str | None = None,
                 runs: Mapping[str, RunRecord] | None = None) -> list[str]:
    """Problems in a ladder document; [] when consistent. `runs` (row id -> its report's run) lets
    the figures be recomputed from the reports; `markdown` is compared with the rendering."""
    try:
        ladder = ladder_from_document(doc)
    except (ValueError, TypeError, KeyError) as err:
        return [f"ladder does not parse: {err}"]
    problems = _check_rows(ladder)
    for data, row in zip(doc.get("rows", []), ladder.rows, strict=True):
        derived = data.get("derived", {})
        derivations = (("speedup", speedup(ladder, row)), ("work_ratio", work_ratio(ladder, row)),
                       ("speedup_without_compile", speedup_without_compile(ladder, row)))
        for name, value in derivations:
            if not _same(derived.get(name), value):
                problems.append(f"row {row.id}: {name} {derived.get(name)!r} is not what its figures give ({value!r})")
        if runs is not None and row.id in runs and row.figures is not None:
            if dataclasses.asdict(row_figures(runs[row.id])) != dataclasses.asdict(row.figures):
                problems.append(f"row {row.id}: figures differ from its run report {row.report}")
    if markdown is not None and markdown != render_ladder(ladder):
        problems.append("ladder Markdown differs from what the document renders")
    return problems


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9)


def _check_rows(ladder: Ladder) -> list[str]:
    problems = []
    rows: Sequence[LadderRow] = ladder.rows
    if not rows or not rows[0].baseline or any(r.baseline for r in rows[1:]):
        problems.append("a ladder has exactly one baseline row, first")
    for row in rows:
        where = f"row {row.id}"
        if row.status not in STATUSES:
            problems.append(f"{where}: status {row.status!r} is not one of {STATUSES}")
        if row.status == MEASURED and (row.figures is None or row.reason is not None):
            problems.append(f"{where}: measured rows carry figures and no reason")
        if row.status != MEASURED and (row.reason is None or row.figures is not None or row.deviation is not None):
            problems.append(f"{where}: a {row.status} row carries its reason and no figures")
        dev = row.deviation
        if row.baseline and dev is not None:
            problems.append(f"{where}: the baseline has no deviation from itself")
        if dev is not None:
            if dev.latent_rel_l2 is not None and dev.latent_rel_l2 < 0:
                problems.append(f"{where}: negative latent deviation {dev.latent_rel_l2}")
            if dev.video_identical and dev.psnr_db is not None:
                problems.append(f"{where}: identical frames with a finite PSNR {dev.psnr_db}")
    return problems
