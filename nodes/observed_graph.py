"""The prompt a profiler observes, as the observer reads it, and what nodes recorded before.

`PromptGraph` is the API-format prompt (node id -> class_type, inputs, _meta) with the node classes
behind it (for the lazy inputs and output nodes); `NodeMemory` keeps, per node, the stages it
recorded the last time it ran under observation, for the prompts in which ComfyUI serves it from
its cache. Pure Python (no ComfyUI import).

Shapes: none (no tensors).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .api_prompt import is_link
from .observed_sampling import RunSpan

log = logging.getLogger(__name__)

MEMORY_CAPACITY = 256  # nodes remembered for the cached-node rows of later prompts


@dataclass(frozen=True)
class RememberedStage:
    name: str
    kind: str
    seconds: float
    facts: dict[str, Any]


@dataclass(frozen=True)
class Remembered:
    """What a node recorded the last time it ran under observation."""

    signature: str
    stages: tuple[RememberedStage, ...]
    run: RunSpan | None = None


class NodeMemory:
    """Stages per node (by node id and class, checked against the node's inputs), least recently
    used dropped first. Shared by the observations of one process."""

    def __init__(self, capacity: int = MEMORY_CAPACITY) -> None:
        self._items: OrderedDict[tuple[str, str], Remembered] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def recall(self, node_id: str, class_type: str, signature: str) -> Remembered | None:
        with self._lock:
            item = self._items.get((node_id, class_type))
            return item if item is not None and item.signature == signature else None

    def remember(self, node_id: str, class_type: str, item: Remembered) -> None:
        with self._lock:
            self._items[(node_id, class_type)] = item
            self._items.move_to_end((node_id, class_type))
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)


@dataclass
class PromptGraph:
    """The prompt being run: node id -> {"class_type", "inputs", "_meta"}; `node_class` gives the
    class of a node type (None when unknown) for the roles and the lazy inputs."""

    nodes: Mapping[str, Mapping[str, Any]]
    node_class: Callable[[str], Any] = lambda _class_type: None
    lookup: Callable[[str], Mapping[str, Any] | None] | None = None  # ids the dict lacks (expanded nodes)

    def node(self, node_id: str) -> Mapping[str, Any]:
        found = self.nodes.get(node_id)
        if found is None and self.lookup is not None:
            found = self.lookup(node_id)
        return found or {"class_type": f"node_{node_id}", "inputs": {}}

    def class_type(self, node_id: str) -> str:
        return str(self.node(node_id).get("class_type", f"node_{node_id}"))

    def title(self, node_id: str) -> str | None:
        meta = self.node(node_id).get("_meta")
        return meta.get("title") if isinstance(meta, dict) else None

    def signature(self, node_id: str) -> str:
        node = self.node(node_id)
        return json.dumps([node.get("class_type"), node.get("inputs", {})], sort_keys=True, default=str)

    def needed_inputs(self, node_id: str) -> Iterable[str]:
        """Ids of the nodes this node's non-lazy inputs link to."""
        cls = self.node_class(self.class_type(node_id))
        lazy = _lazy_inputs(cls)
        for name, value in self.node(node_id).get("inputs", {}).items():
            if is_link(value) and name not in lazy:
                yield str(value[0])


def _lazy_inputs(cls: Any) -> set[str]:
    if cls is None or not hasattr(cls, "INPUT_TYPES"):
        return set()
    try:
        spec = cls.INPUT_TYPES()
    except (TypeError, ValueError, KeyError, AttributeError) as err:  # another pack's node: not ours to fix
        log.debug("INPUT_TYPES of %s failed (%s); its inputs are taken as not lazy", cls, err)
        return set()
    lazy = set()
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            if isinstance(entry, (tuple, list)) and len(entry) > 1 and isinstance(entry[1], dict):
                if entry[1].get("lazy"):
                    lazy.add(name)
    return lazy
