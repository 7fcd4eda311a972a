"""The LoRA-cost benchmark: figures follow from the raw times, the results file is complete."""

from __future__ import annotations

import json
import statistics

import pytest

from bench.bench_lora import main


def test_main_writes_consistent_figures(tmp_path):
    payload = main(["--dim", "64", "--ffn-dim", "128", "--tokens", "16", "--rank", "4", "--repeats", "3",
                    "--name", "lora", "--results-dir", str(tmp_path)])
    data = json.loads((tmp_path / "lora.json").read_text())
    assert data["benchmark"] == "lora" and data["machine"]["cpu"]
    result, summary = data["result"], data["summary"]
    assert set(result["raw"]) == {"base", "lora", "base_1_token", "lora_1_token"}
    assert all(len(v["wall_s"]) == len(v["cpu_s"]) == 3 for v in result["raw"].values())
    for clock in ("wall_s", "cpu_s"):
        base = statistics.median(result["raw"]["base"][clock])
        lora = statistics.median(result["raw"]["lora"][clock])
        assert summary[clock]["overhead_pct"] == pytest.approx(100 * (lora - base) / base)
    # 2 matrices of 64x64 per attention x 4 x 2 attentions, and the FFN's 64x128 twice: 2 * rank * numel
    assert result["flops_lora"] == 2 * 4 * (8 * 64 * 64 + 2 * 64 * 128)
    assert summary["flops_ratio_pct"] == pytest.approx(100 * result["flops_lora"] / result["flops_block"])
    assert result["peak_extra_bytes"] is None, "no allocator figure on the CPU: n/a, never 0"
    assert result["config"]["tokens"] == 16 and payload["summary"] == summary
