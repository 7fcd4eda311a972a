"""run_all: every selected benchmark is run in its own process and accounted for in the summary."""

from __future__ import annotations

import json

from bench.run_all import Bench, benches, main, run_bench


def test_run_all_runs_a_benchmark_and_lists_its_results_file(tmp_path):
    payload = main(["--only", "bench_matmul", "--quick", "--results-dir", str(tmp_path)])
    (run,) = payload["runs"]
    assert run["status"] == "ok" and run["wall_s"] > 0
    assert [p.rsplit("/", 1)[-1] for p in run["files"]] == ["bench_matmul.json"]
    summary = json.loads((tmp_path / "run_all.json").read_text())
    assert summary["runs"][0]["module"] == "bench_matmul"
    assert "bench_matmul" in summary["table"]


def test_missing_and_failing_benchmarks_are_reported_not_dropped(tmp_path):
    missing = run_bench(Bench(module="bench_does_not_exist"), quick=True, results_dir=tmp_path, timeout_s=60)
    assert missing["status"] == "missing" and "does not exist" in missing["detail"]
    failing = run_bench(Bench(module="bench_matmul", quick_args=("--dtype", "int3")), quick=True,
                        results_dir=tmp_path, timeout_s=60)
    assert failing["status"].startswith("failed") and "int3" in failing["output_tail"]


def test_every_benchmark_of_the_issue_is_scheduled():
    modules = {b.module for b in benches(has_cuda=False)}
    assert {"bench_matmul", "bench_dit", "bench_dit_block", "bench_t5", "bench_vae", "bench_sampler",
            "bench_profiling", "bench_compile", "bench_gpu"} <= modules
    gpu = next(b for b in benches(has_cuda=False) if b.module == "bench_gpu")
    assert "--tiny" in gpu.args and "--tiny" in gpu.quick_args
