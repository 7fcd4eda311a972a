"""What a user sees for bad inputs, and report figures that must not look measured when they are not.

Every bad input must end in one line naming the problem, the node and the fix (exit code 2), with
no traceback and no output file; none of these tests needs model weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from make_golden_report import run_cpu_tiny, run_t2v_l40s
from wanbench.cli import describe_error, main
from wanbench.nodes.comfy_bridge import Bridge
from wanbench.profiling import analyze_run, summarize_run
from wanbench.profiling.figures import stage_tflops
from wanbench.runner import NODE_NOTE_PREFIX, WorkflowError, run_workflow
from wanbench.wan_core.errors import CheckpointError


def test_tests_run_with_one_torch_thread_unless_asked_otherwise() -> None:
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])


def _models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    for folder in ("diffusion_models", "text_encoders", "vae"):
        (root / folder).mkdir(parents=True)
    return root


def _loader(model_high: str) -> dict:
    return {
        "2": {
            "class_type": "WanBenchModelLoader",
            "inputs": {
                "model_high": model_high,
                "model_low": "none",
                "dtype": "float32",
                "attention": "sdpa",
                "device": "cpu",
            },
        }
    }


def _write(tmp_path: Path, prompt: dict) -> Path:
    path = tmp_path / "wf.api.json"
    path.write_text(json.dumps(prompt), encoding="utf-8")
    return path


def test_unknown_model_name_says_where_it_was_looked_for(tmp_path: Path, caplog) -> None:
    models = _models(tmp_path)
    (models / "diffusion_models" / "other.safetensors").write_bytes(b"x")
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR, logger="wanbench"):
        code = main(
            [
                "run",
                str(_write(tmp_path, _loader("missing.safetensors"))),
                "--out",
                str(out),
                "--models",
                str(models),
            ]
        )
    assert code == 2
    text = caplog.text
    assert "'missing.safetensors' is not one of ['other.safetensors']" in text
    assert str(models / "diffusion_models") in text and "--models" in text
    assert "Traceback" not in text
    assert not any(p.is_file() for p in out.rglob("*"))


def test_a_failing_node_is_named_with_the_error_type(tmp_path: Path, caplog) -> None:
    models = _models(tmp_path)
    (models / "diffusion_models" / "not_wan.safetensors").write_bytes(b"not a safetensors file")
    prompt = _loader("not_wan.safetensors")
    bridge = Bridge.for_models_root(models, tmp_path / "out")
    with pytest.raises(CheckpointError) as caught:  # the original type survives for callers
        run_workflow(prompt, bridge)
    assert f"{NODE_NOTE_PREFIX}2 (WanBenchModelLoader)" in caught.value.__notes__
    assert describe_error(caught.value).startswith("node 2 (WanBenchModelLoader) failed: CheckpointError: ")

    with caplog.at_level(logging.ERROR, logger="wanbench"):
        code = main(
            ["run", str(_write(tmp_path, prompt)), "--out", str(tmp_path / "out"), "--models", str(models)]
        )
    assert code == 2
    assert "node 2 (WanBenchModelLoader) failed: CheckpointError" in caplog.text
    assert "Traceback" not in caplog.text


def test_missing_link_input_says_what_to_connect(tmp_path: Path) -> None:
    prompt = {
        "7": {
            "class_type": "WanBenchImageToVideo",
            "inputs": {"width": 64, "height": 48, "length": 9},
        }
    }
    with pytest.raises(WorkflowError, match="'vae' is missing; connect a node that outputs WAN22_VAE"):
        run_workflow(prompt, Bridge.for_models_root(_models(tmp_path), tmp_path / "out"))


def test_unwritable_output_folder_is_a_clear_error(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with caplog.at_level(logging.ERROR, logger="wanbench"):
        code = main(
            [
                "run",
                str(_write(tmp_path, _loader("x.safetensors"))),
                "--out",
                str(blocker / "out"),
                "--models",
                str(tmp_path),
            ]
        )
    assert code == 2
    assert "Error" in caplog.text and str(blocker) in caplog.text and "Traceback" not in caplog.text


# ------------------------------------------------------------------------------------------------
# Report figures
# ------------------------------------------------------------------------------------------------
def test_stages_without_arithmetic_have_no_flop_rate() -> None:
    run = run_cpu_tiny()
    loading = [s for s in run.stages if s.kind == "step-loading"]
    assert loading and all(s.flops == 0 for s in loading)
    assert all(stage_tflops(s) is None for s in loading)  # "n/a", never a measured-looking 0
    inference = next(s for s in run.stages if s.kind == "step-inference")
    assert stage_tflops(inference) == pytest.approx(inference.flops / inference.duration_s / 1e12)


def test_largest_phase_names_the_stages_it_adds_up() -> None:
    base = run_cpu_tiny()
    # Make the run's preprocessing a second loader, so that two init stages form one phase.
    stages = [
        dataclasses.replace(s, name="VAE_Initialization", kind="init", end_s=s.start_s + 50.0)
        if s.kind == "preprocess"
        else s
        for s in base.stages
    ]
    run = dataclasses.replace(base, stages=stages)
    init = [s for s in run.top_level if s.kind == "init"]
    assert [s.name for s in init] == ["Model_Initialization", "VAE_Initialization"]
    finding = next(f for f in analyze_run(run, summarize_run(run)).findings if f.rule == "largest_phase")
    seconds = sum(s.duration_s for s in init)
    assert finding.text.startswith(
        "Largest part of the run: Initialization (Model_Initialization + VAE_Initialization), "
        f"{seconds:.2f} s"
    )
    # A phase of one stage keeps its plain name.
    single = next(f for f in analyze_run(base, summarize_run(base)).findings if f.rule == "largest_phase")
    assert "+" not in single.figures["phase"]


def test_negligible_step_loading_is_not_recommended_away() -> None:
    run = run_t2v_l40s()
    loading = [s for s in run.stages if s.kind == "step-loading"]
    tiny = dataclasses.replace(
        run,
        stages=[dataclasses.replace(s, end_s=s.start_s + 0.0005) if s in loading else s for s in run.stages],
    )
    sm = summarize_run(tiny)
    assert sm.loading_share_pct is not None and sm.loading_share_pct < 5.0
    assert not any(r.rule == "placement_none" for r in analyze_run(tiny, sm).recommendations)
    # with the real 9.6 s of loading the question arises: on this L40S the other expert does not fit
    assert any(f.rule == "placement_none_does_not_fit" for f in analyze_run(run, summarize_run(run)).findings)


def test_unreachable_or_malformed_server_url(tmp_path: Path, caplog) -> None:
    import socket

    with socket.socket() as sock:  # a port that is certainly closed: bound, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="wanbench"):
            code = main(
                [
                    "run",
                    str(_write(tmp_path, _loader("x"))),
                    "--server",
                    f"http://127.0.0.1:{port}",
                    "--out",
                    str(tmp_path / "out"),
                ]
            )
    assert code == 2
    assert f"cannot reach a ComfyUI server at http://127.0.0.1:{port}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="wanbench"):
        code = main(
            [
                "run",
                str(_write(tmp_path, _loader("x"))),
                "--server",
                "127.0.0.1:8188",
                "--out",
                str(tmp_path / "out"),
            ]
        )
    assert code == 2
    assert (
        "--server must be a plain http:// URL such as http://127.0.0.1:8188; got '127.0.0.1:8188'"
        in caplog.text
    )
