"""Checkpoint reading/writing: every DiT layout round-trips, config detection, and bad files."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from wanbench.wan_core.checkpoints.dit import detect_dit_config, load_dit, load_experts, save_dit
from wanbench.wan_core.checkpoints.io import read_state_dict, write_safetensors
from wanbench.wan_core.config import I2V_A14B, T2V_A14B, TI2V_5B, preset
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.errors import CheckpointError


@pytest.fixture(scope="module")
def tiny_model() -> WanDiT:
    torch.manual_seed(2)
    return WanDiT(preset("t2v", tiny=True).dit).eval()


@pytest.fixture(scope="module")
def tiny_io(tiny_model: WanDiT) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    t = torch.tensor([700])
    ctx = [torch.randn(6, tiny_model.config.text_dim, generator=g)]
    with torch.no_grad():
        ref = tiny_model(x, t, ctx)
    return x, t, ctx, ref


# layout, dtype, fp8, file name (None: a folder), max relative error vs the fp32 model
LAYOUTS = [
    ("official", torch.float32, False, None, 1e-6),
    ("comfy", torch.float16, False, "m.safetensors", 2e-3),
    ("comfy", torch.bfloat16, False, "m.safetensors", 1.5e-2),
    ("comfy_prefixed", torch.float16, False, "m.safetensors", 2e-3),
    ("comfy", torch.float16, True, "m.safetensors", 3e-2),
    ("comfy_prefixed", torch.bfloat16, True, "m.safetensors", 3e-2),
    ("diffusers", torch.float32, False, None, 1e-6),
    ("diffusers", torch.float32, False, "m.safetensors", 1e-6),
]


@pytest.mark.parametrize(("layout", "dtype", "fp8", "name", "max_rel"), LAYOUTS,
                         ids=[f"{lay}-{str(dt)[6:]}{'-fp8' if f8 else ''}-{'file' if n else 'folder'}"
                              for lay, dt, f8, n, _ in LAYOUTS])
def test_layout_round_trip(tmp_path: Path, tiny_model: WanDiT, tiny_io, layout, dtype, fp8, name,
                           max_rel) -> None:
    x, t, ctx, ref = tiny_io
    target = save_dit(tiny_model, tmp_path / (name or "model"), layout=layout, dtype=dtype, fp8_scaled=fp8)
    model = load_dit(target)
    assert model.config == tiny_model.config
    with torch.no_grad():
        out = model(x, t, ctx)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel <= max_rel, f"{layout} {dtype} fp8={fp8}: relative error {rel:.2e} > {max_rel:.0e}"
    assert not list(tmp_path.rglob("*.tmp")), "temporary files left behind"


def test_official_folder_layout(tmp_path: Path, tiny_model: WanDiT) -> None:
    folder = save_dit(tiny_model, tmp_path / "high_noise_model", layout="official", dtype=torch.float32)
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["dim"], config["num_heads"]) == ("t2v", 64, 4)
    sd = read_state_dict(folder / "diffusion_pytorch_model.safetensors.index.json")
    assert set(sd) == set(tiny_model.state_dict())


def test_fp8_scaled_file_contents(tmp_path: Path, tiny_model: WanDiT) -> None:
    path = save_dit(tiny_model, tmp_path / "fp8.safetensors", layout="comfy_prefixed", fp8_scaled=True)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        q = f.get_tensor("model.diffusion_model.blocks.0.self_attn.q.weight")
        scale = f.get_tensor("model.diffusion_model.blocks.0.self_attn.q.scale_weight")
        assert f.get_tensor("model.diffusion_model.scaled_fp8").dtype == torch.float8_e4m3fn
        assert f.get_tensor("model.diffusion_model.patch_embedding.weight").dtype == torch.float16
    assert all(k.startswith("model.diffusion_model.") for k in keys)
    assert q.dtype == torch.float8_e4m3fn and scale.ndim == 0
    original = tiny_model.state_dict()["blocks.0.self_attn.q.weight"]
    torch.testing.assert_close(scale, original.abs().max() / 448.0)
    sd = read_state_dict(path)
    assert "scaled_fp8" not in sd and not any(k.endswith(".scale_weight") for k in sd)
    assert sd["blocks.0.self_attn.q.weight"].dtype == torch.float32
    rel = (sd["blocks.0.self_attn.q.weight"] - original).abs().max() / original.abs().max()
    assert rel < 0.07  # e4m3 keeps 3 mantissa bits: at most half a step (1/16) of the largest value


def test_read_state_dict_casts_and_strips_prefix(tmp_path: Path) -> None:
    tensors = {"model.diffusion_model.a": torch.randn(3), "model.diffusion_model.n": torch.arange(3),
               "first_stage_model.b": torch.randn(2)}
    path = write_safetensors(tensors, tmp_path / "all.safetensors")
    sd = read_state_dict(path, dtype=torch.float16)
    assert set(sd) == {"a", "n"}
    assert sd["a"].dtype == torch.float16 and sd["n"].dtype == torch.int64
    other = read_state_dict(path, strip_prefixes=("first_stage_model.",))
    assert set(other) == {"b"}


def test_read_pth_and_folder(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2, 2)}, tmp_path / "m.pth")
    assert torch.equal(read_state_dict(tmp_path / "m.pth")["w"], torch.ones(2, 2))
    shards = tmp_path / "shards"
    write_safetensors({"a": torch.ones(1)}, shards / "part-1.safetensors")
    write_safetensors({"b": torch.zeros(1)}, shards / "part-2.safetensors")
    assert set(read_state_dict(shards)) == {"a", "b"}
    write_safetensors({"a": torch.ones(1)}, tmp_path / "dup.safetensors")
    with pytest.raises(CheckpointError, match="more than one file"):
        read_state_dict([shards / "part-1.safetensors", tmp_path / "dup.safetensors"])


@pytest.mark.parametrize("spec", [T2V_A14B, I2V_A14B, TI2V_5B], ids=lambda s: s.name)
def test_detect_real_size_configs(spec) -> None:
    """Shapes of the released models (built on the meta device, no memory) give back their preset."""
    with torch.device("meta"):
        sd = WanDiT(spec.dit).state_dict()
    assert detect_dit_config(sd) == spec.dit


def test_detect_tiny_needs_num_heads(tiny_model: WanDiT) -> None:
    sd = tiny_model.state_dict()
    with pytest.raises(CheckpointError, match="pass num_heads"):
        detect_dit_config(sd)
    assert detect_dit_config(sd, num_heads=4) == tiny_model.config


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_state_dict(tmp_path / "nope.safetensors")


def test_truncated_file(tmp_path: Path, tiny_model: WanDiT) -> None:
    path = save_dit(tiny_model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*re-download"):
        load_dit(path)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(bad)


def test_not_a_wan_dit(tmp_path: Path) -> None:
    path = tmp_path / "t5.safetensors"
    save_file({"encoder.block.0.layer.0.weight": torch.ones(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a Wan2.2 DiT.*blocks.0.self_attn.q.weight.*encoder.block"):
        load_dit(path)


def test_pickle_with_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(1), "when": datetime.date(2024, 1, 1)}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(path)


def test_experts_of_different_tasks(tmp_path: Path, tiny_model: WanDiT) -> None:
    high = save_dit(tiny_model, tmp_path / "high.safetensors")
    low = save_dit(WanDiT(preset("i2v", tiny=True).dit), tmp_path / "low.safetensors")
    with pytest.raises(CheckpointError, match="experts differ.*high is t2v, low is i2v"):
        load_experts(high, low)
    same = save_dit(tiny_model, tmp_path / "low2.safetensors")
    assert len(load_experts(high, same)) == 2


def test_shape_mismatch(tmp_path: Path, tiny_model: WanDiT) -> None:
    sd = dict(tiny_model.state_dict())
    sd["blocks.1.ffn.0.weight"] = torch.zeros(100, 64)
    path = save_dit(sd, tmp_path / "bad.safetensors", config=tiny_model.config)
    expected = r"shape mismatch for blocks.1.ffn.0.weight: expected \(128, 64\), got \(100, 64\)"
    with pytest.raises(CheckpointError, match=expected):
        load_dit(path)


def test_unknown_layout(tmp_path: Path, tiny_model: WanDiT) -> None:
    with pytest.raises(ValueError, match="unknown DiT layout"):
        save_dit(tiny_model, tmp_path / "x.safetensors", layout="onnx")
