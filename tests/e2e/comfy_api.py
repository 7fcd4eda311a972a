"""Small HTTP helpers for talking to a ComfyUI server in the end-to-end tests.

Running a whole prompt (websocket included) goes through the pack's own client,
``wanbench.runner.run_on_server``; these helpers cover what that client does not expose: raw
answers to ``POST /prompt`` (for refused prompts), ``/object_info``, ``/history``, ``/view`` and
``POST /interrupt``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

WORKFLOWS_DIR = Path(__file__).resolve().parents[2] / "workflows"


def http_json(method: str, url: str, body: Any = None, *, timeout_s: float = 60.0) -> tuple[int, Any]:
    """(status, parsed JSON body) of one request; HTTP error statuses are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, raw.decode(errors="replace")


def view_bytes(server: str, entry: Mapping[str, Any], *, timeout_s: float = 60.0) -> bytes:
    """The file a history entry (``{"filename", "subfolder", "type"}``) names, through ``/view``."""
    query = urllib.parse.urlencode(
        {
            "filename": entry["filename"],
            "subfolder": entry.get("subfolder", ""),
            "type": entry.get("type", "output"),
        }
    )
    with urllib.request.urlopen(f"{server}/view?{query}", timeout=timeout_s) as response:
        return response.read()


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
    return json.loads((WORKFLOWS_DIR / name).read_text(encoding="utf-8"))


def tiny_api_workflows() -> list[str]:
    """File names of the shipped tiny API workflows (the ones that run on CPU in seconds)."""
    return sorted(p.name for p in WORKFLOWS_DIR.glob("tiny_*.api.json"))


def ui_workflows_with_twins() -> list[tuple[str, str]]:
    """(UI workflow, API twin) file names of every shipped UI-format workflow."""
    pairs = []
    for path in sorted(WORKFLOWS_DIR.glob("*.json")):
        if path.name.endswith(".api.json"):
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "nodes" in data and "links" in data:
            pairs.append((path.name, path.name[: -len(".json")] + ".api.json"))
    return pairs


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
