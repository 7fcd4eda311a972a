"""`python -m bench.gpu_check --tiny`: the one GPU command's tiny version runs every part on the CPU."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from bench.gpu_check import main  # noqa: E402


@pytest.mark.slow
def test_tiny_gpu_check_runs_every_part_and_writes_its_files(tmp_path, capsys) -> None:
    data = main(["--tiny", "--tests", "test_placement.py", "--results-dir", str(tmp_path)])
    assert (tmp_path / "gpu_check_cpu_tiny.json").is_file() and (tmp_path / "gpu_check_cpu_tiny.md").is_file()
    parts = data["parts"]
    assert list(parts) == ["tests", "ti2v_step", "a14b_steps", "nvml", "profiler_overhead"]
    tests = parts["tests"]
    assert tests["status"] == "ok" and tests["counts"].get("skipped", 0) >= 1  # gpu tests skip without CUDA
    ti2v, a14b = parts["ti2v_step"], parts["a14b_steps"]
    assert ti2v["status"] == a14b["status"] == "ok"
    assert ti2v["placement"] == a14b["placement"] == "placement 'none'"  # the planner's choice on the CPU
    assert ti2v["experts"] == ["model"] and a14b["experts"] == ["high", "low"]  # both A14B experts ran
    assert a14b["memory_estimate_bytes"] > 0 and a14b["report_problems"] == []
    assert ti2v["speedup_vs_diffusers"] == pytest.approx(ti2v["forward_diffusers_s"] / ti2v["forward_ours_s"])
    report = json.loads(open(a14b["report"], encoding="utf-8").read())
    assert "Step_1_Inference" in json.dumps(report)
    assert parts["nvml"] == {"status": "n/a", "reason": "no CUDA device: NVML reads GPU activity",
                             "seconds": parts["nvml"]["seconds"]}
    overhead = parts["profiler_overhead"]
    assert overhead["status"] == "ok" and len(overhead["raw_cpu_wall_s"]["profiled"]) == 3
    assert data["total_s"] < data["settings"]["budget_s"]
    printed = capsys.readouterr().out
    assert printed.count("\n| ") >= 5 and "profiler_overhead" in printed
