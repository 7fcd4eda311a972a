"""The matmul ceiling benchmark: figures are consistent with the raw times, the results file is complete."""

from __future__ import annotations

import json

import pytest

from bench.bench_matmul import dense_peak_tflops, main, measure_matmul_ceiling


def test_ceiling_gflops_follow_from_the_median_times():
    ceiling = measure_matmul_ceiling(sizes=(32, 64), repeats=3, warmup=1)
    assert [p.n for p in ceiling.points] == [32, 64]
    for point in ceiling.points:
        assert len(point.times_s) == 3 and all(t > 0 for t in point.times_s)
        assert point.gflops == pytest.approx(2 * point.n**3 / point.median_s / 1e9)
    assert ceiling.best_gflops == max(p.gflops for p in ceiling.points)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="dtype must be one of"):
        measure_matmul_ceiling(dtype="int8", sizes=(8,))
    with pytest.raises(ValueError, match="at least one matrix size"):
        measure_matmul_ceiling(sizes=())


def test_datasheet_peak_lookup():
    assert dense_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989.4)
    assert dense_peak_tflops("NVIDIA H100 80GB HBM3", "float32") is None
    assert dense_peak_tflops("Some Future GPU", "bfloat16") is None


def test_main_writes_a_complete_results_file(tmp_path):
    payload = main(["--device", "cpu", "--sizes", "16", "32", "--repeats", "2", "--name", "mm",
                    "--results-dir", str(tmp_path)])
    data = json.loads((tmp_path / "mm.json").read_text())
    assert data["benchmark"] == "mm" and data["machine"]["cpu"]
    assert data["settings"]["sizes"] == [16, 32]
    assert data["ceiling"]["best_gflops"] == payload["ceiling"]["best_gflops"] > 0
    assert data["datasheet_peak_tflops"] is None  # CPU: no datasheet peak, not a made-up number
