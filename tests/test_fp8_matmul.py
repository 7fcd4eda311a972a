"""fp8 matmul linears (`torch._scaled_mm`, tested on the CPU build for correctness): error against the
dequantised path, both activation scalings, the swap and its undo, LoRA refusal, the GPU check."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from wanbench.wan_core.checkpoints.dit import load_dit, save_dit
from wanbench.wan_core.config import preset
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.runtime import fp8_matmul as mm
from wanbench.wan_core.runtime.compact import compact_weights_of, store_fp8
from wanbench.wan_core.runtime.fp8_matmul import (
    ACTIVATION_ERROR_BOUND,
    Fp8Linear,
    apply_fp8_matmul,
    check_fp8_matmul_device,
    weight_patch_problem,
)

CFG = dataclasses.replace(preset("t2v", tiny=True).dit, dim=128, ffn_dim=256, num_heads=4, num_layers=2)


def model_with_fp8(dtype: torch.dtype = torch.bfloat16) -> WanDiT:
    torch.manual_seed(0)
    model = WanDiT(CFG).eval().to(dtype)
    store_fp8(model)
    return model


@pytest.mark.parametrize("activation", ["row", "tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_linear_is_within_the_stated_error_of_the_dequantised_path(activation: str, dtype: torch.dtype) -> None:
    model = model_with_fp8(dtype)
    linear = model.blocks[0].ffn[0]
    entry = compact_weights_of(model).entry(linear.weight)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 37, CFG.dim, generator=g) * torch.linspace(0.1, 3, 37)[:, None]).to(dtype)  # varied rows
    dequantised = F.linear(x, entry.decoded(), linear.bias)
    got = Fp8Linear(linear, entry.format.scale, activation=activation)(x)
    assert got.dtype == dtype and got.shape == dequantised.shape
    rel = ((got.float() - dequantised.float()).norm() / dequantised.float().norm()).item()
    assert rel < ACTIVATION_ERROR_BOUND, rel
    assert rel > 0  # the activations really went through fp8


@torch.no_grad()
def test_model_runs_as_fp8_matmuls_and_comes_back(tmp_path: Path) -> None:
    model = model_with_fp8()
    x, t, ctx = torch.randn(1, 16, 2, 8, 8), torch.tensor([500]), [torch.randn(5, CFG.text_dim)]
    dequantised = model(x, t, ctx)
    handle = apply_fp8_matmul(model)
    assert handle.num_layers == 2 * 10  # q, k, v, o of both attentions and the two FFN matrices, per block
    assert isinstance(model.blocks[1].self_attn.q, Fp8Linear)
    assert set(model.state_dict()) == set(WanDiT(CFG).state_dict())  # keys unchanged
    out = model(x, t, ctx)
    assert model.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn  # stays fp8 inside the forward too
    rel = ((out - dequantised).norm() / dequantised.norm()).item()
    assert 0 < rel < ACTIVATION_ERROR_BOUND, rel
    handle.remove()
    assert isinstance(model.blocks[1].self_attn.q, torch.nn.Linear)
    assert torch.equal(model(x, t, ctx), dequantised)


def test_loader_option_gives_fp8_matmul_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = save_dit(WanDiT(CFG), tmp_path / "fp8.safetensors", dtype=torch.float16, fp8_scaled=True)
    model = load_dit(path, dtype=torch.bfloat16, storage="fp8_e4m3fn_scaled_mm")
    assert isinstance(model.blocks[0].cross_attn.v, Fp8Linear)
    assert weight_patch_problem(model) is not None and "fp8_e4m3fn_scaled" in weight_patch_problem(model)
    assert weight_patch_problem(load_dit(path, dtype=torch.bfloat16, storage="fp8_e4m3fn_scaled")) is None


def test_a_patched_weight_is_refused_with_the_fix() -> None:
    model = model_with_fp8()
    apply_fp8_matmul(model)
    layer = model.blocks[0].ffn[2]
    layer.weight.data = torch.zeros(layer.weight.shape, dtype=torch.bfloat16)  # what a LoRA merge would do
    with pytest.raises(RuntimeError, match="LoRA.*need storage 'fp8_e4m3fn_scaled'"):
        layer(torch.zeros(1, CFG.ffn_dim, dtype=torch.bfloat16))


def test_needs_compact_fp8_weights_and_a_valid_scaling() -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="needs the block weights kept in fp8"):
        apply_fp8_matmul(WanDiT(CFG))
    with pytest.raises(ValueError, match="activation scaling must be one of"):
        apply_fp8_matmul(model_with_fp8(), activation="block")


def test_gpus_without_fp8_tensor_cores_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mm.torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(mm.torch.cuda, "get_device_name", lambda device=None: "NVIDIA RTX A6000")
    with pytest.raises(ValueError, match=r"capability >= 8.9.*RTX A6000 has 8.6.*fp8_e4m3fn_scaled"):
        check_fp8_matmul_device("cuda:0")
    monkeypatch.setattr(mm.torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_matmul_device("cuda:0")  # Hopper: accepted
