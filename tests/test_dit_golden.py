"""WanDiT against the golden fixtures made by the official Wan2.2 code.

Manifest-driven: every fixture of kind `dit_forward` in MANIFEST.json (folder from
WANBENCH_GOLDEN_DIR) is checked, with the model config taken from the manifest entry, every case's
output compared, and the case-0 intermediates compared through forward hooks.
Select one with `pytest -k dit_t2v_tiny`.
"""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from conftest import assert_close_manifest, fixture_params, golden_dir
from safetensors.torch import load_file
from wanbench.wan_core.config import DiTConfig
from wanbench.wan_core.dit import WanDiT, sinusoidal_embedding
from wanbench.wan_core.rope import apply_rope

FIXTURES = fixture_params(kind_prefix="dit_forward")


def config_from_manifest(raw: dict) -> DiTConfig:
    # qk_norm and cross_attn_norm are on in every Wan2.2 model and always built by WanDiT
    assert raw.get("qk_norm", True) is True and raw.get("cross_attn_norm", True) is True, raw
    names = {f.name for f in fields(DiTConfig)}
    return DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names})


def fixture_files(fixture: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, io) tensors of a fixture, told apart by the roles its manifest lists."""
    weights: dict[str, torch.Tensor] = {}
    io: dict[str, torch.Tensor] = {}
    for entry in fixture["files"]:
        roles = {t["role"] for t in entry["tensors"]}
        target = weights if roles == {"weights"} else io
        target.update(load_file(str(golden_dir() / entry["file"])))
    return weights, io


def build_model(fixture: dict) -> tuple[WanDiT, dict[str, torch.Tensor]]:
    weights, io = fixture_files(fixture)
    model = WanDiT(config_from_manifest(fixture["config"])).eval()
    model.load_state_dict(weights, strict=True)
    return model, io


def run_case(model: WanDiT, io: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    p = f"case{k}."
    lens = io[p + "context_lens"]
    context = [io[p + "context"][b, : int(n)] for b, n in enumerate(lens)]
    with torch.no_grad():
        return model(io[p + "x"], io[p + "t"], context, seq_len=int(io[p + "seq_len"]), y=io.get(p + "y"))


@pytest.mark.parametrize("fixture", FIXTURES)
def test_dit_forward_matches_official(fixture: dict) -> None:
    model, io = build_model(fixture)
    tol = fixture["tolerance"]
    assert fixture["cases"], "fixture lists no cases"
    for case in fixture["cases"]:
        k = case["case"]
        got = run_case(model, io, k)
        assert_close_manifest(got, io[f"case{k}.expected.out"], atol=tol["atol"], rtol=tol["rtol"],
                              what=f"{fixture['name']} case {k}")


@pytest.mark.parametrize("fixture", FIXTURES)
def test_dit_padded_context_tensor_equals_list(fixture: dict) -> None:
    """The padded (B, S, text_dim) form with context_lens gives the same output as the list form."""
    model, io = build_model(fixture)
    k = fixture["cases"][-1]["case"]
    p = f"case{k}."
    with torch.no_grad():
        padded = model(io[p + "x"], io[p + "t"], io[p + "context"], seq_len=int(io[p + "seq_len"]),
                       y=io.get(p + "y"), context_lens=io[p + "context_lens"])
    torch.testing.assert_close(padded, run_case(model, io, k), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_dit_intermediates_match_official(fixture: dict) -> None:
    model, io = build_model(fixture)
    cfg = model.config
    tol = fixture["tolerance"]
    inter = {k[len("case0.inter."):]: v for k, v in io.items() if k.startswith("case0.inter.")}
    assert inter, "fixture has no case-0 intermediates"

    captured: dict[str, torch.Tensor] = {}
    hooks = {"patch_embedding": model.patch_embedding, "text_embedding": model.text_embedding,
             "head": model.head, "block0.q_before_rope": model.blocks[0].self_attn.norm_q,
             "block0.k_before_rope": model.blocks[0].self_attn.norm_k}
    hooks.update({f"block{i}": block for i, block in enumerate(model.blocks)})
    handles = []
    for name, module in hooks.items():
        def hook(_m, _inp, out, name=name):
            captured.setdefault(name, out.detach().clone())  # q/k norms are rotated in place later
        handles.append(module.register_forward_hook(hook))
    try:
        run_case(model, io, 0)
    finally:
        for h in handles:
            h.remove()

    seq_len = int(io["case0.seq_len"])
    t = io["case0.t"]
    t_tokens = t.expand(t.shape[0], seq_len) if t.ndim == 1 else t  # what the official model feeds
    e, e0 = model.embed_time(t_tokens)
    grid = tuple(captured["patch_embedding"].shape[2:])
    cos, sin = model.rope.cos_sin(grid, torch.device("cpu"))
    for qk in ("q", "k"):
        before = captured[f"block0.{qk}_before_rope"].unflatten(-1, (cfg.num_heads, -1))
        captured[f"block0.{qk}_before_rope"] = before
        captured[f"block0.{qk}_after_rope"] = apply_rope(before, cos, sin)
    captured["sinusoidal"] = sinusoidal_embedding(cfg.freq_dim, t_tokens)
    captured["time_embedding"] = e
    captured["time_projection"] = e0.flatten(-2)

    checked = 0
    for name, exp in inter.items():
        assert name in captured, f"intermediate {name!r} of the fixture is not exposed by the model"
        got = captured[name]
        rows = min(got.shape[1], exp.shape[1]) if got.ndim == 3 and name != "text_embedding" else None
        if rows is not None:  # padded token rows may be skipped
            got, exp = got[:, :rows], exp[:, :rows]
        assert_close_manifest(got, exp, atol=tol["atol"], rtol=tol["rtol"], what=f"{fixture['name']} {name}")
        checked += 1
    assert checked == len(inter)


@pytest.mark.gpu
@pytest.mark.parametrize("fixture", FIXTURES)
def test_dit_forward_matches_official_on_cuda(fixture: dict) -> None:
    """Same check on CUDA in float32 with TF32 off (cuDNN's TF32 convolutions differ by ~1e-4)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, io = build_model(fixture)
    model.cuda()
    tol = fixture["tolerance"]
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for case in fixture["cases"]:
            k = case["case"]
            got = run_case(model, {n: v.cuda() for n, v in io.items()}, k).cpu()
            assert_close_manifest(got, io[f"case{k}.expected.out"], atol=tol["atol"], rtol=tol["rtol"],
                                  what=f"{fixture['name']} case {k} (cuda)")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
