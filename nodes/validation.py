"""Readable checks for node inputs, reported on the input they concern, every problem at once.

How ComfyUI checks a prompt (0.3.75 and 0.33, `execution.validate_inputs`), which shapes this module:

- For each widget input it converts the value to the declared type and checks `min`/`max` and the
  combo choices itself; each failure is an error attached to that input, and all are reported.
- `VALIDATE_INPUTS` is called with the inputs its signature names; ComfyUI then *skips its own
  checks for those inputs*, and attaches a failure message to **every** input in the signature.

So each node's `VALIDATE_INPUTS` names only the one input that needs a check `min`/`max`/choices
cannot express (a frame count of 4k+1, a file-name prefix, a prompt with visible text): its message
then lands on that input, and ComfyUI reports range problems of all the other inputs next to it. The
pixel-size grid of Wan Empty Latent / Wan Image To Video depends on the task (16 for A14B, 32 for
TI2V-5B), which is known only from the VAE when the node runs; the node checks width and height
together then, naming each one that is off.

`input_problems` applies the same rules outside ComfyUI (the in-process runner checks a whole
workflow with it before anything runs) and `check_node_inputs` at the start of a node's function,
so a node called directly refuses what the server would have refused.

Each check returns None when the value is fine, or a message that says what was wrong, what was
given, what is expected and how to fix it. A value of None means the input is linked and not known
at validation time; it is then checked when the node runs.
"""

from __future__ import annotations

import inspect
import math
import os
import unicodedata
from collections.abc import Mapping
from typing import Any

from ..wan_core.config import PRESETS

# Pixel-size step of the widgets: the smallest multiple any task accepts (16: Wan2.1 VAE stride 8
# x patch 2). TI2V-5B needs multiples of 32, which the node checks once it knows the VAE.
SIZE_STEP = min(task.size_multiple for task in PRESETS.values())
FRAME_STEP = min(task.vae.temporal_stride for task in PRESETS.values())  # frame counts are 4k+1
MAX_SIZE = 4096
MAX_FRAMES = 1025
MAX_NAME_BYTES = 255  # the longest file name (one path component) Linux, macOS and Windows allow
# What the pack appends to a prefix's last part: "_<counter>_" (5 digits, 6 after 99999) and the
# longest extension it writes (".json"). A prefix part may use the rest of MAX_NAME_BYTES.
PREFIX_SUFFIX_BYTES = len("_000000_.json")
MAX_LABEL_CHARS = 200
# Characters Windows forbids in file names (Linux and macOS allow every one of them but "/").
WINDOWS_FORBIDDEN = '<>:"|?*'
# Letters that draw nothing although Unicode does not class them as spaces or format characters.
BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})


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


def _control_character(value: str) -> tuple[int, str] | None:
    for i, ch in enumerate(value):
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            return i, ch
    return None


def check_prefix(name: str, value: str | None) -> str | None:
    """Output prefixes are relative paths inside the output folder that every file system can hold.

    Any character a Linux file name may hold is accepted (`wanbench/a:b` is a valid relative path)
    except control characters (a NUL byte cannot be in a file name at all); on Windows also the
    characters it forbids. Each part must leave room for the counter and extension the pack appends.
    """
    if value is None:  # linked input: checked when the node runs
        return None
    if not isinstance(value, str) or not value.strip():
        return f"{name} must be a non-empty text such as 'wanbench/video'; got {value!r}"
    control = _control_character(value)
    if control is not None:
        i, ch = control
        what = "a NUL byte (\\x00)" if ch == "\x00" else f"the control character {ch!r}"
        return f"{name} contains {what} at position {i}, which a file name cannot hold; remove it (got {value!r})"
    parts = value.replace("\\", "/").split("/")
    drive = os.name == "nt" and len(value) > 1 and value[1] == ":"  # C:... is a relative name elsewhere
    if value.startswith(("/", "\\")) or ".." in parts or drive:
        return (
            f"{name} must be a relative path inside the output folder (e.g. 'wanbench/video'); got {value!r}"
        )
    if os.name == "nt":
        bad = sorted({ch for ch in value if ch in WINDOWS_FORBIDDEN})
        if bad:
            return f"{name} holds {''.join(bad)!r}, which Windows does not allow in file names; remove them"
    for part in parts:
        limit = MAX_NAME_BYTES - PREFIX_SUFFIX_BYTES
        size = len(part.encode("utf-8"))
        if size > limit:
            return (
                f"{name}: the part {part[:24]!r}... is {size} bytes (UTF-8); a file name holds at most "
                f"{MAX_NAME_BYTES} bytes and the pack appends up to {PREFIX_SUFFIX_BYTES} "
                f"(counter and extension), so each part may have at most {limit}; shorten it"
            )
    return None


def has_visible_text(value: str) -> bool:
    """True when `value` holds a character that draws something: not only spaces, zero-width and
    other format characters (U+200B, U+2060, U+FEFF, ...), control characters or blank letters."""
    for ch in value:
        if ch.isspace() or ch in BLANK_LETTERS:
            continue
        if unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp", "Co", "Cn"):
            continue
        return True
    return False


def check_prompt(name: str, value: str | None, *, max_chars: int) -> str | None:
    """A prompt: text with at least one visible character, at most `max_chars` long."""
    if value is None:  # linked input: checked when the node runs
        return None
    if not isinstance(value, str):
        return f"{name} must be text; got {type(value).__name__}"
    if len(value) > max_chars:
        return f"{name} is {len(value)} characters; at most {max_chars} (only 512 tokens are used); shorten it"
    if not value.strip():
        return f"{name} is empty{' (only spaces)' if value else ''}; describe the video to generate"
    if not has_visible_text(value):
        return (
            f"{name} holds only invisible characters ({value[:8]!r}: zero-width or format characters, "
            "blanks); describe the video to generate"
        )
    return None


def check_label(name: str, value: str | None) -> str | None:
    """A label shown in reports (a case name): visible text, no control characters, a sane length."""
    if value is None:  # linked input: checked when the node runs
        return None
    if not isinstance(value, str) or not has_visible_text(value):
        return f"{name} must be a visible text such as '01_Speed_Preview_480p'; got {value!r}"
    control = _control_character(value)
    if control is not None:
        return f"{name} contains the control character {control[1]!r} at position {control[0]}; remove it"
    if len(value) > MAX_LABEL_CHARS:
        return f"{name} is {len(value)} characters; at most {MAX_LABEL_CHARS}; shorten it"
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
    """`True` when every check passed, else the first message (what `VALIDATE_INPUTS` returns)."""
    for problem in problems:
        if problem:
            return problem
    return True


def raise_problems(*problems: str | None, headline: str = "") -> None:
    """Raise one ValueError listing every message given (None: that check passed); nothing when all passed."""
    found = [problem for problem in problems if problem]
    if found:
        raise ValueError(headline + "; ".join(found))


# ------------------------------------------------------------------------------------------------
# ComfyUI's own checks, for the runner and for nodes called directly
# ------------------------------------------------------------------------------------------------
def widget_problem(name: str, kind: Any, opts: Mapping[str, Any], value: Any) -> str | None:
    """What ComfyUI's validation says of one widget value: wrong type, outside min/max, not a choice."""
    if isinstance(kind, list):
        if value not in kind:
            if not kind:
                return f"{name}: {value!r} is not available: the list is empty (no files found)"
            shown = kind if len(kind) <= 8 else [*kind[:8], "..."]
            return f"{name}: value {value!r} is not one of {shown}"
        return None
    if kind in ("INT", "FLOAT"):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind == "INT" and not float(value).is_integer())
        ):
            return f"{name}: expected {'an integer' if kind == 'INT' else 'a number'}; got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{name}: expected a finite number; got {value!r}"
        if "min" in opts and value < opts["min"]:
            return f"{name}: {value} is below the minimum {opts['min']}"
        if "max" in opts and value > opts["max"]:
            return f"{name}: {value} is above the maximum {opts['max']}"
    elif kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{name}: expected a boolean; got {value!r}"
    elif kind == "STRING" and not isinstance(value, str):
        return f"{name}: expected text; got {value!r}"
    return None


def widget_specs(cls: type) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Widget inputs of a node class (required and optional): name -> (type or choices, options)."""
    specs: dict[str, tuple[Any, dict[str, Any]]] = {}
    for section in ("required", "optional"):
        for name, entry in cls.INPUT_TYPES().get(section, {}).items():
            kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            if (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput"):
                specs[name] = (kind, opts)
    return specs


def validated_inputs(cls: type) -> tuple[str, ...]:
    """The inputs a node's VALIDATE_INPUTS takes (ComfyUI skips its own checks for them)."""
    validate = getattr(cls, "VALIDATE_INPUTS", None)
    if validate is None:
        return ()
    return tuple(inspect.signature(validate).parameters)


def input_problems(cls: type, values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(input, message) for every problem with the given widget values, as ComfyUI would attach them.

    `values` holds the widget inputs given (linked inputs left out). Inputs named by VALIDATE_INPUTS
    get its message; every other widget gets ComfyUI's own type, range and choice checks.
    """
    specs = widget_specs(cls)
    custom = validated_inputs(cls)
    problems: list[tuple[str, str]] = []
    for name, value in values.items():
        if name in specs and name not in custom:
            problem = widget_problem(name, *specs[name], value)
            if problem:
                problems.append((name, problem))
    if custom:
        given = {k: v for k, v in values.items() if k in custom}
        verdict = cls.VALIDATE_INPUTS(**given)
        if verdict is not True:
            message = str(verdict) if verdict is not False else "refused by the node's own check"
            problems += [(name, message) for name in given] or [("", message)]
    return problems


def check_node_inputs(cls: type, **values: Any) -> None:
    """Raise ValueError naming every problem with a node's widget values (for nodes called directly)."""
    problems = input_problems(cls, {k: v for k, v in values.items() if v is not None})
    raise_problems(*(message for _, message in problems))
