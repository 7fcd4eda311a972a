"""Consistency checker for report JSON (and the Markdown beside it).

`check_report(path_or_dict)` returns a list of problems (empty when consistent). It recomputes
every derived figure from the raw records and fails on contradictions: an unmeasured value shown
as a number, a statement about utilization the figures do not support, stage times that do not
account for the total (time outside every top-level stage above the margin of max(`SUM_MARGIN_PCT`
% of the total, `SUM_MARGIN_ABS_S`) that the session did not record as outside time, overlapping
top-level stages), a memory verdict about another GPU (or a peak above the GPU's capacity), a step
count that differs from the steps recorded, a CPU % above 100 x the logical cores the system facts
record, unnamed stages, and mis-encoded text (mojibake).

The Markdown beside a JSON file is checked against the records too: it must be exactly what
`render_markdown` makes of them (chart lines aside), so a number edited in, an `n/a` turned into
a figure or a mislabelled activity column fails; and each hardware group's and case's activity
labels must fit the metric its own runs used.

A ladder document (`ladder.py`) is checked against its Markdown and against each row's run report
(`check_ladder_file`): speed-ups and work ratios must follow from the measured figures, and the
figures from the reports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from .figures import SUM_MARGIN_ABS_S, SUM_MARGIN_PCT, covered_s, sum_margin_s, summarize_run
from .findings import ACTIVITY_HIGH_PCT, ACTIVITY_LOW_PCT, analyze_run
from .formatting import NA
from .ladder import LADDER_SCHEMA, check_ladder
from .ranks import check_parallel
from .records import ACTIVITY_BUSY, REPORT_SCHEMA_VERSION, RunRecord, run_from_dict
from .report import group_runs, render_markdown

SUM_MARGIN_PCT_TEXT = f"{SUM_MARGIN_PCT:g} % of the total, {SUM_MARGIN_ABS_S:g} s"
_MOJIBAKE = ("\u00c3", "\u00e2\u20ac", "\u00f0\u0178", "\ufffd", "\u00c2\u00a0")
_LOW_UTIL = re.compile(r"\blow\b[^.]*\b(utili[sz]ation|activity|busy)", re.IGNORECASE)


def check_report(source: str | os.PathLike[str] | dict[str, Any]) -> list[str]:
    """Problems found in a report JSON (a path or the parsed dict); [] when it is consistent.

    With a path, the Markdown file of the same name beside it (if any) is checked too. A ladder
    document (`ladder.LADDER_SCHEMA`) is checked by `check_ladder_file`.
    """
    problems: list[str] = []
    if isinstance(source, dict):
        doc = source
        if doc.get("schema") == LADDER_SCHEMA:
            return check_ladder(doc)
    else:
        path = Path(source)
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return [f"{path}: not UTF-8 ({err})"]
        doc = json.loads(text)
        if doc.get("schema") == LADDER_SCHEMA:
            return check_ladder_file(path, doc)
        md = path.with_suffix(".md")
        if md.is_file():
            problems += check_markdown(md.read_text(encoding="utf-8"), doc)
    if doc.get("schema") != REPORT_SCHEMA_VERSION:
        return problems + [f"schema is {doc.get('schema')!r}; expected {REPORT_SCHEMA_VERSION!r}"]
    runs = doc.get("runs")
    if not runs:
        return problems + ["the report holds no runs"]
    for data in runs:
        problems += _check_run(data)
    try:
        problems += check_parallel([run_from_dict(r) for r in runs])
    except (ValueError, TypeError, KeyError) as err:
        problems.append(f"parallel runs: the records do not parse: {err}")
    return problems


def check_ladder_file(path: Path, doc: dict[str, Any]) -> list[str]:
    """A ladder JSON: its derived figures, its Markdown beside it, and every row's figures against
    the row's own run report (paths relative to the ladder file; each report checked as well)."""
    runs: dict[str, RunRecord] = {}
    problems: list[str] = []
    for row in doc.get("rows", []):
        report = row.get("report") if isinstance(row, dict) else None
        if not report:
            continue
        report_path = path.parent / report
        if not report_path.is_file():
            problems.append(f"row {row.get('id')}: its run report {report} is missing")
            continue
        report_doc = json.loads(report_path.read_text(encoding="utf-8"))
        problems += [f"row {row.get('id')}: {p}" for p in check_report(report_path)]
        parsed = [run_from_dict(r) for r in report_doc.get("runs", [])]
        if len(parsed) != 1:
            problems.append(f"row {row.get('id')}: its report holds {len(parsed)} runs; a ladder row has one")
            continue
        runs[row["id"]] = parsed[0]
    md = path.with_suffix(".md")
    markdown = md.read_text(encoding="utf-8") if md.is_file() else None
    return problems + check_ladder(doc, markdown=markdown, runs=runs)


def check_markdown(text: str, doc: dict[str, Any] | None = None) -> list[str]:
    """Encoding and wording problems in a rendered report."""
    problems = [
        f"Markdown: mojibake sequence {seq!r} (text was decoded with the wrong encoding)"
        for seq in _MOJIBAKE
        if seq in text
    ]
    if re.search(r"^\|\s*Unknown\s*\|", text, re.MULTILINE):
        problems.append("Markdown: a stage row is named 'Unknown'")
    if doc is not None:
        metrics = {r.get("system", {}).get("activity_metric") for r in doc.get("runs", [])}
        if metrics == {ACTIVITY_BUSY} and _SM_WORDS.search(text):
            problems.append("Markdown: NVML utilization (GPU busy) is labelled as SM activity")
        try:
            runs = [run_from_dict(r) for r in doc.get("runs", [])]
        except (ValueError, TypeError, KeyError) as err:
            return problems + [f"Markdown: cannot check it, the records do not parse: {err}"]
        if runs:
            problems += _check_labels(text, runs)
            problems += _compare_rendered(text, runs)
    return problems


_SM_WORDS = re.compile(r"SM Act|SM activity|SM\(%\)")
_NUMBER = re.compile(r"^-?\d+(\.\d+)?(e[-+]?\d+)?$")


def _sections(text: str, heading: str) -> dict[str, str]:
    """Text of each section whose heading line starts with `heading`, up to the next `#`/`##` one."""
    out: dict[str, str] = {}
    parts = re.split(r"^(?=#{1,2} )", text, flags=re.MULTILINE)
    for part in parts:
        if part.startswith(heading):
            out[part.splitlines()[0][len(heading) :].strip()] = part
    return out


def _check_labels(text: str, runs: list[RunRecord]) -> list[str]:
    """Per hardware group and per case: a GPU-busy run is never labelled SM activity."""
    problems: list[str] = []
    groups = _sections(text, "## Hardware Group ")
    for label, members in group_runs(runs).items():
        section = next((v for k, v in groups.items() if k.split(": ", 1)[-1] == label), None)
        if section is None:
            problems.append(f"Markdown: no summary for hardware group {label!r}")
            continue
        busy = {r.system.activity_metric for r in members} == {ACTIVITY_BUSY}
        if busy and _SM_WORDS.search(section):
            problems.append(f"Markdown: group {label!r} measured GPU busy (NVML utilization) but is labelled SM")
        if not busy and "Busy(%)" in section:
            problems.append(f"Markdown: group {label!r} did not measure GPU busy but has a Busy(%) column")
    cases = _sections(text, "## Case: ")
    for run in runs:
        heading = next((k for k in cases if k.startswith(f"{run.context.case_name} (")), None)
        if heading is None:
            problems.append(f"Markdown: no section for case {run.context.case_name!r}")
        elif run.system.activity_metric == ACTIVITY_BUSY and _SM_WORDS.search(cases[heading]):
            problems.append(
                f"Markdown: case {run.context.case_name!r} measured GPU busy but is labelled SM activity"
            )
    return problems


def _compare_rendered(text: str, runs: list[RunRecord]) -> list[str]:
    """The Markdown must be what `render_markdown` makes of the records (chart lines aside)."""
    lines = text.splitlines()
    notes = [ln[len("- Note: ") :] for ln in lines[: _first_group_line(lines)] if ln.startswith("- Note: ")]
    expected = render_markdown(runs, notes=notes).splitlines()
    free = {i + 2 for i, ln in enumerate(expected) if ln == "### Timeline"}  # the chart line
    for i, (want, got) in enumerate(zip(expected, lines, strict=False)):
        if i in free or want == got:
            continue
        where = f"Markdown line {i + 1}"
        if want.startswith("|") and got.startswith("|"):
            w_cells, g_cells = want.split("|"), got.split("|")
            if len(w_cells) == len(g_cells):
                for w, g in zip(w_cells, g_cells, strict=True):
                    if w.strip() == NA and _NUMBER.match(g.strip()):
                        return [f"{where}: unmeasured value printed as the number {g.strip()!r} ({want.strip()})"]
                    if w.strip() != g.strip():
                        return [f"{where}: cell {g.strip()!r} differs from the records ({w.strip()!r})"]
        return [f"{where}: {got!r} differs from what the records render ({want!r})"]
    if len(expected) != len(lines):
        return [f"Markdown: {len(lines)} lines, the records render {len(expected)}"]
    return []


def _first_group_line(lines: list[str]) -> int:
    return next((i for i, ln in enumerate(lines) if ln.startswith("## ")), len(lines))


def _check_run(data: dict[str, Any]) -> list[str]:
    case = data.get("context", {}).get("case_name", "?")
    where = f"case {case!r}"
    try:
        run = run_from_dict(data)
    except (ValueError, TypeError, KeyError) as err:
        return [f"{where}: records do not parse: {err}"]
    problems = _check_records(run, where)
    summary = summarize_run(run)
    expected = dataclasses.asdict(summary)
    stored = data.get("summary")
    if stored is None:
        problems.append(f"{where}: no 'summary' block")
    else:
        problems += _compare(expected, stored, f"{where}: summary")
        problems += _check_sum(run, where)
        problems += _check_steps(run, stored, where)
    analysis = data.get("analysis")
    if analysis is None:
        problems.append(f"{where}: no 'analysis' block")
    else:
        problems += _check_statements(run, stored or expected, analysis, where)
        expected_analysis = dataclasses.asdict(analyze_run(run, summary))
        if [s["text"] for s in analysis.get("findings", [])] != [
            s["text"] for s in expected_analysis["findings"]
        ] or [s["text"] for s in analysis.get("recommendations", [])] != [
            s["text"] for s in expected_analysis["recommendations"]
        ]:
            problems.append(f"{where}: analysis text differs from what the records support")
    return problems


def _check_records(run: RunRecord, where: str) -> list[str]:
    problems: list[str] = []
    measured_gpu = run.system.activity_metric is not None
    for s in (*run.stages, run.total):
        label = f"{where}: stage {s.name!r}"
        if not s.name or s.name.lower() == "unknown":
            problems.append(f"{where}: a stage has no real name ({s.name!r})")
        if s.end_s < s.start_s:
            problems.append(f"{label}: ends before it starts ({s.start_s} > {s.end_s})")
        if s.start_s < -1e-9 or s.end_s > run.total.end_s + 1e-9:
            problems.append(f"{label}: lies outside Total_Execution [0, {run.total.end_s}]")
        if not measured_gpu and (s.activity_mean_pct is not None or s.activity_max_pct is not None):
            problems.append(
                f"{label}: activity {s.activity_mean_pct} shown although no GPU activity was measured"
            )
        if s.activity_mean_pct is not None and s.num_samples == 0:
            problems.append(f"{label}: activity {s.activity_mean_pct} without any sample behind it")
        if (
            s.activity_mean_pct is not None
            and s.activity_max_pct is not None
            and s.activity_max_pct + 1e-9 < s.activity_mean_pct
        ):
            problems.append(f"{label}: activity max {s.activity_max_pct} < mean {s.activity_mean_pct}")
        if s.device == "cpu" and s.memory.allocated_peak is not None:
            problems.append(f"{label}: CUDA memory {s.memory.allocated_peak} shown for a CPU run")
        if s.cached and (s.duration_s != 0 or s.activity_mean_pct is not None):
            problems.append(f"{label}: marked cached but carries measurements")
    problems += _check_cpu(run, where)
    capacity = run.system.gpu_memory_bytes
    for figure in (run.total.memory.reserved_peak, run.total.memory.device_used_max):
        if capacity is not None and figure is not None and figure > capacity:
            problems.append(
                f"{where}: memory {figure / 1e9:.2f} GB exceeds the {capacity / 1e9:.2f} GB of "
                f"{run.system.gpu_name}: the figures are from another GPU"
            )
    if run.system.gpu_name is None and capacity is not None:
        problems.append(f"{where}: GPU capacity given without a GPU")
    return problems


def _check_cpu(run: RunRecord, where: str) -> list[str]:
    """Process CPU % can never exceed 100 x the logical cores (nor be negative)."""
    cores = run.system.cpu_logical_cores
    top = None if cores is None else 100.0 * cores
    problems = []
    figures = [(f"stage {s.name!r}", s.cpu_pct) for s in (*run.stages, run.total)]
    figures += [(f"sample at {x.t_s:.3f} s", x.cpu_pct) for x in run.samples]
    for label, value in figures:
        if value is None:
            continue
        if value < -1e-9:
            problems.append(f"{where}: {label}: CPU {value:.1f} % is negative")
        elif top is not None and value > top + 1e-6:
            problems.append(f"{where}: {label}: CPU {value:.1f} % exceeds the {top:.0f} % that "
                            f"{cores} logical cores allow")
    return problems


def _compare(expected: Any, stored: Any, where: str) -> list[str]:
    if isinstance(expected, dict):
        if not isinstance(stored, dict):
            return [f"{where}: expected an object, got {stored!r}"]
        out: list[str] = []
        for key in expected.keys() | stored.keys():
            if key not in stored:
                out.append(f"{where}.{key}: missing")
            elif key not in expected:
                out.append(f"{where}.{key}: unknown field")
            else:
                out += _compare(expected[key], stored[key], f"{where}.{key}")
        return out
    if expected is None and isinstance(stored, (int, float)) and not isinstance(stored, bool):
        return [f"{where}: unmeasured value shown as the number {stored}"]
    if stored is None and expected is not None:
        return [f"{where}: measured value {expected!r} is missing"]
    if isinstance(expected, (int, float)) and isinstance(stored, (int, float)):
        if not math.isclose(float(expected), float(stored), rel_tol=1e-6, abs_tol=1e-9):
            return [f"{where}: {stored} disagrees with the records ({expected})"]
        return []
    if isinstance(expected, list) and isinstance(stored, list) and len(expected) == len(stored):
        return [p for e, s in zip(expected, stored, strict=True) for p in _compare(e, s, where)]
    return [] if expected == stored else [f"{where}: {stored!r} disagrees with the records ({expected!r})"]


def _check_sum(run: RunRecord, where: str) -> list[str]:
    """Top-level stages must account for Total_Execution: what they leave uncovered is either
    within the margin or recorded by the session as outside time (interval by interval)."""
    total = run.total.duration_s
    margin = sum_margin_s(total)
    top = [s for s in run.top_level if not s.cached]
    covered = covered_s(top, total)
    stage_sum = sum(s.duration_s for s in top)
    uncovered = total - covered
    recorded = sum(o.duration_s for o in run.outside)
    problems = []
    if stage_sum > covered + margin:
        problems.append(
            f"{where}: top-level stages add up to {stage_sum:.3f} s but cover only {covered:.3f} s of the "
            f"{total:.3f} s total: stages overlap"
        )
    if abs(uncovered - recorded) > margin:
        problems.append(
            f"{where}: stage times do not add up to the total: {uncovered:.3f} s of the {total:.3f} s lie "
            f"outside every top-level stage, but {recorded:.3f} s was recorded as outside time "
            f"(margin {margin:.3f} s = max({SUM_MARGIN_PCT_TEXT}))"
        )
    for o in run.outside:
        inside = [s.name for s in top if s.start_s < o.end_s - 1e-9 and s.end_s > o.start_s + 1e-9]
        if o.end_s < o.start_s or o.start_s < -1e-9 or o.end_s > total + 1e-9 or inside:
            problems.append(
                f"{where}: outside interval {o.start_s:.3f}-{o.end_s:.3f} s is not outside the stages "
                f"({', '.join(inside) or 'it lies outside Total_Execution'})"
            )
    return problems


def _check_steps(run: RunRecord, stored: dict[str, Any], where: str) -> list[str]:
    steps = sorted(
        {s.step for s in run.stages if s.kind == "step-inference" and s.step is not None and not s.cached}
    )
    cached = {s.step for s in run.stages if s.kind == "step-inference" and s.step is not None and s.cached}
    problems = []
    if steps and not cached and steps != list(range(len(steps))):
        problems.append(f"{where}: step indices {steps} are not 0..{len(steps) - 1}")
    if stored.get("num_steps_recorded") != len(steps):
        problems.append(
            f"{where}: shows {stored.get('num_steps_recorded')} steps but {len(steps)} were recorded"
        )
    planned = run.context.steps
    if planned is not None and planned != len(set(steps) | cached) and run.status == "completed":
        problems.append(
            f"{where}: the run facts say {planned} steps but {len(steps)} steps were recorded"
            + (f" and {len(cached)} served from cache" if cached else "")
        )
    return problems


def _check_statements(
    run: RunRecord, summary: dict[str, Any], analysis: dict[str, Any], where: str
) -> list[str]:
    problems: list[str] = []
    act = summary.get("step_activity_pct")
    busy = run.system.activity_metric == ACTIVITY_BUSY
    for st in [*analysis.get("findings", []), *analysis.get("recommendations", [])]:
        rule, text, figures = st.get("rule"), st.get("text", ""), st.get("figures", {})
        label = f"{where}: statement {text[:60]!r}"
        cited = figures.get("step_activity_pct")
        if rule in ("activity_high", "activity_low", "activity_moderate"):
            if act is None or cited is None:
                problems.append(f"{label}: speaks of utilization that was not measured")
            elif not math.isclose(cited, act, rel_tol=1e-6):
                problems.append(f"{label}: cites {cited} % but the steps show {act} %")
            elif (
                rule == "activity_high"
                and act < ACTIVITY_HIGH_PCT
                or rule == "activity_low"
                and act >= ACTIVITY_LOW_PCT
            ):
                problems.append(f"{label}: verdict {rule} does not fit {act:.1f} %")
        if _LOW_UTIL.search(text) and rule != "activity_low":
            problems.append(f"{label}: claims low utilization, which the figures ({act} %) do not support")
        if busy and "SM activity" in text:
            problems.append(f"{label}: calls NVML utilization 'SM activity'")
        if rule == "memory" and figures.get("gpu_name") != run.system.gpu_name:
            problems.append(
                f"{label}: memory verdict about {figures.get('gpu_name')!r}, but the run was on "
                f"{run.system.gpu_name!r}"
            )
        if rule == "memory" and figures.get("gpu_memory_bytes") not in (None, run.system.gpu_memory_bytes):
            problems.append(
                f"{label}: judges against {figures.get('gpu_memory_bytes')} bytes, not the measured "
                f"GPU's {run.system.gpu_memory_bytes}"
            )
    return problems
