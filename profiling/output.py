"""Report files: the versioned JSON document (written and read back) and `write_report` (.md + .json + .png).

All files are written atomically through the pack's one writer, `util.atomic`. Merging several
report files into one report is `merge.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..util.atomic import atomic_group
from .chart import draw_timeline
from .figures import summarize_run
from .findings import analyze_run
from .formatting import NA, activity_label, fmt_gb, fmt_pct, fmt_s, markdown_text
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


def summary_cards(runs: Sequence[RunRecord]) -> list[dict[str, str]]:
    """What a user wants first about each run, as display text (the report node shows it as a table).

    Keys: case, task, size, steps, status, total_s, s_per_step, peak_memory, activity, mfu,
    top_finding. Unmeasured figures read `n/a` (with the reason where there is one), never 0. The
    values are plain text: the UI inserts them as text, never as HTML.
    """
    cards = []
    for run in runs:
        summary = summarize_run(run)
        analysis = analyze_run(run, summary)
        c = run.context
        size = " x ".join(str(v) for v in (c.width, c.height) if v is not None) or NA
        if c.frames is not None:
            size += f", {c.frames} frames"
        if summary.peak_allocated_bytes is not None:
            memory = f"{fmt_gb(summary.peak_allocated_bytes)} GB (CUDA peak)"
        elif summary.rss_max_bytes is not None:
            memory = f"{fmt_gb(summary.rss_max_bytes)} GB (process RSS; no GPU)"
        else:
            memory = NA
        if summary.step_activity_pct is not None:
            activity = f"{activity_label(summary.activity_metric)} {fmt_pct(summary.step_activity_pct)} %"
        else:
            activity = f"n/a ({run.system.activity_unavailable_reason or 'no GPU activity was measured'})"
        cards.append(
            {
                "case": c.case_name,
                "task": c.task or NA,
                "size": size,
                "steps": str(summary.num_steps_recorded),
                "status": run.status,
                "total_s": fmt_s(summary.total_s),
                "s_per_step": fmt_s(summary.s_per_step),
                "peak_memory": memory,
                "activity": activity,
                "mfu": NA if summary.mfu_pct is None else f"{fmt_pct(summary.mfu_pct)} %",
                "top_finding": analysis.findings[0].text if analysis.findings else NA,
            }
        )
    return cards


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
    extra: Mapping[str, tuple[str, Callable[[Path], object]]] | None = None,
) -> ReportFiles:
    """Write `<basename>.md`, `<basename>.json` and the timeline PNG(s); returns their paths.

    Keys: "md", "json", and "png" (one run) or "png:<case>" (several runs) for each chart drawn.
    `extra` adds files that belong to the report (the node's latent): key -> (file name in the
    folder, a function that writes the file at the path it is given); they join the group.
    The ranks of a parallel run are labelled with their rank (`ranks.label_ranks`). The files
    appear together or not at all (`util.atomic.atomic_group`): a failure while writing any of them
    (a full disk while writing the Markdown, say) leaves none, so no JSON can claim a completed run
    whose report is missing.
    """
    runs = label_ranks(_as_runs(source))
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    charts = _chart_names(basename, runs) if chart else []
    md_path, json_path = folder / f"{basename}.md", folder / f"{basename}.json"
    extras = dict(extra or {})
    targets = [json_path, md_path, *(folder / name for name in charts), *(folder / n for n, _ in extras.values())]
    written = ReportFiles()
    with atomic_group(targets) as temps:
        for (key, (file_name, write)), tmp in zip(extras.items(), temps[len(temps) - len(extras) :], strict=True):
            write(tmp)
            written[key] = folder / file_name
        notes: dict[str, str] = {}
        for run, name, tmp in zip(runs if chart else [], charts, temps[2 : 2 + len(charts)], strict=True):
            case = run.context.case_name
            notes[case] = _draw_chart(run, tmp, name)
            if tmp.exists() and tmp.stat().st_size > 0:
                written["png" if len(runs) == 1 else f"png:{case}"] = folder / name
            else:
                tmp.unlink(missing_ok=True)
        if not chart:
            notes = {run.context.case_name: "Chart skipped: charts were turned off for this report." for run in runs}
        json_text = json.dumps(report_document(runs), indent=1, ensure_ascii=False) + "\n"
        temps[0].write_text(json_text, encoding="utf-8")
        temps[1].write_text(render_markdown(runs, chart_notes=notes), encoding="utf-8")
    written["md"], written["json"] = md_path, json_path
    return written


def _chart_names(basename: str, runs: Sequence[RunRecord]) -> list[str]:
    """One chart file name per run: `<basename>.png`, or `<basename>_<case>.png` for several runs
    (numbered when two runs have the same case name)."""
    if len(runs) == 1:
        return [f"{basename}.png"]
    names: list[str] = []
    seen: dict[str, int] = {}
    for run in runs:
        name = f"{basename}_{_safe(run.context.case_name)}"
        seen[name] = seen.get(name, 0) + 1
        names.append(f"{name}.png" if seen[name] == 1 else f"{name}_{seen[name]}.png")
    return names


def _draw_chart(run: RunRecord, tmp: Path, name: str) -> str:
    """Draw one run's chart into `tmp` (its final name is `name`); returns the report's chart line."""
    result = draw_timeline(run, tmp)
    if result.path is None:
        return f"Chart skipped: {result.skipped_reason}."
    missing = "" if run.system.activity_metric else " GPU series are unavailable; it shows CPU % and RSS."
    return f"![timeline of {markdown_text(run.context.case_name)}]({quote(name)}){missing}"


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
