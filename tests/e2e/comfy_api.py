"""Test-only helpers for talking to a ComfyUI server in the end-to-end tests.

HTTP requests and whole prompts (websocket included) go through the pack's own client,
``wanbench.client`` (``http_json``, ``view_bytes``, ``run_on_server``); what is here the pack does
not need: a strict ``/history`` lookup, the shipped workflow files and finding nodes in a prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wanbench.client import http_json

ROOT = Path(__file__).resolve().parents[2]
API_DIR = ROOT / "workflows" / "api"  # the API twins
TEMPLATES_DIR = ROOT / "example_workflows"  # the UI workflows (ComfyUI's templates of the pack)


def history_outputs(server: str, prompt_id: str) -> dict[str, Any]:
    """``outputs`` of one finished prompt in ``/history`` (node id -> ui dict)."""
    status, history = http_json("GET", f"{server}/history/{prompt_id}")
    if status != 200 or prompt_id not in history:
        raise LookupError(
            f"prompt {prompt_id} is not in {server}/history (HTTP {status}): {str(history)[:500]}"
        )
    return history[prompt_id]["outputs"]


def load_api(name: str) -> dict[str, Any]:
    """A shipped API-format workflow, ``_meta`` included."""
    return json.loads((API_DIR / name).read_text(encoding="utf-8"))


def load_template(name: str) -> dict[str, Any]:
    """A shipped UI-format workflow (a template) by file name."""
    return json.loads((TEMPLATES_DIR / name).read_text(encoding="utf-8"))


def tiny_api_workflows() -> list[str]:
    """File names of the shipped tiny API workflows (the ones that run on CPU in seconds)."""
    return sorted(p.name for p in API_DIR.glob("tiny_*.api.json"))


def ui_workflows_with_twins() -> list[tuple[str, str]]:
    """(UI workflow, API twin) file names of every shipped UI-format workflow, from the generator."""
    from wanbench.workflows.build_workflows import WORKFLOWS

    return [(spec.template_file, spec.api_file) for spec in WORKFLOWS]


def nodes_of_type(prompt: Mapping[str, Any], class_type: str) -> list[str]:
    return [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]


def only_node_of_type(prompt: Mapping[str, Any], class_type: str) -> str:
    found = nodes_of_type(prompt, class_type)
    if len(found) != 1:
        raise LookupError(f"expected one {class_type} node in the workflow; got {found}")
    return found[0]


def geometry_node(prompt: Mapping[str, Any]) -> str:
    """The node that sets the video's size and frame count (inputs width, height and length)."""
    found = [
        node_id for node_id, node in prompt.items() if {"width", "height", "length"} <= set(node["inputs"])
    ]
    if len(found) != 1:
        raise LookupError(f"expected one node with width/height/length inputs; got {found}")
    return found[0]
