"""Wan Profiler and Wan Benchmark Report: drop both into any workflow to profile the whole prompt.

No wires are needed (`observer.py` explains how the prompt is observed). Wan Profiler is an output
node: it runs in every prompt whose settings changed and opens the observation; ComfyUI caches it
otherwise. Wan Benchmark Report is an async output node that ComfyUI runs in every prompt
(`IS_CHANGED` is NaN): it opens the observation if the profiler was cached, waits until every
other node of the prompt has finished, then closes the observation and writes Markdown, JSON and
the timeline chart. If the prompt fails or is interrupted while it waits, it writes the report of
what ran, marked failed, and lets the prompt end.

In a parallel run (`rank_runner.py`) both nodes run on every rank and each rank observes the nodes
it runs: the report node gathers every rank's record to rank 0, which writes one report; the other
ranks write nothing and return empty strings.

The `profiler` output and input stay for saved workflows and explicit case naming; the report's
`video_path` input is lazy (never waited for): it only keeps old wiring valid. The report's
optional `latent` input (a real dependency: the sampler runs first) is saved beside the report as
`<prefix>_<counter>_latent.safetensors`, so that runs can be compared by their output (ladders).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import torch

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
    settings_problem,
)
from .validation import check_prefix, first_problem

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
        }

    @classmethod
    def VALIDATE_INPUTS(cls, case_name: str | None = None, sample_interval_ms: int | None = None) -> bool | str:
        return settings_problem(case_name, sample_interval_ms) or True

    def start(self, case_name: str, sample_interval_ms: int) -> tuple[ProfilerHandle]:
        settings = check_profiler_settings(case_name, sample_interval_ms)
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
        from ..wan_core.runtime.distributed import gather_to_root  # loads the DiT: not at import time

        if profiler is not None and not isinstance(profiler, ProfilerHandle):
            raise TypeError(f"profiler must come from a Wan Profiler node; got {type(profiler).__name__}")
        problem = check_prefix("filename_prefix", filename_prefix)
        if problem:
            raise ValueError(problem)
        samples = _latent_samples(latent)
        observation = observer.observe_current_prompt(None if profiler is None else profiler.settings)
        if not observation.closed:
            try:
                await observer.wait_until_quiet(observation, me=unique_id)
            except asyncio.CancelledError:  # the prompt failed or was interrupted meanwhile
                record = observer.end_observation(observation, error=None, stopped=True)
                if record is not None:
                    written = _write(record, filename_prefix, samples)
                    log.warning("the prompt stopped; the report of what ran is %s", written[0])
                raise
        # another report node of this prompt may have closed it first: it wrote the same record
        record = observer.end_observation(observation, error=None) or observation.record
        if record is None:
            raise RuntimeError("the profiling session of this prompt was closed before the report ran")
        runs = gather_to_root(record)  # a parallel run's ranks report through rank 0
        if runs is None:
            return {"ui": {}, "result": ("", "")}  # another rank of a parallel run: rank 0 writes
        # (rank 0 of a parallel run saves the latent: every rank sampled the same one)
        markdown, files, chart, subfolder = _write(runs, filename_prefix, samples)
        summary = Path(markdown).read_text(encoding="utf-8")
        ui: dict[str, Any] = {"text": [summary], "wanbench_report": files}
        if chart is not None:
            ui["images"] = [{"filename": Path(chart).name, "subfolder": subfolder, "type": "output"}]
        log.info("benchmark report: %s", markdown)
        bridge.send_ui_message("wanbench.report", {"node": unique_id, "files": files})
        json_path = next(f["path"] for f in files if f["filename"].endswith(".json"))
        return {"ui": ui, "result": (summary, json_path)}


def _write(
    runs: Any, filename_prefix: str, samples: torch.Tensor | None
) -> tuple[str, list[dict[str, Any]], Path | None, str]:
    """The report files (and the latent beside them when one was given): Markdown, JSON, latent."""
    from ..profiling import write_report
    from ..wan_core.checkpoints.latent import save_latent

    folder, stem, counter, subfolder = bridge.save_path(filename_prefix, 0, 0)
    written = write_report(runs, folder, basename=f"{stem}_{counter:05}_")
    outputs = [written.markdown, written.json]
    if samples is not None:
        outputs.append(save_latent(samples, Path(folder) / f"{stem}_{counter:05}_{LATENT_SUFFIX}"))
    files = [
        {"filename": Path(p).name, "subfolder": subfolder, "type": "output", "path": str(p)}
        for p in outputs
    ]
    return str(written.markdown), files, written.chart, subfolder
