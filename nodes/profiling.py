"""Wan Profiler (opens a profiling session) and Wan Benchmark Report (closes it, writes the report).

The profiler's output is cached by ComfyUI like any node output, so it lives across prompts; each
executed prompt gets its own session (see `profiler_handle.py`). In a parallel run every rank
runs the report node: rank 0 gathers every rank's session and writes one report, the others write
nothing. The report node is never cached
(`IS_CHANGED` is NaN): it runs after everything wired into it, marks the stage nodes ComfyUI
served from its cache as cached, and writes Markdown, JSON and the timeline chart.

What the report node sends to the UI (`web/wanbench.js` draws it in the node):
`ui.wanbench_summary`, one card per run (`profiling.summary_cards`: case, total, s/step, peak
memory, activity, MFU, the top finding; plain text, shown as text), and `ui.wanbench_report`,
the written files with their `kind` ("markdown", "json", "chart") for ComfyUI's `/view`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..util.atomic import release_claim
from . import comfy_bridge as bridge
from . import types as T
from .profiler_handle import ProfilerHandle, ProfilerSettings
from .validation import check_label, check_node_inputs, check_prefix

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
            "hidden": dict(T.HIDDEN_IDS),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, case_name: str | None = None) -> bool | str:
        # Only case_name (the message lands on it); ComfyUI checks sample_interval_ms's range.
        problem = check_label("case_name", case_name)
        return True if problem is None else problem

    def start(
        self, case_name: str, sample_interval_ms: int, unique_id: str | None = None
    ) -> tuple[ProfilerHandle]:
        check_node_inputs(WanProfiler, case_name=case_name, sample_interval_ms=sample_interval_ms)
        node_id = None if unique_id is None else str(unique_id)
        settings = ProfilerSettings(case_name=case_name, sample_interval_ms=sample_interval_ms, node_id=node_id)
        return (ProfilerHandle(settings=settings),)


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
            },
            "hidden": {"unique_id": "UNIQUE_ID", "graph": "PROMPT"},
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs: Any) -> float:
        return float("nan")  # never cached: every prompt gets its own report

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix: str | None = None) -> bool | str:
        problem = check_prefix("filename_prefix", filename_prefix)
        return True if problem is None else problem

    def report(
        self,
        profiler: ProfilerHandle,
        filename_prefix: str,
        video_path: str | None = None,
        unique_id: str | None = None,
        graph: Any = None,
    ) -> dict[str, Any]:
        from ..profiling import summary_cards, write_report
        from ..wan_core.runtime.distributed import gather_to_root

        if not isinstance(profiler, ProfilerHandle):
            raise TypeError(f"profiler must come from a Wan Profiler node; got {type(profiler).__name__}")
        check_node_inputs(WanBenchmarkReport, filename_prefix=filename_prefix)
        session = profiler.finish_run(_graph_node_ids(graph))
        runs = gather_to_root(session.record)  # a parallel run's ranks report through rank 0
        if runs is None:
            return {"ui": {}, "result": ("", "")}  # another rank of a parallel run: rank 0 writes
        name = bridge.claim_output(filename_prefix, ".json")  # .md and .png share its base name
        try:
            written = write_report(runs, name.folder, basename=name.basename)
        except BaseException:
            release_claim(name.path)  # nothing of this report stays: no empty or lone file
            raise
        charts = [("chart", path) for key, path in written.items() if key.startswith("png")]
        kinds = [("markdown", written.markdown), ("json", written.json), *charts]
        files = [
            {"filename": Path(p).name, "subfolder": name.subfolder, "type": "output", "kind": kind}
            for kind, p in kinds
            if p is not None
        ]
        ui: dict[str, Any] = {"wanbench_summary": summary_cards(runs), "wanbench_report": files}
        log.info("benchmark report: %s", written.markdown)
        bridge.send_ui_message("wanbench.report", {"node": unique_id, "files": files})
        summary = Path(written.markdown).read_text(encoding="utf-8")
        return {"ui": ui, "result": (summary, str(written.json))}
