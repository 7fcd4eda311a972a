"""Weight-format benchmark: every format loads, is timed (wall and CPU), and its memory and deviation
are the loaded model's own figures."""

from __future__ import annotations

import json

import pytest

from bench.bench_weights import FORMATS, main


def test_weights_bench_writes_every_format_with_its_figures(tmp_path):
    pytest.importorskip("gguf")
    main(["--dim", "256", "--layers", "1", "--text-dim", "64", "--latent", "2", "8", "8", "--repeats", "2",
          "--threads", "1", "--name", "w", "--results-dir", str(tmp_path)])
    data = json.loads((tmp_path / "w.json").read_text())
    results = data["results"]
    assert list(results) == list(FORMATS) and data["load_average_before"] is not None
    bf16 = results["bf16"]
    assert bf16["deviation_vs_bf16"] == 0.0 and 0 < bf16["deviation_vs_fp32"] < 0.02
    for name in ("fp8-resident", "fp8-matmul", "gguf-Q8_0", "gguf-Q4_K_M"):
        r = results[name]
        assert r["resident_bytes"] < bf16["resident_bytes"], name  # compact block matrices
        assert 0 < r["deviation_vs_bf16"] < 0.1, (name, r["deviation_vs_bf16"])
        assert len(r["forward_wall_s"]) == len(r["forward_cpu_s"]) == len(r["load_wall_s"]) == 2
        assert r["forward_wall"]["median"] > 0 and r["forward_cpu"]["median"] > 0
    assert results["gguf-Q4_K_M"]["resident_bytes"] < results["gguf-Q8_0"]["resident_bytes"]
    assert results["gguf-Q8_0"]["deviation_vs_bf16"] < results["gguf-Q4_K_M"]["deviation_vs_bf16"]
    assert "| fp8-matmul" in data["table"]
