"""ComfyUI's progress registry, as the workflow observer reads it and hooks into it.

ComfyUI (`comfy_execution.progress`) keeps one registry per prompt: the prompt's graph
(`dynprompt`), each node's state, and progress handlers told of every node start, progress and
finish. The observer reads the graph and the node states from it and adds one handler, named
`HANDLER_NAME`, that passes node events on to a callback. The registry is replaced for every
prompt, so a handler never sees another prompt; `reset()`, which ComfyUI calls when the next
prompt starts (or when the handler is unregistered), is passed on as well.

This module knows nothing of observations: the observer gives it the callbacks.

Shapes: none (no tensors).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

from .observed_graph import PromptGraph

HANDLER_NAME = "wanbench.observer"

NodeEvent = Callable[..., None]  # (prompt_id, event name, node id, *figures)


def progress_registry() -> Any:
    """The registry of the prompt ComfyUI is executing now."""
    progress = importlib.import_module("comfy_execution.progress")
    return progress.get_progress_state()


def graph_of(registry: Any) -> PromptGraph:
    """The prompt's graph as ComfyUI holds it (its node classes from ComfyUI's `NODE_CLASS_MAPPINGS`)."""
    dynprompt = getattr(registry, "dynprompt", None)
    if dynprompt is None:
        raise RuntimeError("ComfyUI's progress registry holds no prompt; the profiler cannot see the graph")
    nodes_module = sys.modules.get("nodes")
    mappings = getattr(nodes_module, "NODE_CLASS_MAPPINGS", {}) if nodes_module is not None else {}

    def lookup(node_id: str) -> Mapping[str, Any] | None:
        return dynprompt.get_node(node_id) if dynprompt.has_node(node_id) else None

    return PromptGraph(dict(dynprompt.get_original_prompt()), node_class=mappings.get, lookup=lookup)


def node_states(registry: Any) -> dict[str, str]:
    """Each node the registry knows, with its state ("running", "finished", ...)."""
    return {str(node_id): _state(entry) for node_id, entry in getattr(registry, "nodes", {}).items()}


def _state(entry: Any) -> str:
    state = entry.get("state") if isinstance(entry, dict) else None
    return str(getattr(state, "value", state))


def add_handler(on_event: NodeEvent, on_reset: Callable[[], None]) -> None:
    """Add the observer's handler to the current prompt's registry.

    `on_event(prompt_id, event, node_id, *figures)` gets "node_started", "node_progress" (with
    value and maximum) and "node_finished"; `on_reset()` runs when ComfyUI resets the handler."""
    progress = importlib.import_module("comfy_execution.progress")
    handler = _handler_class(progress.ProgressHandler)(on_event, on_reset)
    progress.add_progress_handler(handler)


def remove_handler(registry: Any, prompt_id: str) -> None:
    """Take the observer's handler out of `registry`, if it is still that prompt's and holds it."""
    handlers = getattr(registry, "handlers", {})
    if getattr(registry, "prompt_id", None) == prompt_id and HANDLER_NAME in handlers:
        registry.unregister_handler(HANDLER_NAME)


_HANDLER_CLASSES: dict[type, type] = {}


def _handler_class(base: type) -> type:
    """A `ProgressHandler` subclass (ComfyUI's base class, found at run time) passing events on."""
    if base in _HANDLER_CLASSES:
        return _HANDLER_CLASSES[base]

    class ObserverHandler(base):  # type: ignore[misc, valid-type]
        def __init__(self, on_event: NodeEvent, on_reset: Callable[[], None]) -> None:
            super().__init__(HANDLER_NAME)
            self.on_event, self.on_reset = on_event, on_reset

        def start_handler(self, node_id: str, state: Any, prompt_id: str) -> None:
            self.on_event(prompt_id, "node_started", node_id)

        def update_handler(
            self, node_id: str, value: float, max_value: float, state: Any, prompt_id: str, image: Any = None
        ) -> None:
            self.on_event(prompt_id, "node_progress", node_id, value, max_value)

        def finish_handler(self, node_id: str, state: Any, prompt_id: str) -> None:
            self.on_event(prompt_id, "node_finished", node_id)

        def reset(self) -> None:  # ComfyUI started another prompt (or unregistered us)
            self.on_reset()

    _HANDLER_CLASSES[base] = ObserverHandler
    return ObserverHandler
