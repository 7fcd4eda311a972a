"""Report files: the versioned JSON document (written and read back) and `write_report` (.md + .json + .png).

All files are written atomically through the pack's one writer, `util.atomic`. Merging several
report files into one report is `merge.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..util.atomic import atomic_write_text
from .chart import draw_timeline
from .figures import summarize_run
from .findings import analyze_run
from .ranks import label_ranks
from .records import REPORT_SCHEMA_VERSION, RunRecord, run_from_dict, run_to_dict
from .report import render_markdown
from .session import ProfileSession


def run_document(run: RunRecord) -> dict[str, Any]:
    """One run in the report JSON: the raw records plus the derived figures and statements shown."""
    summary = summarize_run(run)
    analysis = analyze_run(run, summary)
    data = run_to_dict(run)
    data["summary"] = dataclasses.asdict(summary)
    data["analysis"] = dataclasses.asdict(analysis)
    return data


def report_document(runs: Sequence[RunRecord]) -> dict[str, Any]:
    return {"schema": REPORT_SCHEMA_VERSION, "runs": [run_document(r) for r in runs]}


def load_runs(path: str | os.PathLike[str]) -> list[RunRecord]:
    """Runs from a report JSON (`wanbench.report/1`) file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"report JSON not found: {p} (write it with write_report or `wanbench run`)")
    return runs_from_document(json.loads(p.read_text(encoding="utf-8")), where=str(p))


def runs_from_document(doc: dict[str, Any], *, where: str = "report") -> list[RunRecord]:
    if doc.get("schema") != REPORT_SCHEMA_VERSION:
        raise ValueError(f"{where}: schema is {doc.get('schema')!r}; expected {REPORT_SCHEMA_VERSION!r}")
    return [run_from_dict(r) for r in doc["runs"]]


class ReportFiles(dict[str, Path]):
    """The paths `write_report` wrote: keys "md", "json", "png" / "png:<case>"; also as attributes."""

    @property
    def markdown(self) -> Path:
        return self["md"]

    @property
    def json(self) -> Path:
        return self["json"]

    @property
    def chart(self) -> Path | None:
        """The chart of a single-run report (None when it was skipped)."""
        return self.get("png")


def _as_runs(source: ProfileSession | RunRecord | Sequence[RunRecord]) -> list[RunRecord]:
    if isinstance(source, ProfileSession):
        if source.record is None:
            raise ValueError(f"profile session {source.case_name!r} is still open; close() it before writing")
        return [source.record]
    if isinstance(source, RunRecord):
        return [source]
    runs = list(source)
    if not runs or not all(isinstance(r, RunRecord) for r in runs):
        raise TypeError("write_report takes a closed ProfileSession, a RunRecord or a non-empty list of them")
    return runs


def write_report(
    source: ProfileSession | RunRecord | Sequence[RunRecord],
    out_dir: str | os.PathLike[str],
    *,
    basename: str = "wanbench_report",
    chart: bool = True,
) -> ReportFiles:
    """Write `<basename>.md`, `<basename>.json` and the timeline PNG(s); returns their paths.

    Keys: "md", "json", and "png" (one run) or "png:<case>" (several runs) for each chart drawn.
    The ranks of a parallel run are labelled with their rank (`ranks.label_ranks`).
    """
    runs = label_ranks(_as_runs(source))
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = ReportFiles()
    notes: dict[str, str] = {}
    for run in runs:
        case = run.context.case_name
        if not chart:
            notes[case] = "Chart skipped: charts were turned off for this report."
            continue
        name = f"{basename}.png" if len(runs) == 1 else f"{basename}_{_safe(case)}.png"
        result = draw_timeline(run, folder / name)
        if result.path is None:
            notes[case] = f"Chart skipped: {result.skipped_reason}."
            continue
        written["png" if len(runs) == 1 else f"png:{case}"] = result.path
        missing = "" if run.system.activity_metric else " GPU series are unavailable; it shows CPU % and RSS."
        notes[case] = f"![timeline of {case}]({name}){missing}"
    md_path, json_path = folder / f"{basename}.md", folder / f"{basename}.json"
    atomic_write_text(json_path, json.dumps(report_document(runs), indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(md_path, render_markdown(runs, chart_notes=notes))
    written["md"], written["json"] = md_path, json_path
    return written


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
