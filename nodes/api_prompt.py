"""API-format prompts (`{node_id: {"class_type", "inputs", "_meta"}}`): what an input that is a link looks like.

One definition for everything that reads a prompt's links: the in-process runners (`runner.py`,
`rank_runner.py`) and the workflow observer (`observed_graph.py`, `prompt_rewrite.py`). It lives
among the nodes because the runners import the nodes and the nodes never import the runners.

Shapes: none (graph plumbing only).
"""

from __future__ import annotations

from typing import Any


def is_link(value: Any) -> bool:
    """An input value that is a link: `[source node id (str), output slot (int)]`, as ComfyUI reads it."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)
