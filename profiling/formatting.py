"""How figures and metrics are written, for the report, the findings and the chart: None is `n/a`, never 0.

Times keep significant digits when they are short (`0.0021`, `5.0e-05`), so a measured time never
prints as `0.00` and a statement never contradicts the gain printed beside it. `fmt_*` give a
table cell (the unit is in the header); `secs`, `gbs` and `pcts` give a figure inside a sentence.
"""

from __future__ import annotations

from collections.abc import Sequence

from .records import ACTIVITY_BUSY

NA = "n/a"
GB = 1e9


def fmt_s(value: float | None) -> str:
    """Seconds: two decimals, four below 0.01 s, scientific below 0.0001 s."""
    if value is None:
        return NA
    if value != 0 and abs(value) < 0.0001:
        return f"{value:.1e}"  # never "0.0000" for something that took time
    if value != 0 and abs(value) < 0.01:
        return f"{value:.4f}"
    return f"{value:.2f}"


def fmt_gb(value: int | float | None) -> str:
    return NA if value is None else f"{value / GB:.2f}"


def fmt_pct(value: float | None) -> str:
    return NA if value is None else f"{value:.1f}"


def fmt_load(value: float | None) -> str:
    if value is None:
        return NA
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.2f}"


def fmt_tflops(value: float | None) -> str:
    if value is None:
        return NA
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"


def with_unit(text: str, unit: str) -> str:
    """ "12.3 GB" for a number, plain "n/a" when unmeasured."""
    return text if text == NA else f"{text} {unit}"


def secs(value: float | None) -> str:
    """ "1.23 s", "0.0021 s" or "n/a": a time inside a sentence."""
    return with_unit(fmt_s(value), "s")


def gbs(value: int | float | None) -> str:
    """ "12.30 GB" or "n/a": memory inside a sentence."""
    return with_unit(fmt_gb(value), "GB")


def pcts(value: float | None) -> str:
    """ "12.3 %" or "n/a": a percentage inside a sentence."""
    return with_unit(fmt_pct(value), "%")


def activity_label(metric: str | None) -> str:
    """How the activity figure is named: never "SM activity" unless it is GPM SM activity."""
    return "GPU busy" if metric == ACTIVITY_BUSY else "SM activity"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table (left-aligned columns)."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(":---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines
