"""Per-stage measurement (time, memory, SM activity) and the benchmark report.

Knows nothing of Wan beyond the stage names and the FLOP counts it is given; never imports
comfy or the nodes. One job per module:

- measuring: `session` (ProfileSession: lifetime, the wan_core tracer), `telemetry` (samples and
  their bounded buffer; probes in `nvml`, `memory`, thread in `sampler_thread`), `assembly`
  (records from what the session measured), `system` (device, NVML target, machine facts);
- records: `records` (frozen records, JSON), `timers`, `stats`, `gpus`;
- reporting: `figures` (RunSummary, per-stage figures), `findings` (statements, recommendations),
  `formatting`, `report` (Markdown), `chart` (PNG), `output` (JSON document, `write_report`),
  `merge` (several report files), `ranks` (the ranks of a parallel run side by side), `checker` (a
  report against its records).
"""

from .chart import ChartResult, draw_timeline
from .checker import check_markdown, check_report
from .figures import RunSummary, summarize_run
from .findings import RunAnalysis, Statement, analyze_run
from .gpus import KNOWN_GPUS, GpuSpec, lookup_gpu
from .memory import CpuDevice, CudaDevice, FakeDevice, FakeHost, ProcessProbe
from .merge import merge_reports
from .nvml import FakeNvml, GpuMonitor, GpuReading, open_gpu_monitor
from .output import ReportFiles, load_runs, report_document, run_document, write_report
from .records import (
    REPORT_SCHEMA_VERSION,
    SCHEMA_VERSION,
    EventRecord,
    MemoryFigures,
    RunContext,
    RunRecord,
    Sample,
    StageRecord,
    SystemInfo,
    run_from_dict,
    run_to_dict,
)
from .report import render_markdown
from .session import ProfileSession
from .timers import FakeClock, MonotonicClock

__all__ = [
    "REPORT_SCHEMA_VERSION",
    "SCHEMA_VERSION",
    "KNOWN_GPUS",
    "ChartResult",
    "CpuDevice",
    "CudaDevice",
    "EventRecord",
    "FakeClock",
    "FakeDevice",
    "FakeHost",
    "FakeNvml",
    "GpuMonitor",
    "GpuReading",
    "GpuSpec",
    "MemoryFigures",
    "MonotonicClock",
    "ProcessProbe",
    "ProfileSession",
    "ReportFiles",
    "RunAnalysis",
    "RunContext",
    "RunRecord",
    "RunSummary",
    "Sample",
    "StageRecord",
    "Statement",
    "SystemInfo",
    "analyze_run",
    "check_markdown",
    "check_report",
    "draw_timeline",
    "load_runs",
    "lookup_gpu",
    "merge_reports",
    "open_gpu_monitor",
    "render_markdown",
    "report_document",
    "run_document",
    "run_from_dict",
    "run_to_dict",
    "summarize_run",
    "write_report",
]
