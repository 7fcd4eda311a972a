"""Wan LoRA and the Wan Sampler's schedule inputs through the node classes, on the tiny models:
chaining, an immutable shared bundle, the 4-step recipe split over two samplers as ComfyUI's
templates do, denoise from an input latent, the report's LoRA facts, and readable errors.
"""

from __future__ import annotations

import types

import pytest
import torch
from wanbench.nodes.context import Bridge, use_bridge
from wanbench.nodes.encoder_loaders import WanTextEncoderLoader, WanVAELoader
from wanbench.nodes.latents import WanEmptyLatent
from wanbench.nodes.loaders import WanModelLoader
from wanbench.nodes.lora import WanLora
from wanbench.nodes.sampling import LATENT_CONTINUATION, WanSampler
from wanbench.nodes.text import WanTextEncode
from wanbench.nodes.validation import input_problems
from wanbench.wan_core.errors import CheckpointError

T2V_HIGH = "wanbench_tiny_t2v_high_noise_14B_fp16.safetensors"
T2V_LOW = "wanbench_tiny_t2v_low_noise_14B_fp16.safetensors"
TI2V_DIT = "wanbench_tiny_ti2v_5B_fp16.safetensors"
LORA_HIGH = "wanbench_tiny_t2v_4steps_lora_high_noise.safetensors"
LORA_LOW = "wanbench_tiny_t2v_4steps_lora_low_noise.safetensors"
LORA_I2V_HIGH = "wanbench_tiny_i2v_4steps_lora_high_noise.safetensors"
RECIPE = {"seed": 3, "steps": 4, "shift": 5.0, "boundary": 0.875, "guidance_high": 1.0, "guidance_low": 1.0,
          "solver": "euler_distill", "batched_cfg": True, "placement": "none", "resident_blocks": 0}


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from wanbench.tiny_models import make_tiny_models

    root = tmp_path_factory.mktemp("tiny_models")
    make_tiny_models(root, seed=0)
    bridge = Bridge.for_models_root(root, tmp_path_factory.mktemp("tiny_out"))
    with use_bridge(bridge):
        (encoder,) = WanTextEncoderLoader().load("wanbench_tiny_umt5_xxl_fp16.safetensors", "float32", "cpu")
        (embeds,) = WanTextEncode().encode(encoder, "a fox in the snow", "")
        (vae,) = WanVAELoader().load("wanbench_tiny_wan_2.1_vae.safetensors", "float32", "cpu")
        (model,) = WanModelLoader().load(T2V_HIGH, T2V_LOW, "float32", "sdpa", "cpu")
        (latent,) = WanEmptyLatent().make(vae, 32, 32, 5)
    return types.SimpleNamespace(bridge=bridge, embeds=embeds, vae=vae, model=model, latent=latent)


def _lora(tiny, model, name, high, low):
    with use_bridge(tiny.bridge):
        return WanLora().apply(model, name, high, low)[0]


def _sample(tiny, model, latent, **kw):
    args = {**RECIPE, **kw}
    return WanSampler().sample(model, tiny.embeds, latent, **args)["result"][0]


def test_lora_node_returns_a_new_bundle_and_leaves_the_input_unchanged(tiny) -> None:
    plain = _sample(tiny, tiny.model, tiny.latent)["samples"]
    with_high = _lora(tiny, tiny.model, LORA_HIGH, 1.0, 0.0)
    both = _lora(tiny, with_high, LORA_LOW, 0.0, 1.0)
    assert tiny.model.loras == () and len(with_high.loras) == 1 and len(both.loras) == 2
    assert both.experts == tiny.model.experts, "the modules are shared, never copied"
    patched = _sample(tiny, both, tiny.latent)["samples"]
    assert not torch.allclose(patched, plain, atol=1e-4)
    assert torch.equal(_sample(tiny, tiny.model, tiny.latent)["samples"], plain), "the shared base is untouched"
    assert torch.equal(_sample(tiny, both, tiny.latent)["samples"], patched), "re-running applies nothing twice"
    reordered = _lora(tiny, _lora(tiny, tiny.model, LORA_LOW, 0.0, 1.0), LORA_HIGH, 1.0, 0.0)
    torch.testing.assert_close(_sample(tiny, reordered, tiny.latent)["samples"], patched, rtol=1e-5, atol=1e-6)
    lines = both.lora_descriptions()
    assert lines[0].startswith(f"{LORA_HIGH} (high 1, low 0; comfy:") and "94 of 94 keys" in lines[0]
    assert lines[1].startswith(f"{LORA_LOW} (high 0, low 1; comfy: lora_up/lora_down;")


def test_template_split_over_two_samplers_equals_one_sampler(tiny) -> None:
    """ComfyUI's 14B templates: sampler 1 runs steps 0-2 with leftover noise, sampler 2 (add_noise
    off) the rest."""
    model = _lora(tiny, _lora(tiny, tiny.model, LORA_HIGH, 1.0, 0.0), LORA_LOW, 0.0, 1.0)
    whole = _sample(tiny, model, tiny.latent)
    high = _sample(tiny, model, tiny.latent, end_step=2)
    assert LATENT_CONTINUATION in high
    low = _sample(tiny, model, high, start_step=2, add_noise=False, seed=0)
    assert torch.equal(low["samples"], whole["samples"])
    assert LATENT_CONTINUATION not in low


def test_denoise_below_one_reads_the_input_latent(tiny) -> None:
    source = _sample(tiny, tiny.model, tiny.latent, solver="unipc", steps=3, guidance_high=4.0, guidance_low=3.0)
    a = _sample(tiny, tiny.model, source, denoise=0.5)
    b = _sample(tiny, tiny.model, {"samples": source["samples"] * 0.5}, denoise=0.5)
    assert not torch.allclose(a["samples"], b["samples"])
    full = _sample(tiny, tiny.model, {"samples": source["samples"] * 0.5})
    assert torch.equal(full["samples"], _sample(tiny, tiny.model, tiny.latent)["samples"])


def test_explicit_timesteps_equal_the_distill_schedule(tiny) -> None:
    by_solver = _sample(tiny, tiny.model, tiny.latent)
    by_list = _sample(tiny, tiny.model, tiny.latent, timesteps="1000, 750, 500, 250")
    by_sigmas = _sample(tiny, tiny.model, tiny.latent, sigmas="1.0 0.9375 0.8333333 0.625 0")
    assert torch.equal(by_list["samples"], by_solver["samples"])
    torch.testing.assert_close(by_sigmas["samples"], by_solver["samples"], rtol=1e-5, atol=1e-5)


def test_sampler_schedule_input_errors_name_the_fix(tiny) -> None:
    with pytest.raises(ValueError, match="steps is 4 but timesteps lists 3 steps; set steps to 3"):
        _sample(tiny, tiny.model, tiny.latent, timesteps="1000 500 250")
    with pytest.raises(ValueError, match="give steps \\+ 1 = 5 sigmas"):
        _sample(tiny, tiny.model, tiny.latent, sigmas="1 0.5 0")
    with pytest.raises(ValueError, match="'abc' is not a number"):
        _sample(tiny, tiny.model, tiny.latent, timesteps="1000, abc")
    with pytest.raises(ValueError, match="start_step must be an integer in \\[0, steps - 1\\] = \\[0, 3\\]"):
        _sample(tiny, tiny.model, tiny.latent, start_step=4)
    with pytest.raises(ValueError, match="end_step must be an integer in \\(start_step, steps\\] = \\(2, 4\\]"):
        _sample(tiny, tiny.model, tiny.latent, start_step=2, end_step=2)
    assert input_problems(WanSampler, {"denoise": 0.0}) == [("denoise", "denoise: 0.0 is below the minimum 0.01")]
    assert WanSampler.VALIDATE_INPUTS(timesteps="1, x").startswith("timesteps must be numbers")


def test_lora_node_errors(tiny) -> None:
    with pytest.raises(CheckpointError, match="does not fit this model"):
        _lora(tiny, tiny.model, LORA_I2V_HIGH, 1.0, 1.0)  # an I2V LoRA (in_dim 36) on T2V experts
    with use_bridge(tiny.bridge):
        with pytest.raises(FileNotFoundError, match="not found"):
            WanLora().apply(tiny.model, "missing.safetensors", 1.0, 1.0)
        with pytest.raises(ValueError, match="strength_high: 1000.0 is above the maximum 100.0"):
            WanLora().apply(tiny.model, LORA_HIGH, 1000.0, 1.0)
        (ti2v,) = WanModelLoader().load(TI2V_DIT, "none", "float32", "sdpa", "cpu")
        lora_ti2v = WanLora().apply(ti2v, LORA_LOW, 0.5, 7.0)[0]  # blocks only: the tiny widths agree
    assert lora_ti2v.loras[0].strengths == (0.5,), "TI2V-5B takes strength_high as its only strength"
    assert lora_ti2v.lora_descriptions()[0].startswith(f"{LORA_LOW} (model 0.5;")
    assert "lora_name" in WanLora.INPUT_TYPES()["required"]
