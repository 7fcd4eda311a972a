"""Writes every shipped workflow (UI format + API twin) and the benchmark suites from one description.

Also ComfyUI's own Wan2.2 graphs with the profiler dropped in (API format) and the suite that runs
them beside this pack's workflows (`native_workflows.py`).

Run `python workflows/build_workflows.py` (or `python -m wanbench.workflows.build_workflows`) after
changing a node's inputs; the tests fail when the checked-in files differ from what it writes.

- UI format (drag-and-drop, litegraph version 0.4): `widgets_values` follow the order of each
  node's widget inputs in `INPUT_TYPES` (required, then optional), with the extra
  "fixed"/"randomize" value the frontend stores after an INT input that has
  `control_after_generate`; socket inputs (and `forceInput` ones) are listed in `inputs`.
- API format: what the frontend's `app.graphToPrompt()` produces for that graph: every widget
  value by name, links as `[source id, output slot]`, `_meta.title`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import the installed package
    from wanbench.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from wanbench.util.atomic import atomic_write_text
    from wanbench.wan_core.config import DEFAULT_NEGATIVE_PROMPT, I2V_A14B, T2V_A14B, TI2V_5B, distilled_sampler
    from wanbench.workflows.native_workflows import NATIVE_NAMES, comparison_suite, native_graph
else:
    from ..nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from ..util.atomic import atomic_write_text
    from ..wan_core.config import DEFAULT_NEGATIVE_PROMPT, I2V_A14B, T2V_A14B, TI2V_5B, distilled_sampler
    from .native_workflows import NATIVE_NAMES, comparison_suite, native_graph

WORKFLOWS_DIR = Path(__file__).resolve().parent
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
CORE_NODES: dict[str, dict[str, Any]] = {
    # The only core node the shipped workflows use, with its widget/socket layout (ComfyUI >= 0.3).
    "LoadImage": {
        "widgets": ["image", "upload"],
        "api_widgets": ["image"],
        "inputs": [],
        "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
        "title": "Load Image",
    },
}

PROMPT = (
    "A red fox trots through fresh snow in a birch forest at sunrise, its breath visible in the cold "
    "air; the camera tracks it slowly from the side, soft golden light, shallow depth of field."
)
TINY_PROMPT = "a red fox running through snow"

TINY_FILES = {
    "ti2v": ("wanbench_tiny_ti2v_5B_fp16.safetensors", "none"),
    "t2v": (
        "wanbench_tiny_t2v_high_noise_14B_fp16.safetensors",
        "wanbench_tiny_t2v_low_noise_14B_fp16.safetensors",
    ),
    "i2v": (
        "wanbench_tiny_i2v_high_noise_14B_fp16.safetensors",
        "wanbench_tiny_i2v_low_noise_14B_fp16.safetensors",
    ),
}
TINY_TEXT_ENCODER = "wanbench_tiny_umt5_xxl_fp16.safetensors"
TINY_VAE = {
    "wan2.2": "wanbench_tiny_wan2.2_vae.safetensors",
    "wan2.1": "wanbench_tiny_wan_2.1_vae.safetensors",
}
# Tiny twins: small enough that the CPU demo finishes in well under a minute (9 frames).
TINY_GEOMETRY = {"ti2v": (96, 64, 9), "t2v": (64, 48, 9), "i2v": (64, 48, 9)}
FULL_FILES = {
    "ti2v": ("wan2.2_ti2v_5B_fp16.safetensors", "none"),
    "t2v": (
        "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
        "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
    ),
    "i2v": (
        "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
        "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors",
    ),
}
FULL_TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
FULL_VAE = {"wan2.2": "wan2.2_vae.safetensors", "wan2.1": "wan_2.1_vae.safetensors"}
# The 4-step distill LoRAs of ComfyUI's Wan2.2 14B templates (high-noise file, low-noise file).
FULL_LORAS = {
    "t2v": ("wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors",
            "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors"),
    "i2v": ("wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
            "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors"),
}
TINY_LORAS = {
    task: tuple(f"wanbench_tiny_{task}_4steps_lora_{expert}_noise.safetensors" for expert in ("high", "low"))
    for task in ("t2v", "i2v")
}
FOUR_STEP_GEOMETRY = (640, 640, 81)  # the templates' 4-step path: 640x640, 81 frames
# Where ComfyUI's templates download each file (node `properties.models`, shown by the frontend).
REPACKAGED_22 = "https://huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files"
REPACKAGED_21 = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
MODEL_URL_ROOTS = {
    "diffusion_models": REPACKAGED_22 + "/diffusion_models",
    "text_encoders": REPACKAGED_21 + "/text_encoders",
    "vae": REPACKAGED_22 + "/vae",
    "loras": REPACKAGED_22 + "/loras",
}
# Sampler widgets added after the first release (optional inputs): the values of a plain full run.
FULL_RUN_WINDOW = {"denoise": 1.0, "start_step": 0, "end_step": 10000, "add_noise": True, "timesteps": "",
                   "sigmas": ""}


@dataclass
class Node:
    id: int
    type: str
    widgets: dict[str, Any]
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    models: list[dict[str, str]] = field(default_factory=list)  # UI `properties.models` (download info)


@dataclass(frozen=True)
class WorkflowSpec:
    """One shipped workflow: task, mode (text or image), size class, and the 4-step LoRA recipe."""

    name: str
    model_type: str  # "ti2v" | "t2v" | "i2v"
    with_image: bool
    tiny: bool
    four_step: bool = False  # the 4-step distill LoRAs (A14B), as in ComfyUI's 14B templates


def _models(tiny: bool, folder: str, *names: str) -> list[dict[str, str]]:
    """The `properties.models` entries of a loader for real files (none for the tiny ones)."""
    if tiny:
        return []
    return [{"name": n, "url": f"{MODEL_URL_ROOTS[folder]}/{n}", "directory": folder} for n in names if n != "none"]


def _graph(spec: WorkflowSpec) -> list[Node]:
    if spec.four_step:
        return _four_step_graph(spec)
    task = {"ti2v": TI2V_5B, "t2v": T2V_A14B, "i2v": I2V_A14B}[spec.model_type]
    cfg = task.tiny() if spec.tiny else task
    sampler = task.sampler
    high, low = (TINY_FILES if spec.tiny else FULL_FILES)[spec.model_type]
    vae_file = (TINY_VAE if spec.tiny else FULL_VAE)[task.vae.variant]
    width, height, frames = (
        TINY_GEOMETRY[spec.model_type] if spec.tiny else (*task.default_size, task.frame_num)
    )
    dtype = "float32" if spec.tiny else "bfloat16"
    # Node ids follow the run order (the in-process runner runs nodes by id, dependencies first):
    # every loader (DiT, text encoder, VAE), then text encode, image and latent, sampler, decode,
    # save, report. A report then lists one Model_Initialization, T5_Encoding, TI2V_Preprocess.
    # No profiler wires: Wan Profiler and Wan Benchmark Report measure the whole prompt by themselves.
    nodes = [
        Node(1, "WanBenchProfiler", {"case_name": spec.name, "sample_interval_ms": 100}),
        Node(
            2,
            "WanBenchModelLoader",
            {
                "model_high": high,
                "model_low": low,
                "dtype": dtype,
                "attention": "sdpa",
                "device": "auto",
                # the A14B files are fp8-scaled: kept in fp8 (14.3 GB per expert instead of 28.6 GB),
                # decoded per block to the same bf16 values as a dequantised load
                "weight_dtype": "as_stored" if task.is_moe and not spec.tiny else "default",
                "compile": "off",
                "tf32": False,
            },
            {},
            _models(spec.tiny, "diffusion_models", high, low),
        ),
        Node(
            3,
            "WanBenchTextEncoderLoader",
            {
                "text_encoder": TINY_TEXT_ENCODER if spec.tiny else FULL_TEXT_ENCODER,
                "dtype": dtype,
                "device": "auto",
                "weight_dtype": "default",
            },
            {},
            _models(spec.tiny, "text_encoders", FULL_TEXT_ENCODER),
        ),
        Node(
            4,
            "WanBenchVAELoader",
            {"vae": vae_file, "dtype": "float32", "device": "auto"},
            {},
            _models(spec.tiny, "vae", vae_file),
        ),
        Node(
            5,
            "WanBenchTextEncode",
            {
                "prompt": TINY_PROMPT if spec.tiny else PROMPT,
                "negative_prompt": "" if spec.tiny else DEFAULT_NEGATIVE_PROMPT,
            },
            {"text_encoder": (3, 0)},
        ),
    ]
    geometry = {"width": width, "height": height, "length": frames}
    if spec.with_image:
        if spec.tiny:
            nodes.append(
                Node(
                    6,
                    "WanBenchTestImage",
                    {"width": width + width // 4, "height": height, "pattern": "gradient"},
                )
            )
        else:
            nodes.append(Node(6, "LoadImage", {"image": "example.png", "upload": "image"}))
        nodes.append(
            Node(
                7,
                "WanBenchImageToVideo",
                geometry,
                {"vae": (4, 0), "start_image": (6, 0)},
            )
        )
    else:
        nodes.append(Node(7, "WanBenchEmptyLatent", geometry, {"vae": (4, 0)}))
    nodes += [
        Node(
            8,
            "WanBenchSampler",
            {
                "seed": 42,
                "steps": cfg.sampler.steps,
                "shift": sampler.shift,
                "boundary": sampler.boundary if sampler.boundary is not None else 0.875,
                "guidance_high": sampler.guide_scale.high,
                "guidance_low": sampler.guide_scale.low,
                "solver": "unipc",
                "batched_cfg": True,
                "placement": "auto",  # the memory planner picks none / model / blocks to fit
                "resident_blocks": 0,
                **FULL_RUN_WINDOW,
            },
            {"model": (2, 0), "text_embeds": (5, 0), "latent": (7, 0)},
        ),
        Node(
            9, "WanBenchVAEDecode", {"tiling": "auto"}, {"vae": (4, 0), "latent": (8, 0)}
        ),
        Node(
            10,
            "WanBenchSaveVideo",
            {"fps": task.fps, "filename_prefix": f"wanbench/{spec.name}", "format": "mp4 (h264)", "crf": 19},
            {"images": (9, 0)},
        ),
        Node(
            11,
            "WanBenchReport",
            {"filename_prefix": f"wanbench/{spec.name}_report"},
        ),
    ]
    return nodes


def _four_step_graph(spec: WorkflowSpec) -> list[Node]:
    """The A14B graph with the 4-step distill LoRAs: Wan LoRA (high-noise file on the high expert),
    Wan LoRA (low-noise file on the low expert), then one Wan Sampler with the distilled recipe
    (euler_distill, 4 steps, shift 5, guidance 1; it switches experts at the boundary itself, where
    the templates need two KSamplerAdvanced nodes). Ids follow the run order, as in `_graph`.
    """
    task = {"t2v": T2V_A14B, "i2v": I2V_A14B}[spec.model_type]
    recipe = distilled_sampler(task)
    base = {n.type: n for n in _graph(WorkflowSpec(spec.name, spec.model_type, spec.with_image, spec.tiny))}
    lora_high, lora_low = (TINY_LORAS if spec.tiny else FULL_LORAS)[spec.model_type]
    width, height, frames = TINY_GEOMETRY[spec.model_type] if spec.tiny else FOUR_STEP_GEOMETRY
    geometry = {"width": width, "height": height, "length": frames}

    def lora(node_id: int, source: int, name: str, high: float, low: float) -> Node:
        return Node(node_id, "WanBenchLora", {"lora_name": name, "strength_high": high, "strength_low": low},
                    {"model": (source, 0)}, _models(spec.tiny, "loras", name))

    def moved(node_type: str, node_id: int, **links: tuple[int, int]) -> Node:
        node = base[node_type]
        return Node(node_id, node.type, dict(node.widgets), {**node.links, **links}, node.models)

    nodes = [
        Node(1, "WanBenchProfiler", {"case_name": spec.name, "sample_interval_ms": 100}),
        moved("WanBenchModelLoader", 2),
        lora(3, 2, lora_high, 1.0, 0.0),
        lora(4, 3, lora_low, 0.0, 1.0),
        moved("WanBenchTextEncoderLoader", 5),
        moved("WanBenchVAELoader", 6),
        moved("WanBenchTextEncode", 7, text_encoder=(5, 0)),
    ]
    if spec.with_image:
        image = moved("WanBenchTestImage" if spec.tiny else "LoadImage", 8)
        if spec.tiny:
            image.widgets.update(width=width + width // 4, height=height)
        nodes += [image, Node(9, "WanBenchImageToVideo", geometry, {"vae": (6, 0), "start_image": (8, 0)})]
    else:
        nodes.append(Node(9, "WanBenchEmptyLatent", geometry, {"vae": (6, 0)}))
    sampler = moved("WanBenchSampler", 10, model=(4, 0), text_embeds=(7, 0), latent=(9, 0))
    sampler.widgets.update(steps=recipe.steps, shift=recipe.shift, boundary=recipe.boundary,
                           guidance_high=recipe.guide_scale.high, guidance_low=recipe.guide_scale.low,
                           solver=recipe.solver)
    nodes += [
        sampler,
        moved("WanBenchVAEDecode", 11, vae=(6, 0), latent=(10, 0)),
        moved("WanBenchSaveVideo", 12, images=(11, 0)),
        moved("WanBenchReport", 13),
    ]
    return nodes


# ------------------------------------------------------------------------------------------------
# Node layout from the node definitions
# ------------------------------------------------------------------------------------------------
def _layout(node_type: str) -> dict[str, Any]:
    """Widget names (UI order, with control values), API widget names, socket inputs, outputs, title."""
    if node_type in CORE_NODES:
        return CORE_NODES[node_type]
    cls = NODE_CLASS_MAPPINGS[node_type]
    spec = cls.INPUT_TYPES()
    widgets: list[str] = []
    api_widgets: list[str] = []
    inputs: list[tuple[str, str, bool]] = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            is_widget = (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")
            if is_widget:
                widgets.append(name)
                api_widgets.append(name)
                if opts.get("control_after_generate"):
                    widgets.append(f"{name}.control_after_generate")
            else:
                inputs.append((name, kind, section == "optional"))
    outputs = list(zip(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES), cls.RETURN_TYPES, strict=True))
    return {
        "widgets": widgets,
        "api_widgets": api_widgets,
        "inputs": inputs,
        "outputs": outputs,
        "title": NODE_DISPLAY_NAME_MAPPINGS[node_type],
    }


def _widget_value(node: Node, name: str) -> Any:
    if name.endswith(".control_after_generate"):
        return "fixed"
    if name not in node.widgets:
        raise KeyError(f"workflow node {node.id} ({node.type}) has no value for widget {name!r}")
    return node.widgets[name]


def to_api(nodes: list[Node]) -> dict[str, Any]:
    """The API ("prompt") format of a graph."""
    prompt: dict[str, Any] = {}
    for node in nodes:
        layout = _layout(node.type)
        inputs: dict[str, Any] = {name: _widget_value(node, name) for name in layout["api_widgets"]}
        for name, *_ in layout["inputs"]:
            if name in node.links:
                src, slot = node.links[name]
                inputs[name] = [str(src), slot]
        prompt[str(node.id)] = {
            "inputs": inputs,
            "class_type": node.type,
            "_meta": {"title": layout["title"]},
        }
    return prompt


def to_ui(nodes: list[Node]) -> dict[str, Any]:
    """The UI (litegraph 0.4) format of a graph, laid out in columns by dependency depth."""
    by_id = {n.id: n for n in nodes}
    depth: dict[int, int] = {}

    def depth_of(node: Node) -> int:
        if node.id not in depth:
            depth[node.id] = 1 + max((depth_of(by_id[s]) for s, _ in node.links.values()), default=-1)
        return depth[node.id]

    links: list[list[Any]] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    in_link: dict[tuple[int, str], int] = {}
    for node in nodes:
        layout = _layout(node.type)
        for name, kind, _ in layout["inputs"]:
            if name in node.links:
                src, slot = node.links[name]
                link_id = len(links) + 1
                target_slot = [i[0] for i in layout["inputs"]].index(name)
                links.append([link_id, src, slot, node.id, target_slot, kind])
                out_links.setdefault((src, slot), []).append(link_id)
                in_link[(node.id, name)] = link_id
    order = sorted(nodes, key=lambda n: (depth_of(n), n.id))
    rows: dict[int, int] = {}
    ui_nodes = []
    for position, node in enumerate(order):
        layout = _layout(node.type)
        col = depth_of(node)
        row = rows.get(col, 0)
        rows[col] = row + 1
        inputs = []
        for name, kind, optional in layout["inputs"]:
            entry: dict[str, Any] = {"name": name, "type": kind, "link": in_link.get((node.id, name))}
            if optional:
                entry["shape"] = 7
            inputs.append(entry)
        outputs = [
            {"name": name, "type": kind, "slot_index": slot, "links": out_links.get((node.id, slot))}
            for slot, (name, kind) in enumerate(layout["outputs"])
        ]
        ui_nodes.append(
            {
                "id": node.id,
                "type": node.type,
                "pos": [40 + 380 * col, 40 + 260 * row],
                "size": [340, 220],
                "flags": {},
                "order": position,
                "mode": 0,
                "inputs": inputs,
                "outputs": outputs,
                "properties": {"Node name for S&R": node.type, **({"models": node.models} if node.models else {})},
                "widgets_values": [_widget_value(node, name) for name in layout["widgets"]],
            }
        )
    ui_nodes.sort(key=lambda n: n["id"])
    return {
        "last_node_id": max(n.id for n in nodes),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


# ------------------------------------------------------------------------------------------------
# The shipped set
# ------------------------------------------------------------------------------------------------
WORKFLOWS = (
    WorkflowSpec("wan22_ti2v_5B_t2v", "ti2v", with_image=False, tiny=False),
    WorkflowSpec("wan22_ti2v_5B_i2v", "ti2v", with_image=True, tiny=False),
    WorkflowSpec("wan22_t2v_A14B", "t2v", with_image=False, tiny=False),
    WorkflowSpec("wan22_i2v_A14B", "i2v", with_image=True, tiny=False),
    WorkflowSpec("tiny_ti2v_5B_t2v", "ti2v", with_image=False, tiny=True),
    WorkflowSpec("tiny_ti2v_5B_i2v", "ti2v", with_image=True, tiny=True),
    WorkflowSpec("tiny_t2v_A14B", "t2v", with_image=False, tiny=True),
    WorkflowSpec("tiny_i2v_A14B", "i2v", with_image=True, tiny=True),
    WorkflowSpec("wan22_t2v_A14B_4steps_lora", "t2v", with_image=False, tiny=False, four_step=True),
    WorkflowSpec("wan22_i2v_A14B_4steps_lora", "i2v", with_image=True, tiny=False, four_step=True),
    WorkflowSpec("tiny_t2v_A14B_4steps_lora", "t2v", with_image=False, tiny=True, four_step=True),
    WorkflowSpec("tiny_i2v_A14B_4steps_lora", "i2v", with_image=True, tiny=True, four_step=True),
)

# The cases of the existing benchmark reports: (name, workflow, steps, placement, width, height).
BENCHMARK_CASES = (
    ("01_Speed_Preview_480p", "ti2v_5B_t2v", 5, "model", None, None),
    ("02_Efficiency_Mode_720p", "ti2v_5B_t2v", 10, "model", None, None),
    ("03_Performance_Mode_720p", "ti2v_5B_t2v", 10, "none", None, None),
    ("02_Efficiency_Quality_704p", "ti2v_5B_t2v", 30, "model", None, None),
    ("03_Max_Quality_704p", "ti2v_5B_t2v", 50, "model", None, None),
    ("04_14B_Speed_Preview_480p", "t2v_A14B", 10, "model", 832, 480),
)
TINY_STEPS = {5: 2, 10: 3, 30: 4, 50: 5}


def _suite(tiny: bool) -> dict[str, Any]:
    cases = []
    for name, workflow, steps, placement, width, height in BENCHMARK_CASES:
        overrides: dict[str, Any] = {
            "WanBenchProfiler.case_name": name,
            "WanBenchSampler.steps": TINY_STEPS[steps] if tiny else steps,
            "WanBenchSampler.placement": "none" if tiny else placement,
        }
        if width is not None and not tiny:
            overrides |= {"WanBenchEmptyLatent.width": width, "WanBenchEmptyLatent.height": height}
        prefix = "tiny_" if tiny else "wan22_"
        cases.append({"name": name, "workflow": f"../{prefix}{workflow}.api.json", "overrides": overrides})
    title = "tiny twins (CPU)" if tiny else "TI2V-5B at 1280x704 and T2V-A14B at 832x480"
    return {
        "name": "wan22_benchmark" + ("_tiny" if tiny else ""),
        "description": f"Benchmark cases: {title}",
        "cases": cases,
    }


# ------------------------------------------------------------------------------------------------
# Optimisation ladders: the reference documents' configuration tables, as suites (suites.py)
# ------------------------------------------------------------------------------------------------
SEED003_SOURCE = (
    "LightX2V's published benchmark (reference report 003): Wan2.1-I2V-14B-480P on an H200, 40 steps, seed 42, "
    "CFG on. Its times are for Wan2.1 on an H200; this ladder runs Wan2.2 I2V-A14B at 832x480"
)
SEED004_SOURCE = (
    "the Wan 2.2 T2V optimisation analysis (reference report 004): expected results for T2V-A14B at 1280x720, "
    "81 frames, 40 steps on an H100"
)
UNIFIED_BF16 = (
    "the pack has no all-bf16 mode: its bf16 path keeps the official float32 regions (time embedding, "
    "modulation, norms, head), which the document's row drops"
)
# 003: (row, settings it adds, expected cumulative speed-up, expected inference s, unsupported reason)
SEED003_ROWS = (
    ("LightX2V_1: SageAttention", {"attention": "sage"}, 1.47, 249.54, None),
    ("LightX2V_2: unified bf16", {}, 1.69, 216.16, UNIFIED_BF16),
    ("LightX2V_3: fp8 + tiled VAE", {"weight_dtype": "fp8_e4m3fn_scaled_mm", "vae_tiling": "auto"}, 1.92, 190.73,
     None),
    ("LightX2V_4: + TeaCache 0.2", {"step_cache": {"mode": "teacache", "threshold": 0.2, "warmup_steps": 5,
                                                    "max_skip": 10, "calibration": "wan2.1_i2v_14B_480p_e0"}},
     3.41, 107.19, None),
    # LoRAs patch decoded weights: fp8 stays as storage here (a LoRA cannot patch fp8-matmul weights)
    ("LightX2V_4-Distill: 4-step distilled LoRAs", {"distilled": True, "weight_dtype": "fp8_e4m3fn_scaled"},
     3.41, 107.19, None),
)
# 004's "Expected Results" table: cumulative speed-up and time against its 300 s baseline.
SEED004_ROWS = (
    ("+ Batched CFG", {"cfg_mode": "batched"}, 1.8, 165.0),
    ("+ TF32", {"tf32": True}, 2.4, 125.0),
    ("+ torch.compile", {"compile": "max-autotune-no-cudagraphs"}, 3.0, 100.0),
    ("+ No offloading", {"placement": "none"}, 3.3, 90.0),
)
TINY_LADDER_STEPS = 4
# The tiny models' random time embeddings change about 1 (relative) per step, the real ones far less:
# the tiny twin's TeaCache uses the raw change with a threshold that lets it reuse a step.
TINY_TEACACHE = {"mode": "teacache", "threshold": 1.5, "warmup_steps": 1, "max_skip": 2, "calibration": "none"}


def _ladder_row(name: str, settings: dict[str, Any], speedup: float, time_s: float, source: str,
                unsupported: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "settings": settings,
                           "expected": {"speedup": speedup, "time_s": time_s, "source": source}}
    if unsupported:
        row["unsupported"] = unsupported
    return row


def _seed003(tiny: bool) -> dict[str, Any]:
    prefix = "tiny_" if tiny else "wan22_"
    high, low = (TINY_LORAS if tiny else FULL_LORAS)["i2v"]
    rows = []
    for name, settings, speedup, time_s, unsupported in SEED003_ROWS:
        settings = dict(settings)
        if "step_cache" in settings and tiny:
            settings["step_cache"] = TINY_TEACACHE
        if settings.get("distilled"):
            settings["lora"] = [{"file": high, "strength_high": 1.0, "strength_low": 0.0},
                                {"file": low, "strength_high": 0.0, "strength_low": 1.0}]
        rows.append(_ladder_row(name, settings, speedup, time_s, "003 (H200, Wan2.1 I2V-14B-480P)", unsupported))
    overrides: dict[str, Any] = {"WanBenchSampler.steps": TINY_LADDER_STEPS if tiny else 40, "WanBenchSampler.seed": 42}
    if not tiny:
        overrides |= {"WanBenchImageToVideo.width": 832, "WanBenchImageToVideo.height": 480,
                      "WanBenchImageToVideo.length": 81}
    what = "tiny random-weight twin (CPU, 4 steps)" if tiny else "I2V-A14B, 832x480, 81 frames, 40 steps"
    return {
        "name": "seed003_ladder" + ("_tiny" if tiny else ""),
        "description": f"LightX2V's optimisation table (SageAttention, bf16, fp8 + tiled VAE, TeaCache, 4-step "
        f"distill) on Wan2.2: {what}. Needs a ComfyUI server (--server) for the real start image.",
        "source": SEED003_SOURCE,
        "workflow": f"../{prefix}i2v_A14B.api.json",
        "overrides": overrides,
        "random_weights": tiny,
        "cumulative": True,
        "baseline": {"name": "official-style baseline", "settings": {
            "attention": "sdpa", "dtype": "bfloat16", "cfg_mode": "sequential", "placement": "model",
            "vae_tiling": "none"}},
        "rows": rows,
    }


def _seed004(tiny: bool) -> dict[str, Any]:
    prefix = "tiny_" if tiny else "wan22_"
    rows = [_ladder_row(name, settings, speedup, time_s, "004 (H100, T2V-A14B 1280x720, 81 frames, 40 steps)")
            for name, settings, speedup, time_s in SEED004_ROWS]
    what = "tiny random-weight twin (CPU, 4 steps)" if tiny else "T2V-A14B, 1280x720, 81 frames, 40 steps"
    return {
        "name": "seed004_ladder" + ("_tiny" if tiny else ""),
        "description": f"The Wan 2.2 T2V optimisation analysis' ladder (batched CFG, TF32, torch.compile, no "
        f"offloading) with its expected speed-ups beside the measured ones: {what}. Batching CFG does not reduce "
        "the FLOPs of a step, and TF32 changes float32 matmuls only (this ladder computes in bfloat16, as the "
        "official code does): their rows measure what those claims are worth.",
        "source": SEED004_SOURCE,
        "workflow": f"../{prefix}t2v_A14B.api.json",
        "overrides": {"WanBenchSampler.steps": TINY_LADDER_STEPS if tiny else 40, "WanBenchSampler.seed": 42},
        "random_weights": tiny,
        "cumulative": True,
        "baseline": {"name": "official baseline", "settings": {
            "attention": "sdpa", "dtype": "bfloat16", "cfg_mode": "sequential", "tf32": False, "compile": "off",
            "placement": "model"}},
        "rows": rows,
    }


def build_all() -> dict[str, Any]:
    """Relative path -> JSON content of every generated file."""
    files: dict[str, Any] = {}
    for spec in WORKFLOWS:
        graph = _graph(spec)
        files[f"{spec.name}.json"] = to_ui(graph)
        files[f"{spec.name}.api.json"] = to_api(graph)
    files["suites/wan22_benchmark.json"] = _suite(tiny=False)
    files["suites/wan22_benchmark_tiny.json"] = _suite(tiny=True)
    for model_type, name in NATIVE_NAMES.items():  # ComfyUI's own nodes: API format only
        files[f"{name}.api.json"] = native_graph(model_type, PROMPT, DEFAULT_NEGATIVE_PROMPT)
    files["suites/wan22_native_vs_pack.json"] = comparison_suite()
    for tiny in (False, True):
        for ladder in (_seed003(tiny), _seed004(tiny)):
            files[f"suites/{ladder['name']}.json"] = ladder
    return files


def render(content: Any) -> str:
    return json.dumps(content, indent=2, ensure_ascii=False) + "\n"


def write_all(target: Path = WORKFLOWS_DIR) -> list[Path]:
    written = []
    for rel, content in build_all().items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, render(content))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_all():
        sys.stdout.write(f"{p}\n")
