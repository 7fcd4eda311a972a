"""What a Wan Profiler is set to: the case name and the telemetry sampling interval.

Shapes: none (no tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

from .validation import check_int_range, check_prefix, first_problem

MIN_INTERVAL_MS, MAX_INTERVAL_MS = 10, 5000
DEFAULT_INTERVAL_MS = 100
DEFAULT_CASE_NAME = "wan22_run"


@dataclass(frozen=True)
class ProfilerSettings:
    """What the Wan Profiler node was configured with."""

    case_name: str
    sample_interval_ms: int


def settings_problem(case_name: object, sample_interval_ms: object) -> str | None:
    """The first problem with profiler settings (a message naming the input and the fix), or None."""
    verdict = first_problem(
        check_prefix("case_name", case_name),  # type: ignore[arg-type]
        check_int_range("sample_interval_ms", sample_interval_ms, MIN_INTERVAL_MS, MAX_INTERVAL_MS),  # type: ignore[arg-type]
    )
    return None if verdict is True else str(verdict)


def check_profiler_settings(case_name: object, sample_interval_ms: object) -> ProfilerSettings:
    """Validated settings; ValueError naming the input otherwise."""
    problem = settings_problem(case_name, sample_interval_ms)
    if problem:
        raise ValueError(problem)
    return ProfilerSettings(case_name=str(case_name), sample_interval_ms=int(sample_interval_ms))  # type: ignore[call-overload]
