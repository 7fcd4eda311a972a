"""Ladder suites: the settings vocabulary, row planning on a machine, the rows' workflows, the ladder
table and its checks, and the deviation measures."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from wanbench.nodes import NODE_CLASS_MAPPINGS
from wanbench.profiling.deviation import psnr_8bit, relative_l2
from wanbench.profiling.ladder import (
    FAILED,
    MEASURED,
    SKIPPED,
    Deviation,
    Expected,
    Ladder,
    LadderRow,
    RowFigures,
    check_ladder,
    ladder_document,
    render_ladder,
    speedup,
    work_note,
)
from wanbench.runner import load_api_workflow, validate_workflow
from wanbench.suites import (
    SETTINGS,
    Machine,
    SuiteError,
    check_settings,
    ineffective,
    load_suite_file,
    node_inputs,
    parse_ladder,
    plan_rows,
    row_prompt,
)
from wanbench.wan_core.checkpoints.latent import load_latent, save_latent

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
SUITES = WORKFLOWS / "suites"
LADDERS = sorted(p for p in SUITES.glob("*.json") if "ladder" in p.name)


def _pack_nodes(extra: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    nodes = {name: node_inputs(cls.INPUT_TYPES()) for name, cls in NODE_CLASS_MAPPINGS.items()}
    for node, inputs in (extra or {}).items():
        nodes[node] = {**nodes.get(node, {}), **inputs}
    return nodes


CPU = Machine(where="this machine", cuda=False, nodes=_pack_nodes(), installed=lambda name: False)
NEWER_LOADER = {"WanBenchModelLoader": ("weight_dtype", "tf32", "compile")}  # inputs of compact weights and kernels


def _older_pack(machine: Machine) -> Machine:
    """The machine with a pack whose loader predates compact weights, TF32 and compile."""
    nodes = {k: dict(v) for k, v in machine.nodes.items()}
    for name in NEWER_LOADER["WanBenchModelLoader"]:
        nodes["WanBenchModelLoader"].pop(name, None)
    return dataclasses.replace(machine, nodes=nodes)


def _gpu(capability: tuple[int, int] = (9, 0), installed: bool = True) -> Machine:
    return Machine(where="gpu box", cuda=True, gpu_name="NVIDIA H100 80GB HBM3", capability=capability,
                   nodes=_pack_nodes(), installed=lambda name: installed)


def _suite(rows: list[dict], *, baseline: dict | None = None, cumulative: bool = True, **extra: Any) -> dict:
    return {"name": "t", "workflow": "../tiny_t2v_A14B.api.json", "cumulative": cumulative,
            "baseline": {"name": "base", "settings": baseline or {"cfg_mode": "sequential"}}, "rows": rows, **extra}


def _parse(data: dict):
    return parse_ladder(data, SUITES / "t.json")


# ------------------------------------------------------------------------------------------------ vocabulary
def test_unknown_setting_lists_the_valid_ones() -> None:
    with pytest.raises(SuiteError, match=r"unknown setting 'batch_cfg'; the settings are \[.*'cfg_mode'"):
        check_settings({"batch_cfg": True}, "row x")


@pytest.mark.parametrize(("settings", "match"), [
    ({"cfg_mode": "parallel"}, "cfg_mode' must be one of"),
    ({"tf32": 1}, "takes true or false"),
    ({"shift": "5"}, "takes number"),
    ({"steps": -1}, "integer >= 0"),
    ({"guidance": "high"}, "'guidance' takes a number"),
    ({"lora": [{"path": "x"}]}, "a 'lora' entry is"),
    ({"step_cache": {"mode": "teacache", "threshold": -1}}, "threshold must be a finite number >= 0"),
    ({"step_cache": {"mode": "magcache", "threshold": 0.1, "calibration": "wan2.2_ti2v_5B"}},
     "magcache calibration must be one of"),
    ({"distilled": False}, "takes true"),
])
def test_bad_setting_values_name_the_problem(settings: dict, match: str) -> None:
    with pytest.raises(SuiteError, match=match):
        check_settings(settings, "row x")


def test_ladder_structure_errors() -> None:
    with pytest.raises(SuiteError, match="needs a unique 'name'"):
        _parse(_suite([{"name": "a"}, {"name": "a"}]))
    with pytest.raises(SuiteError, match="extends 'zz', which is not an earlier row"):
        _parse(_suite([{"name": "a", "extends": "zz"}]))
    with pytest.raises(SuiteError, match="expected speedup must be a number > 0"):
        _parse(_suite([{"name": "a", "expected": {"speedup": 0}}]))
    with pytest.raises(SuiteError, match="a ladder needs 'workflow'"):
        parse_ladder({"name": "x", "baseline": {}, "rows": [{}]}, SUITES / "t.json")


def test_rows_extend_the_previous_row_or_the_baseline() -> None:
    rows = [{"name": "a", "settings": {"cfg_mode": "batched"}}, {"name": "b", "settings": {"steps": 3}},
            {"name": "c", "extends": "a", "settings": {"placement": "none"}}]
    cumulative = plan_rows(_parse(_suite(rows)), CPU)
    assert [p.changes for p in cumulative] == [{}, {"cfg_mode": "batched"}, {"cfg_mode": "batched", "steps": 3},
                                               {"cfg_mode": "batched", "placement": "none"}]
    separate = plan_rows(_parse(_suite(rows[:2], cumulative=False)), CPU)
    assert [p.changes for p in separate] == [{}, {"cfg_mode": "batched"}, {"steps": 3}]


# ------------------------------------------------------------------------------------------------ machines
def test_rows_that_cannot_run_are_skipped_and_later_rows_go_on_without_them() -> None:
    rows = [{"name": "sage", "settings": {"attention": "sage"}},
            {"name": "bf16 everywhere", "unsupported": "no such mode"},
            {"name": "fp8", "settings": {"weight_dtype": "fp8_e4m3fn_scaled_mm"}},
            {"name": "batched", "settings": {"cfg_mode": "batched"}}]
    planned = plan_rows(_parse(_suite(rows)), _older_pack(CPU))
    skips = [p.skip for p in planned]
    assert skips[0] is None
    assert skips[1] == "attention sage runs on CUDA GPUs only; this machine has none"
    assert skips[2] == "not reproducible with this pack: no such mode"
    assert "needs input 'weight_dtype' of WanBenchModelLoader" in skips[3]
    assert plan_rows(_parse(_suite(rows)), CPU)[3].skip == "fp8 matmuls (fp8 tensor cores) needs a CUDA GPU; " \
        "this machine has none"
    assert skips[4] is None
    assert planned[4].changes == {"cfg_mode": "batched"}
    assert planned[4].dropped == ["attention sage", "weight_dtype fp8_e4m3fn_scaled_mm"]


@pytest.mark.parametrize(("settings", "machine", "expected"), [
    ({"attention": "sage", "dtype": "bfloat16"}, _gpu(installed=False), "attention sage is not installed on gpu box"),
    ({"attention": "flash_attn", "dtype": "float32"}, _gpu(), "needs bfloat16 or float16 weights"),
    ({"tf32": True}, _gpu(capability=(7, 5)), "needs compute capability 8.0 or newer; NVIDIA H100 80GB HBM3 is 7.5"),
    ({"weight_dtype": "fp8_e4m3fn_scaled_mm"}, _gpu(capability=(8, 0)), "needs compute capability 8.9"),
    ({"tf32": True}, CPU, "TF32 (tensor-core float32 matmuls) needs a CUDA GPU; this machine has none"),
    ({"tf32": True}, _older_pack(_gpu()), "needs input 'tf32' of WanBenchModelLoader"),
    ({"placement": "none"}, CPU, "every placement runs as none"),
    ({"lora": [{"file": "nowhere.safetensors"}]}, CPU, "['nowhere.safetensors'] are not in models/loras"),
    ({"vae_tiling": "spiral"}, CPU, "'spiral' is not offered by WanBenchVAEDecode.tiling"),
    ({"weight_dtype": "fp8_e4m3fn_scaled_mm", "lora": [{"file": "a"}]}, _gpu(), "LoRAs cannot patch weights that run"),
    ({"compile": "default", "lora": [{"file": "a"}]}, _gpu(), "LoRAs cannot be combined with torch.compile"),
    ({"lora": [{"file": "a"}]}, _gpu(), "['a'] are not in models/loras on gpu box"),
])
def test_skip_reasons_name_what_is_missing(settings: dict, machine: Machine, expected: str) -> None:
    planned = plan_rows(_parse(_suite([{"name": "r", "settings": settings}],
                                      baseline={"placement": "model", "dtype": "bfloat16"})), machine)
    assert planned[0].skip is None
    assert expected in planned[1].skip


def test_rows_that_can_run_on_a_capable_gpu_are_not_skipped() -> None:
    rows = [{"name": "fp8", "settings": {"weight_dtype": "fp8_e4m3fn_scaled_mm", "attention": "sage"}},
            {"name": "tf32", "settings": {"tf32": True}}, {"name": "compile",
                                                           "settings": {"compile": "max-autotune-no-cudagraphs"}}]
    planned = plan_rows(_parse(_suite(rows, baseline={"dtype": "bfloat16", "placement": "model"})), _gpu())
    assert [p.skip for p in planned] == [None, None, None, None]


def test_neutral_baseline_settings_need_nothing_and_ineffective_ones_are_noted() -> None:
    suite = _parse(_suite([{"name": "batched", "settings": {"cfg_mode": "batched"}}],
                          baseline={"tf32": False, "compile": "off", "placement": "model"}))
    planned = plan_rows(suite, _older_pack(CPU))  # a pack without tf32 or compile inputs: their defaults apply
    assert [p.skip for p in planned] == [None, None]
    assert ineffective(suite.baseline.own, CPU) == [
        "placement model has no effect here: placement moves weights between the CPU and a CUDA GPU; "
        "this machine has none, so every placement runs as none"]
    base = load_api_workflow(suite.workflow)
    for node in base.values():  # the workflow of such a pack has no tf32 or compile input either
        for name in NEWER_LOADER["WanBenchModelLoader"]:
            node["inputs"].pop(name, None)
    prompt = row_prompt(suite, planned[0], base, _older_pack(CPU))
    (loader,) = [n for n in prompt.values() if n["class_type"] == "WanBenchModelLoader"]
    assert "tf32" not in loader["inputs"] and "compile" not in loader["inputs"]
    newer = row_prompt(suite, plan_rows(suite, CPU)[0], load_api_workflow(suite.workflow), CPU)
    (loader,) = [n for n in newer.values() if n["class_type"] == "WanBenchModelLoader"]
    assert loader["inputs"]["tf32"] is False and loader["inputs"]["compile"] == "off"


def test_rows_are_skipped_when_the_baseline_cannot_run() -> None:
    planned = plan_rows(_parse(_suite([{"name": "a", "settings": {"steps": 2}}], baseline={"attention": "sage"})), CPU)
    assert planned[0].skip and planned[1].skip == f"the baseline cannot run here ({planned[0].skip})"


# ------------------------------------------------------------------------------------------------ workflows
def test_row_workflow_inserts_loras_and_the_step_cache_and_wires_the_latent() -> None:
    cache = {"mode": "teacache", "threshold": 1.5, "calibration": "none"}
    loras = [{"file": "a.safetensors", "strength_low": 0.0}, {"file": "b.safetensors", "strength_high": 0.0}]
    suite = _parse(_suite([{"name": "all", "settings": {"step_cache": cache, "lora": loras, "distilled": True,
                                                        "steps": 9, "cfg_mode": "batched", "vae_tiling": "auto"}}],
                          overrides={"WanBenchEmptyLatent.width": 80}))
    planned = plan_rows(suite, CPU)
    prompt = row_prompt(suite, planned[1], load_api_workflow(suite.workflow), CPU)
    by_type = {n["class_type"]: (k, n["inputs"]) for k, n in prompt.items()}
    loader_id = by_type["WanBenchModelLoader"][0]
    lora_ids = [k for k, n in prompt.items() if n["class_type"] == "WanBenchLora"]
    first, second = (prompt[k]["inputs"] for k in lora_ids)
    assert first["model"] == [loader_id, 0] and second["model"] == [lora_ids[0], 0]
    assert (first["lora_name"], first["strength_low"]) == ("a.safetensors", 0.0)
    # the shipped workflows wire no profiler (the observer profiles every node, the LoRA nodes too)
    assert "profiler" not in by_type["WanBenchModelLoader"][1] and "profiler" not in first
    cache_id, cache_inputs = by_type["WanBenchStepCache"]
    assert cache_inputs["model"] == [lora_ids[1], 0] and cache_inputs["threshold"] == 1.5
    sampler_id, sampler = by_type["WanBenchSampler"]
    assert sampler["model"] == [cache_id, 0]
    assert (sampler["solver"], sampler["steps"], sampler["shift"]) == ("euler_distill", 4, 5.0)  # distilled wins
    assert sampler["guidance_high"] == sampler["guidance_low"] == 1.0 and sampler["batched_cfg"] is True
    assert by_type["WanBenchVAEDecode"][1]["tiling"] == "auto"
    assert by_type["WanBenchEmptyLatent"][1]["width"] == 80
    assert by_type["WanBenchReport"][1]["latent"] == [sampler_id, 0]
    assert by_type["WanBenchProfiler"][1]["case_name"] == planned[1].row.id == "01_all"
    assert by_type["WanBenchReport"][1]["filename_prefix"] == "wanbench/t/01_all/report"
    validate_workflow(prompt)  # every node type and input exists in the pack
    # a workflow that still wires the profiler into its loader passes the wire on to the LoRA nodes
    wired = load_api_workflow(suite.workflow)
    profiler_id = next(k for k, n in wired.items() if n["class_type"] == "WanBenchProfiler")
    next(n for n in wired.values() if n["class_type"] == "WanBenchModelLoader")["inputs"]["profiler"] = [profiler_id, 0]
    wired_row = row_prompt(suite, planned[1], wired, CPU)
    lora_nodes = [n for n in wired_row.values() if n["class_type"] == "WanBenchLora"]
    assert len(lora_nodes) == 2 and all(n["inputs"]["profiler"] == [profiler_id, 0] for n in lora_nodes)
    validate_workflow(wired_row)


@pytest.mark.parametrize("path", LADDERS, ids=lambda p: p.name)
def test_shipped_ladders_parse_and_every_runnable_row_builds_a_valid_workflow(path: Path) -> None:
    data = load_suite_file(path)
    suite = parse_ladder(data, path)
    assert suite.workflow.is_file() and suite.random_weights == path.stem.endswith("_tiny")
    machine = _gpu()
    machine = dataclasses.replace(machine, nodes=_pack_nodes({"WanBenchLora": {
        "lora_name": [e["file"] for r in suite.rows for e in r.own.get("lora", [])]}}))
    base = load_api_workflow(suite.workflow)
    for node in base.values():  # the real I2V start image comes from ComfyUI's Load Image: a pack node here
        if node["class_type"] == "LoadImage":
            node.update(class_type="WanBenchTestImage", inputs={"width": 64, "height": 64, "pattern": "gradient"})
    for planned in plan_rows(suite, machine):
        if planned.skip is None:
            validate_workflow(row_prompt(suite, planned, base, machine))
        else:
            assert planned.row.unsupported, planned.skip  # only rows the pack cannot reproduce are skipped


def test_seed004_ladder_carries_the_documents_expectations() -> None:
    suite = parse_ladder(load_suite_file(SUITES / "seed004_ladder.json"), SUITES / "seed004_ladder.json")
    expected = [(r.name, r.expected.speedup, r.expected.time_s) for r in suite.rows[1:]]
    # reference report 004, "Expected Results": 300 s baseline, then 165, 125, 100, 90 s
    assert expected == [("+ Batched CFG", 1.8, 165.0), ("+ TF32", 2.4, 125.0), ("+ torch.compile", 3.0, 100.0),
                        ("+ No offloading", 3.3, 90.0)]
    assert suite.baseline.own["cfg_mode"] == "sequential" and suite.baseline.own["placement"] == "model"


# ------------------------------------------------------------------------------------------------ the table
def _figures(inference_s: float, flops: float, *, steps: int = 4, reused: int = 0, floor: float | None = None,
             cfg: tuple[str, ...] = ("sequential",)) -> RowFigures:
    return RowFigures(load_s=1.0, inference_s=inference_s, total_s=inference_s + 2, s_per_step=inference_s / steps,
                      peak_allocated_bytes=None, mfu_pct=None, flops_steps=flops, steps_floor_s=floor,
                      num_steps=steps, num_reused=reused, cfg_modes=list(cfg))


def _ladder(floor: float | None = None) -> Ladder:
    rows = [
        LadderRow(id="00_base", name="base", baseline=True, changes={}, status=MEASURED,
                  figures=_figures(10.0, 100.0, floor=floor), video="00_base/v.mp4"),
        LadderRow(id="01_fast", name="fast", baseline=False, changes={"cfg_mode": "batched"}, status=MEASURED,
                  figures=_figures(5.0, 100.0, floor=floor), deviation=Deviation(latent_rel_l2=0.0,
                                                                                   video_identical=True),
                  expected=Expected(speedup=1.8, time_s=165.0, source="004")),
        LadderRow(id="02_cache", name="cache", baseline=False, changes={"step_cache": {"mode": "magcache"}},
                  status=MEASURED, figures=_figures(4.0, 50.0, reused=2, floor=floor),
                  deviation=Deviation(latent_rel_l2=0.01, psnr_db=38.5, video_identical=False),
                  expected=Expected(speedup=40.0, source="004")),
        LadderRow(id="03_tf32", name="tf32", baseline=False, changes={"tf32": True}, status=SKIPPED,
                  reason="TF32 needs a CUDA GPU"),
        LadderRow(id="04_bad", name="bad", baseline=False, changes={"steps": 0}, status=FAILED,
                  reason="node 8 failed: WorkflowError: steps 0"),
    ]
    return Ladder(suite="t", description="d", source="s", execution="e", machine="m", random_weights=True,
                  baseline_settings={"cfg_mode": "sequential"}, rows=rows)


def test_speedup_and_work_come_from_the_measured_figures() -> None:
    ladder = _ladder()
    assert [speedup(ladder, r) for r in ladder.rows] == [1.0, 2.0, 2.5, None, None]
    assert work_note(ladder, ladder.rows[1]) == "same work"
    assert work_note(ladder, ladder.rows[2]) == ("less work: 50 % of the baseline's model FLOPs (2 of 4 steps "
                                                 "reused from the step cache)")
    text = render_ladder(ladder)
    assert "| 1 | fast (01_fast) | cfg_mode batched | measured |" in text and "| 2.00x | same work |" in text
    assert "| 0 (identical) | identical | 1.80x / 165 s |" in text
    assert "skipped: TF32 needs a CUDA GPU" in text and "failed: node 8 failed: WorkflowError: steps 0" in text
    assert "random-weight tiny models" in text and "[mp4](00_base/v.mp4)" in text
    assert "impossible here" not in text  # no GPU peak: no floor to compare with


def test_compile_time_is_counted_and_also_shown_without() -> None:
    ladder = _ladder()
    compiled = dataclasses.replace(_figures(20.0, 100.0), compile_s=15.0)  # 15 s compiling, 5 s of steps
    ladder.rows[1] = dataclasses.replace(ladder.rows[1], figures=compiled)
    assert speedup(ladder, ladder.rows[1]) == 0.5
    text = render_ladder(ladder)
    assert "| 15.00 | 0.50x (2.00x without compiling) | same work |" in text
    assert "| n/a | 2.50x | less work" in text  # rows that did not compile: one figure
    assert check_ladder(ladder_document(ladder), markdown=text) == []


def test_expected_figures_below_the_flop_floor_are_marked_impossible() -> None:
    ladder = _ladder(floor=300.0)
    text = render_ladder(ladder)
    # 165 s, and 10 s / 1.8, lie below the 300 s floor of the row's steps
    assert "1.80x / 165 s (impossible here: below the 300.00 s FLOP floor" in text


def test_check_ladder_recomputes_what_the_document_derives() -> None:
    ladder = _ladder()
    doc = ladder_document(ladder)
    text = render_ladder(ladder)
    assert check_ladder(json.loads(json.dumps(doc)), markdown=text) == []
    forged = copy.deepcopy(doc)
    forged["rows"][1]["derived"]["speedup"] = 1.8  # the document's claim copied in
    assert any("speedup 1.8 is not what its figures give" in p for p in check_ladder(forged))
    assert check_ladder(doc, markdown=text.replace("2.00x", "2.10x")) == [
        "ladder Markdown differs from what the document renders"]
    bad = copy.deepcopy(doc)
    bad["rows"][3]["figures"] = bad["rows"][1]["figures"]
    bad["rows"][0]["deviation"] = {"latent_rel_l2": 0.0}
    problems = check_ladder(bad)
    assert any("a skipped row carries its reason and no figures" in p for p in problems)
    assert any("the baseline has no deviation from itself" in p for p in problems)


# ------------------------------------------------------------------------------------------------ deviation
def test_relative_l2_and_psnr() -> None:
    ref = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    assert relative_l2(ref.clone(), ref) == 0.0
    assert relative_l2(ref * 1.1, ref) == pytest.approx(0.1)
    frames = torch.full((2, 4, 4, 3), 100, dtype=torch.uint8)
    assert psnr_8bit(frames, frames.clone()) is None  # identical: infinite PSNR
    assert psnr_8bit(frames + 1, frames) == pytest.approx(20 * math.log10(255))  # MSE 1
    with pytest.raises(ValueError, match="shapes differ"):
        relative_l2(ref, ref[:1])
    with pytest.raises(TypeError, match="uint8"):
        psnr_8bit(frames.float(), frames.float())


def test_latent_files_round_trip_and_refuse_other_files(tmp_path: Path) -> None:
    from wanbench.wan_core.checkpoints.io import write_safetensors

    latent = torch.randn(1, 16, 3, 4, 4)
    path = save_latent(latent, tmp_path / "r_latent.safetensors")
    assert torch.equal(load_latent(path), latent)
    write_safetensors({"samples": latent}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="is not a latent file of this pack"):
        load_latent(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        load_latent(tmp_path / "missing.safetensors")


def test_every_setting_names_a_pack_node() -> None:
    for setting in SETTINGS.values():
        assert setting.node in NODE_CLASS_MAPPINGS, setting.name


def test_a_ladder_with_comfyui_nodes_asks_for_a_server_before_any_row(tmp_path: Path, caplog) -> None:
    from wanbench.cli import main

    assert main(["suite", "seed003_ladder.json", "--out", str(tmp_path / "out"), "--models", str(tmp_path)]) == 2
    assert "uses ComfyUI's own nodes ['LoadImage'], which run only on a ComfyUI server; run the ladder with " \
        "--server URL" in caplog.text
    assert not (tmp_path / "out").exists()


def test_cli_model_options_are_refused_with_a_ladder(tmp_path: Path, caplog) -> None:
    from wanbench.cli import main

    assert main(["suite", "seed004_ladder_tiny.json", "--out", str(tmp_path), "--tf32"]) == 2
    assert "['tf32'] would override every row of the ladder seed004_ladder_tiny.json" in caplog.text


def test_a_ladder_whose_rows_cannot_be_built_stops_before_any_row(tmp_path: Path, caplog) -> None:
    from wanbench.cli import main

    suite = {"name": "nodecode", "workflow": str(WORKFLOWS / "tiny_t2v_A14B.api.json"),
             "overrides": {}, "baseline": {"name": "base"}, "rows": [{"name": "tiled",
                                                                      "settings": {"vae_tiling": "auto"}}]}
    prompt = json.loads((WORKFLOWS / "tiny_t2v_A14B.api.json").read_text())
    for key in [k for k, n in prompt.items() if n["class_type"] in ("WanBenchVAEDecode", "WanBenchSaveVideo")]:
        del prompt[key]
    (tmp_path / "wf.api.json").write_text(json.dumps(prompt))
    suite["workflow"] = str(tmp_path / "wf.api.json")
    (tmp_path / "s.json").write_text(json.dumps(suite))
    assert main(["suite", str(tmp_path / "s.json"), "--out", str(tmp_path / "out"), "--models", str(tmp_path)]) == 2
    assert "setting 'vae_tiling' sets WanBenchVAEDecode, which the ladder's workflow does not contain" in caplog.text
    assert not list((tmp_path / "out").glob("*_ladder.json"))
