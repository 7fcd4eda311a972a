"""What a workflow run tells the CLI, the same for in-process and `--server` runs.

- `InputProblem`: one problem with one input of one node. The in-process runner finds them itself
  (`runner.validate_workflow`); for `--server` runs they come from the `node_errors` of ComfyUI's
  refusal (`client.problems_from_node_errors`). Either way every problem is listed at once, each on
  the input it concerns, naming the node by its title.
- `FILE_KINDS`: the files a run wrote, by kind; `FILE_LABELS` is how the CLI names each kind.

Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# "reports" are the report JSON files (what `wanbench report` merges and `check-report` checks).
FILE_KINDS = ("videos", "reports", "markdown", "charts", "other")
FILE_LABELS = {
    "videos": "video",
    "markdown": "report",
    "reports": "report data (JSON)",
    "charts": "chart",
    "other": "file",
}
# The `kind` of an entry of the report node's `ui.wanbench_report` -> the file kind.
REPORT_FILE_KINDS = {"json": "reports", "markdown": "markdown", "chart": "charts"}


@dataclass(frozen=True)
class InputProblem:
    """`input` is None for a problem of the node as a whole (an unknown node type, a cycle)."""

    node_id: str
    class_type: str
    title: str
    input: str | None
    message: str

    def __str__(self) -> str:
        where = f"node {self.node_id} '{self.title}'"
        if self.title != self.class_type:
            where += f" ({self.class_type})"
        if self.input:
            where += f", input '{self.input}'"
        return f"{where}: {self.message}"


def node_title(prompt: Mapping[str, Any], node_id: str, fallback: str | None = None) -> str:
    """The title a user sees for a node: its `_meta.title`, else `fallback`, else its class type."""
    node = prompt.get(node_id) or {}
    title = (node.get("_meta") or {}).get("title") if isinstance(node, Mapping) else None
    return str(title or fallback or node.get("class_type") or f"node {node_id}")


def describe_problems(headline: str, problems: list[InputProblem]) -> str:
    """A headline and one indented line per problem."""
    return "\n".join([headline, *(f"  - {p}" for p in problems)])
