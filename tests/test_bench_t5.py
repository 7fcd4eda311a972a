"""UMT5 side-by-side benchmark: the transformers twin shares our weights and encodes the same."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from bench.bench_t5 import CPU_CASES, TINY_CASES, build_encoder, main, make_inputs, transformers_twin  # noqa: E402

CASE = TINY_CASES["tiny"]


def test_transformers_twin_shares_tensors_and_matches_on_real_tokens():
    ours = build_encoder(CASE.config(), device="cpu", dtype=torch.float32)
    theirs = transformers_twin(ours)
    assert ours.token_embedding.weight.data_ptr() == theirs.shared.weight.data_ptr()
    assert ours.blocks[1].ffn.fc2.weight.data_ptr() == \
        theirs.encoder.block[1].layer[1].DenseReluDense.wo.weight.data_ptr()
    inputs = make_inputs(CASE, device="cpu")
    assert int(inputs["mask"].sum()) == CASE.batch * CASE.num_real_tokens
    with torch.inference_mode():
        a = ours(inputs["ids"], inputs["mask"])[:, : CASE.num_real_tokens]
        b = theirs(input_ids=inputs["ids"], attention_mask=inputs["mask"]).last_hidden_state
    torch.testing.assert_close(a, b[:, : CASE.num_real_tokens], rtol=1e-4, atol=1e-5)


def test_main_writes_consistent_results(tmp_path):
    main(["--cases", "tiny", "--repeats", "2", "--warmup", "0", "--name", "t5",
          "--results-dir", str(tmp_path), "--comfyui", "none"])
    data = json.loads((tmp_path / "t5.json").read_text())
    (result,) = data["results"]
    assert result["output_diff"]["transformers"]["max_abs"] < 1e-4
    for impl in ("ours", "transformers"):
        assert len(result["clocks"][impl]["thread_cpu_s"]) == 2
        median = result["stats"][impl]["thread_cpu_s"]["median_s"]
        assert result["gflops_executed_thread_cpu"][impl] == pytest.approx(
            result["executed_flops"][impl] / median / 1e9)
    assert result["vs"]["transformers"]["thread_cpu_s"]["ratio_of_medians"] == pytest.approx(
        result["stats"]["transformers"]["thread_cpu_s"]["median_s"]
        / result["stats"]["ours"]["thread_cpu_s"]["median_s"])
    # ours skips the padding positions: it computes 9 of 32 positions, the peer all of them
    assert result["executed_flops"]["ours"] < result["executed_flops"]["transformers"] == result["reference_flops"]


def test_full_cases_have_no_padding_to_skip():
    for name in ("small_full", "mid_full", "large_full"):
        case = CPU_CASES[name]
        assert case.num_real_tokens == case.num_positions
        assert case.executed_flops == case.flops
