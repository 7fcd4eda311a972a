"""Shipped workflows: in sync with their generator, valid against the node definitions, UI == API twin,
suites that point at real workflows, and the in-process runner's checks.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from wanbench.nodes import NODE_CLASS_MAPPINGS
from wanbench.runner import WorkflowError, apply_overrides, load_api_workflow, validate_workflow

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
FILE_INPUTS = ("model_high", "model_low", "text_encoder", "vae", "lora_name")
UI_FILES = sorted(p for p in WORKFLOWS.glob("*.json") if not p.name.endswith(".api.json"))


def _generator():
    spec = importlib.util.spec_from_file_location("build_workflows", WORKFLOWS / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


GEN = _generator()


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_checked_in_files_match_the_generator() -> None:
    built = GEN.build_all()
    on_disk = {str(p.relative_to(WORKFLOWS)) for p in WORKFLOWS.rglob("*.json")}
    assert on_disk == set(built), "run `python workflows/build_workflows.py`"
    for rel, content in built.items():
        assert (WORKFLOWS / rel).read_text(encoding="utf-8") == GEN.render(content), f"{rel} is stale"


def test_every_task_has_ui_api_and_tiny_twins() -> None:
    names = {p.name for p in UI_FILES}
    for task in ("ti2v_5B_t2v", "ti2v_5B_i2v", "t2v_A14B", "i2v_A14B"):
        for prefix in ("wan22_", "tiny_"):
            assert f"{prefix}{task}.json" in names and (WORKFLOWS / f"{prefix}{task}.api.json").is_file()


def _widget_names(node_type: str) -> list[str]:
    if node_type in GEN.CORE_NODES:
        return GEN.CORE_NODES[node_type]["widgets"]
    names = []
    spec = NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
    for section in ("required", "optional"):
        for name, (kind, *rest) in spec.get(section, {}).items():
            opts = rest[0] if rest else {}
            if (isinstance(kind, list) or kind in GEN.WIDGET_TYPES) and not opts.get("forceInput"):
                names.append(name)
                if opts.get("control_after_generate"):
                    names.append(None)  # the frontend's "fixed"/"randomize" value
    return names


def ui_to_api(ui: dict) -> dict:
    """An independent re-implementation of what the frontend's graphToPrompt does for these graphs."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        names = _widget_names(node["type"])
        assert len(names) == len(node["widgets_values"]), f"node {node['id']} widgets_values length"
        inputs = {}
        for name, value in zip(names, node["widgets_values"], strict=True):
            if name is None:
                assert value in ("fixed", "randomize", "increment", "decrement")
            elif name != "upload":
                inputs[name] = value
        for entry in node["inputs"]:
            if entry["link"] is not None:
                _, src, slot, dst, _, _ = links[entry["link"]]
                assert dst == node["id"]
                inputs[entry["name"]] = [str(src), slot]
        title = GEN.CORE_NODES[node["type"]]["title"] if node["type"] in GEN.CORE_NODES else None
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"], "title": title}
    return prompt


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_file_is_a_litegraph_04_graph(path: Path) -> None:
    ui = _load(path)
    assert ui["version"] == 0.4 and {"groups", "config", "extra"} <= set(ui)
    assert ui["last_node_id"] == max(n["id"] for n in ui["nodes"]) and ui["last_link_id"] == len(ui["links"])
    nodes = {n["id"]: n for n in ui["nodes"]}
    for node in ui["nodes"]:
        assert node["type"] in NODE_CLASS_MAPPINGS or node["type"] in GEN.CORE_NODES
        assert {
            "id",
            "type",
            "pos",
            "size",
            "flags",
            "order",
            "mode",
            "inputs",
            "outputs",
            "properties",
            "widgets_values",
        } <= set(node)
        assert node["properties"]["Node name for S&R"] == node["type"]
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert out["type"] == inp["type"] == kind, f"link {link_id} joins {out['type']} to {inp['type']}"
        assert link_id in out["links"] and inp["link"] == link_id


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_and_api_twin_describe_the_same_graph(path: Path) -> None:
    api = _load(path.with_name(path.name[: -len(".json")] + ".api.json"))
    converted = ui_to_api(_load(path))
    assert set(converted) == set(api)
    for node_id, node in converted.items():
        assert api[node_id]["class_type"] == node["class_type"]
        assert api[node_id]["inputs"] == node["inputs"], f"node {node_id} differs"
        assert api[node_id]["_meta"]["title"]


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.api.json")), ids=lambda p: p.name)
def test_api_values_are_valid_for_the_node_definitions(path: Path) -> None:
    prompt = load_api_workflow(path)
    pack_only = {k: v for k, v in prompt.items() if v["class_type"] in NODE_CLASS_MAPPINGS}
    for node_id, node in pack_only.items():
        cls = NODE_CLASS_MAPPINGS[node["class_type"]]
        spec = cls.INPUT_TYPES()
        for name in spec["required"]:
            assert name in node["inputs"], f"{path.name} node {node_id} lacks {name}"
        constants = {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}
        for name, value in constants.items():
            kind, opts = ({**spec["required"], **spec.get("optional", {})})[name][:2]
            if name in FILE_INPUTS:  # model-file lists depend on the installation
                assert value == "none" or value.endswith(".safetensors")
            elif isinstance(kind, list):
                assert value in kind, f"{path.name} node {node_id} {name}={value!r}"
            elif kind in ("INT", "FLOAT"):
                assert opts["min"] <= value <= opts["max"]
        validate = getattr(cls, "VALIDATE_INPUTS", None)
        if validate is not None:
            import inspect

            wanted = inspect.signature(validate).parameters
            assert validate(**{k: v for k, v in constants.items() if k in wanted}) is True
    if all(v["class_type"] in NODE_CLASS_MAPPINGS for v in prompt.values()):
        order = validate_workflow(prompt)
        of_type = {v["class_type"]: k for k, v in prompt.items()}
        assert order.index(of_type["WanBenchProfiler"]) < order.index(of_type["WanBenchSampler"]) \
            < order.index(of_type["WanBenchReport"])


# The run order of the shipped graphs, by node type: every loader, then text encode, then the image
# and latent, sampler, decode, save, report. The in-process runner runs nodes by id (dependencies
# first), so ids in this order give a report with one Model_Initialization, then T5_Encoding,
# then TI2V_Preprocess.
RUN_RANK = {
    "WanBenchProfiler": 0,
    "WanBenchModelLoader": 1,
    "WanBenchLora": 1,
    "WanBenchTextEncoderLoader": 1,
    "WanBenchVAELoader": 1,
    "WanBenchTextEncode": 2,
    "WanBenchTestImage": 3,
    "LoadImage": 3,
    "WanBenchImageToVideo": 3,
    "WanBenchEmptyLatent": 3,
    "WanBenchSampler": 4,
    "WanBenchVAEDecode": 5,
    "WanBenchSaveVideo": 6,
    "WanBenchReport": 7,
}


PACK_API_FILES = sorted(p for p in WORKFLOWS.glob("*.api.json") if not p.name.startswith("native_"))
NATIVE_API_FILES = sorted(WORKFLOWS.glob("native_*.api.json"))


@pytest.mark.parametrize("path", PACK_API_FILES, ids=lambda p: p.name)
def test_node_ids_follow_the_run_order(path: Path) -> None:
    prompt = load_api_workflow(path)
    by_id = sorted(prompt, key=int)
    ranks = [RUN_RANK[prompt[k]["class_type"]] for k in by_id]
    assert ranks == sorted(ranks), f"{path.name}: node types by id {[prompt[k]['class_type'] for k in by_id]}"
    for node_id, node in prompt.items():
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert int(value[0]) < int(node_id), f"{path.name}: node {node_id} reads later node {value[0]}"
    if all(v["class_type"] in NODE_CLASS_MAPPINGS for v in prompt.values()):
        assert validate_workflow(prompt) == by_id


def test_real_workflows_use_comfyui_file_names_and_spec_defaults() -> None:
    ti2v = load_api_workflow(WORKFLOWS / "wan22_ti2v_5B_t2v.api.json")
    assert ti2v["2"]["inputs"]["model_high"] == "wan2.2_ti2v_5B_fp16.safetensors"
    assert ti2v["4"]["inputs"]["vae"] == "wan2.2_vae.safetensors"
    assert ti2v["3"]["inputs"]["text_encoder"] == "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    assert {k: ti2v["7"]["inputs"][k] for k in ("width", "height", "length")} == {
        "width": 1280,
        "height": 704,
        "length": 121,
    }
    assert (ti2v["8"]["inputs"]["steps"], ti2v["8"]["inputs"]["shift"], ti2v["10"]["inputs"]["fps"]) == (
        50,
        5.0,
        24,
    )
    t2v = load_api_workflow(WORKFLOWS / "wan22_t2v_A14B.api.json")
    assert t2v["2"]["inputs"]["model_low"] == "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"
    assert t2v["4"]["inputs"]["vae"] == "wan_2.1_vae.safetensors"
    s = t2v["8"]["inputs"]
    assert (s["steps"], s["shift"], s["boundary"], s["guidance_high"], s["guidance_low"]) == (
        40,
        12.0,
        0.875,
        4.0,
        3.0,
    )
    i2v = load_api_workflow(WORKFLOWS / "wan22_i2v_A14B.api.json")
    assert (i2v["8"]["inputs"]["boundary"], i2v["8"]["inputs"]["shift"], i2v["10"]["inputs"]["fps"]) == (
        0.9,
        5.0,
        16,
    )
    assert i2v["6"]["class_type"] == "LoadImage" and i2v["7"]["inputs"]["start_image"] == ["6", 0]


REPACKAGED = "https://huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/"


@pytest.mark.parametrize("task,lora_high,lora_low,boundary", [
    ("t2v", "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors",
     "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors", 0.875),
    ("i2v", "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
     "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors", 0.9),
])
def test_four_step_lora_workflows_follow_comfyui_templates(task: str, lora_high: str, lora_low: str,
                                                           boundary: float) -> None:
    """ComfyUI's 14B templates (4-step path): the lightx2v LoRA of each expert at strength 1, 4 steps,
    cfg 1, shift 5, euler, 640x640x81 at 16 fps; the UI file names each file's download URL."""
    api = load_api_workflow(WORKFLOWS / f"wan22_{task}_A14B_4steps_lora.api.json")
    loras = [n["inputs"] for n in api.values() if n["class_type"] == "WanBenchLora"]
    assert [(x["lora_name"], x["strength_high"], x["strength_low"]) for x in loras] == [
        (lora_high, 1.0, 0.0), (lora_low, 0.0, 1.0)]
    (sampler,) = [n["inputs"] for n in api.values() if n["class_type"] == "WanBenchSampler"]
    assert (sampler["solver"], sampler["steps"], sampler["shift"], sampler["guidance_high"], sampler["guidance_low"],
            sampler["boundary"]) == ("euler_distill", 4, 5.0, 1.0, 1.0, boundary)
    assert api[sampler["model"][0]]["class_type"] == "WanBenchLora"
    latent_types = ("WanBenchEmptyLatent", "WanBenchImageToVideo")
    (latent,) = [n["inputs"] for n in api.values() if n["class_type"] in latent_types]
    assert (latent["width"], latent["height"], latent["length"]) == (640, 640, 81)
    ui = _load(WORKFLOWS / f"wan22_{task}_A14B_4steps_lora.json")
    urls = {m["name"]: (m["directory"], m["url"]) for n in ui["nodes"] for m in n["properties"].get("models", [])}
    assert urls[lora_high] == ("loras", REPACKAGED + "loras/" + lora_high)
    assert urls[lora_low] == ("loras", REPACKAGED + "loras/" + lora_low)
    high_dit = f"wan2.2_{task}_high_noise_14B_fp8_scaled.safetensors"
    assert urls[high_dit] == ("diffusion_models", REPACKAGED + "diffusion_models/" + high_dit)
    assert urls["umt5_xxl_fp8_e4m3fn_scaled.safetensors"][0] == "text_encoders"
    tiny = _load(WORKFLOWS / f"tiny_{task}_A14B_4steps_lora.json")
    assert not any(n["properties"].get("models") for n in tiny["nodes"]), "tiny files are made locally"


@pytest.mark.parametrize("suite", sorted((WORKFLOWS / "suites").glob("wan22_benchmark*.json")), ids=lambda p: p.name)
def test_suites_point_at_workflows_and_overrides_apply(suite: Path) -> None:
    data = _load(suite)
    names = [c["name"] for c in data["cases"]]
    assert names == [
        "01_Speed_Preview_480p",
        "02_Efficiency_Mode_720p",
        "03_Performance_Mode_720p",
        "02_Efficiency_Quality_704p",
        "03_Max_Quality_704p",
        "04_14B_Speed_Preview_480p",
    ]
    for case in data["cases"]:
        prompt = apply_overrides(load_api_workflow(suite.parent / case["workflow"]), case["overrides"])
        assert prompt["1"]["inputs"]["case_name"] == case["name"]
    if "tiny" not in suite.name:
        steps = [c["overrides"]["WanBenchSampler.steps"] for c in data["cases"]]
        assert steps == [5, 10, 10, 30, 50, 10]
        facts = {}
        for case in data["cases"]:
            prompt = apply_overrides(load_api_workflow(suite.parent / case["workflow"]), case["overrides"])
            (sampler,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "WanBenchSampler"]
            (latent,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "WanBenchEmptyLatent"]
            (loader,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "WanBenchModelLoader"]
            facts[case["name"]] = (
                loader["model_high"],
                latent["width"],
                latent["height"],
                sampler["steps"],
                sampler["placement"],
            )
        ti2v = "wan2.2_ti2v_5B_fp16.safetensors"
        # The TI2V-5B cases of the reports: 1280x704 at 5, 10, 10, 30, 50 steps; only case 03
        # (Performance Mode) runs without offload (placement none), the others with placement model.
        assert list(facts.values())[:5] == [
            (ti2v, 1280, 704, 5, "model"),
            (ti2v, 1280, 704, 10, "model"),
            (ti2v, 1280, 704, 10, "none"),
            (ti2v, 1280, 704, 30, "model"),
            (ti2v, 1280, 704, 50, "model"),
        ]
        # Case 04 is T2V-A14B at 832x480.
        assert facts["04_14B_Speed_Preview_480p"] == (
            "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
            832,
            480,
            10,
            "model",
        )


# ------------------------------------------------------------------------------------------------
# Runner checks
# ------------------------------------------------------------------------------------------------
def _tiny() -> dict:
    return load_api_workflow(WORKFLOWS / "tiny_ti2v_5B_t2v.api.json")


def test_runner_rejects_foreign_nodes_bad_links_and_missing_inputs() -> None:
    with pytest.raises(WorkflowError, match="node type 'KSampler' is not a ComfyUI-WanBench node"):
        validate_workflow({**_tiny(), "99": {"class_type": "KSampler", "inputs": {}}})
    bad = _tiny()
    bad["8"]["inputs"]["latent"] = ["4", 0]
    with pytest.raises(WorkflowError, match="input 'latent' expects LATENT; node 4 output 0 is WAN22_VAE"):
        validate_workflow(bad)
    bad = _tiny()
    del bad["8"]["inputs"]["steps"]
    with pytest.raises(WorkflowError, match="required input 'steps' is missing"):
        validate_workflow(bad)
    bad = _tiny()
    bad["9"]["inputs"]["latent"] = ["8", 0]
    bad["8"]["inputs"]["latent"] = ["9", 0]
    with pytest.raises(WorkflowError, match="expects LATENT; node 9 output 0 is IMAGE"):
        validate_workflow(bad)
    with pytest.raises(WorkflowError, match="UI-format workflow"):
        load_api_workflow(WORKFLOWS / "tiny_ti2v_5B_t2v.json")


def test_overrides_must_match() -> None:
    with pytest.raises(WorkflowError, match="no node with id or type 'WanBenchNope'"):
        apply_overrides(_tiny(), {"WanBenchNope.steps": 3})
    with pytest.raises(WorkflowError, match="has no input 'stepz'"):
        apply_overrides(_tiny(), {"WanBenchSampler.stepz": 3})
    assert apply_overrides(_tiny(), {"8.steps": 3})["8"]["inputs"]["steps"] == 3


# ------------------------------------------------------------------------------------------------
# ComfyUI's own Wan graphs with the profiler dropped in, and the native-vs-pack suite
# ------------------------------------------------------------------------------------------------
NATIVE_CORE_TYPES = {
    "UNETLoader",
    "CLIPLoader",
    "VAELoader",
    "ModelSamplingSD3",
    "CLIPTextEncode",
    "Wan22ImageToVideoLatent",
    "EmptyHunyuanLatentVideo",
    "KSampler",
    "KSamplerAdvanced",
    "VAEDecode",
    "CreateVideo",
    "SaveVideo",
}


@pytest.mark.parametrize("path", NATIVE_API_FILES, ids=lambda p: p.name)
def test_native_workflows_are_core_nodes_with_an_unwired_profiler(path: Path) -> None:
    prompt = load_api_workflow(path)
    types = {n["class_type"] for n in prompt.values()}
    assert types - NATIVE_CORE_TYPES == {"WanBenchProfiler", "WanBenchReport"}
    apparatus = {k for k, n in prompt.items() if n["class_type"] in ("WanBenchProfiler", "WanBenchReport")}
    for node_id, node in prompt.items():
        links = [v for v in node["inputs"].values() if isinstance(v, list)]
        assert all(v[0] in prompt for v in links), f"{path.name} node {node_id} links to a missing node"
        assert not any(v[0] in apparatus for v in links), "nothing is wired to the profiler or the report"
        if node_id in apparatus:
            assert not links


def _job_of_native(prompt: dict) -> dict:
    latents = ("Wan22ImageToVideoLatent", "EmptyHunyuanLatentVideo")
    (latent,) = [n["inputs"] for n in prompt.values() if n["class_type"] in latents]
    samplers = [n["inputs"] for n in prompt.values() if n["class_type"] in ("KSampler", "KSamplerAdvanced")]
    shifts = {n["inputs"]["shift"] for n in prompt.values() if n["class_type"] == "ModelSamplingSD3"}
    first = samplers[0]
    return {
        "size": (latent["width"], latent["height"], latent["length"]),
        "steps": first["steps"],
        "seed": first.get("noise_seed", first.get("seed")),
        "solver": {(s["sampler_name"], s["scheduler"]) for s in samplers},
        "shift": shifts,
        "cfg": [s["cfg"] for s in samplers],
        "split": first.get("end_at_step"),
    }


def _job_of_pack(prompt: dict) -> dict:
    (latent,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "WanBenchEmptyLatent"]
    (sampler,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "WanBenchSampler"]
    return {"size": (latent["width"], latent["height"], latent["length"]), **sampler}


def test_native_vs_pack_suite_runs_the_same_job_twice() -> None:
    from wanbench.cli import load_suite
    from wanbench.wan_core.config import preset
    from wanbench.wan_core.sampler import select_expert
    from wanbench.wan_core.schedulers import make_schedule

    suite_path = WORKFLOWS / "suites" / "wan22_native_vs_pack.json"
    suite = load_suite(suite_path)
    cases = {c["name"]: c for c in suite["cases"]}
    assert len(suite["comparisons"]) == 2
    for comparison in suite["comparisons"]:
        native_case, pack_case = cases[comparison["baseline"]], cases[comparison["candidate"]]
        native_file = suite_path.parent / native_case["workflow"]
        native = apply_overrides(load_api_workflow(native_file), native_case["overrides"])
        pack = apply_overrides(load_api_workflow(suite_path.parent / pack_case["workflow"]), pack_case["overrides"])
        a, b = _job_of_native(native), _job_of_pack(pack)
        assert a["size"] == b["size"] and a["steps"] == b["steps"] and a["seed"] == b["seed"]
        assert a["solver"] == {("euler", "simple")} and b["solver"] == "euler"
        assert a["shift"] == {b["shift"]}
        task = preset(pack_case["name"].removeprefix("pack_"))
        if task.is_moe:  # the high-noise expert runs the same steps in both
            schedule = make_schedule("euler", b["steps"], b["shift"])
            high = sum(select_expert(int(t), b["boundary"]) == "high" for t in schedule.timesteps)
            assert a["split"] == high and a["cfg"] == [b["guidance_high"], b["guidance_low"]]
        else:
            assert a["cfg"] == [b["guidance_high"]]
        texts = [n["inputs"]["text"] for n in native.values() if n["class_type"] == "CLIPTextEncode"]
        (encode,) = [n["inputs"] for n in pack.values() if n["class_type"] == "WanBenchTextEncode"]
        assert texts == [encode["prompt"], encode["negative_prompt"]]  # positive first, as in the templates
        assert native["1"]["inputs"]["case_name"] == native_case["name"]
        assert pack["1"]["inputs"]["case_name"] == pack_case["name"]


def test_suite_comparisons_must_name_cases(tmp_path: Path) -> None:
    from wanbench.cli import load_suite

    bad = {
        "name": "x",
        "cases": [{"name": "a", "workflow": "w.json"}],
        "comparisons": [{"baseline": "a", "candidate": "b"}],
    }
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(ValueError, match=r"names no case \['b'\]"):
        load_suite(path)
