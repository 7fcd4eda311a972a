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
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .nodes import NODE_CLASS_MAPPINGS
from .nodes.api_prompt import is_link
from .nodes.comfy_bridge import model_folder_description
from .nodes.context import Bridge, use_bridge
from .nodes.observer import InProcessPrompt, in_process_prompt
from .wan_core.errors import WanError

log = logging.getLogger(__name__)


class WorkflowError(WanError, ValueError):
    """The workflow cannot run: unknown node type, bad link, invalid input value."""


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
# Input types entered as widget values (everything else is a link from another node's output).
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
RUN_FIRST = ("WanBenchProfiler",)  # output nodes without needed inputs ComfyUI starts first
RUN_LAST = ("WanBenchReport",)  # the report waits for every other node


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
        "pass another models folder with --models, or pick one of the listed names"
    )


def _check_value(
    node_id: str, class_type: str, name: str, kind: Any, opts: dict[str, Any], value: Any, cls: type
) -> None:
    where = f"node {node_id} ({class_type}) input {name!r}"
    if isinstance(kind, list):
        if value not in kind:
            shown = kind if len(kind) <= 8 else kind[:8] + ["..."]
            if not kind:
                raise WorkflowError(
                    f"{where}: {value!r} is not available: the list is empty (no model files found). "
                    "Pass the models folder with --models, or create the tiny models with "
                    "--make-tiny-models / `wanbench make-tiny-models DIR`"
                )
            raise WorkflowError(
                f"{where}: value {value!r} is not one of {shown}{_model_folder_hint(cls, name)}"
            )
        return
    if kind in ("INT", "FLOAT"):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind == "INT" and not float(value).is_integer())
        ):
            raise WorkflowError(f"{where}: expected {kind}; got {value!r}")
        if isinstance(value, float) and math.isnan(value):
            raise WorkflowError(f"{where}: expected a number; got NaN")
        if "min" in opts and value < opts["min"] or "max" in opts and value > opts["max"]:
            raise WorkflowError(f"{where}: {value} is outside [{opts.get('min')}, {opts.get('max')}]")
    elif kind == "BOOLEAN" and not isinstance(value, bool):
        raise WorkflowError(f"{where}: expected a boolean; got {value!r}")
    elif kind == "STRING" and not isinstance(value, str):
        raise WorkflowError(f"{where}: expected text; got {value!r}")


def validate_workflow(prompt: Mapping[str, Any]) -> list[str]:
    """Check node types, links and required inputs; return the node ids in execution order."""
    for node_id, node in prompt.items():
        class_type = node.get("class_type")
        if class_type not in NODE_CLASS_MAPPINGS:
            raise WorkflowError(
                f"node {node_id}: node type {class_type!r} is not a ComfyUI-WanBench node; "
                f"the in-process runner only runs {sorted(NODE_CLASS_MAPPINGS)}. "
                f"Run this workflow on a ComfyUI server with --server URL"
            )
        cls = NODE_CLASS_MAPPINGS[class_type]
        inputs = node.get("inputs", {})
        for name, entry in cls.INPUT_TYPES().get("required", {}).items():
            if name not in inputs:
                kind = entry[0]
                fix = (
                    f"connect a node that outputs {kind} to it"
                    if isinstance(kind, str) and kind.isupper() and kind not in WIDGET_TYPES
                    else "give it a value"
                )
                raise WorkflowError(
                    f"node {node_id} ({class_type}): required input {name!r} is missing; {fix}"
                )
        for name, value in inputs.items():
            spec = _input_spec(cls, name)
            if spec is None:
                raise WorkflowError(f"node {node_id} ({class_type}): unknown input {name!r}")
            if is_link(value):
                src_id, slot = value
                if src_id not in prompt:
                    raise WorkflowError(
                        f"node {node_id} ({class_type}) input {name!r} links to missing node {src_id}"
                    )
                src_cls = NODE_CLASS_MAPPINGS.get(prompt[src_id]["class_type"])
                out_types = src_cls.RETURN_TYPES if src_cls else ()
                if slot >= len(out_types) or (
                    out_types[slot] != spec[0] and "*" not in (out_types[slot], spec[0])
                ):
                    got = out_types[slot] if slot < len(out_types) else f"no output {slot}"
                    raise WorkflowError(
                        f"node {node_id} ({class_type}) input {name!r} expects {spec[0]}; "
                        f"node {src_id} output {slot} is {got}"
                    )
    return _topological_order(prompt)


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
    constants: dict[str, Any] = {}
    for name, value in node.get("inputs", {}).items():
        if is_link(value):
            kwargs[name] = result.outputs[value[0]][value[1]]
        else:
            kind, opts = _input_spec(cls, name)  # type: ignore[misc]
            _check_value(node_id, class_type, name, kind, opts, value, cls)
            kwargs[name] = constants[name] = value
    validate = getattr(cls, "VALIDATE_INPUTS", None)
    if validate is not None:
        wanted = inspect.signature(validate).parameters
        verdict = validate(**{k: v for k, v in constants.items() if k in wanted})
        if verdict is not True:
            raise WorkflowError(f"node {node_id} ({class_type}): {verdict}")
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


def run_workflow(prompt: Mapping[str, Any], bridge: Bridge) -> RunResult:
    """Validate and run `prompt` with `bridge`'s model folders and output folder."""
    result = RunResult()
    observed = InProcessPrompt(prompt_id=uuid.uuid4().hex, nodes=prompt, node_classes=NODE_CLASS_MAPPINGS)
    with use_bridge(bridge), in_process_prompt(observed):
        result.order = validate_workflow(prompt)

        def announce(node_id: str) -> None:
            log.info("running node %s (%s)", node_id, prompt[node_id]["class_type"])

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


def output_files(result: RunResult) -> dict[str, list[str]]:
    """Files an in-process run wrote: {"videos": [...], "reports": [...json...], "other": [...]} (the
    report's Markdown and latent files are "other", as `client.fetch_outputs` sorts them)."""
    files: dict[str, list[str]] = {"videos": [], "reports": [], "other": []}
    for node_id in result.order:
        ui = result.ui.get(node_id, {})
        if "wanbench_report" in ui:
            for entry in ui["wanbench_report"]:
                files["reports" if entry["path"].endswith(".json") else "other"].append(entry["path"])
        elif ui.get("animated"):
            files["videos"].append(str(result.outputs[node_id][0]))
    return files
