"""UMT5 encoder parity with the golden fixtures (official code, fp32 CPU), read through the manifest.

Every fixture of kind `umt5_encoder` is checked (final output, per-layer outputs, layer-0 bias by
offset), and every `ops` fixture that carries a T5 bucket map. The fixture folder comes from
WANBENCH_GOLDEN_DIR; configs and tolerances come from the manifest.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import assert_close_manifest, fixture_params, golden_dir, golden_params, manifest_fixtures
from safetensors.torch import load_file
from wanbench.wan_core.checkpoints.t5 import detect_t5_config, read_t5_state_dict
from wanbench.wan_core.t5 import UMT5Encoder, relative_position_bucket

T5_FIXTURES = fixture_params(kind_prefix="umt5_encoder")
BUCKET_FIXTURES = golden_params(
    lambda: [pytest.param(f, id=f["name"]) for f in manifest_fixtures(kind_prefix="ops")
             if any(t["name"].startswith("t5_bucket.") for file in f["files"] for t in file.get("tensors", []))],
    fail_id="golden-missing-t5_bucket")


def _file_with_role(fixture: dict, role: str) -> str:
    for file in fixture["files"]:
        if any(t["role"] == role for t in file.get("tensors", [])):
            return file["file"]
    raise AssertionError(f"fixture {fixture['name']} lists no file with {role!r} tensors")


def _load_encoder(fixture: dict) -> tuple[UMT5Encoder, dict[str, torch.Tensor]]:
    sd, spiece = read_t5_state_dict(golden_dir() / _file_with_role(fixture, "weights"), dtype=torch.float32)
    assert spiece is None
    cfg = fixture["config"]
    detected = detect_t5_config(sd)
    names = (("vocab_size", "vocab"), ("dim", "dim"), ("dim_attn", "dim_attn"), ("dim_ffn", "dim_ffn"),
             ("num_heads", "num_heads"), ("num_layers", "num_layers"), ("num_buckets", "num_buckets"))
    for ours, theirs in names:
        got = getattr(detected, ours)
        assert got == cfg[theirs], f"detected {ours} {got} != manifest {cfg[theirs]}"
    assert cfg["shared_pos"] is False
    config = replace(detected, max_distance=cfg["relative_max_distance"], text_len=cfg["text_len"])
    encoder = UMT5Encoder(config)
    encoder.load_state_dict(sd, strict=True)
    io = load_file(str(golden_dir() / _file_with_role(fixture, "input")))
    return encoder.eval(), io


def _assert_valid_rows(got: torch.Tensor, exp: torch.Tensor, seq_lens: torch.Tensor, fixture: dict,
                       what: str) -> None:
    tol = fixture["tolerance"]
    for b, n in enumerate(seq_lens.tolist()):
        assert_close_manifest(got[b, :n], exp[b, :n], atol=tol["atol"], rtol=tol["rtol"],
                              what=f"{fixture['name']} {what} sample {b}")


@pytest.mark.parametrize("fixture", T5_FIXTURES)
def test_encoder_output_matches_golden(fixture: dict) -> None:
    encoder, io = _load_encoder(fixture)
    assert io["seq_lens"].tolist() == io["mask"].sum(1).tolist()
    with torch.no_grad():
        out = encoder(io["ids"], io["mask"])
    _assert_valid_rows(out, io["expected.out"], io["seq_lens"], fixture, "expected.out")


@pytest.mark.parametrize("fixture", T5_FIXTURES)
def test_encoder_intermediates_match_golden(fixture: dict) -> None:
    encoder, io = _load_encoder(fixture)
    inter = {k: v for k, v in io.items() if k.startswith("inter.")}
    with torch.no_grad():
        x = encoder.token_embedding(io["ids"])
        if "inter.token_embedding" in inter:
            _assert_valid_rows(x, inter["inter.token_embedding"], io["seq_lens"], fixture, "token_embedding")
        checked = 0
        for i, block in enumerate(encoder.blocks):
            x = block(x, io["mask"])
            if f"inter.block{i}" in inter:
                _assert_valid_rows(x, inter[f"inter.block{i}"], io["seq_lens"], fixture, f"block{i}")
                checked += 1
    assert checked == sum(1 for k in inter if k.count(".") == 1 and k.startswith("inter.block"))


@pytest.mark.parametrize("fixture", T5_FIXTURES)
def test_layer0_bias_by_offset_matches_golden(fixture: dict) -> None:
    encoder, io = _load_encoder(fixture)
    exp = io["inter.block0.pos_bias_by_relpos"]  # (N, 2L-1), column r + L - 1 for offset r = key - query
    length = (exp.shape[1] + 1) // 2
    with torch.no_grad():
        bias = encoder.blocks[0].pos_embedding(length, length)[0]  # (N, L, L)
    # offset r >= 0: query 0, key r; offset r < 0: query -r, key 0
    by_offset = torch.cat([bias[:, torch.arange(length - 1, 0, -1), 0], bias[:, 0, :]], dim=1)
    tol = fixture["tolerance"]
    assert_close_manifest(by_offset, exp, atol=tol["atol"], rtol=tol["rtol"], what="block0 bias by offset")


@pytest.mark.parametrize("fixture", BUCKET_FIXTURES)
def test_bucket_map_matches_golden_exactly(fixture: dict) -> None:
    tensors = load_file(str(golden_dir() / fixture["files"][0]["file"]))
    rel = tensors["t5_bucket.rel_pos"]
    expected = [v for k, v in tensors.items() if k.startswith("t5_bucket.expected")]
    assert len(expected) == 1
    got = relative_position_bucket(rel, num_buckets=fixture["config"]["t5_num_buckets"],
                                   max_distance=fixture["config"]["t5_max_distance"])
    assert got.dtype == torch.int64
    assert torch.equal(got, expected[0]), f"{(got != expected[0]).sum()} bucket(s) differ"
