"""Wan Profiler and Wan Benchmark Report: drop both into any workflow to profile the whole prompt.

No wires are needed (`observer.py` explains how the prompt is observed). Wan Profiler is an output
node: it runs in every prompt whose settings changed and opens the observation; ComfyUI caches it
otherwise. Wan Benchmark Report is an async output node that ComfyUI runs in every prompt
(`IS_CHANGED` is NaN): it opens the observation if the profiler was cached, waits until every
other node of the prompt has finished, then closes the observation and writes Markdown, JSON and
the timeline chart. If the prompt fails or is interrupted while it waits, it writes the report of
what ran, marked failed, and lets the prompt end. While the prompt runs, the Wan Profiler node
shows a live view of it (`live_view.py`), which stops when the observation closes.

In a parallel run (`rank_runner.py`) both nodes run on every rank and each rank observes the nodes
it runs: the report node gathers every rank's record to rank 0, which writes one report; the other
ranks write nothing and return empty strings.

The `profiler` output and input stay for saved workflows and explicit case naming; the report's
`video_path` input is lazy (never waited for): it only keeps old wiring valid. The report's
optional `latent` input (a real dependency: the sampler runs first) is saved beside the report as
`<prefix>_<counter>_latent.safetensors`, so that runs can be compared by their output (ladders).
The report's files (Markdown, JSON, charts, latent) are claimed under one new name (`O_EXCL`) and
appear together or not at all.

What the report node sends to the UI (`web/wanbench.js` draws it in the node):
`ui.wanbench_summary`, one card per run (`profiling.summary_cards`: case, total, s/step, peak
memory, activity, MFU, the top finding; plain text, shown as text), and `ui.wanbench_report`,
the written files with their `kind` ("markdown", "json", "chart", "latent") for ComfyUI's `/view`.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import torch

from ..util.atomic import release_claim
from . import comfy_bridge as bridge
from . import observer
from . import types as T
from .profiler_handle import ProfilerHandle
from .profiler_settings import (
    DEFAULT_CASE_NAME,
    DEFAULT_INTERVAL_MS,
    MAX_INTERVAL_MS,
    MIN_INTERVAL_MS,
    check_profiler_settings,
)
from .validation import check_label, check_node_inputs, check_prefix, first_problem

log = logging.getLogger(__name__)


class WanProfiler:
    """Profiles the whole prompt it is part of (every node, no wires needed)."""

    CATEGORY = T.CATEGORY
    RETURN_TYPES = (T.PROFILER,)
    RETURN_NAMES = ("profiler",)
    FUNCTION = "start"
    OUTPUT_NODE = True
    DESCRIPTION = (
        "Measures every node of this workflow (time, memory, GPU activity; sampler steps with their "
        "expert and CFG mode); add a Wan Benchmark Report to write the report. No wires needed."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "case_name": (
                    "STRING",
                    {
                        "default": DEFAULT_CASE_NAME,
                        "tooltip": "Name of this case in the report (e.g. 01_Speed_Preview_480p).",
                    },
                ),
                "sample_interval_ms": (
                    "INT",
                    {
                        "default": DEFAULT_INTERVAL_MS,
                        "min": MIN_INTERVAL_MS,
                        "max": MAX_INTERVAL_MS,
                        "tooltip": "How often GPU activity and memory are sampled.",
                    },
                ),
            },
            "hidden": dict(T.HIDDEN_IDS),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, case_name: str | None = None) -> bool | str:
        # Only case_name (the message lands on it); ComfyUI checks sample_interval_ms's range.
        return first_problem(check_label("case_name", case_name))

    def start(
        self, case_name: str, sample_interval_ms: int, unique_id: str | None = None
    ) -> tuple[ProfilerHandle]:
        check_node_inputs(WanProfiler, case_name=case_name, sample_interval_ms=sample_interval_ms)
        node_id = None if unique_id is None else str(unique_id)
        settings = check_profiler_settings(case_name, sample_interval_ms, node_id=node_id)
        if observer.current_prompt_id() is not None:
            observer.observe_current_prompt(settings)
        return (ProfilerHandle(settings=settings),)


LATENT_SUFFIX = "latent.safetensors"  # the report's latent file: <prefix>_<counter>_latent.safetensors


def _latent_samples(latent: Any) -> Any:
    """The tensor of an optional LATENT input (None when unwired); a clear error for anything else."""
    if latent is None:
        return None
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise ValueError(
            f"latent must be a LATENT ({{'samples': tensor}}) from Wan Sampler; got {type(latent).__name__}"
        )
    return samples


class WanBenchmarkReport:
    """Waits for the rest of the prompt, then writes its benchmark report."""

    CATEGORY = T.CATEGORY
    RETURN_TYPES = (T.STRING, T.STRING)
    RETURN_NAMES = ("summary", "report_json")
    FUNCTION = "report"
    OUTPUT_NODE = True
    DESCRIPTION = (
        "Writes report Markdown, JSON and a timeline chart into the output folder once every other "
        "node of the workflow has finished; nodes ComfyUI served from its cache are marked cached, "
        "never shown as 0 s. No wires needed."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "filename_prefix": (
                    "STRING",
                    {"default": "wanbench/report", "tooltip": "Report file prefix inside the output folder."},
                ),
            },
            "optional": {
                "profiler": (T.PROFILER, {"tooltip": "Optional: the Wan Profiler to report (no wire needed)."}),
                "video_path": (
                    T.STRING,
                    {
                        "forceInput": True,
                        "lazy": True,
                        "tooltip": "Optional, not needed: the report waits for every node anyway.",
                    },
                ),
                "latent": (
                    T.LATENT,
                    {
                        "tooltip": "The sampled latent (optional): saved beside the report as "
                        "*_latent.safetensors, so that runs can be compared with it (benchmark ladders "
                        "measure each row's deviation from the baseline's)."
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs: Any) -> float:
        return float("nan")  # never cached: every prompt gets its own report

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix: str | None = None) -> bool | str:
        return first_problem(check_prefix("filename_prefix", filename_prefix))

    def check_lazy_status(self, **kwargs: Any) -> list[str]:
        return []  # video_path is never needed: waiting for the whole prompt orders the report last

    async def report(
        self,
        filename_prefix: str,
        profiler: ProfilerHandle | None = None,
        video_path: str | None = None,
        unique_id: str | None = None,
        latent: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        from ..profiling import summary_cards
        from ..wan_core.runtime.distributed import gather_to_root  # loads the DiT: not at import time

        if profiler is not None and not isinstance(profiler, ProfilerHandle):
            raise TypeError(f"profiler must come from a Wan Profiler node; got {type(profiler).__name__}")
        check_node_inputs(WanBenchmarkReport, filename_prefix=filename_prefix)
        samples = _latent_samples(latent)
        observation = observer.observe_current_prompt(None if profiler is None else profiler.settings)
        if not observation.closed:
            try:
                await observer.wait_until_quiet(observation, me=unique_id)
            except asyncio.CancelledError:  # the prompt failed or was interrupted meanwhile
                record = observer.end_observation(observation, error=None, stopped=True)
                if record is not None:
                    written, _ = _write([record], filename_prefix, samples)
                    log.warning("the prompt stopped; the report of what ran is %s", written.markdown)
                raise
        # another report node of this prompt may have closed it first: it wrote the same record
        record = observer.end_observation(observation, error=None) or observation.record
        if record is None:
            raise RuntimeError("the profiling session of this prompt was closed before the report ran")
        runs = gather_to_root(record)  # a parallel run's ranks report through rank 0
        if runs is None:
            return {"ui": {}, "result": ("", "")}  # another rank of a parallel run: rank 0 writes
        # (rank 0 of a parallel run saves the latent: every rank sampled the same one)
        written, files = _write(runs, filename_prefix, samples)
        ui: dict[str, Any] = {"wanbench_summary": summary_cards(runs), "wanbench_report": files}
        log.info("benchmark report: %s", written.markdown)
        bridge.send_ui_message("wanbench.report", {"node": unique_id, "files": files})
        summary = Path(written.markdown).read_text(encoding="utf-8")
        return {"ui": ui, "result": (summary, str(written.json))}


def _write(runs: Any, filename_prefix: str, samples: torch.Tensor | None) -> tuple[Any, list[dict[str, Any]]]:
    """Write the report (and the latent beside it when one was given) under one claimed name.

    Returns the written paths (`profiling.ReportFiles`) and their entries for the UI, each with
    its `kind`. The files appear together or not at all (`write_report`'s group), and a failure
    also removes the claimed name, so nothing of this report stays behind."""
    from ..profiling import write_report
    from ..wan_core.checkpoints.latent import save_latent

    name = bridge.claim_output(filename_prefix, ".json")  # .md, .png and the latent share its base name
    extra = {}
    if samples is not None:
        extra["latent"] = (f"{name.basename}{LATENT_SUFFIX}", lambda tmp: save_latent(samples, tmp))
    try:
        written = write_report(runs, name.folder, basename=name.basename, extra=extra)
    except BaseException:
        release_claim(name.path)
        raise
    charts = [("chart", path) for key, path in written.items() if key.startswith("png")]
    kinds = [("markdown", written.markdown), ("json", written.json), *charts]
    if "latent" in written:
        kinds.append(("latent", written["latent"]))
    files = [
        {"filename": Path(p).name, "subfolder": name.subfolder, "type": "output", "kind": kind}
        for kind, p in kinds
    ]
    return written, files
