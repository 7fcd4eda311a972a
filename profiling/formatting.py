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
# Characters that make Markdown structure anywhere in a line (GitHub flavour): table cells,
# emphasis, code, links, strike-through. `_` only counts at a word boundary, so `01_Speed_480p`
# stays as it is; characters special only at the start of a line (`#`, `-`, `1.`) never start one
# here, since user text is always written after a label or inside a table cell.
_MARKDOWN_SPECIAL = frozenset("\\`*[]|~")
_HTML_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def markdown_text(value: object) -> str:
    """User or system text as literal Markdown: no table cells, emphasis, links or raw HTML.

    A `case_name` of `| x | <script>` renders as those characters in one cell: the characters that
    make structure are backslash-escaped, `& < >` become entities, line breaks become spaces and
    other control characters are written as `\\xNN`.
    """
    text = str(value)
    out = []
    for i, ch in enumerate(text):
        if ch in _HTML_ENTITIES:
            out.append(_HTML_ENTITIES[ch])
        elif ch in _MARKDOWN_SPECIAL or (ch == "_" and not _inside_word(text, i)):
            out.append("\\" + ch)
        elif ch in "\r\n\t\v\f\u2028\u2029":
            out.append(" ")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _inside_word(text: str, i: int) -> bool:
    return 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()


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
    """GB with two decimals; a size under 0.005 GB keeps two significant digits (never a bare 0.00)."""
    if value is None:
        return NA
    gb = value / GB
    return f"{gb:.2g}" if 0 < abs(gb) < 0.005 else f"{gb:.2f}"


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
