"""The tiny TI2V workflow run in-process with a profiler (no wires): the stage names the report users know."""

from __future__ import annotations

import json
from pathlib import Path

from wanbench.cli import DEMO_WORKFLOW, WORKFLOWS_DIR
from wanbench.nodes.comfy_bridge import Bridge
from wanbench.profiling import check_report, load_runs
from wanbench.runner import load_api_workflow, output_files, run_workflow
from wanbench.tiny_models import make_tiny_models


def test_tiny_workflow_stage_sequence(tmp_path: Path) -> None:
    models = make_tiny_models(tmp_path / "models", seed=0, overwrite=False)
    prompt = load_api_workflow(WORKFLOWS_DIR / DEMO_WORKFLOW)  # as shipped: loaders have the first ids
    bridge = Bridge.for_models_root(models.root, tmp_path / "out")
    files = output_files(run_workflow(prompt, bridge))
    (report,) = files["reports"]
    (run,) = load_runs(report)
    steps = prompt["8"]["inputs"]["steps"]
    top = [s.name for s in run.top_level] + [run.total.name]
    assert top == [
        "Model_Initialization",
        "T5_Encoding",
        "TI2V_Preprocess",
        *(f"Step_{i}_{part}" for i in range(steps) for part in ("Loading", "Inference")),
        "VAE_Decoding",
        "WanBenchSaveVideo",  # a node without stages of its own: a row under its class name
        "Total_Execution",
    ]
    assert not any(isinstance(v, list) and v[0] == "1" for n in prompt.values() for v in n["inputs"].values())
    init = run.top_level[0]
    children = [s for s in run.stages if s.parent == init.index]
    assert [s.name for s in children] == ["DiT_Initialization", "Text_Encoder_Initialization", "VAE_Initialization"]
    assert init.start_s <= children[0].start_s and children[-1].end_s <= init.end_s
    assert sum(s.duration_s for s in children) <= init.duration_s + 1e-9
    inference = [s for s in run.stages if s.kind == "step-inference"]
    assert all(s.expert and s.cfg_mode for s in inference)
    assert prompt["8"]["inputs"]["placement"] == "auto"
    assert run.context.placement == "none"  # what the memory planner chose for the tiny model, not "auto"
    assert check_report(report) == []
    doc = json.loads(Path(report).read_text(encoding="utf-8"))
    assert doc["runs"][0]["outside"] == [json.loads(json.dumps(o.__dict__)) for o in run.outside]


def test_tiny_four_step_lora_workflows_run_and_report_their_loras(tmp_path: Path) -> None:
    """The tiny twins of the 4-step LoRA workflows, in-process: LoRA loading is part of
    Model_Initialization, 4 single-pass steps (2 high, 2 low), the LoRAs in the run facts."""
    models = make_tiny_models(tmp_path / "models", seed=0, overwrite=False)
    bridge = Bridge.for_models_root(models.root, tmp_path / "out")
    for name in ("tiny_t2v_A14B_4steps_lora.api.json", "tiny_i2v_A14B_4steps_lora.api.json"):
        prompt = load_api_workflow(WORKFLOWS_DIR / name)
        files = output_files(run_workflow(prompt, bridge))
        (report,) = files["reports"]
        (run,) = load_runs(report)
        assert [s.name for s in run.top_level][:1] == ["Model_Initialization"]
        init = run.top_level[0]
        children = [s.name for s in run.stages if s.parent == init.index]
        assert children == ["DiT_Initialization", "LoRA_Initialization", "LoRA_Initialization",
                            "Text_Encoder_Initialization", "VAE_Initialization"]
        inference = [s for s in run.stages if s.kind == "step-inference"]
        assert [(s.expert, s.cfg_mode) for s in inference] == [("high", "off")] * 2 + [("low", "off")] * 2
        assert run.context.solver == "euler_distill" and run.context.steps == 4
        high, low = run.context.loras
        assert high.startswith(f"{prompt['3']['inputs']['lora_name']} (high 1, low 0;")
        assert low.startswith(f"{prompt['4']['inputs']['lora_name']} (high 0, low 1;")
        text = Path(report).with_suffix(".md").read_text(encoding="utf-8")
        assert "LoRAs " + high in text
        assert check_report(report) == []
        assert files["videos"], f"{name} wrote no video"
