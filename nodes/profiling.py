"""Wan Profiler (opens a profiling session) and Wan Benchmark Report (closes it, writes the report).

The profiler's output is cached by ComfyUI like any node output, so it lives across prompts; each
executed prompt gets its own session (see `profiler_handle.py`). In a parallel run every rank
runs the report node: rank 0 gathers every rank's session and writes one report, the others write
nothing. The report node is never cached
(`IS_CHANGED` is NaN): it runs after everything wired into it, marks the stage nodes ComfyUI
served from its cache as cached, and writes Markdown, JSON and the timeline chart.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from . import comfy_bridge as bridge
from . import types as T
from .profiler_handle import ProfilerHandle, ProfilerSettings
from .validation import check_int_range, check_prefix, first_problem

log = logging.getLogger(__name__)

MIN_INTERVAL_MS, MAX_INTERVAL_MS = 10, 5000


class WanProfiler:
    """Starts a profiling session; wire its output into every stage node and into the report."""

    CATEGORY = T.CATEGORY
    RETURN_TYPES = (T.PROFILER,)
    RETURN_NAMES = ("profiler",)
    FUNCTION = "start"
    DESCRIPTION = "Measures every stage (time, memory, GPU activity) of the nodes wired to it."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "case_name": (
                    "STRING",
                    {
                        "default": "wan22_run",
                        "tooltip": "Name of this case in the report (e.g. 01_Speed_Preview_480p).",
                    },
                ),
                "sample_interval_ms": (
                    "INT",
                    {
                        "default": 100,
                        "min": MIN_INTERVAL_MS,
                        "max": MAX_INTERVAL_MS,
                        "tooltip": "How often GPU activity and memory are sampled.",
                    },
                ),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(
        cls, case_name: str | None = None, sample_interval_ms: int | None = None
    ) -> bool | str:
        return first_problem(
            check_prefix("case_name", case_name),
            check_int_range("sample_interval_ms", sample_interval_ms, MIN_INTERVAL_MS, MAX_INTERVAL_MS),
        )

    def start(self, case_name: str, sample_interval_ms: int) -> tuple[ProfilerHandle]:
        problem = check_prefix("case_name", case_name)
        if problem:
            raise ValueError(problem)
        settings = ProfilerSettings(case_name=case_name, sample_interval_ms=sample_interval_ms)
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


def _graph_node_ids(graph: Any) -> list[str] | None:
    """Node ids of the prompt being executed (ComfyUI's hidden PROMPT input), or None if unknown."""
    if isinstance(graph, dict) and graph:
        return [str(k) for k in graph]
    return None


class WanBenchmarkReport:
    """Closes the profiling session of this prompt and writes the benchmark report."""

    CATEGORY = T.CATEGORY
    RETURN_TYPES = (T.STRING, T.STRING)
    RETURN_NAMES = ("summary", "report_json")
    FUNCTION = "report"
    OUTPUT_NODE = True
    DESCRIPTION = (
        "Writes report Markdown, JSON and a timeline chart into the output folder; stages whose "
        "nodes ComfyUI served from its cache are marked cached, never shown as 0 s."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "profiler": (T.PROFILER, {"tooltip": "The Wan Profiler whose session is reported."}),
                "filename_prefix": (
                    "STRING",
                    {"default": "wanbench/report", "tooltip": "Report file prefix inside the output folder."},
                ),
            },
            "optional": {
                "video_path": (
                    T.STRING,
                    {"forceInput": True, "tooltip": "Wire Wan Save Video here so the report runs last."},
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
            "hidden": {"unique_id": "UNIQUE_ID", "graph": "PROMPT"},
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs: Any) -> float:
        return float("nan")  # never cached: every prompt gets its own report

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix: str | None = None) -> bool | str:
        return first_problem(check_prefix("filename_prefix", filename_prefix))

    def report(
        self,
        profiler: ProfilerHandle,
        filename_prefix: str,
        video_path: str | None = None,
        unique_id: str | None = None,
        graph: Any = None,
        latent: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        from ..profiling import write_report
        from ..wan_core.checkpoints.latent import save_latent
        from ..wan_core.runtime.distributed import gather_to_root

        if not isinstance(profiler, ProfilerHandle):
            raise TypeError(f"profiler must come from a Wan Profiler node; got {type(profiler).__name__}")
        problem = check_prefix("filename_prefix", filename_prefix)
        if problem:
            raise ValueError(problem)
        samples = _latent_samples(latent)
        session = profiler.finish_run(_graph_node_ids(graph))
        runs = gather_to_root(session.record)  # a parallel run's ranks report through rank 0
        if runs is None:
            return {"ui": {}, "result": ("", "")}  # another rank of a parallel run: rank 0 writes
        folder, stem, counter, subfolder = bridge.save_path(filename_prefix, 0, 0)
        written = write_report(runs, folder, basename=f"{stem}_{counter:05}_")
        outputs = [written.markdown, written.json]
        if samples is not None:  # (rank 0 of a parallel run: every rank sampled the same latent)
            outputs.append(save_latent(samples, Path(folder) / f"{stem}_{counter:05}_{LATENT_SUFFIX}"))
        summary = Path(written.markdown).read_text(encoding="utf-8")
        files = [
            {"filename": Path(p).name, "subfolder": subfolder, "type": "output", "path": str(p)}
            for p in outputs
        ]
        ui: dict[str, Any] = {"text": [summary], "wanbench_report": files}
        if written.chart is not None:
            ui["images"] = [{"filename": Path(written.chart).name, "subfolder": subfolder, "type": "output"}]
        log.info("benchmark report: %s", written.markdown)
        bridge.send_ui_message("wanbench.report", {"node": unique_id, "files": files})
        return {"ui": ui, "result": (summary, str(written.json))}
