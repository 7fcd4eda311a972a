"""Task presets against the spec (`spec/WAN22_DIT_T5_SAMPLER.md`): section 1 (config table, model
sizes), section 2 (latent geometry, token counts), section 4.1 (UMT5-XXL) and section 8 (FLOPs).

Every number below is copied from the spec text, not from config.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from wanbench.wan_core.config import (
    DEFAULT_NEGATIVE_PROMPT,
    I2V_A14B,
    NUM_TRAIN_TIMESTEPS,
    PRESETS,
    T2V_A14B,
    TI2V_5B,
    WanConfig,
    preset,
)
from wanbench.wan_core.dit import WanBlock, WanDiT, WanRMSNorm

# Spec section 1, one row per field of the table: (t2v-A14B, i2v-A14B, ti2v-5B).
SPEC_TABLE: dict[str, tuple[object, object, object]] = {
    "model_type": ("t2v", "i2v", "ti2v"),
    "num_experts": (2, 2, 1),
    "expert_names": (("high_noise_model", "low_noise_model"), ("high_noise_model", "low_noise_model"),
                     ("model",)),
    "patch_size": ((1, 2, 2), (1, 2, 2), (1, 2, 2)),
    "dim": (5120, 5120, 3072),
    "ffn_dim": (13824, 13824, 14336),
    "freq_dim": (256, 256, 256),
    "num_heads": (40, 40, 24),
    "head_dim": (128, 128, 128),
    "num_layers": (40, 40, 30),
    "in_dim": (16, 36, 48),
    "out_dim": (16, 16, 48),
    "text_dim": (4096, 4096, 4096),
    "text_len": (512, 512, 512),
    "eps": (1e-6, 1e-6, 1e-6),
    "window_size": ((-1, -1), (-1, -1), (-1, -1)),
    "qk_norm": (True, True, True),
    "cross_attn_norm": (True, True, True),
    "sample_shift": (12.0, 5.0, 5.0),
    "sample_steps": (40, 40, 50),
    "boundary": (0.875, 0.900, None),
    "sample_guide_scale": ((3.0, 4.0), (3.5, 3.5), (5.0, 5.0)),  # (low-noise, high-noise); ti2v scalar 5.0
    "frame_num": (81, 81, 121),
    "sample_fps": (16, 16, 24),
    "vae": (("wan2.1", (4, 8, 8), 16), ("wan2.1", (4, 8, 8), 16), ("wan2.2", (4, 16, 16), 48)),
    "supported_sizes": ({(720, 1280), (1280, 720), (480, 832), (832, 480)},
                        {(720, 1280), (1280, 720), (480, 832), (832, 480)}, {(704, 1280), (1280, 704)}),
}
PRESET_ORDER = (T2V_A14B, I2V_A14B, TI2V_5B)
SPEC_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def _block_norms(cfg: WanConfig) -> tuple[bool, bool]:
    """(qk_norm, cross_attn_norm) as the model implements them: RMS norms on q and k of both
    attentions, and an affine (weight and bias) LayerNorm before the cross-attention."""
    with torch.device("meta"):
        block = WanBlock(cfg.dit)
    qk_norm = all(isinstance(attn.norm_q, WanRMSNorm) and isinstance(attn.norm_k, WanRMSNorm)
                  for attn in (block.self_attn, block.cross_attn))
    cross_attn_norm = block.norm3.weight is not None and block.norm3.bias is not None
    return qk_norm, cross_attn_norm


def _field(cfg: WanConfig, name: str) -> object:
    """The preset's value of one row of the spec table."""
    dit, sampler = cfg.dit, cfg.sampler
    if name in ("qk_norm", "cross_attn_norm"):  # not config fields: always present in Wan2.2
        return _block_norms(cfg)[name == "cross_attn_norm"]
    return {
        "model_type": dit.model_type, "num_experts": cfg.num_experts, "expert_names": cfg.expert_names,
        "patch_size": dit.patch_size, "dim": dit.dim, "ffn_dim": dit.ffn_dim, "freq_dim": dit.freq_dim,
        "num_heads": dit.num_heads, "head_dim": dit.head_dim, "num_layers": dit.num_layers,
        "in_dim": dit.in_dim, "out_dim": dit.out_dim, "text_dim": dit.text_dim, "text_len": dit.text_len,
        "eps": dit.eps, "window_size": tuple(dit.window_size), "sample_shift": sampler.shift,
        "sample_steps": sampler.steps, "boundary": sampler.boundary,
        "sample_guide_scale": sampler.guide_scale.official(), "frame_num": cfg.frame_num, "sample_fps": cfg.fps,
        "vae": (cfg.vae.variant, cfg.vae.stride, cfg.vae.z_dim), "supported_sizes": set(cfg.sizes),
    }[name]


@pytest.mark.parametrize("name", list(SPEC_TABLE))
@pytest.mark.parametrize("index", range(3), ids=[c.name for c in PRESET_ORDER])
def test_preset_field_matches_spec_table(index: int, name: str) -> None:
    cfg = PRESET_ORDER[index]
    assert _field(cfg, name) == SPEC_TABLE[name][index], f"{cfg.name}.{name}"


@pytest.mark.parametrize("cfg", PRESET_ORDER, ids=lambda c: c.name)
def test_shared_values(cfg: WanConfig) -> None:
    """Shared config (spec section 1) and UMT5-XXL (section 4.1)."""
    assert cfg.sampler.num_train_timesteps == NUM_TRAIN_TIMESTEPS == 1000
    assert cfg.sampler.solver == "unipc"  # CLI default
    assert cfg.sampler.boundary_timestep == (None if cfg.sampler.boundary is None else 1000 * cfg.sampler.boundary)
    assert cfg.default_size == ((1280, 704) if cfg is TI2V_5B else (1280, 720))  # (width, height)
    t5 = cfg.t5
    assert (t5.vocab_size, t5.dim, t5.dim_attn, t5.dim_ffn, t5.num_heads, t5.head_dim, t5.num_layers) == \
        (256384, 4096, 4096, 10240, 64, 64, 24)
    assert (t5.num_buckets, t5.max_distance, t5.shared_pos, t5.eps, t5.text_len) == (32, 128, False, 1e-6, 512)
    assert DEFAULT_NEGATIVE_PROMPT == SPEC_NEGATIVE_PROMPT
    assert DEFAULT_NEGATIVE_PROMPT.count("，") == 27 and "," not in DEFAULT_NEGATIVE_PROMPT  # full-width commas


def test_presets_are_looked_up_by_name_and_model_type() -> None:
    assert set(PRESETS) == {"t2v-A14B", "i2v-A14B", "ti2v-5B"}
    for cfg in PRESET_ORDER:
        assert preset(cfg.name) is cfg and preset(cfg.dit.model_type) is cfg
    with pytest.raises(ValueError, match="unknown Wan2.2 task 'x2v'"):
        preset("x2v")


# Spec section 2: (width, height, frames) -> latent (C, T, h, w) and tokens L = T * h/2 * w/2.
GEOMETRY = [
    (T2V_A14B, (1280, 720, 81), (16, 21, 90, 160), 75600),
    (I2V_A14B, (1280, 720, 81), (16, 21, 90, 160), 75600),
    (T2V_A14B, (832, 480, 81), (16, 21, 60, 104), 32760),
    (TI2V_5B, (1280, 704, 121), (48, 31, 44, 80), 27280),
]


@pytest.mark.parametrize(("cfg", "video", "latent", "tokens"), GEOMETRY,
                         ids=[f"{c.name}-{w}x{h}x{f}" for c, (w, h, f), _, _ in GEOMETRY])
def test_latent_shape_and_token_count(cfg: WanConfig, video: tuple[int, int, int],
                                      latent: tuple[int, int, int, int], tokens: int) -> None:
    assert cfg.latent_shape(*video) == latent
    assert cfg.num_tokens(*video) == tokens
    _, t, h, w = latent
    assert cfg.dit.token_grid((t, h, w)) == (t, h // 2, w // 2)


# Spec section 1, "Model sizes (parameters, from the module definitions)".
@pytest.mark.parametrize(("cfg", "expected"), [(T2V_A14B, 14_288_491_584), (I2V_A14B, 14_288_901_184),
                                               (TI2V_5B, 4_999_787_712)], ids=lambda v: getattr(v, "name", ""))
def test_parameter_count_of_the_built_model(cfg: WanConfig, expected: int) -> None:
    with torch.device("meta"):
        model = WanDiT(cfg.dit)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert cfg.dit.num_params() == expected


# Spec section 8 table: one forward and one CFG step (x2), 3 significant digits, with the time MLP
# counted per token as the official code runs it; and the self-attention core share.
FLOPS = [
    (T2V_A14B, (1280, 720, 81), 6.55e15, 1.31e16, 0.72),
    (T2V_A14B, (832, 480, 81), 1.69e15, 3.38e15, 0.52),
    (TI2V_5B, (1280, 704, 121), 5.21e14, 1.04e15, 0.53),
]


@pytest.mark.parametrize(("cfg", "video", "forward", "per_step", "attn_share"), FLOPS,
                         ids=[f"{c.name}-{w}x{h}x{f}" for c, (w, h, f), *_ in FLOPS])
def test_flops_match_spec_table(cfg: WanConfig, video: tuple[int, int, int], forward: float,
                                per_step: float, attn_share: float) -> None:
    num_tokens = cfg.num_tokens(*video)
    got = cfg.dit.flops_forward(num_tokens, per_token_time=True)
    assert float(f"{got:.2e}") == forward
    assert float(f"{cfg.dit.flops_forward(num_tokens, batch=2, per_token_time=True):.2e}") == per_step
    L, D, Fd, T = num_tokens, cfg.dit.dim, cfg.dit.ffn_dim, cfg.dit.text_len
    block = 12 * L * D * D + 4 * T * D * D + 4 * L * L * D + 4 * L * T * D + 4 * L * D * Fd
    assert round(4 * L * L * D / block, 2) == attn_share  # the share of a block's FLOPs
    # the time MLP once per sample instead of per token (WanConfig's count): < 1 % less
    once = cfg.dit.flops_forward(num_tokens)
    assert once < got and math.isclose(once, got, rel_tol=1e-2)
    assert cfg.flops_forward(*video) == once and cfg.flops_per_step(*video) == 2 * once


def test_flops_formula_by_hand() -> None:
    """Spec section 8 block formula and the outside-the-blocks terms on a small made-up case."""
    dit = TI2V_5B.dit.tiny()
    L, D, Fd, T = 10, dit.dim, dit.ffn_dim, dit.text_len
    block = 12 * L * D * D + 4 * T * D * D + 4 * L * L * D + 4 * L * T * D + 4 * L * D * Fd
    outside = (2 * L * (4 * dit.in_dim) * D + 2 * T * (dit.text_dim * D + D * D)
               + 2 * L * (dit.freq_dim * D + 7 * D * D) + 2 * L * D * (4 * dit.out_dim))
    assert dit.flops_forward(L, per_token_time=True) == dit.num_layers * block + outside
    assert dit.flops_forward(L, batch=3, per_token_time=True) == 3 * (dit.num_layers * block + outside)


@pytest.mark.parametrize("cfg", PRESET_ORDER, ids=lambda c: c.name)
def test_tiny_twin_keeps_the_structure(cfg: WanConfig) -> None:
    tiny = cfg.tiny()
    assert preset(cfg.name, tiny=True) == tiny
    for name in ("model_type", "in_dim", "out_dim", "patch_size", "text_len", "window_size", "eps"):
        assert getattr(tiny.dit, name) == getattr(cfg.dit, name), name
    assert _block_norms(tiny) == _block_norms(cfg)
    assert (tiny.num_experts, tiny.expert_names, tiny.sampler.boundary) == \
        (cfg.num_experts, cfg.expert_names, cfg.sampler.boundary)
    assert (tiny.vae.variant, tiny.vae.z_dim, tiny.vae.stride) == (cfg.vae.variant, cfg.vae.z_dim, cfg.vae.stride)
    assert tiny.dit.text_dim == tiny.t5.dim
    assert tiny.dit.dim <= 64 and tiny.dit.num_layers == 2 and tiny.dit.head_dim == 16
    assert tiny.dit.num_params() < 1_000_000
    tiny.validate_video(*tiny.default_size, tiny.frame_num)
