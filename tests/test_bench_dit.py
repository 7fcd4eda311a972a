"""DiT side-by-side benchmark: the diffusers twin shares our weights and computes the same thing."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from wanbench.wan_core.dit import WanDiT  # noqa: E402

from bench.bench_dit import (  # noqa: E402
    TINY_CASES,
    build_wan_dit,
    diffusers_twin,
    forward_fns,
    main,
    make_inputs,
    random_init_,
    run_case,
)

CASE = TINY_CASES["tiny"]


def test_random_weights_are_built_on_the_device_and_are_finite():
    model = build_wan_dit(CASE.config(), device="cpu", dtype=torch.float32, seed=1)
    for name, param in model.named_parameters():
        assert param.device.type == "cpu" and torch.isfinite(param).all(), name
        assert param.float().std() > 0 or param.numel() == 1, name
    again = build_wan_dit(CASE.config(), device="cpu", dtype=torch.float32, seed=1)
    torch.testing.assert_close(model.state_dict(), again.state_dict(), rtol=0, atol=0)


def test_random_init_refuses_meta_parameters():
    with torch.device("meta"):
        model = WanDiT(CASE.config())
    with pytest.raises(ValueError, match="to_empty"):
        random_init_(model)


def test_diffusers_twin_shares_tensors_and_matches_our_forward():
    ours = build_wan_dit(CASE.config(), device="cpu", dtype=torch.float32)
    theirs = diffusers_twin(ours)
    assert ours.blocks[0].self_attn.q.weight.data_ptr() == theirs.blocks[0].attn1.to_q.weight.data_ptr()
    assert ours.blocks[1].norm3.weight.data_ptr() == theirs.blocks[1].norm2.weight.data_ptr()
    fns = forward_fns(ours, theirs, make_inputs(CASE, device="cpu", dtype=torch.float32))
    out_ours, out_theirs = fns["ours"](), fns["diffusers"]()
    assert out_ours.shape == (CASE.batch, CASE.out_dim, *CASE.latent_thw)
    torch.testing.assert_close(out_ours, out_theirs.float(), rtol=1e-4, atol=1e-4)


def test_run_case_reports_consistent_figures():
    result = run_case(CASE, repeats=2, warmup=1)
    for impl in ("ours", "diffusers"):
        assert len(result["times_s"][impl]) == 2
        assert result["gflops"][impl] == pytest.approx(CASE.flops / result["stats"][impl]["median_s"] / 1e9)
    ratio = result["stats"]["diffusers"]["median_s"] / result["stats"]["ours"]["median_s"]
    assert result["speedup_vs_diffusers"] == pytest.approx(ratio)
    assert result["output_diff"]["max_abs"] < 1e-4


def test_main_writes_results_and_profile(tmp_path):
    main(["--cases", "tiny", "--repeats", "1", "--warmup", "0", "--ceiling-sizes", "32", "--profile", "tiny",
          "--breakdown", "tiny", "--name", "dit", "--results-dir", str(tmp_path)])
    data = json.loads((tmp_path / "dit.json").read_text())
    assert [r["case"]["name"] for r in data["results"]] == ["tiny"]
    assert data["matmul_ceiling"]["best_gflops"] > 0
    for impl in ("ours", "diffusers"):
        top = data["profile"][impl]["top"]
        assert top and all(e["self_cpu_ms"] >= 0 for e in top)
    assert set(data["breakdown"]["components"]) == {"self_attn", "cross_attn", "ffn", "block", "embed"}
    assert data["load_average_1m"]["before"] is None or data["load_average_1m"]["before"] >= 0
