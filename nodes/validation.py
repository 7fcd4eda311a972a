"""Readable checks for node inputs that min/max/step cannot fully encode.

Each check returns None when the value is fine, or a message that says what was wrong, what was
given, what is expected and how to fix it. Nodes combine them in `VALIDATE_INPUTS`, which returns
`True` or the first message (ComfyUI shows it as `custom_validation_failed`).

A value of None means the input is linked and not known at validation time; it is then checked
when the node runs. Note: ComfyUI skips its own min/max check for an input that `VALIDATE_INPUTS`
names, so these
checks cover the range as well.
"""

from __future__ import annotations

import math

from ..wan_core.config import PRESETS

# Pixel-size step of the widgets: the smallest multiple any task accepts (16: Wan2.1 VAE stride 8
# x patch 2). TI2V-5B needs multiples of 32, which the node checks once it knows the VAE.
SIZE_STEP = min(task.size_multiple for task in PRESETS.values())
FRAME_STEP = min(task.vae.temporal_stride for task in PRESETS.values())  # frame counts are 4k+1
MAX_SIZE = 4096
MAX_FRAMES = 1025


def check_int_range(name: str, value: int | None, lo: int, hi: int) -> str | None:
    if value is None:  # linked input: checked when the node runs
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        return f"{name} must be an integer; got {value!r}"
    if not lo <= value <= hi:
        return f"{name} must be between {lo} and {hi}; got {value}"
    return None


def check_frames(name: str, value: int | None) -> str | None:
    """Frame counts are 4k+1 (1, 5, 9, ..., 81, 121)."""
    if value is None:  # linked input: checked when the node runs
        return None
    problem = check_int_range(name, value, 1, MAX_FRAMES)
    if problem:
        return problem
    if (value - 1) % FRAME_STEP:
        lower = value - (value - 1) % FRAME_STEP
        return f"{name} must be 4k+1 (e.g. 81 or 121); got {value}; use {lower} or {lower + FRAME_STEP}"
    return None


def check_size(name: str, value: int | None, multiple: int = SIZE_STEP) -> str | None:
    """Pixel sizes are positive multiples of the VAE stride x DiT patch (16 for A14B, 32 for TI2V-5B)."""
    if value is None:  # linked input: checked when the node runs
        return None
    problem = check_int_range(name, value, multiple, MAX_SIZE)
    if problem:
        return problem
    if value % multiple:
        lower = value - value % multiple
        return (
            f"{name} must be a multiple of {multiple}; got {value}; "
            f"use {max(lower, multiple)} or {lower + multiple}"
        )
    return None


def check_float_range(name: str, value: float | None, lo: float, hi: float) -> str | None:
    """A number in the closed range [lo, hi] (lo may be 0, e.g. a guidance scale)."""
    if value is None:  # linked input: checked when the node runs
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return f"{name} must be a number; got {value!r}"
    if not lo <= value <= hi:
        return f"{name} must be between {lo} and {hi}; got {value}"
    return None


def check_open_unit(name: str, value: float | None) -> str | None:
    """A fraction strictly inside (0, 1), e.g. the expert-switch boundary."""
    if value is None:  # linked input: checked when the node runs
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return f"{name} must be a number; got {value!r}"
    if not 0.0 < value < 1.0:
        return f"{name} must lie strictly between 0 and 1 (e.g. 0.875); got {value}"
    return None


def check_prefix(name: str, value: str | None) -> str | None:
    """Output prefixes stay inside the output folder."""
    if value is None:  # linked input: checked when the node runs
        return None
    if not isinstance(value, str) or not value.strip():
        return f"{name} must be a non-empty text; got {value!r}"
    parts = value.replace("\\", "/").split("/")
    if value.startswith(("/", "\\")) or ".." in parts or ":" in value:
        return (
            f"{name} must be a relative path inside the output folder (e.g. 'wanbench/video'); got {value!r}"
        )
    return None


def parse_numbers(name: str, text: str | None) -> tuple[float, ...] | None:
    """A comma- or space-separated list of numbers ("1000, 750, 500, 250"); None for an empty text.

    Raises ValueError naming the input and the part that is not a number.
    """
    if text is None or not text.strip():
        return None
    parts = [p for p in text.replace(",", " ").split() if p]
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{name} must be numbers separated by commas (e.g. '1000, 750, 500, 250'); "
                             f"{part!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite numbers; got {part!r}")
        values.append(value)
    return tuple(values)


def check_numbers(name: str, text: str | None) -> str | None:
    """`parse_numbers` as a validation check (None when fine or linked)."""
    if text is None:
        return None
    if not isinstance(text, str):
        return f"{name} must be a text of numbers; got {text!r}"
    try:
        parse_numbers(name, text)
    except ValueError as e:
        return str(e)
    return None


def first_problem(*problems: str | None) -> bool | str:
    """`True` when every check passed, else the first message."""
    for problem in problems:
        if problem:
            return problem
    return True
