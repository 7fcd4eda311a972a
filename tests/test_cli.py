"""CLI: make-tiny-models, in-process runs of every tiny workflow, suites, report and check-report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch
from wanbench.cli import API_WORKFLOWS_DIR, main
from wanbench.profiling import check_report
from wanbench.tiny_models import DIT_FILES, TEXT_ENCODER_FILE, VAE_FILES, randomize

TINY_WORKFLOWS = ("tiny_ti2v_5B_t2v", "tiny_ti2v_5B_i2v", "tiny_t2v_A14B", "tiny_i2v_A14B")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    assert main(["make-tiny-models", str(root)]) == 0
    return root


def test_tiny_models_use_comfyui_folders_and_layouts(models: Path) -> None:
    from safetensors import safe_open

    assert sorted(p.name for p in (models / "diffusion_models").iterdir()) == sorted(DIT_FILES)
    assert [p.name for p in (models / "text_encoders").iterdir()] == [TEXT_ENCODER_FILE]
    assert sorted(p.name for p in (models / "vae").iterdir()) == sorted(VAE_FILES)
    with safe_open(str(models / "text_encoders" / TEXT_ENCODER_FILE), "pt") as f:
        keys = set(f.keys())
        assert "spiece_model" in keys and "shared.weight" in keys  # HF T5 layout + embedded tokenizer
        assert f.get_tensor("spiece_model").dtype == torch.uint8
    with safe_open(str(models / "diffusion_models" / "wanbench_tiny_ti2v_5B_fp16.safetensors"), "pt") as f:
        assert "patch_embedding.weight" in set(f.keys())
        assert f.get_tensor("patch_embedding.weight").dtype == torch.float16


def test_randomize_is_seeded() -> None:
    a = randomize(torch.nn.Linear(8, 4), 3).weight
    b = randomize(torch.nn.Linear(8, 4), 3).weight
    c = randomize(torch.nn.Linear(8, 4), 4).weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def _video_facts(path: str) -> tuple[int, int, int]:
    with av.open(path) as container:
        frames = [f for f in container.decode(video=0)]
    return len(frames), frames[0].width, frames[0].height


@pytest.mark.parametrize("name", TINY_WORKFLOWS)
def test_run_tiny_workflow_in_process(name: str, models: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["run", f"{name}.api.json", "--out", str(out), "--models", str(models)]) == 0
    videos = sorted(out.rglob("*.mp4"))
    reports = sorted(out.rglob("*.json"))
    assert len(videos) == 1 and len(reports) == 1
    stdout = capsys.readouterr().out
    assert str(videos[0]) in stdout and str(reports[0]) in stdout
    # progress names the nodes; each file is labelled by what it is
    assert "  [1/" in stdout and "Wan Profiler (node 1)" in stdout and "Wan Sampler (node 8)" in stdout
    assert f"  video: {videos[0]}" in stdout and f"  report data (JSON): {reports[0]}" in stdout
    assert f"  report: {reports[0].with_suffix('.md')}" in stdout
    assert f"  chart: {reports[0].with_suffix('.png')}" in stdout
    assert "othe:" not in stdout
    doc = json.loads(reports[0].read_text(encoding="utf-8"))
    run = doc["runs"][0]
    context = run["context"]
    frames, width, height = _video_facts(str(videos[0]))
    assert frames == context["frames"] == 9
    assert (width, height) == (context["width"], context["height"])
    if name == "tiny_ti2v_5B_t2v":
        assert (width, height) == (96, 64)
    if name == "tiny_t2v_A14B":
        assert (width, height) == (64, 48)
    if name == "tiny_i2v_A14B":  # the 120x64 test image keeps its aspect within 64x48 pixels of area
        assert (width, height) == (64, 32)
    names = [s["name"] for s in run["stages"] if s["parent"] is None]
    steps = json.loads((API_WORKFLOWS_DIR / f"{name}.api.json").read_text())["8"]["inputs"]["steps"]
    for expected in (
        "Model_Initialization",
        "T5_Encoding",
        "TI2V_Preprocess",
        "VAE_Decoding",
        *(f"Step_{i}_Inference" for i in range(steps)),
    ):
        assert expected in names, f"{expected} missing from {names}"
    # the shipped graphs run every loader first: one Model_Initialization, then text, then latent
    # (the synthetic start image of the image variants is a row under its class name before it)
    staged = [n for n in names if n != "WanBenchTestImage"]
    assert staged[:3] == ["Model_Initialization", "T5_Encoding", "TI2V_Preprocess"], names
    assert names[-2:] == ["VAE_Decoding", "WanBenchSaveVideo"], names  # Save Video: a row under its class name
    assert not any(s["cached"] for s in run["stages"])
    assert check_report(reports[0]) == []
    assert reports[0].with_suffix(".md").is_file()


def test_run_writes_the_list_of_its_files(models: Path, tmp_path: Path) -> None:
    out, listing = tmp_path / "out", tmp_path / "files.json"
    args = ["run", "tiny_t2v_A14B.api.json", "--out", str(out), "--models", str(models), "--files-json", str(listing)]
    assert main([*args, "--set", "WanBenchSampler.steps=2"]) == 0
    files = json.loads(listing.read_text(encoding="utf-8"))
    assert [Path(p).suffix for p in files["videos"]] == [".mp4"] and files["reports"][0].endswith(".json")
    assert all(Path(p).is_file() for kind in files.values() for p in kind)


def test_run_reports_foreign_nodes_clearly(tmp_path: Path, caplog) -> None:
    workflow = tmp_path / "wf.api.json"
    workflow.write_text(json.dumps({"1": {"class_type": "KSampler", "inputs": {}}}), encoding="utf-8")
    assert main(["run", str(workflow), "--out", str(tmp_path)]) == 2
    assert "node type 'KSampler' is not a ComfyUI-WanBench node" in caplog.text


def test_suite_runs_every_case_and_reports_failures(models: Path, tmp_path: Path, capsys) -> None:
    suite = {
        "name": "mini",
        "cases": [
            {
                "name": "good_case",
                "workflow": str(API_WORKFLOWS_DIR / "tiny_t2v_A14B.api.json"),
                "overrides": {"WanBenchProfiler.case_name": "good_case", "WanBenchSampler.steps": 2},
            },
            {
                "name": "bad_case",
                "workflow": str(API_WORKFLOWS_DIR / "tiny_t2v_A14B.api.json"),
                "overrides": {"WanBenchEmptyLatent.length": 18},
            },
        ],
    }
    path = tmp_path / "mini.json"
    path.write_text(json.dumps(suite), encoding="utf-8")
    out = tmp_path / "suite_out"
    assert main(["suite", str(path), "--out", str(out), "--models", str(models)]) == 1
    stdout = capsys.readouterr().out
    assert "FAILED bad_case" in stdout and "length must be 4k+1" in stdout and "1/2 cases passed" in stdout
    combined = (out / "mini_report.md").read_text(encoding="utf-8")
    assert "good_case" in combined
    failed = combined[combined.index("## Failed cases") :]
    assert "| bad_case | FAILED |" in failed and "length must be 4k+1" in failed

    run_json = next((out / "good_case").rglob("*.json"))
    merged = tmp_path / "merged.md"
    assert main(["report", str(run_json), str(run_json), "-o", str(merged)]) == 0
    assert "good_case" in merged.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.glob("merged*")) == ["merged.md"]  # written atomically
    assert main(["check-report", str(run_json)]) == 0
    assert f"{run_json}: OK" in capsys.readouterr().out


def test_check_report_flags_a_broken_report(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "wanbench.report/1", "runs": []}), encoding="utf-8")
    assert main(["check-report", str(bad)]) == 1
    assert "the report holds no runs" in capsys.readouterr().out


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "wanbench", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("make-tiny-models", "run", "suite", "report", "check-report", "demo"):
        assert command in done.stdout


def test_missing_models_say_how_to_get_them(tmp_path: Path, caplog) -> None:
    assert (
        main(["run", "tiny_ti2v_5B_t2v.api.json", "--out", str(tmp_path), "--models", str(tmp_path / "none")])
        == 2
    )
    assert "the list is empty" in caplog.text and "--make-tiny-models" in caplog.text
    # every loader's problem at once, each on its node and input, before anything ran
    for where in ("node 2 'Wan Model Loader' (WanBenchModelLoader), input 'model_high'",
                  "node 3 'Wan Text Encoder Loader' (WanBenchTextEncoderLoader), input 'text_encoder'",
                  "node 4 'Wan VAE Loader' (WanBenchVAELoader), input 'vae'"):
        assert where in caplog.text, caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["tiny_ti2v_5B_i2v", "tiny_i2v_A14B"])
def test_tiny_workflow_on_cuda(name: str, models: Path, tmp_path: Path) -> None:
    devices = [
        f"{node}.device=cuda"
        for node in ("WanBenchModelLoader", "WanBenchTextEncoderLoader", "WanBenchVAELoader")
    ]
    args = ["run", f"{name}.api.json", "--out", str(tmp_path), "--models", str(models)]
    assert main(args + [a for d in devices for a in ("--set", d)]) == 0
    report = next(tmp_path.rglob("*_.json"))
    run = json.loads(report.read_text(encoding="utf-8"))["runs"][0]
    assert run["system"]["device"].startswith("cuda")
    assert check_report(report) == []


def test_ctrl_c_ends_with_a_message_not_a_traceback(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from wanbench import cli

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_demo", interrupted)
    with caplog.at_level("ERROR"):
        assert cli.main(["demo"]) == 130
    assert "interrupted: the run stopped before its end" in caplog.text and "Traceback" not in caplog.text
