"""Running an optimisation ladder (`wanbench suite LADDER.json`): every row, then one comparison.

Rows run in order, each isolated from the ones before it:
- in-process (no `--server`): every row runs in a fresh Python process (`wanbench run` on the row's
  workflow), so no loaded model, compiled graph, allocator cache or global flag carries over;
- on a ComfyUI server: before each row the client asks the server to unload models and drop its
  execution cache (`POST /free` with `free_memory`) and waits `FREE_SETTLE_S`, so no node of the row
  is served from ComfyUI's cache (the profiler needs no wires: the row's case name changes the
  profiler node only).

Each row's workflow is written to `OUT/<row>/workflow.api.json` (rerun it with `wanbench run`), its
report, video and latent land under `OUT/<row>/`. When every row has run, the rows' figures are
read from their report files (`profiling.ladder.row_figures`), the deviation of each output from
the baseline's is measured from the latent files and the videos, and the ladder is written as
`OUT/<suite>_ladder.json` and `.md` (`profiling.ladder`). A row that cannot run here is skipped
with the reason (`suites.unavailable`); a row that raises is listed as failed with the error.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .profiling.deviation import psnr_8bit, relative_l2
from .profiling.ladder import FAILED, MEASURED, SKIPPED, Deviation, Expected, Ladder, LadderRow, RowFigures
from .suites import LadderSuite, Machine, PlannedRow, SuiteError, ineffective, node_inputs, plan_rows, row_prompt
from .util.atomic import atomic_write_text

log = logging.getLogger(__name__)

FREE_SETTLE_S = 2.0  # after POST /free: time for ComfyUI's idle worker to free before the next prompt
LATENT_SUFFIX = "_latent.safetensors"
CHILD_ERROR_LINES = 6  # stderr lines of a failed row process kept as its reason


class RowFailed(RuntimeError):
    """A row's run did not finish (its process failed, or it wrote no report)."""


@dataclass
class RowResult:
    planned: PlannedRow
    status: str
    reason: str | None = None
    files: dict[str, list[str]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Where rows run
# ------------------------------------------------------------------------------------------------
def local_machine(models: Path, out_dir: Path) -> Machine:
    """This machine: the pack's own nodes (model lists from `models`), its GPU, its packages."""
    from .nodes import NODE_CLASS_MAPPINGS
    from .nodes.context import Bridge, use_bridge
    from .wan_core.attention import BACKENDS

    with use_bridge(Bridge.for_models_root(models, out_dir)):
        nodes = {name: node_inputs(cls.INPUT_TYPES()) for name, cls in NODE_CLASS_MAPPINGS.items()}
    cuda = torch.cuda.is_available()

    def installed(name: str) -> bool:
        return name in BACKENDS and BACKENDS[name].is_installed()

    return Machine(where="this machine", cuda=cuda, gpu_name=torch.cuda.get_device_name(0) if cuda else None,
                   capability=tuple(torch.cuda.get_device_capability(0)) if cuda else None, nodes=nodes,
                   installed=installed)


def server_machine(server: str) -> Machine:
    """A ComfyUI server: its node definitions (`/object_info`) and devices (`/system_stats`).
    Compute capability and installed packages are not visible from outside (not checked)."""
    from .client import ServerError, check_server_url, http_json

    server = check_server_url(server)
    status, info = http_json("GET", f"{server}/object_info")
    status_stats, stats = http_json("GET", f"{server}/system_stats")
    if status != 200 or status_stats != 200 or not isinstance(info, dict) or not isinstance(stats, dict):
        raise ServerError(f"{server} did not describe its nodes and devices (/object_info HTTP {status}, "
                          f"/system_stats HTTP {status_stats}); is it a ComfyUI server?")
    devices = [d for d in stats.get("devices", []) if isinstance(d, dict)]
    gpus = [str(d.get("name")) for d in devices if d.get("type") == "cuda"]
    nodes = {name: node_inputs(spec.get("input", {})) for name, spec in info.items() if isinstance(spec, dict)}
    return Machine(where=f"the server {server}", cuda=bool(gpus), gpu_name=gpus[0] if gpus else None, nodes=nodes)


# ------------------------------------------------------------------------------------------------
# One row
# ------------------------------------------------------------------------------------------------
def _run_row_process(prompt_file: Path, row_dir: Path, models: Path) -> dict[str, list[str]]:
    """`wanbench run` on the row's workflow in a fresh Python process; the files it wrote."""
    files_json = row_dir / "files.json"
    files_json.unlink(missing_ok=True)
    command = [sys.executable, "-m", __package__ or "wanbench", "run", str(prompt_file), "--out", str(row_dir),
               "--models", str(models), "--files-json", str(files_json)]
    done = subprocess.run(command, stderr=subprocess.PIPE, text=True, check=False)
    if done.stderr:
        sys.stderr.write(done.stderr)
    if done.returncode != 0 or not files_json.is_file():
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        if any(line.startswith("Traceback") for line in lines):
            errors = lines[-1:]  # an unexpected error: its last line names it (the traceback is above)
        else:
            errors = [line for line in lines if line.startswith(("ERROR", "CRITICAL"))] or lines
        reason = " / ".join(errors[-CHILD_ERROR_LINES:]) or "no output"
        raise RowFailed(f"the row's process exited with code {done.returncode}: {reason}")
    return json.loads(files_json.read_text(encoding="utf-8"))


def _run_row(prompt: dict[str, Any], row_dir: Path, models: Path | None, server: str | None) -> dict[str, list[str]]:
    prompt_file = row_dir / "workflow.api.json"
    atomic_write_text(prompt_file, json.dumps(prompt, indent=2, ensure_ascii=False) + "\n")
    if server is None:
        assert models is not None
        files = _run_row_process(prompt_file, row_dir, models)
    else:
        from .client import free_server_memory, run_on_server

        free_server_memory(server)
        time.sleep(FREE_SETTLE_S)
        files = run_on_server(prompt, server, row_dir).files
    if not files.get("reports"):
        raise RowFailed("the row wrote no report JSON (is Wan Benchmark Report in the workflow?)")
    return files


# ------------------------------------------------------------------------------------------------
# The ladder
# ------------------------------------------------------------------------------------------------
def run_ladder(suite: LadderSuite, *, out_dir: Path, models: Path | None, server: str | None,
               say: Callable[[str], None]) -> tuple[Path, int]:
    """Run every row of `suite`, then write the ladder; returns (ladder JSON path, failed rows)."""
    from .client import ServerError
    from .runner import NODE_ERRORS, describe_error, load_api_workflow

    base = load_api_workflow(suite.workflow)
    if server is None:
        _check_runs_in_process(suite, base)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = server_machine(server) if server else local_machine(models or out_dir / "models", out_dir)
    plan = plan_rows(suite, machine)
    # every row's workflow first: a suite that cannot be built as written stops before any row runs
    prompts = {p.row.id: row_prompt(suite, p, base, machine) for p in plan if p.skip is None}
    results = []
    for planned in plan:
        row = planned.row
        say(f"== row {row.id}: {row.name}")
        if planned.skip is not None:
            say(f"  skipped: {planned.skip}")
            results.append(RowResult(planned, SKIPPED, planned.skip))
            continue
        try:
            files = _run_row(prompts[row.id], out_dir / row.id, models, server)
            results.append(RowResult(planned, MEASURED, files=files))
        except (RowFailed, ServerError, SuiteError, *NODE_ERRORS) as err:
            log.error("row %s failed: %s", row.id, describe_error(err))
            say(f"  FAILED: {describe_error(err)}")
            results.append(RowResult(planned, FAILED, describe_error(err)))
    execution = (f"in order on the ComfyUI server {server}; before each row the server unloaded its models and "
                 f"dropped its cache (POST /free, then {FREE_SETTLE_S:g} s), and every profiled node ran anew"
                 if server else "in order, each in a fresh Python process (`wanbench run`) on this machine")
    ladder = build_ladder(suite, results, out_dir, execution, notes=ineffective(suite.baseline.own, machine))
    path = write_ladder(ladder, out_dir)
    return path, sum(r.status == FAILED for r in results)


def _check_runs_in_process(suite: LadderSuite, prompt: dict[str, Any]) -> None:
    """A workflow with ComfyUI's own nodes (e.g. Load Image) runs on a server only: say so before any row."""
    from .nodes import NODE_CLASS_MAPPINGS

    foreign = sorted({n.get("class_type") for n in prompt.values()} - set(NODE_CLASS_MAPPINGS))
    if foreign:
        raise SuiteError(f"ladder {suite.name}: its workflow {suite.workflow.name} uses ComfyUI's own nodes {foreign}, "
                         "which run only on a ComfyUI server; run the ladder with --server URL")


def write_ladder(ladder: Ladder, out_dir: Path) -> Path:
    """`<suite>_ladder.json` and `.md`, and `<suite>_report.md` (every measured row's full report)."""
    from .profiling import merge_reports
    from .profiling.ladder import ladder_document, render_ladder

    stem = out_dir / f"{ladder.suite}_ladder"
    json_path = stem.with_suffix(".json")
    atomic_write_text(json_path, json.dumps(ladder_document(ladder), indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(stem.with_suffix(".md"), render_ladder(ladder))
    reports = [out_dir / r.report for r in ladder.rows if r.report is not None]
    if reports:
        atomic_write_text(out_dir / f"{ladder.suite}_report.md", merge_reports(reports))
    return json_path


def build_ladder(suite: LadderSuite, results: list[RowResult], out_dir: Path, execution: str, *,
                 notes: list[str] | None = None) -> Ladder:
    """The ladder document of finished rows: figures from their reports, deviations from their outputs."""
    from .profiling import load_runs
    from .profiling.ladder import row_figures

    runs = {r.planned.row.id: load_runs(r.files["reports"][0])[0] for r in results if r.status == MEASURED}
    base_result = results[0]
    rows = []
    for result in results:
        row = result.planned.row
        figures: RowFigures | None = row_figures(runs[row.id]) if row.id in runs else None
        deviation = None
        if figures is not None and not row.baseline:
            deviation = _deviation(base_result, result)
        rows.append(LadderRow(
            id=row.id, name=row.name, baseline=row.baseline, changes=result.planned.changes,
            dropped=result.planned.dropped, status=result.status,
            reason=result.reason, report=_relative(result.files.get("reports", [None])[0], out_dir),
            video=_relative(_first(result.files.get("videos", [])), out_dir),
            latent=_relative(_latent_file(result), out_dir), figures=figures, deviation=deviation,
            expected=None if row.expected is None else Expected(
                speedup=row.expected.speedup, time_s=row.expected.time_s, source=row.expected.source)))
    return Ladder(suite=suite.name, description=suite.description, source=suite.source, execution=execution,
                  machine=_machine_text(runs.values()), random_weights=suite.random_weights,
                  baseline_settings=suite.baseline.own, rows=rows, notes=list(notes or []))


def _first(items: list[str]) -> str | None:
    return items[0] if items else None


def _latent_file(result: RowResult) -> str | None:
    return _first([p for p in result.files.get("other", []) if p.endswith(LATENT_SUFFIX)])


def _relative(path: str | None, out_dir: Path) -> str | None:
    if path is None:
        return None
    p = Path(path).resolve()
    try:
        return p.relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return str(p)


def _machine_text(runs: Any) -> str:
    systems = {(r.system.gpu_name, r.system.cpu_name, r.system.torch_version, r.system.cuda_version) for r in runs}
    if not systems:
        return "n/a (no row ran)"
    texts = [f"{gpu or f'CPU {cpu or chr(63)} (no GPU)'}, torch {torch_v or 'n/a'}, CUDA {cuda_v or 'n/a'}"
             for gpu, cpu, torch_v, cuda_v in sorted(systems, key=str)]
    return "; ".join(texts) if len(texts) == 1 else "rows differ: " + "; ".join(texts)


def _deviation(base: RowResult, result: RowResult) -> Deviation:
    """Latent relative L2 and video PSNR of a row against the baseline (n/a with the reason)."""
    from .nodes.video import read_mp4
    from .wan_core.checkpoints.latent import load_latent

    if base.status != MEASURED:
        return Deviation(note="the baseline did not run")
    notes = []
    l2 = psnr = identical = None
    base_latent, latent = _latent_file(base), _latent_file(result)
    if base_latent and latent:
        try:
            l2 = relative_l2(load_latent(latent), load_latent(base_latent))
        except ValueError as err:
            notes.append(f"latent: {err}")
    else:
        notes.append("latent: a run saved no latent file (wire the sampler's latent into Wan Benchmark Report)")
    base_video, video = _first(base.files.get("videos", [])), _first(result.files.get("videos", []))
    if base_video and video:
        try:
            psnr = psnr_8bit(read_mp4(Path(video)), read_mp4(Path(base_video)))
            identical = psnr is None
        except ValueError as err:
            notes.append(f"video: {err}")
    else:
        notes.append("video: a run saved no video")
    return Deviation(latent_rel_l2=l2, psnr_db=psnr, video_identical=identical, note="; ".join(notes) or None)
