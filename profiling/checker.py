"""Consistency checker for report JSON (and the Markdown beside it).

`check_report(path_or_dict)` returns a list of problems (empty when consistent). It recomputes
every derived figure from the raw records and fails on contradictions: an unmeasured value shown
as a number, a statement about utilization the figures do not support, stage times that do not
add up to the total within `SUM_MARGIN_PCT`, a memory verdict about another GPU (or a peak above
the GPU's capacity), a step count that differs from the steps recorded, unnamed stages, and
mis-encoded text (mojibake).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from .analysis import (
    ACTIVITY_HIGH_PCT,
    ACTIVITY_LOW_PCT,
    SUM_MARGIN_ABS_S,
    SUM_MARGIN_PCT,
    analyze_run,
    summarize_run,
)
from .records import ACTIVITY_BUSY, REPORT_SCHEMA_VERSION, RunRecord, run_from_dict

_MOJIBAKE = ("\u00c3", "\u00e2\u20ac", "\u00f0\u0178", "\ufffd", "\u00c2\u00a0")
_LOW_UTIL = re.compile(r"\blow\b[^.]*\b(utili[sz]ation|activity|busy)", re.IGNORECASE)


def check_report(source: str | os.PathLike[str] | dict[str, Any]) -> list[str]:
    """Problems found in a report JSON (a path or the parsed dict); [] when it is consistent.

    With a path, the Markdown file of the same name beside it (if any) is checked too.
    """
    problems: list[str] = []
    if isinstance(source, dict):
        doc = source
    else:
        path = Path(source)
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return [f"{path}: not UTF-8 ({err})"]
        doc = json.loads(text)
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
    return problems


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
        if metrics == {ACTIVITY_BUSY} and re.search(r"SM Act|SM activity|SM\(%\)", text):
            problems.append("Markdown: NVML utilization (GPU busy) is labelled as SM activity")
    return problems


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
        problems += _check_sum(stored, where)
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


def _check_sum(stored: dict[str, Any], where: str) -> list[str]:
    total, stages, outside = stored.get("total_s"), stored.get("stage_sum_s"), stored.get("outside_s")
    if not all(isinstance(v, (int, float)) for v in (total, stages, outside)):
        return [f"{where}: stage sum, outside time or total is missing"]
    margin = max(SUM_MARGIN_PCT / 100.0 * total, SUM_MARGIN_ABS_S)
    problems = []
    if abs(stages + outside - total) > margin:
        problems.append(
            f"{where}: stage times ({stages:.3f} s + {outside:.3f} s outside) do not add up to the "
            f"total {total:.3f} s within {SUM_MARGIN_PCT} %"
        )
    if outside < -margin:
        problems.append(
            f"{where}: top-level stages ({stages:.3f} s) exceed the total ({total:.3f} s); "
            "stages overlap or the total is wrong"
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
