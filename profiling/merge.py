"""Merging runs: several report JSON files into one Markdown report.

`merge_reports(paths)` reads every file's runs (`output.load_runs`), reports a run given more than
once only once, with a note (`dedupe_runs`: same `run_id`, or identical records without one), and
renders them together, grouped by GPU (and activity metric) as `report.render_markdown` does.
The ranks of a parallel run (one file written by its rank 0) stay together as one "Parallel run"
section (`ranks.py`); merged with a single-GPU run of the same workload, that section states the
scaling efficiency.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from .output import load_runs
from .records import RunRecord, run_to_dict
from .report import render_markdown


def merge_reports(paths: Sequence[str | os.PathLike[str]]) -> str:
    """One Markdown report from several runs' JSON files, grouped by GPU (and activity metric).

    A run found more than once (same `run_id`, e.g. one file given twice or a merged report merged
    again) is kept once, and the report says so.
    """
    if not paths:
        raise ValueError("merge_reports needs at least one report JSON path")
    runs: list[RunRecord] = []
    for path in paths:
        runs.extend(load_runs(path))
    unique, notes = dedupe_runs(runs)
    return render_markdown(unique, notes=notes)


def dedupe_runs(runs: Sequence[RunRecord]) -> tuple[list[RunRecord], list[str]]:
    """Runs with repeated ones dropped (same run id; without one, identical records), and notes."""
    seen: dict[str, int] = {}
    unique: list[RunRecord] = []
    for run in runs:
        key = run.run_id or json.dumps(run_to_dict(run), sort_keys=True)
        if key in seen:
            seen[key] += 1
            continue
        seen[key] = 1
        unique.append(run)
    notes = []
    for run in unique:
        count = seen[run.run_id or json.dumps(run_to_dict(run), sort_keys=True)]
        if count > 1:
            notes.append(
                f"run {run.run_id or '(no id)'} of case {run.context.case_name!r} was given {count} times; "
                "it is reported once"
            )
    return unique, notes
