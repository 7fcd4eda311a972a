"""The step-cache benchmark: figures follow from the raw times, the results file is complete."""

from __future__ import annotations

import json
import statistics

import pytest

from bench.bench_step_cache import main


def test_main_writes_consistent_figures(tmp_path):
    main(["--task", "ti2v-5B", "--dim", "64", "--layers", "1", "--steps", "6", "--latent", "2", "8", "8",
          "--repeats", "3", "--name", "cache", "--results-dir", str(tmp_path)])
    data = json.loads((tmp_path / "cache.json").read_text())
    assert data["benchmark"] == "cache" and data["machine"]["cpu"]
    runs, summary = data["runs"], data["summary"]
    assert set(runs["raw"]) == {"off", "teacache_threshold_0", "magcache_max_reuse"}
    for name, raw in runs["raw"].items():
        assert len(raw["wall_s"]) == len(raw["cpu_s"]) == 3
        assert summary["runs"][name]["wall_s"]["median_s"] == pytest.approx(statistics.median(raw["wall_s"]))
    # threshold 0 computes every step and changes nothing; max reuse computes steps 0, 3 and 5 of 6
    assert runs["computed_steps"] == {"off": 6, "teacache_threshold_0": 6, "magcache_max_reuse": 3}
    assert runs["latent_rel_l2"]["teacache_threshold_0"] == 0.0 < runs["latent_rel_l2"]["magcache_max_reuse"]
    decision = data["decision"]
    assert decision["tokens"] == 27280 and len(decision["wall_s"]) == 3  # TI2V-5B 1280x704x121: 31 x 22 x 40
    assert decision["flops_real_step"] > 1e14
