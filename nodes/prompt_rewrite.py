"""Put a Wan Model Tap after every model source of a profiled prompt (ComfyUI's on-prompt hook).

ComfyUI calls the pack's handler (registered once with `PromptServer.add_on_prompt_handler`) with
every prompt posted to `/prompt`, before it validates it. When the prompt holds a Wan Profiler or
a Wan Benchmark Report, `insert_model_taps` adds one `WanBenchModelTap` node per model source (a
node type with a MODEL output and no MODEL input: UNETLoader, CheckpointLoaderSimple, ...) and
points every input that used that MODEL output at the tap. The tap carries the source's node id,
the file it loads and the expert that file name states (high / low; "model" when the prompt has
one model source), so each sampler step is attributed to the right expert. Prompts without the
profiler pass unchanged, so they carry no profiling code at all.

Prompts that reach ComfyUI some other way (not through `/prompt`) get no taps: their sampler steps
are then timed from progress updates, with loading, expert, CFG mode and FLOPs `n/a` (said so).

Shapes: none (graph plumbing only).
"""

from __future__ import annotations

import copy
import logging
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

from ..wan_core.config import EXPERT_SINGLE
from .api_prompt import is_link
from .observed_stages import expert_from_file, model_file_of

log = logging.getLogger(__name__)

TAP_CLASS = "WanBenchModelTap"
PROFILED_MARKERS = frozenset({"WanBenchProfiler", "WanBenchReport"})
MODEL_TYPE = "MODEL"
_ID_CHARS = re.compile(r"[^A-Za-z0-9_]+")
INSPECT_ERRORS = (TypeError, ValueError, KeyError, AttributeError, IndexError)


def is_profiled(prompt: Mapping[str, Any]) -> bool:
    return any(isinstance(n, Mapping) and n.get("class_type") in PROFILED_MARKERS for n in prompt.values())


def model_output_slots(node_class: Any) -> list[int]:
    """Output slots typed MODEL of a model *source* (a class that takes no MODEL input), else []."""
    if node_class is None:
        return []
    try:
        returns = list(getattr(node_class, "RETURN_TYPES", ()) or ())
        spec = node_class.INPUT_TYPES()
    except INSPECT_ERRORS as err:  # another pack's class that cannot describe itself: not tapped
        log.debug("cannot inspect %s (%s); its outputs are not tapped", node_class, err)
        return []
    for section in ("required", "optional"):
        for entry in (spec.get(section) or {}).values():
            if isinstance(entry, (tuple, list)) and entry and entry[0] == MODEL_TYPE:
                return []
    return [slot for slot, kind in enumerate(returns) if kind == MODEL_TYPE]


def insert_model_taps(prompt: Mapping[str, Any], node_class: Callable[[str], Any]) -> dict[str, Any]:
    """A copy of `prompt` with a tap after each MODEL output of a model source that something uses."""
    out: dict[str, Any] = copy.deepcopy(dict(prompt))
    consumers: dict[tuple[str, int], list[tuple[str, str]]] = {}
    for node_id, node in out.items():
        if not isinstance(node, dict) or node.get("class_type") == TAP_CLASS:
            continue
        for name, value in (node.get("inputs") or {}).items():
            if is_link(value):
                consumers.setdefault((str(value[0]), int(value[1])), []).append((node_id, name))
    sources = []
    for (source, slot), users in consumers.items():
        node = out.get(source)
        if not isinstance(node, dict):
            continue
        if slot in model_output_slots(node_class(str(node.get("class_type")))):
            sources.append((source, slot, users))
    for source, slot, users in sources:
        file_name = model_file_of(out[source].get("inputs") or {}) or ""
        expert = expert_from_file(file_name) or (EXPERT_SINGLE if len(sources) == 1 else "")
        tap_id = _tap_id(out, source, slot)
        out[tap_id] = {
            "class_type": TAP_CLASS,
            "inputs": {"model": [source, slot], "source_node": source, "model_file": file_name, "expert": expert},
            "_meta": {"title": f"Wan Model Tap ({file_name or source})"},
        }
        for user, name in users:
            out[user]["inputs"][name] = [tap_id, 0]
    return out


def _tap_id(prompt: Mapping[str, Any], source: str, slot: int) -> str:
    base = f"wanbench_tap_{_ID_CHARS.sub('_', source)}_{slot}"
    tap_id, n = base, 1
    while tap_id in prompt:
        n += 1
        tap_id = f"{base}_{n}"
    return tap_id


def on_prompt(json_data: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's on-prompt hook: taps for a profiled prompt, anything else unchanged."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict) or not is_profiled(prompt):
        return json_data
    nodes_module = sys.modules.get("nodes")
    mappings = getattr(nodes_module, "NODE_CLASS_MAPPINGS", {}) if nodes_module is not None else {}
    json_data["prompt"] = insert_model_taps(prompt, mappings.get)
    return json_data


def install() -> bool:
    """Register `on_prompt` with the running ComfyUI server (once); False outside ComfyUI."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None) if server else None
    if instance is None or not hasattr(instance, "add_on_prompt_handler"):
        return False
    handlers = getattr(instance, "on_prompt_handlers", [])
    if any(
        getattr(h, "__qualname__", "") == on_prompt.__qualname__ and getattr(h, "__module__", "") == __name__
        for h in handlers
    ):
        return True
    instance.add_on_prompt_handler(on_prompt)
    return True
