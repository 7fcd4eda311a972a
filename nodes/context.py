"""The standalone environment (model folders, output folder) the nodes use outside ComfyUI.

Held in a context variable so that concurrent in-process runs (tests, the CLI) never share state
through module globals. Inside ComfyUI it is not consulted.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from .comfy_bridge import Bridge

_BRIDGE: contextvars.ContextVar[Bridge | None] = contextvars.ContextVar("wanbench_bridge", default=None)


def current_bridge() -> Bridge:
    """The bridge installed by `use_bridge`, or a default one (cwd/wanbench_out, no model folders)."""
    bridge = _BRIDGE.get()
    return bridge if bridge is not None else Bridge()


@contextlib.contextmanager
def use_bridge(bridge: Bridge) -> Iterator[Bridge]:
    """Run node code inside the block with `bridge`'s model and output folders."""
    token = _BRIDGE.set(bridge)
    try:
        yield bridge
    finally:
        _BRIDGE.reset(token)
