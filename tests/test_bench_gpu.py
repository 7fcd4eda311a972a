"""The real-size GPU benchmark runs end to end on the CPU with the tiny twins."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from bench.bench_gpu import SUITE, TINY_SUITE, main, suite_cases  # noqa: E402


def test_suite_cases_resolve_sizes_steps_and_tasks():
    cases = {c.name: c for c in suite_cases(SUITE)}
    a14b = cases["04_14B_Speed_Preview_480p"]
    assert (a14b.task, a14b.width, a14b.height, a14b.frames) == ("t2v-A14B", 832, 480, 81)
    five_b = cases["03_Max_Quality_704p"]
    assert five_b.task == "ti2v-5B" and five_b.steps == 50
    assert all(c.task in ("ti2v-5B", "t2v-A14B") for c in suite_cases(TINY_SUITE))


def test_tiny_run_writes_reports_and_side_by_side_figures(tmp_path):
    payload = main(["--tiny", "--cases", "t2v-A14B-tiny", "--max-steps", "4", "--repeats", "1",
                    "--name", "gpu", "--results-dir", str(tmp_path)])
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["settings"]["device"] == "cpu" and data["datasheet_peak_tflops"] is None
    (result,) = data["results"]
    assert result["steps_run"] == 4 and len(result["step_inference_s"]) == 4
    assert result["report_problems"] == []
    report = json.loads(open(result["report_files"]["json"]).read())
    stage_names = json.dumps(report)
    assert "Model_Initialization" in stage_names and "Step_3_Inference" in stage_names
    # Both experts ran (shift 12, 4 steps: high, high, high, low).
    assert result["mfu_pct"] is None  # no GPU: MFU is unavailable, never 0
    fwd = result["forward"]
    assert fwd["max_abs_diff"] < 1e-3
    assert fwd["speedup_vs_diffusers"] == pytest.approx(
        fwd["stats"]["diffusers"]["median_s"] / fwd["stats"]["ours"]["median_s"])
    assert payload["table"].count("\n") == 2


def test_tiny_run_with_compile_records_the_compile_stage(tmp_path):
    torch._dynamo.reset()
    main(["--tiny", "--cases", "01_Speed_Preview_480p", "--max-steps", "2", "--repeats", "1",
          "--no-diffusers",
          "--compile", "--compile-backend", "eager", "--name", "gpuc", "--results-dir", str(tmp_path)])
    torch._dynamo.reset()
    (result,) = json.loads((tmp_path / "gpuc.json").read_text())["results"]
    assert "Compile" in open(result["report_files"]["json"]).read()
    (stats,) = result["compile"]
    assert stats["num_regions"] == 2 and stats["compile_time_s"] > 0
    assert "speedup_vs_diffusers" not in result["forward"]


def test_real_size_run_without_cuda_says_how_to_run_tiny():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="--tiny"):
        main(["--cases", "ti2v-5B_1280x704x121"])
