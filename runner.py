"""Run an API-format workflow in this process through the pack's own node classes.

What ComfyUI's executor does, for a graph made only of this pack's nodes: check every node type
exists, validate inputs against `INPUT_TYPES` (types of links, combo choices, min/max) and
`VALIDATE_INPUTS`, order nodes by their links, fill the hidden inputs (UNIQUE_ID, PROMPT), call
each node's FUNCTION once (an async one to completion) and collect the `ui` outputs. There is no
cache: every node runs. Wan Profiler nodes run first and Wan Benchmark Report nodes last, as in
ComfyUI; the workflow observer is told when each node starts and finishes (`run_observed`,
`observer.InProcessPrompt`), so a profiler needs no wires here either. The ranks of a parallel
run go through the same loop (`rank_runner.py`).
Also here: loading API workflow files and applying `--set` overrides. Runs on a ComfyUI server
(`--server`) go through `client.py` instead.

Shapes: none (graph plumbing only).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.api_prompt import is_link
from .nodes.comfy_bridge import model_folder_description
from .nodes.context import Bridge, use_bridge
from .nodes.observer import InProcessPrompt, in_process_prompt
from .nodes.validation import WIDGET_TYPES, input_problems
from .run_results import FILE_KINDS, REPORT_FILE_KINDS, InputProblem, describe_problems, node_title
from .util.public import PUBLIC_MODULE
from .wan_core.errors import WanError

log = logging.getLogger(__name__)


class WorkflowError(WanError, ValueError):
    """The workflow cannot run: unknown node type, bad link, invalid input value.

    `problems` lists every problem found (each naming its node and input), all at once.
    """

    __module__ = PUBLIC_MODULE

    def __init__(self, message: str, problems: Sequence[InputProblem] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


NODE_NOTE_PREFIX = "raised by node "  # exception note added by the runner: "raised by node 7 (Class)"
# What nodes raise for a run that cannot go on (bad input, missing file or package, torch errors):
# the runner adds the node note to these and the CLI prints them as one line. Anything else is a
# bug and keeps its full traceback (whose frames show the node).
NODE_ERRORS: tuple[type[Exception], ...] = (
    WanError,
    OSError,
    ValueError,
    TypeError,
    KeyError,
    ImportError,
    RuntimeError,
)
RUN_FIRST = ("WanBenchProfiler",)  # output nodes without needed inputs ComfyUI starts first
RUN_LAST = ("WanBenchReport",)  # the report waits for every other node
NodeCallback = Callable[[str, str, int, int], None]  # (node id, title, position from 1, number of nodes)


def describe_error(err: BaseException) -> str:
    """One line for the user: the node that raised (when a workflow node did), the type, the message."""
    where = [
        n[len(NODE_NOTE_PREFIX) :] for n in getattr(err, "__notes__", []) if n.startswith(NODE_NOTE_PREFIX)
    ]
    prefix = f"node {where[-1]} failed: " if where else ""
    return f"{prefix}{type(err).__name__}: {err}"


@dataclass
class RunResult:
    """Outputs of every node (by node id) and the `ui` dicts of the output nodes."""

    outputs: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    ui: dict[str, dict[str, Any]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)


def load_api_workflow(path: str | Path) -> dict[str, Any]:
    """Read an API-format workflow (`{node_id: {"class_type", "inputs"}}`); a UI-format file is an error."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise WorkflowError(f"{path} is a UI-format workflow; run its API twin (*.api.json) instead")
    if isinstance(data, dict) and "prompt" in data and isinstance(data["prompt"], dict):
        data = data["prompt"]
    if not isinstance(data, dict) or not all(
        isinstance(v, dict) and "class_type" in v for v in data.values()
    ):
        raise WorkflowError(f"{path} is not an API-format workflow: expected {{id: {{class_type, inputs}}}}")
    return data


def _input_spec(cls: type, name: str) -> tuple[Any, dict[str, Any]] | None:
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        if name in spec.get(section, {}):
            entry = spec[section][name]
            return entry[0], (entry[1] if len(entry) > 1 else {})
    return None


def _model_folder_hint(cls: type, name: str) -> str:
    """For an input that picks a model file: where the file was looked for, and how to fix it."""
    folder = getattr(cls, "MODEL_FOLDERS", {}).get(name)
    if folder is None:
        return ""
    return (
        f"; model files are looked up in {model_folder_description(folder)}: put the file there, "
        "pass another models folder with --models (or create the tiny ones with --make-tiny-models), "
        "or pick one of the listed names"
    )


def validate_workflow(prompt: Mapping[str, Any], *, values: bool = True) -> list[str]:
    """Check the whole workflow before anything runs, as ComfyUI does; return the execution order.

    Node types, required inputs, links (source, slot, type) and, with `values`, every widget value
    (type, min/max, choices such as the model files of the active bridge, the node's own
    `VALIDATE_INPUTS`) are checked; all problems are reported at once in one `WorkflowError` whose
    `problems` name each node and input. `values=False` checks the structure only.
    """
    problems: list[InputProblem] = []
    for node_id, node in prompt.items():
        problems += _node_problems(prompt, str(node_id), node, values=values)
    if problems:
        raise WorkflowError(
            describe_problems(f"the workflow has {len(problems)} problem(s); nothing was run:", problems),
            problems,
        )
    return _topological_order(prompt)


def _node_problems(
    prompt: Mapping[str, Any], node_id: str, node: Mapping[str, Any], *, values: bool
) -> list[InputProblem]:
    class_type = str(node.get("class_type"))
    cls = NODE_CLASS_MAPPINGS.get(class_type)
    title = node_title(prompt, node_id, NODE_DISPLAY_NAME_MAPPINGS.get(class_type))

    def problem(name: str | None, message: str) -> InputProblem:
        return InputProblem(node_id=node_id, class_type=class_type, title=title, input=name, message=message)

    if cls is None:
        return [
            problem(
                None,
                f"node type {class_type!r} is not a ComfyUI-WanBench node; the in-process runner only runs "
                f"{sorted(NODE_CLASS_MAPPINGS)}. Run this workflow on a ComfyUI server with --server URL",
            )
        ]
    found: list[InputProblem] = []
    inputs = node.get("inputs", {})
    for name, entry in cls.INPUT_TYPES().get("required", {}).items():
        if name not in inputs:
            kind = entry[0]
            linked = isinstance(kind, str) and kind.isupper() and kind not in WIDGET_TYPES
            fix = f"connect a node that outputs {kind} to it" if linked else "give it a value"
            found.append(problem(name, f"required input {name!r} is missing; {fix}"))
    constants: dict[str, Any] = {}
    for name, value in inputs.items():
        spec = _input_spec(cls, name)
        if spec is None:
            found.append(problem(name, f"unknown input {name!r}"))
        elif is_link(value):
            message = _link_problem(prompt, name, value, spec[0])
            if message:
                found.append(problem(name, message))
        else:
            constants[name] = value
    if values:
        for name, message in input_problems(cls, constants):
            found.append(problem(name or None, message + _model_folder_hint(cls, name)))
    return found


def _link_problem(prompt: Mapping[str, Any], name: str, link: list[Any], wanted: Any) -> str | None:
    src_id, slot = link
    if src_id not in prompt:
        return f"input {name!r} links to missing node {src_id}"
    src_cls = NODE_CLASS_MAPPINGS.get(prompt[src_id].get("class_type"))
    if src_cls is None:
        return None  # the source node's own problem is reported there
    out_types = src_cls.RETURN_TYPES
    if slot >= len(out_types) or (out_types[slot] != wanted and "*" not in (out_types[slot], wanted)):
        got = out_types[slot] if slot < len(out_types) else f"no output {slot}"
        return f"input {name!r} expects {wanted}; node {src_id} output {slot} is {got}"
    return None


def _topological_order(prompt: Mapping[str, Any]) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(node_id: str, path: tuple[str, ...]) -> None:
        if state.get(node_id) == 2:
            return
        if state.get(node_id) == 1:
            raise WorkflowError(f"the workflow has a cycle through nodes {' -> '.join(path + (node_id,))}")
        state[node_id] = 1
        for value in prompt[node_id].get("inputs", {}).values():
            if is_link(value):
                visit(value[0], path + (node_id,))
        state[node_id] = 2
        order.append(node_id)

    for node_id in sorted(prompt, key=lambda k: (len(k), k)):
        visit(node_id, ())
    first = [n for n in order if prompt[n]["class_type"] in RUN_FIRST]
    last = [n for n in order if prompt[n]["class_type"] in RUN_LAST]
    return first + [n for n in order if n not in first and n not in last] + last


def run_node(node_id: str, node: Mapping[str, Any], prompt: Mapping[str, Any], result: RunResult) -> None:
    """Run one node with its linked inputs taken from `result.outputs`; store its outputs there."""
    class_type = node["class_type"]
    cls = NODE_CLASS_MAPPINGS[class_type]
    kwargs: dict[str, Any] = {}
    for name, value in node.get("inputs", {}).items():
        kwargs[name] = result.outputs[value[0]][value[1]] if is_link(value) else value
    for name, kind in cls.INPUT_TYPES().get("hidden", {}).items():
        kwargs[name] = {"UNIQUE_ID": node_id, "PROMPT": dict(prompt)}.get(kind)
    try:
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
        if inspect.iscoroutine(out):
            out = asyncio.run(out)
    except NODE_ERRORS as err:
        # Same exception (callers and tests keep its type); the note names the node that raised.
        err.add_note(f"{NODE_NOTE_PREFIX}{node_id} ({class_type})")
        raise
    if isinstance(out, dict):
        result.ui[node_id] = out.get("ui", {})
        out = out.get("result", ())
    result.outputs[node_id] = tuple(out)


def run_workflow(prompt: Mapping[str, Any], bridge: Bridge, *, on_node: NodeCallback | None = None) -> RunResult:
    """Validate and run `prompt` with `bridge`'s model folders and output folder.

    `on_node(node id, title, position, number of nodes)` is called before each node runs.
    """
    result = RunResult()
    observed = InProcessPrompt(prompt_id=uuid.uuid4().hex, nodes=prompt, node_classes=NODE_CLASS_MAPPINGS)
    with use_bridge(bridge), in_process_prompt(observed):
        result.order = validate_workflow(prompt)
        positions = {node_id: position for position, node_id in enumerate(result.order, 1)}

        def announce(node_id: str) -> None:
            class_type = prompt[node_id]["class_type"]
            log.info("running node %s (%s)", node_id, class_type)
            if on_node is not None:
                title = node_title(prompt, node_id, NODE_DISPLAY_NAME_MAPPINGS.get(class_type))
                on_node(node_id, title, positions[node_id], len(result.order))

        run_observed(prompt, result.order, result, observed, before_node=announce)
    return result


def run_observed(
    prompt: Mapping[str, Any],
    node_ids: Sequence[str],
    result: RunResult,
    observed: InProcessPrompt,
    *,
    before_node: Callable[[str], None] | None = None,
) -> None:
    """Run `node_ids` in order (`run_node`), telling the workflow observer when each starts and
    finishes; the prompt's observation ends with the loop, errors included. `before_node` runs
    before each node starts, outside its time: the log line, and in a parallel run the values
    rank 0 sends to the other ranks."""
    error: BaseException | None = None
    try:
        for node_id in node_ids:
            if before_node is not None:
                before_node(node_id)
            observed.node_started(node_id)
            run_node(node_id, prompt[node_id], prompt, result)
            observed.node_finished(node_id)
    except BaseException as err:
        error = err
        raise
    finally:
        observed.ended(error)


# ------------------------------------------------------------------------------------------------
# Workflow files: overrides
# ------------------------------------------------------------------------------------------------
def apply_overrides(prompt: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `prompt` with `{"<ClassType or node id>.<input>": value}` applied.

    A class type applies to every node of that type; it is an error when nothing matches, so a
    typo never silently leaves the default in place.
    """
    out = json.loads(json.dumps(prompt))
    for key, value in overrides.items():
        target, _, name = key.rpartition(".")
        if not target or not name:
            raise WorkflowError(f"override {key!r} must look like 'WanBenchSampler.steps' or '8.steps'")
        hits = [nid for nid, node in out.items() if nid == target or node["class_type"] == target]
        if not hits:
            raise WorkflowError(f"override {key!r}: no node with id or type {target!r} in the workflow")
        for nid in hits:
            inputs = out[nid].setdefault("inputs", {})
            if name not in inputs:
                raise WorkflowError(
                    f"override {key!r}: node {nid} ({out[nid]['class_type']}) has no input {name!r}"
                )
            inputs[name] = value
    return out


def output_files(result: RunResult, output_dir: str | Path) -> dict[str, list[str]]:
    """Files an in-process run wrote under `output_dir`, by kind (see `FILE_KINDS`)."""
    files: dict[str, list[str]] = {kind: [] for kind in FILE_KINDS}
    for node_id in result.order:
        ui = result.ui.get(node_id, {})
        for entry in ui.get("wanbench_report", []):
            path = Path(output_dir).resolve() / entry.get("subfolder", "") / entry["filename"]
            files[REPORT_FILE_KINDS.get(entry.get("kind"), "other")].append(str(path))
        if ui.get("animated"):
            files["videos"].append(str(result.outputs[node_id][0]))
    return files
