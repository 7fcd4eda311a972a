"""Ladders run end to end in-process (a fresh process per row) on the tiny models: the shipped tiny
twin of seed 004, and a ladder with a step-cache row and a row that fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from wanbench.cli import main
from wanbench.profiling import check_report, load_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    assert main(["make-tiny-models", str(root)]) == 0
    return root


def _ladder(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}_ladder.json").read_text(encoding="utf-8"))


def test_seed004_tiny_twin_runs_in_fresh_processes(models: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["suite", "seed004_ladder_tiny.json", "--out", str(out), "--models", str(models)]) == 0
    doc = _ladder(out, "seed004_ladder_tiny")
    rows = {r["id"]: r for r in doc["rows"]}
    assert list(rows) == ["00_official_baseline", "01_batched_cfg", "02_tf32", "03_torch_compile",
                          "04_no_offloading"]
    assert [r["status"] for r in doc["rows"]] == ["measured", "measured", "skipped", "measured", "skipped"]
    assert "TF32 (tensor-core float32 matmuls) needs a CUDA GPU" in rows["02_tf32"]["reason"]
    compiled = rows["03_torch_compile"]
    assert compiled["dropped"] == ["tf32 true"] and compiled["figures"]["compile_s"] > 0
    assert compiled["derived"]["speedup_without_compile"] is not None
    assert "every placement runs as none" in rows["04_no_offloading"]["reason"]
    assert doc["notes"] and "placement model has no effect here" in doc["notes"][0]
    assert "fresh Python process" in doc["execution"] and doc["random_weights"] is True
    batched = rows["01_batched_cfg"]
    # batching CFG changes no FLOP: the same work, and (in float32 sums of bf16 weights) nearly the same latent
    assert batched["derived"]["work_ratio"] == pytest.approx(1.0)
    assert batched["deviation"]["latent_rel_l2"] < 1e-2
    base_run = load_runs(out / rows["00_official_baseline"]["report"])[0]
    assert base_run.context.cfg_mode == "sequential" and base_run.context.case_name == "00_official_baseline"
    assert load_runs(out / batched["report"])[0].context.cfg_mode == "batched"
    for row in (rows["00_official_baseline"], batched):
        assert (out / row["video"]).is_file() and (out / row["latent"]).is_file()
        assert (out / row["id"] / "workflow.api.json").is_file()  # each row can be rerun with `wanbench run`
    assert batched["derived"]["speedup"] == pytest.approx(
        rows["00_official_baseline"]["figures"]["inference_s"] / batched["figures"]["inference_s"])
    assert check_report(out / "seed004_ladder_tiny_ladder.json") == []
    text = (out / "seed004_ladder_tiny_ladder.md").read_text(encoding="utf-8")
    assert "1.80x / 165 s" in text and "| same work |" in text
    assert (out / "seed004_ladder_tiny_report.md").is_file()
    assert "skipped: TF32" in capsys.readouterr().out


def test_ladder_with_a_step_cache_row_and_a_failing_row(models: Path, tmp_path: Path) -> None:
    workflows = Path(__file__).resolve().parents[1] / "workflows"
    suite = {
        "name": "mixed", "description": "a cached row and a row that fails", "workflow":
        str(workflows / "tiny_ti2v_5B_t2v.api.json"), "overrides": {"WanBenchSampler.steps": 5},
        "baseline": {"name": "plain", "settings": {"cfg_mode": "batched"}},
        "rows": [
            {"name": "cached", "settings": {"step_cache": {"mode": "magcache", "threshold": 9.0,
                                                           "warmup_steps": 1, "max_skip": 1}}},
            {"name": "broken", "settings": {"steps": 0}},
        ],
    }
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(suite), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["suite", str(path), "--out", str(out), "--models", str(models)]) == 1  # a row failed
    doc = _ladder(out, "mixed")
    plain, cached, broken = doc["rows"]
    assert broken["status"] == "failed" and "steps" in broken["reason"] and broken["figures"] is None
    assert cached["figures"]["num_reused"] == 2 and cached["figures"]["num_steps"] == 5
    assert cached["derived"]["work_ratio"] == pytest.approx(3 / 5)  # 3 of 5 steps ran the model
    assert cached["deviation"]["latent_rel_l2"] > 0
    run = load_runs(out / cached["report"])[0]
    assert run.context.step_cache.startswith("magcache, threshold 9")
    reused = [s.step for s in run.stages if s.kind == "step-inference" and s.facts.get("step_cache") == "reused"]
    assert reused == [1, 3]
    text = (out / "mixed_ladder.md").read_text(encoding="utf-8")
    assert "less work: 60 % of the baseline's model FLOPs (2 of 5 steps reused from the step cache)" in text
    assert "failed: " in text
    assert check_report(out / "mixed_ladder.json") == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seed004_tiny_twin_on_a_gpu_runs_every_row(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["suite", "seed004_ladder_tiny.json", "--out", str(out), "--models", str(models)]) == 0
    doc = _ladder(out, "seed004_ladder_tiny")
    assert [r["status"] for r in doc["rows"]] == ["measured"] * 5
    for row in doc["rows"]:
        assert row["figures"]["peak_allocated_bytes"] > 0  # GPU memory is measured on CUDA
    assert check_report(out / "seed004_ladder_tiny_ladder.json") == []
