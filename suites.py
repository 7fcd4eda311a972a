"""Benchmark suites (`workflows/suites/*.json`): case lists and optimisation ladders.

A case list runs named cases, each a workflow with `Node.input` overrides:

    {"name", "description", "cases": [{"name", "workflow", "overrides": {"WanBenchSampler.steps": 4}}]}

A ladder runs one workflow as a baseline and as rows that change named settings of it (the
vocabulary is `SETTINGS`, mapped here onto node inputs; an unknown name is an error that lists
them). Rows extend the baseline, or, with `"cumulative": true`, the row before them (a row may
name the row it extends with `"extends"`):

    {"name", "description", "source", "workflow", "overrides": {...}, "random_weights": false,
     "cumulative": true, "baseline": {"name", "settings": {...}},
     "rows": [{"name", "settings": {...}, "expected": {"speedup": 1.8, "time_s": 165, "source": "..."},
               "unsupported": "why this pack cannot reproduce the row (it is listed, not run)"}]}

Whether a row can run where it runs (`Machine`: this machine, or a ComfyUI server) is decided
before it runs: a setting whose node input the pack does not have, a backend that is not
installed, TF32 or fp8 matmuls without the GPU for them, a LoRA file that is not there. Such a
row is skipped with the reason (`unavailable`), never dropped. A neutral value (TF32 off, compile
off, no cache) needs nothing, so a baseline runs on any version of the pack.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .wan_core.config import (
    BATCHED_CFG,
    CFG_MODES,
    DISTILL_SHIFT,
    DISTILL_SOLVER,
    DISTILL_STEPS,
    SEQUENTIAL_CFG,
    STEP_CACHE_OFF,
)
from .wan_core.errors import WanError

Prompt = dict[str, Any]
LOADER, SAMPLER, DECODE = "WanBenchModelLoader", "WanBenchSampler", "WanBenchVAEDecode"
PROFILER, REPORT, SAVE = "WanBenchProfiler", "WanBenchReport", "WanBenchSaveVideo"
LORA, STEP_CACHE = "WanBenchLora", "WanBenchStepCache"
FP8_MATMUL = "fp8_e4m3fn_scaled_mm"  # weight storage whose matmuls run in fp8 (tensor cores, sm 8.9+)
FP8_CAPABILITY = (8, 9)
TF32_CAPABILITY = (8, 0)
GPU_BACKENDS = ("flash_attn", "sage")


class SuiteError(WanError, ValueError):
    """A suite file that cannot be run as written (the message names the field and the fix)."""


# ------------------------------------------------------------------------------------------------
# Where rows run
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """What ladder rows may need from where they run. None = unknown there (then not checked)."""

    where: str
    cuda: bool | None
    gpu_name: str | None = None
    capability: tuple[int, int] | None = None
    nodes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # class -> input -> choices/type
    installed: Callable[[str], bool] | None = None  # attention backend installed? (None: unknown)

    def has_node(self, node: str) -> bool:
        return node in self.nodes

    def input_kind(self, node: str, name: str) -> Any:
        """The input's choices (a list) or type name; None when the node or input does not exist."""
        return self.nodes.get(node, {}).get(name)


def node_inputs(input_types: Mapping[str, Any]) -> dict[str, Any]:
    """{input: choices list or type name} from an `INPUT_TYPES()` dict or `/object_info`'s `input`."""
    out: dict[str, Any] = {}
    for section in ("required", "optional"):
        for name, spec in (input_types.get(section) or {}).items():
            kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
            if kind == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):  # newer object_info form
                kind = list(spec[1].get("options", []))
            out[name] = list(kind) if isinstance(kind, (list, tuple)) else kind
    return out


# ------------------------------------------------------------------------------------------------
# The settings a ladder row may change
# ------------------------------------------------------------------------------------------------
_NO_NEUTRAL = object()


@dataclass(frozen=True)
class Setting:
    """One named setting: how a suite value is checked, which node inputs it sets (or which node it
    inserts), the value that needs nothing, and what it needs from the machine."""

    name: str
    help: str
    node: str
    check: Callable[[Any], Any]  # suite value -> normalised value; raises SuiteError
    inputs: Callable[[Any], dict[str, Any]] | None  # value -> {input: value}; None for inserted nodes
    neutral: Any = _NO_NEUTRAL
    needs: Callable[[Any, Mapping[str, Any], Machine], str | None] | None = None
    # True when what `needs` names only makes the setting ineffective (it still runs): a row that
    # changes it is skipped (it would measure nothing), a baseline that has it runs, with a note.
    effect_only: bool = False


_KIND_NAMES = {bool: "true or false", str: "text", (int, float): "number"}


def _typed(name: str, kind: type | tuple[type, ...], choices: tuple[Any, ...] = ()) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise SuiteError(f"setting {name!r} takes {_KIND_NAMES.get(kind, kind)}; got {value!r}")
        if choices and value not in choices:
            raise SuiteError(f"setting {name!r} must be one of {list(choices)}; got {value!r}")
        return value
    return check


def _positive_int(name: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SuiteError(f"setting {name!r} takes an integer >= 0; got {value!r}")
        return value
    return check


def _guidance(value: Any) -> dict[str, float]:
    if isinstance(value, dict) and set(value) == {"high", "low"}:
        pair = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        pair = {"high": value, "low": value}
    else:
        raise SuiteError(f"setting 'guidance' takes a number (both experts) or {{'high': .., 'low': ..}}; "
                         f"got {value!r}")
    for v in pair.values():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise SuiteError(f"setting 'guidance' takes numbers >= 0; got {value!r}")
    return {"high": float(pair["high"]), "low": float(pair["low"])}


def _loras(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise SuiteError(f"setting 'lora' takes a list of {{'file', 'strength_high', 'strength_low'}}; got {value!r}")
    out = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("file"), str) or \
                set(item) - {"file", "strength_high", "strength_low"}:
            raise SuiteError(f"a 'lora' entry is {{'file': name, 'strength_high': 1.0, 'strength_low': 1.0}}; "
                             f"got {item!r}")
        out.append({"file": item["file"], "strength_high": float(item.get("strength_high", 1.0)),
                    "strength_low": float(item.get("strength_low", 1.0))})
    return out


def _step_cache(value: Any) -> dict[str, Any]:
    from .wan_core.runtime.step_cache import StepCacheSettings

    if value == STEP_CACHE_OFF:
        return {"mode": STEP_CACHE_OFF}
    if not isinstance(value, dict) or "mode" not in value:
        raise SuiteError(f"setting 'step_cache' takes 'off' or {{'mode', 'threshold', 'warmup_steps', 'max_skip', "
                         f"'apply_to', 'calibration'}}; got {value!r}")
    if value["mode"] == STEP_CACHE_OFF:
        return {"mode": STEP_CACHE_OFF}
    try:
        settings = StepCacheSettings(**value)
    except (TypeError, ValueError) as err:
        raise SuiteError(f"setting 'step_cache': {err}") from err
    return {k: getattr(settings, k) for k in ("mode", "threshold", "warmup_steps", "max_skip", "apply_to",
                                              "calibration")}


def _distilled(value: Any) -> bool:
    if value is not True:
        raise SuiteError(f"setting 'distilled' takes true (the 4-step distilled schedule); got {value!r}")
    return True


DISTILLED_INPUTS = {"solver": DISTILL_SOLVER, "steps": DISTILL_STEPS, "shift": DISTILL_SHIFT, "guidance_high": 1.0,
                    "guidance_low": 1.0}  # the Wan Sampler inputs of `distilled`


def _attention_needs(value: Any, settings: Mapping[str, Any], machine: Machine) -> str | None:
    if value not in GPU_BACKENDS:
        return None
    if machine.cuda is False:
        return f"attention {value} runs on CUDA GPUs only; {machine.where} has none"
    if settings.get("dtype", "bfloat16") == "float32":
        return f"attention {value} needs bfloat16 or float16 weights; this row runs float32"
    if machine.installed is not None and not machine.installed(value):
        return f"attention {value} is not installed on {machine.where}"
    return None


def _cuda_needs(what: str, capability: tuple[int, int] | None = None) -> Callable[..., str | None]:
    def needs(value: Any, settings: Mapping[str, Any], machine: Machine) -> str | None:
        if machine.cuda is False:
            return f"{what} needs a CUDA GPU; {machine.where} has none"
        if capability and machine.capability is not None and machine.capability < capability:
            return (f"{what} needs compute capability {capability[0]}.{capability[1]} or newer; "
                    f"{machine.gpu_name or 'the GPU'} is {machine.capability[0]}.{machine.capability[1]}")
        return None
    return needs


def _tf32_needs(value: Any, settings: Mapping[str, Any], machine: Machine) -> str | None:
    return _cuda_needs("TF32 (tensor-core float32 matmuls)", TF32_CAPABILITY)(value, settings, machine)


def _weight_needs(value: Any, settings: Mapping[str, Any], machine: Machine) -> str | None:
    if value != FP8_MATMUL:
        return None
    return _cuda_needs("fp8 matmuls (fp8 tensor cores)", FP8_CAPABILITY)(value, settings, machine)


def _placement_needs(value: Any, settings: Mapping[str, Any], machine: Machine) -> str | None:
    if machine.cuda is False:
        return (f"placement moves weights between the CPU and a CUDA GPU; {machine.where} has none, so every "
                "placement runs as none")
    return None


def _lora_needs(value: Any, settings: Mapping[str, Any], machine: Machine) -> str | None:
    if settings.get("weight_dtype") == FP8_MATMUL:
        return (f"LoRAs cannot patch weights that run as fp8 matmuls (weight_dtype {FP8_MATMUL}); give the row "
                "weight_dtype fp8_e4m3fn_scaled (fp8 storage, LoRA on the decoded weights)")
    if settings.get("compile", "off") != "off":
        return "LoRAs cannot be combined with torch.compile (the compiled graph keeps the patched weights); " \
               "give the row compile off"
    files = machine.input_kind(LORA, "lora_name")
    missing = [item["file"] for item in value if isinstance(files, list) and item["file"] not in files]
    if missing:
        return f"LoRA file(s) {missing} are not in models/loras on {machine.where}"
    return None


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("attention", "attention backend (Wan Model Loader)", LOADER, _typed("attention", str),
            lambda v: {"attention": v}, neutral="sdpa", needs=_attention_needs),
    Setting("dtype", "DiT compute dtype (Wan Model Loader)", LOADER, _typed("dtype", str),
            lambda v: {"dtype": v}),
    Setting("weight_dtype", "how the DiT's block matrices are stored (fp8, GGUF, ...)", LOADER,
            _typed("weight_dtype", str), lambda v: {"weight_dtype": v}, neutral="default", needs=_weight_needs),
    Setting("tf32", "TF32 for float32 matmuls while sampling", LOADER, _typed("tf32", bool),
            lambda v: {"tf32": v}, neutral=False, needs=_tf32_needs, effect_only=True),
    Setting("compile", "regional torch.compile mode of the DiT blocks", LOADER, _typed("compile", str),
            lambda v: {"compile": v}, neutral="off"),
    Setting("placement", "where DiT weights live while sampling (Wan Sampler)", SAMPLER,
            _typed("placement", str), lambda v: {"placement": v}, needs=_placement_needs, effect_only=True),
    Setting("resident_blocks", "blocks kept on the GPU with placement blocks", SAMPLER,
            _positive_int("resident_blocks"), lambda v: {"resident_blocks": v}),
    Setting("cfg_mode", f"CFG as one batch-2 forward ({BATCHED_CFG}) or two ({SEQUENTIAL_CFG})", SAMPLER,
            _typed("cfg_mode", str, CFG_MODES), lambda v: {"batched_cfg": v == BATCHED_CFG}),
    Setting("vae_tiling", "VAE decode tiling (Wan VAE Decode)", DECODE, _typed("vae_tiling", str),
            lambda v: {"tiling": v}, neutral="none"),
    Setting("steps", "denoising steps", SAMPLER, _positive_int("steps"), lambda v: {"steps": v}),
    Setting("solver", "flow-matching solver", SAMPLER, _typed("solver", str), lambda v: {"solver": v}),
    Setting("shift", "sigma shift", SAMPLER, _typed("shift", (int, float)), lambda v: {"shift": float(v)}),
    Setting("guidance", "CFG scale: one number, or {high, low}", SAMPLER, _guidance,
            lambda v: {"guidance_high": v["high"], "guidance_low": v["low"]}),
    Setting("distilled", "the 4-step distilled schedule (euler_distill, 4 steps, shift 5, guidance 1)", SAMPLER,
            _distilled, lambda v: dict(DISTILLED_INPUTS)),
    Setting("lora", "LoRA files on the experts (Wan LoRA nodes after the loader)", LORA, _loras, None,
            neutral=[], needs=_lora_needs),
    Setting("step_cache", "step caching (a Wan Step Cache node before the sampler)", STEP_CACHE, _step_cache,
            None, neutral={"mode": STEP_CACHE_OFF}),
)}
# Settings are applied in this (the vocabulary's) order, so `distilled` wins over `steps`, `solver`,
# `shift` and `guidance` when a row has both; LoRA and step-cache nodes are inserted last.


def check_settings(values: Any, where: str) -> dict[str, Any]:
    """Suite settings checked and normalised; an unknown name lists the valid ones."""
    if not isinstance(values, dict):
        raise SuiteError(f"{where}: settings must be an object {{name: value}}; got {values!r}")
    out = {}
    for name, value in values.items():
        if name not in SETTINGS:
            raise SuiteError(f"{where}: unknown setting {name!r}; the settings are {sorted(SETTINGS)} "
                             "(docs/workflows.md describes each)")
        try:
            out[name] = SETTINGS[name].check(value)
        except SuiteError as err:
            raise SuiteError(f"{where}: {err}") from err
    return out


# ------------------------------------------------------------------------------------------------
# Suite files
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expectation:
    speedup: float | None
    time_s: float | None
    source: str


@dataclass(frozen=True)
class Row:
    """One ladder row as written: the settings it sets and the row it extends (None: the baseline)."""

    id: str
    name: str
    own: dict[str, Any]
    parent: str | None
    expected: Expectation | None = None
    unsupported: str | None = None

    @property
    def baseline(self) -> bool:
        return self.parent is None


@dataclass(frozen=True)
class PlannedRow:
    """A row on one machine: the settings it runs with, what they change against the baseline, the
    settings of the rows it extends that were left out (they could not run here), and why it is
    skipped (None: it runs)."""

    row: Row
    settings: dict[str, Any]
    changes: dict[str, Any]
    dropped: list[str]
    skip: str | None


@dataclass(frozen=True)
class LadderSuite:
    name: str
    description: str
    source: str
    workflow: Path
    overrides: dict[str, Any]
    random_weights: bool
    rows: list[Row]  # the baseline first

    @property
    def baseline(self) -> Row:
        return self.rows[0]


def is_ladder(suite: Mapping[str, Any]) -> bool:
    return "baseline" in suite or "rows" in suite


def load_suite_file(path: Path) -> dict[str, Any]:
    """The suite file's JSON object, checked for its kind's fields (a case list or a ladder)."""
    try:
        suite = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SuiteError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(suite, dict):
        raise SuiteError(f"{path}: a suite is a JSON object; got {type(suite).__name__}")
    if is_ladder(suite):
        parse_ladder(suite, path)
        return suite
    cases = suite.get("cases")
    if not isinstance(cases, list) or not cases:
        raise SuiteError(f"{path}: a suite is {{'name', 'cases': [{{'name', 'workflow', 'overrides'}}]}} or a "
                         "ladder {'name', 'workflow', 'baseline', 'rows'}")
    for case in cases:
        missing = {"name", "workflow"} - set(case)
        if missing:
            raise SuiteError(f"{path}: case {case.get('name', '?')!r} lacks {sorted(missing)}")
    return suite


def _slug(index: int, name: str) -> str:
    return f"{index:02d}_" + (re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()[:40] or "row")


def _expectation(data: Any, where: str) -> Expectation | None:
    if data is None:
        return None
    if not isinstance(data, dict) or set(data) - {"speedup", "time_s", "source"}:
        raise SuiteError(f"{where}: 'expected' is {{'speedup', 'time_s', 'source'}}; got {data!r}")
    for key in ("speedup", "time_s"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise SuiteError(f"{where}: expected {key} must be a number > 0; got {value!r}")
    return Expectation(speedup=data.get("speedup"), time_s=data.get("time_s"), source=str(data.get("source", "")))


def parse_ladder(suite: Mapping[str, Any], path: Path) -> LadderSuite:
    """A ladder suite checked: settings known and valid, every row extending an earlier one."""
    where = str(path)
    for key in ("name", "workflow", "baseline", "rows"):
        if key not in suite:
            raise SuiteError(f"{where}: a ladder needs {key!r} (see suites.py)")
    if not isinstance(suite["rows"], list) or not suite["rows"]:
        raise SuiteError(f"{where}: 'rows' must be a non-empty list")
    base_name = str(suite["baseline"].get("name", "baseline"))
    base = check_settings(suite["baseline"].get("settings", {}), f"{where} baseline")
    rows = [Row(id=_slug(0, base_name), name=base_name, own=base, parent=None)]
    for index, data in enumerate(suite["rows"], start=1):
        name = data.get("name") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name or name in {r.name for r in rows}:
            raise SuiteError(f"{where}: row {index} needs a unique 'name'; got {name!r}")
        parent = data.get("extends", rows[-1].name if suite.get("cumulative") else base_name)
        if parent not in {r.name for r in rows}:
            raise SuiteError(f"{where}: row {name!r} extends {parent!r}, which is not an earlier row")
        unsupported = data.get("unsupported")
        if unsupported is not None and not isinstance(unsupported, str):
            raise SuiteError(f"{where}: row {name!r}: 'unsupported' is the reason text; got {unsupported!r}")
        rows.append(Row(id=_slug(index, name), name=name, parent=parent,
                        own=check_settings(data.get("settings", {}), f"{where} row {name!r}"),
                        expected=_expectation(data.get("expected"), f"{where} row {name!r}"), unsupported=unsupported))
    overrides = suite.get("overrides", {})
    if not isinstance(overrides, dict):
        raise SuiteError(f"{where}: 'overrides' must be an object {{'Node.input': value}}")
    return LadderSuite(name=str(suite["name"]), description=str(suite.get("description", "")),
                       source=str(suite.get("source", "")), workflow=(path.parent / suite["workflow"]).resolve(),
                       overrides=dict(overrides), random_weights=bool(suite.get("random_weights", False)), rows=rows)


# ------------------------------------------------------------------------------------------------
# Rows on a machine: can it run, and its workflow
# ------------------------------------------------------------------------------------------------
def plan_rows(suite: LadderSuite, machine: Machine) -> list[PlannedRow]:
    """Every row on `machine`, in order. A row runs with the settings of the row it extends plus its
    own; a row that cannot run is skipped, and the rows extending it go on without its settings
    (listed as dropped), so one missing kernel does not hide the rest of the ladder."""
    base = suite.baseline.own
    nominal: dict[str, dict[str, Any]] = {}
    effective: dict[str, dict[str, Any]] = {}
    planned = []
    for row in suite.rows:
        parent_nominal = {} if row.parent is None else nominal[row.parent]
        parent_effective = {} if row.parent is None else effective[row.parent]
        settings = {**parent_effective, **row.own}
        nominal[row.name] = {**parent_nominal, **row.own}
        changes = {k: v for k, v in settings.items() if base.get(k, _NO_NEUTRAL) != v}
        dropped = [f"{k} {_show(v)}" for k, v in nominal[row.name].items() if settings.get(k, _NO_NEUTRAL) != v]
        skip = unavailable(row, settings, machine)
        if skip is None and not row.baseline and planned[0].skip is not None:
            skip = f"the baseline cannot run here ({planned[0].skip})"
        planned.append(PlannedRow(row=row, settings=settings, changes=changes, dropped=dropped, skip=skip))
        effective[row.name] = settings if skip is None or row.parent is None else parent_effective
    return planned


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list, bool)) else str(value)


def unavailable(row: Row, settings: Mapping[str, Any], machine: Machine) -> str | None:
    """Why `row` (with its full `settings`) cannot run on `machine`, judged by the settings it sets
    itself; None when it can. A setting that would only have no effect there skips a row that sets
    it, not the baseline (`ineffective` notes those)."""
    if row.unsupported:
        return f"not reproducible with this pack: {row.unsupported}"
    for name, value in row.own.items():
        setting = SETTINGS[name]
        if setting.effect_only and not row.baseline and setting.needs:
            reason = setting.needs(value, settings, machine)  # whatever the value: changing it measures nothing
            if reason:
                return reason
        if value == setting.neutral:
            continue
        if not machine.has_node(setting.node):
            return f"{name} needs the {setting.node} node, which the pack on {machine.where} does not have"
        for input_name, input_value in (setting.inputs(value) if setting.inputs else {}).items():
            kind = machine.input_kind(setting.node, input_name)
            if kind is None:
                return (f"{name} needs input {input_name!r} of {setting.node} ({setting.help}), which the pack on "
                        f"{machine.where} does not have")
            if isinstance(kind, list) and input_value not in kind:
                return (f"{name} {input_value!r} is not offered by {setting.node}.{input_name} on "
                        f"{machine.where} (choices: {kind})")
        reason = setting.needs(value, settings, machine) if setting.needs and not setting.effect_only else None
        if reason:
            return reason
    return None


def ineffective(settings: Mapping[str, Any], machine: Machine) -> list[str]:
    """Settings that run on `machine` without their effect (e.g. offloading without a GPU)."""
    notes = []
    for name, value in settings.items():
        setting = SETTINGS[name]
        if not setting.effect_only or setting.needs is None or value == setting.neutral:
            continue
        reason = setting.needs(value, settings, machine)
        if reason:
            notes.append(f"{name} {_show(value)} has no effect here: {reason}")
    return notes


def row_prompt(suite: LadderSuite, planned: PlannedRow, base: Prompt, machine: Machine) -> Prompt:
    """The API workflow of one row: the suite's overrides, the row's settings, its labels."""
    from .runner import apply_overrides

    prompt = apply_overrides(base, suite.overrides)
    settings = planned.settings
    for name, setting in SETTINGS.items():
        if name not in settings:
            continue
        value = settings[name]
        if value == setting.neutral and not machine.has_node(setting.node):
            continue
        if setting.inputs is not None:
            targets = _nodes(prompt, setting.node, name)
            for input_name, input_value in setting.inputs(value).items():
                if value == setting.neutral and machine.input_kind(setting.node, input_name) is None:
                    continue  # the pack there predates the input; its default is this value
                for node in targets:
                    node["inputs"][input_name] = input_value
    for item in settings.get("lora", []):
        _insert_model_node(prompt, LORA, {"lora_name": item["file"], "strength_high": item["strength_high"],
                                          "strength_low": item["strength_low"]}, profiled=True)
    cache = settings.get("step_cache", {"mode": STEP_CACHE_OFF})
    if cache["mode"] != STEP_CACHE_OFF:
        _insert_model_node(prompt, STEP_CACHE, dict(cache), profiled=False)
    _label(prompt, suite, planned.row)
    return prompt


def _nodes(prompt: Prompt, node: str, setting: str) -> list[dict[str, Any]]:
    found = [n for n in prompt.values() if n.get("class_type") == node]
    if not found:
        raise SuiteError(f"setting {setting!r} sets {node}, which the ladder's workflow does not contain")
    return found


def _insert_model_node(prompt: Prompt, class_type: str, inputs: dict[str, Any], *, profiled: bool) -> None:
    """Put a model-in/model-out node between the samplers and the node that feeds their model."""
    samplers = [n for n in prompt.values() if n["class_type"] == SAMPLER]
    sources = {tuple(n["inputs"]["model"]) for n in samplers}
    if len(sources) != 1:
        raise SuiteError(f"inserting {class_type} needs one model source for the samplers; found {sorted(sources)}")
    source = list(sources.pop())
    new_id = str(max(int(k) for k in prompt if k.isdigit()) + 1)
    node_inputs_: dict[str, Any] = {"model": source, **inputs}
    profiler = next((n["inputs"].get("profiler") for n in prompt.values() if n["class_type"] == LOADER), None)
    if profiled and profiler is not None:
        node_inputs_["profiler"] = profiler
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if value == source and key == "model":
                node["inputs"][key] = [new_id, 0]
    prompt[new_id] = {"class_type": class_type, "inputs": node_inputs_, "_meta": {"title": class_type}}


def _label(prompt: Prompt, suite: LadderSuite, row: Row) -> None:
    """Case name, file prefixes under wanbench/<suite>/<row>/, and the latent wired into the report."""
    prefix = f"wanbench/{suite.name}/{row.id}"
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == PROFILER:
            inputs["case_name"] = row.id
        elif kind == SAVE:
            inputs["filename_prefix"] = f"{prefix}/video"
        elif kind == REPORT:
            inputs["filename_prefix"] = f"{prefix}/report"
    samplers = [k for k, n in prompt.items() if n["class_type"] == SAMPLER]
    reports = [n for n in prompt.values() if n["class_type"] == REPORT]
    if len(reports) != 1 or not samplers:
        raise SuiteError(f"a ladder workflow needs one {REPORT} and a {SAMPLER}; got {len(reports)} and "
                         f"{len(samplers)}")
    last = max(samplers, key=lambda k: prompt[k]["inputs"].get("start_step", 0))  # the one that ends the run
    reports[0]["inputs"]["latent"] = [last, 0]
