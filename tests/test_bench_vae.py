"""VAE decode benchmark: parity before timing, interleaved clocks, reference vs executed FLOPs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from wanbench.wan_core.config import WAN21_VAE, WAN22_VAE  # noqa: E402
from wanbench.wan_core.flops import vae_flops  # noqa: E402

from bench.bench_vae import (  # noqa: E402
    OURS,
    check_parity,
    compare_at,
    executed_flops,
    latent_for,
    random_vae,
)


@pytest.mark.parametrize("config", [WAN21_VAE.tiny(), WAN22_VAE.tiny()], ids=["wan2.1", "wan2.2"])
def test_compare_at_checks_parity_and_compares_with_the_best_peer(config):
    model = random_vae(config)
    at = compare_at(model, (32, 32, 5), repeats=2, vae=config.variant, peers=["diffusers"], comfy=None,
                    measure_memory=False)
    assert at["best_peer"] == "diffusers"
    entries = {e["impl"]: e for e in at["entries"]}
    assert set(entries) == {"ours", "ours-whole-clip", "diffusers"}
    for e in entries.values():
        assert e["max_abs_diff_vs_ours"] <= 1e-4
        assert len(e["clocks"]["thread_cpu_s"]) == 2
    ours = entries["ours"]
    assert ours["vs"]["diffusers"]["thread_cpu_s"]["verdict"] in ("faster", "on par", "slower")
    # diffusers computes the official algorithm: executed == reference; ours skips known-zero work
    assert entries["diffusers"]["executed_flops"] == ours["reference_flops"]
    assert ours["reference_flops"] == vae_flops(config, "decode", tuple(latent_for(config, (32, 32, 5)).shape))
    assert 0.5 < ours["executed_share_of_reference"] < 1.0


def test_parity_check_refuses_a_decoder_that_computes_something_else():
    good = torch.zeros(1, 3, 5, 8, 8)
    with pytest.raises(AssertionError, match="not timing"):
        check_parity({OURS: good, "other": good + 0.5})
    assert check_parity({OURS: good, "same": good.clone()}) == {OURS: 0.0, "same": 0.0}


def test_executed_flops_of_ours_and_diffusers_on_the_meta_device():
    model = random_vae(WAN21_VAE.tiny())
    shape = (1, 16, 1, 2, 2)
    reference = vae_flops(model.config, "decode", shape)
    assert executed_flops(model, "diffusers", shape, None) == reference
    one_frame = executed_flops(model, OURS, shape, None)
    assert one_frame < 0.5 * reference  # one frame: every conv runs one of its three temporal taps
