"""Checkpoint edge cases: corrupt config.json, legacy .pth files, invalid detected configs, expert
checks before loading, and Wan2.1 I2V files."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from wanbench.wan_core.checkpoints import io as checkpoint_io
from wanbench.wan_core.checkpoints.dit import (
    detect_dit_config,
    dit_to_diffusers,
    load_dit,
    load_experts,
    read_dit_config,
    save_dit,
)
from wanbench.wan_core.checkpoints.io import COMFY_DIT_PREFIX, OFFICIAL_CONFIG_NAME, read_state_dict
from wanbench.wan_core.config import preset
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.errors import CheckpointError


@pytest.fixture(scope="module")
def t2v() -> WanDiT:
    torch.manual_seed(3)
    return WanDiT(preset("t2v", tiny=True).dit).eval()


@pytest.fixture(scope="module")
def i2v() -> WanDiT:
    torch.manual_seed(4)
    return WanDiT(preset("i2v", tiny=True).dit).eval()


def _same_weights(a: WanDiT, b: WanDiT) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# --------------------------------------------------------------------------------------------
# config.json that is not JSON
# --------------------------------------------------------------------------------------------
def test_corrupt_config_json_names_file_error_and_fix(tmp_path: Path, t2v: WanDiT) -> None:
    folder = save_dit(t2v, tmp_path / "official", layout="official", dtype=torch.float32)
    config = folder / OFFICIAL_CONFIG_NAME
    config.write_text('{"dim": 64, "num_heads": 4,', encoding="utf-8")  # cut off mid-object
    with pytest.raises(CheckpointError) as info:
        load_dit(folder)
    message = str(info.value)
    assert str(config) in message and "not valid JSON" in message
    assert "Expecting" in message  # the parse error itself
    assert "re-download" in message and "num_heads" in message  # the fix
    assert isinstance(info.value.__cause__, json.JSONDecodeError)

    config.write_text("[64, 4]", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"config.json holds a JSON list, expected an object"):
        load_dit(folder)


# --------------------------------------------------------------------------------------------
# Legacy (non-zip) torch.save files
# --------------------------------------------------------------------------------------------
def test_legacy_pth_loads_tensors_only(tmp_path: Path, t2v: WanDiT) -> None:
    path = tmp_path / "legacy.pth"
    torch.save(t2v.state_dict(), path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"  # a bare pickle, not a zip archive
    sd = read_state_dict(path)
    assert sd.keys() == t2v.state_dict().keys()
    _same_weights(load_dit(path, num_heads=t2v.config.num_heads), t2v)


def test_legacy_pth_with_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil_legacy.pth"
    torch.save({"w": torch.ones(1), "when": datetime.date(2024, 1, 1)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="objects other than tensors.*weights_only"):
        read_state_dict(path)


def test_truncated_legacy_pth_says_what_it_is(tmp_path: Path, t2v: WanDiT) -> None:
    path = tmp_path / "cut.pth"
    torch.save(t2v.state_dict(), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"legacy \(non-zip.*truncated or corrupt: re-download"):
        read_state_dict(path)


# --------------------------------------------------------------------------------------------
# Detected configs that DiTConfig rejects
# --------------------------------------------------------------------------------------------
def test_invalid_detected_config_is_a_checkpoint_error(t2v: WanDiT) -> None:
    sd = t2v.state_dict()
    with pytest.raises(CheckpointError) as info:
        detect_dit_config(sd, num_heads=3)  # dim 64 is not divisible by 3
    message = str(info.value)
    assert "invalid DiT config" in message and "divisible by num_heads (3)" in message
    assert "'dim': 64" in message and "num_heads from the num_heads argument" in message
    assert "pass num_heads=" in message
    with pytest.raises(CheckpointError, match=r"head dim must be even.*num_heads from config.json"):
        detect_dit_config(sd, extra={"num_heads": 64})  # head dim 1


# --------------------------------------------------------------------------------------------
# Experts are checked from headers before any tensor is read
# --------------------------------------------------------------------------------------------
def test_expert_mismatch_is_found_before_loading(tmp_path: Path, t2v: WanDiT, i2v: WanDiT,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    high = save_dit(t2v, tmp_path / "high.safetensors")
    low = save_dit(i2v, tmp_path / "low.safetensors")

    def no_tensor_reads(file: Path) -> dict[str, torch.Tensor]:
        raise AssertionError(f"tensor data of {file} was read before the experts were compared")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_io, "_read_safetensors", no_tensor_reads)
        with pytest.raises(CheckpointError, match="experts differ.*high is t2v, low is i2v"):
            load_experts(high, low)
        assert read_dit_config(high) == t2v.config
    same = save_dit(t2v, tmp_path / "low_t2v.safetensors", dtype=torch.float32)
    models = load_experts(high, same)
    assert len(models) == 2
    _same_weights(models[1], t2v)


@pytest.mark.parametrize(("layout", "name", "fp8"), [
    ("official", None, False), ("comfy_prefixed", "m.safetensors", True), ("diffusers", None, False),
    ("diffusers", "d.safetensors", False),
])
def test_header_config_equals_full_read(tmp_path: Path, i2v: WanDiT, layout: str, name: str | None,
                                        fp8: bool) -> None:
    path = save_dit(i2v, tmp_path / (name or "folder"), layout=layout, fp8_scaled=fp8,
                    dtype=torch.float16 if fp8 else torch.float32)
    assert read_dit_config(path) == load_dit(path).config == i2v.config


# --------------------------------------------------------------------------------------------
# Wan2.1 image-to-video files
# --------------------------------------------------------------------------------------------
def _wan21_i2v_state_dict(i2v: WanDiT) -> dict[str, torch.Tensor]:
    """The tiny i2v DiT plus Wan2.1's CLIP image branch (`img_emb`, `k_img`/`v_img` per block)."""
    sd = dict(i2v.state_dict())
    dim = i2v.config.dim
    sd["img_emb.proj.0.weight"] = torch.ones(1280)
    sd["img_emb.proj.1.weight"] = torch.zeros(dim, 1280)
    for b in range(i2v.config.num_layers):
        for name in ("k_img", "v_img"):
            sd[f"blocks.{b}.cross_attn.{name}.weight"] = torch.zeros(dim, dim)
        sd[f"blocks.{b}.cross_attn.norm_k_img.weight"] = torch.ones(dim)
    return sd


@pytest.mark.parametrize("variant", ["official", "comfy_prefixed", "diffusers"])
def test_wan21_i2v_file_is_named_as_such(tmp_path: Path, i2v: WanDiT, variant: str) -> None:
    sd = _wan21_i2v_state_dict(i2v)
    if variant == "comfy_prefixed":
        sd = {COMFY_DIT_PREFIX + k: v for k, v in sd.items()}
    elif variant == "diffusers":
        sd = dit_to_diffusers(i2v.state_dict())
        sd["condition_embedder.image_embedder.ff.net.0.proj.weight"] = torch.zeros(4, 4)
        sd["blocks.0.attn2.add_k_proj.weight"] = torch.zeros(4, 4)
    path = tmp_path / "wan2.1_i2v_480p_14B_fp16.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    expected = r"Wan2\.1 image-to-video DiT.*runs Wan2\.2 models only.*Wan2\.2 I2V-A14B.*TI2V-5B"
    with pytest.raises(CheckpointError, match=expected):
        load_dit(path, num_heads=i2v.config.num_heads)
    with pytest.raises(CheckpointError, match=expected):
        load_experts(path, path, num_heads=i2v.config.num_heads)
