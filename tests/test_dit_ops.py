"""DiT building blocks (sinusoid, 3-D RoPE) against `dit_ops_tiny`, and forward-pass equivalences."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import fixture_params, golden_dir
from safetensors.torch import load_file
from wanbench.wan_core.config import preset
from wanbench.wan_core.dit import WanDiT, sinusoidal_embedding
from wanbench.wan_core.rope import RopeCache, apply_rope, apply_rope_fp64, rope_split, rope_table

OPS = fixture_params(kind_prefix="ops", name_prefix="dit_ops")


def ops_tensors(fixture: dict) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for entry in fixture["files"]:
        out.update(load_file(str(golden_dir() / entry["file"])))
    return out


def max_err_bound(got: torch.Tensor, exp: torch.Tensor, atol: float, rtol: float) -> tuple[float, float]:
    err = (got.double() - exp.double()).abs().max().item()
    return err, atol + rtol * exp.double().abs().max().item()


@pytest.mark.parametrize("fixture", OPS)
def test_sinusoid_matches_official(fixture: dict) -> None:
    d = ops_tensors(fixture)
    got = sinusoidal_embedding(fixture["config"]["freq_dim"], d["sinusoidal.positions"])
    atol = fixture["tolerance"]["sinusoidal"]["atol"]
    assert (got - d["sinusoidal.expected"]).abs().max().item() <= atol


@pytest.mark.parametrize("fixture", OPS)
def test_rope_tables_match_official(fixture: dict) -> None:
    d = ops_tensors(fixture)
    cfg = fixture["config"]
    rows = d["rope.table_cos"].shape[0]
    angles = rope_table(cfg["head_dim"], rows, theta=float(cfg["rope_theta"]))
    assert list(rope_split(cfg["head_dim"])) == cfg["rope_complex_pairs(t,h,w)"]
    tol = fixture["tolerance"]["rope"]
    for name, got in (("table_cos", angles.cos()), ("table_sin", angles.sin())):
        err, bound = max_err_bound(got, d[f"rope.{name}"], tol["atol"], tol["rtol"])
        assert err <= bound, f"{name}: {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("fixture", OPS)
def test_rope_application_matches_official(fixture: dict) -> None:
    """Both the float64 reference and the float32-table path the model uses pass the fixture."""
    d = ops_tensors(fixture)
    cfg = fixture["config"]
    tol = fixture["tolerance"]["rope"]
    x, exp = d["rope.x"], d["rope.expected"]
    grids = [tuple(int(v) for v in g) for g in d["rope.grid_sizes"]]
    ref = apply_rope_fp64(x, grids, theta=float(cfg["rope_theta"]))
    err, bound = max_err_bound(ref, exp, tol["atol"], tol["rtol"])
    assert err <= bound, f"fp64 rope: {err:.3e} > {bound:.3e}"

    cache = RopeCache(cfg["head_dim"], theta=float(cfg["rope_theta"]))
    fast = torch.cat([apply_rope(x[b:b + 1], *cache.cos_sin(g, x.device)) for b, g in enumerate(grids)])
    err, bound = max_err_bound(fast, exp, tol["atol"], tol["rtol"])
    assert err <= bound, f"fp32 rope: {err:.3e} > {bound:.3e}"
    for b, (f, h, w) in enumerate(grids):  # each sample's own grid: samples may differ
        num_true = f * h * w
        assert torch.equal(fast[b, num_true:], x[b, num_true:]), f"sample {b}: rows beyond its grid must pass through"
    assert fast.dtype == torch.float32


def test_rope_application_check_is_per_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixture whose samples have different grids (other token counts) passes the check above."""
    grids = [(1, 2, 5), (2, 3, 4), (3, 2, 2)]  # 10, 24 and 12 tokens; sample 0 has the fewest
    x = torch.randn(len(grids), 26, 2, 16, generator=torch.Generator().manual_seed(5))
    tensors = {"rope.x": x, "rope.expected": apply_rope_fp64(x, grids), "rope.grid_sizes": torch.tensor(grids)}
    fixture = {"config": {"head_dim": 16, "rope_theta": 10000}, "tolerance": {"rope": {"atol": 1e-5, "rtol": 1e-5}}}
    monkeypatch.setattr(sys.modules[__name__], "ops_tensors", lambda _: tensors)
    test_rope_application_matches_official(fixture)


def test_rope_output_is_float32_for_bf16_input() -> None:
    cache = RopeCache(16)
    x = torch.randn(1, 12, 2, 16, dtype=torch.bfloat16)
    out = apply_rope(x, *cache.cos_sin((1, 3, 4), x.device))
    ref = apply_rope_fp64(x, [(1, 3, 4)])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Forward-pass equivalences on a tiny random model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_t2v() -> WanDiT:
    torch.manual_seed(1)
    cfg = preset("t2v", tiny=True).dit
    return WanDiT(cfg).eval()


def _inputs(model: WanDiT, batch: int = 2) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, cfg.in_dim, 2, 4, 6, generator=g)
    contexts = [torch.randn(5 + 4 * b, cfg.text_dim, generator=g) for b in range(batch)]
    return x, contexts


@torch.no_grad()
def test_scalar_and_per_token_timesteps_agree(tiny_t2v: WanDiT) -> None:
    x, ctx = _inputs(tiny_t2v)
    num_tokens = tiny_t2v.config.num_tokens((2, 4, 6))
    t = torch.tensor([900, 300])
    per_sample = tiny_t2v(x, t, ctx)
    per_token = tiny_t2v(x, t[:, None].expand(2, num_tokens).float(), ctx)
    torch.testing.assert_close(per_token, per_sample, rtol=0, atol=1e-6)
    single = tiny_t2v(x, torch.tensor([900]), ctx)  # a (1,) timestep is shared by the batch
    torch.testing.assert_close(single, tiny_t2v(x, torch.tensor([900, 900]), ctx), rtol=0, atol=1e-6)


@torch.no_grad()
def test_batch_equals_separate_samples(tiny_t2v: WanDiT) -> None:
    x, ctx = _inputs(tiny_t2v)
    t = torch.tensor([900, 300])
    both = tiny_t2v(x, t, ctx)
    for b in range(2):
        alone = tiny_t2v(x[b:b + 1], t[b:b + 1], [ctx[b]])
        torch.testing.assert_close(both[b:b + 1], alone, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_seq_len_padding_does_not_change_output(tiny_t2v: WanDiT) -> None:
    x, ctx = _inputs(tiny_t2v, batch=1)
    num_tokens = tiny_t2v.config.num_tokens((2, 4, 6))
    t = torch.tensor([500])
    padded = tiny_t2v(x, t, ctx, seq_len=num_tokens + 7)
    torch.testing.assert_close(padded, tiny_t2v(x, t, ctx), rtol=0, atol=0)
    mixed = torch.full((1, num_tokens + 3), 500.0)
    mixed[0, :6] = 0.0
    out = tiny_t2v(x, mixed, ctx, seq_len=num_tokens + 3)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, tiny_t2v(x, t, ctx)), "per-token timesteps must change the output"


@torch.no_grad()
def test_bf16_forward_close_to_fp32(tiny_t2v: WanDiT) -> None:
    """bf16 weights (fp32 time MLP, modulation, residual, head): relative error < 2e-2, cosine > 0.999."""
    x, ctx = _inputs(tiny_t2v)
    t = torch.tensor([900, 300])
    ref = tiny_t2v(x, t, ctx)
    bf16 = WanDiT(tiny_t2v.config, dtype=torch.bfloat16).eval()
    bf16.load_state_dict(tiny_t2v.state_dict())
    out = bf16(x, t, ctx)
    assert out.dtype == torch.float32
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    assert rel < 2e-2 and cos > 0.999, f"bf16 vs fp32: rel {rel:.3e}, cosine {cos:.6f}"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"x": torch.randn(1, 16, 2, 4)}, "x must be (B, C, T, h, w)"),
    ({"x": torch.randn(1, 20, 2, 4, 6)}, "in_dim=16"),
    ({"t": torch.zeros(1, 3)}, "t must be (B,) or (B, seq_len"),
    ({"seq_len": 3}, "seq_len must be >="),
    ({"y": torch.randn(1, 4, 2, 4, 6)}, "y (the image conditioning) is only accepted"),
    ({"context": [torch.randn(600, 64)]}, "context 0 must be"),
    ({"context": [torch.randn(3, 64)] * 2}, "need one context per sample"),
])
@torch.no_grad()
def test_forward_rejects_bad_inputs(tiny_t2v: WanDiT, kwargs: dict, message: str) -> None:
    args = {"x": torch.randn(1, 16, 2, 4, 6), "t": torch.tensor([10]), "context": [torch.randn(3, 64)]}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_t2v(args.pop("x"), args.pop("t"), args.pop("context"), **args)


@torch.no_grad()
def test_i2v_requires_y() -> None:
    model = WanDiT(preset("i2v", tiny=True).dit).eval()
    with pytest.raises(ValueError, match="required"):
        model(torch.randn(1, 16, 2, 4, 6), torch.tensor([10]), [torch.randn(3, model.config.text_dim)])
    out = model(torch.randn(1, 16, 2, 4, 6), torch.tensor([10]), [torch.randn(3, model.config.text_dim)],
                y=torch.randn(1, 20, 2, 4, 6))
    assert out.shape == (1, 16, 2, 4, 6)
