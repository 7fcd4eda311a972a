"""Cross-check against diffusers' `WanTransformer3DModel` on tiny random configs.

Our weights -> diffusers names -> diffusers model -> same output, and diffusers' state dict -> our
names -> identical tensors. Tolerance: relative max error 2e-5 (measured 0.6e-6 .. 1.3e-6);
diffusers evaluates the timestep sinusoid in float32, ours is float64 as in the official code.
"""

from __future__ import annotations

import pytest
import torch
from wanbench.wan_core.checkpoints.dit import dit_from_diffusers, dit_to_diffusers
from wanbench.wan_core.config import DiTConfig, preset
from wanbench.wan_core.dit import WanDiT

diffusers = pytest.importorskip("diffusers")

MAX_REL = 2e-5


def diffusers_model(cfg: DiTConfig) -> torch.nn.Module:
    return diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=cfg.eps).eval()


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "ti2v"])
@torch.no_grad()
def test_same_output_as_diffusers(model_type: str) -> None:
    torch.manual_seed(5)
    ours = WanDiT(preset(model_type, tiny=True).dit).eval()
    cfg = ours.config
    theirs = diffusers_model(cfg)
    theirs.load_state_dict(dit_to_diffusers(ours.state_dict()), strict=True)

    g = torch.Generator().manual_seed(6)
    out_ch = cfg.out_dim
    x = torch.randn(2, out_ch, 2, 4, 6, generator=g)
    y = torch.randn(2, cfg.in_dim - out_ch, 2, 4, 6, generator=g) if cfg.in_dim != out_ch else None
    lens = (7, 13)
    padded = torch.zeros(2, cfg.text_len, cfg.text_dim)
    for b, n in enumerate(lens):
        padded[b, :n] = torch.randn(n, cfg.text_dim, generator=g)
    num_tokens = cfg.num_tokens((2, 4, 6))
    if model_type == "ti2v":
        t = torch.full((2, num_tokens), 640.0)
        t[:, : num_tokens // 2] = 0.0  # first latent frame pinned, as the ti2v image mode does
    else:
        t = torch.tensor([900, 250])
    got = ours(x, t, [padded[b, :n] for b, n in enumerate(lens)], y=y)
    model_in = x if y is None else torch.cat((x, y), dim=1)
    exp = theirs(model_in, t, padded, return_dict=False)[0]
    rel = ((got - exp).abs().max() / exp.abs().max()).item()
    assert rel < MAX_REL, f"{model_type}: relative error vs diffusers {rel:.2e}"


def test_key_map_both_ways() -> None:
    torch.manual_seed(7)
    cfg = preset("t2v", tiny=True).dit
    theirs = diffusers_model(cfg)
    sd = dit_from_diffusers(theirs.state_dict())
    ours = WanDiT(cfg)
    assert set(sd) == set(ours.state_dict())
    ours.load_state_dict(sd, strict=True)
    back = dit_to_diffusers(ours.state_dict())
    assert set(back) == set(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(back[key], value), key
    # the cross-attention pre-norm is norm3 in the official names and norm2 in diffusers
    assert torch.equal(sd["blocks.0.norm3.weight"], theirs.state_dict()["blocks.0.norm2.weight"])
