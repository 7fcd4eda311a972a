"""DiT side-by-side benchmark: the diffusers twin shares our weights and computes the same thing."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from wanbench.wan_core.dit import WanDiT  # noqa: E402

from bench.bench_dit import (  # noqa: E402
    CPU_CASES,
    TINY_CASES,
    build_wan_dit,
    check_parity,
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
    fns = forward_fns(ours, {"diffusers": theirs}, make_inputs(CASE, device="cpu", dtype=torch.float32))
    out_ours, out_theirs = fns["ours"](), fns["diffusers"]()
    assert out_ours.shape == (CASE.batch, CASE.out_dim, *CASE.latent_thw)
    torch.testing.assert_close(out_ours, out_theirs.float(), rtol=1e-4, atol=1e-4)


def test_padded_and_full_text_cases_count_what_each_side_computes():
    padded, full = CPU_CASES["mid"], CPU_CASES["mid_full"]
    assert (padded.num_text_rows, full.num_text_rows) == (64, 512)
    assert padded.flops == full.flops  # the reference computes all 512 rows either way
    assert full.executed_flops == full.flops
    cfg = padded.config()
    assert padded.executed_flops == cfg.flops_forward(padded.num_tokens, batch=padded.batch, num_text_rows=65)
    assert padded.executed_flops < padded.flops
    inputs = make_inputs(padded, device="cpu", dtype=torch.float32)
    nonzero = inputs["context"].ne(0).any(-1).sum(-1)
    assert nonzero.tolist() == [64] * padded.batch


def test_parity_check_refuses_a_peer_that_computes_something_else():
    ours = build_wan_dit(CASE.config(), device="cpu", dtype=torch.float32)
    other = build_wan_dit(CASE.config(), device="cpu", dtype=torch.float32, seed=7)
    fns = forward_fns(ours, {"other": other}, make_inputs(CASE, device="cpu", dtype=torch.float32))
    with pytest.raises(AssertionError, match="disagree"):
        check_parity(fns, torch.float32)


def test_run_case_reports_consistent_figures():
    result = run_case(CASE, repeats=2, warmup=1)
    for impl in ("ours", "diffusers"):
        for clock in ("wall_s", "thread_cpu_s", "process_cpu_s"):
            assert len(result["clocks"][impl][clock]) == 2
            assert all(v > 0 for v in result["clocks"][impl][clock])
        median = result["stats"][impl]["thread_cpu_s"]["median_s"]
        assert result["gflops_executed_thread_cpu"][impl] == pytest.approx(
            result["executed_flops"][impl] / median / 1e9)
    vs = result["vs"]["diffusers"]["thread_cpu_s"]
    stats = result["stats"]
    ratio = stats["diffusers"]["thread_cpu_s"]["median_s"] / stats["ours"]["thread_cpu_s"]["median_s"]
    assert vs["ratio_of_medians"] == pytest.approx(ratio)
    assert vs["speedup"] == pytest.approx(sorted(vs["round_ratios"])[0] / 2 + sorted(vs["round_ratios"])[1] / 2)
    assert vs["verdict"] in ("faster", "on par", "slower")
    assert result["best_peer"] == "diffusers"
    assert result["output_diff"]["diffusers"]["max_abs"] < 1e-4


def test_main_writes_results_and_profile(tmp_path):
    main(["--cases", "tiny", "--repeats", "1", "--warmup", "0", "--ceiling-sizes", "32", "--profile", "tiny",
          "--breakdown", "tiny", "--name", "dit", "--results-dir", str(tmp_path), "--comfyui", "none"])
    data = json.loads((tmp_path / "dit.json").read_text())
    assert [r["case"]["name"] for r in data["results"]] == ["tiny"]
    assert data["matmul_ceiling"]["best_gflops"] > 0
    assert data["settings"]["comfyui"] is None
    for impl in ("ours", "diffusers"):
        top = data["profile"][impl]["top"]
        assert top and all(e["self_cpu_ms"] >= 0 for e in top)
    assert set(data["breakdown"]["components"]) == {"self_attn", "cross_attn", "ffn", "block", "embed"}
    assert data["load_average_1m"]["before"] is None or data["load_average_1m"]["before"] >= 0
