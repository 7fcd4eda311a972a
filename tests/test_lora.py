"""LoRA files and patches: every key layout against a hand-merged checkpoint, strength 0, removal,
chaining, composition with fp8 storage and block streaming, the sampler, and bad files.

The expected weights are merged here with this file's own key arithmetic (its own table of names per
layout and its own float64 sums), never with the pack's reader.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from wanbench.tiny_models import DISTILL_LORAS, LORA_FILES, TINY_LAYOUT_LORAS, TinyLora, write_tiny_lora
from wanbench.wan_core.checkpoints.lora import read_lora
from wanbench.wan_core.config import T2V_A14B, TI2V_5B, GuideScale
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.errors import CheckpointError, SamplingInterrupted
from wanbench.wan_core.placement import make_placement
from wanbench.wan_core.runtime.compact import store_fp8
from wanbench.wan_core.runtime.lora import ExpertLora, LoraPatches, load_expert_lora
from wanbench.wan_core.sampler import SamplerOptions, sample

# This test's own official -> diffusers module names (diffusers' WanTransformer3DModel).
DIFFUSERS_BLOCK = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
DIFFUSERS_TOP = {
    "patch_embedding": "patch_embedding", "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out", "head": "head",
}
PREFIX = {"comfy": "diffusion_model.", "peft": "base_model.model.", "bare": ""}
T2V = T2V_A14B.tiny()
LATENT = (16, 3, 8, 8)  # (C, T, h, w) of the tiny T2V DiT


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_dit(seed: int = 0, cfg=None) -> WanDiT:
    torch.manual_seed(seed)
    return WanDiT(cfg or T2V.dit).eval().requires_grad_(False)


def stem(module: str, layout: str) -> str:
    """This test's own key stem of an official module path in a layout."""
    if layout == "kohya":
        return "lora_unet_" + module.replace(".", "_")
    if layout == "diffusers":
        if module.startswith("blocks."):
            _, index, rest = module.split(".", 2) if module.count(".") >= 2 else (*module.split("."), "")
            return f"transformer.blocks.{index}" + (f".{DIFFUSERS_BLOCK[rest]}" if rest else "")
        return "transformer." + DIFFUSERS_TOP[module]
    return PREFIX[layout] + module


def hand_merge(model: WanDiT, file: Path, layout: str, strength: float) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The model's state dict with the file's deltas added in float64, and the set of keys used."""
    raw = load_file(str(file))
    used: set[str] = set()
    merged = {}
    for name, value in model.state_dict().items():
        w = value.double().clone()
        module, leaf = name.rsplit(".", 1)
        if leaf == "weight":
            s = stem(module, layout)
            ups = [k for k in (s + ".lora_up.weight", s + ".lora_B.weight") if k in raw]
            if ups:
                up = raw[ups[0]].double()
                down = raw[ups[0].replace("lora_up", "lora_down").replace("lora_B", "lora_A")].double()
                rank = down.shape[0]
                alpha = raw.get(s + ".alpha")
                scale = float(alpha) / rank if alpha is not None and float(alpha) != 0 else 1.0
                w += strength * scale * (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(w.shape)
                used |= {ups[0], ups[0].replace("lora_up", "lora_down").replace("lora_B", "lora_A")}
                used |= {s + ".alpha"} if alpha is not None else set()
            if s + ".diff" in raw:
                w += strength * raw[s + ".diff"].double()
                used.add(s + ".diff")
        elif leaf == "bias":
            key = stem(module, layout) + ".diff_b"
            if key in raw:
                w += strength * raw[key].double()
                used.add(key)
        elif leaf == "modulation":
            key = stem(module, layout) + ".diff_m"
            if key in raw:
                w += strength * raw[key].double()
                used.add(key)
        merged[name] = w.to(value.dtype)
    return merged, used


def forward(model: WanDiT, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *LATENT, generator=g)
    ctx = [torch.randn(5, model.config.text_dim, generator=g)]
    with torch.no_grad():
        return model(x, torch.tensor([700]), ctx)


def merged_model(model: WanDiT, sd: dict[str, torch.Tensor]) -> WanDiT:
    other = WanDiT(model.config).eval()
    other.load_state_dict(sd)
    return other


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rel * want.abs().max().item(), f"max error {err:.3e} vs scale {want.abs().max().item():.3e}"


T2V_FILES = [name for name, spec in LORA_FILES.items() if spec.task is T2V_A14B]


def layout_lora(tmp_path: Path, layout: str, seed: int, name: str = "lora.safetensors") -> Path:
    """The tiny-model tool's LoRA of `layout` ("kohya", "comfy_peft", "diffusers", "peft", "bare")."""
    return write_tiny_lora(tmp_path / name, TINY_LAYOUT_LORAS[f"wanbench_tiny_t2v_lora_{layout}.safetensors"],
                           seed=seed)


@pytest.mark.parametrize("name", T2V_FILES)
def test_patched_output_equals_hand_merged_checkpoint(tmp_path: Path, name: str) -> None:
    spec = LORA_FILES[name]
    file = write_tiny_lora(tmp_path / name, spec, seed=11)
    model = tiny_dit()
    base_out = forward(model)
    lora = load_expert_lora(file, [model], [0.7])
    assert lora.lora.layout == spec.layout
    sd, used = hand_merge(model, file, spec.layout, 0.7)
    assert used == set(load_file(str(file))), "the hand merge must account for every key of the file"
    assert lora.lora.num_matched == lora.lora.num_keys == len(used)
    want = forward(merged_model(model, sd))
    with LoraPatches([model], [lora]):
        got = forward(model)
    assert_close(got, want)
    assert not torch.allclose(got, base_out, atol=1e-3), "the LoRA must change the output"
    assert torch.equal(forward(model), base_out), "removing the patches gives the base model back"


def test_every_layout_and_dtype_is_covered() -> None:
    layouts = {spec.layout for spec in LORA_FILES.values()}
    assert layouts == {"kohya", "comfy", "diffusers", "peft", "bare"}
    assert {spec.dtype for spec in LORA_FILES.values()} == {torch.float32, torch.bfloat16, torch.float16}
    assert {spec.pair_names for spec in TINY_LAYOUT_LORAS.values()} == {"lora_up", "lora_B"}
    distill = [s for s in DISTILL_LORAS.values() if s.style == "distill"]
    assert distill and all(not s.alpha for s in distill)


def test_distill_lora_reports_its_parts(tmp_path: Path) -> None:
    spec = DISTILL_LORAS["wanbench_tiny_t2v_4steps_lora_high_noise.safetensors"]
    file = write_tiny_lora(tmp_path / "d.safetensors", spec, seed=2)
    model = tiny_dit()
    lora = load_expert_lora(file, [model], [1.0])
    assert lora.lora.kinds == ("lora_up/lora_down", "diff", "diff_b", "diff_m")
    assert "blocks.0.modulation" in lora.lora.targets and "head.modulation" in lora.lora.targets
    text = lora.describe(["model"])
    assert text.startswith("d.safetensors (model 1; comfy:")
    assert f"{lora.lora.num_keys} of {lora.lora.num_keys} keys" in text


def test_strength_zero_is_bit_identical_and_patches_nothing(tmp_path: Path) -> None:
    file = layout_lora(tmp_path, "kohya", 5, "k.safetensors")
    model = tiny_dit()
    base = forward(model)
    with LoraPatches([model], [load_expert_lora(file, [model], [0.0])]) as patches:
        assert patches.num_patched == 0
        assert torch.equal(forward(model), base)


def test_apply_change_remove_returns_exact_base_weights(tmp_path: Path) -> None:
    file = layout_lora(tmp_path, "bare", 6, "c.safetensors")
    model = tiny_dit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    storages = {k: v.data_ptr() for k, v in model.state_dict().items()}
    outs = []
    for strength in (1.0, 0.5, -2.0):
        with LoraPatches([model], [load_expert_lora(file, [model], [strength])]):
            outs.append(forward(model))
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(storages[k] == after[k].data_ptr() for k in before), "the base tensors themselves are restored"
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_two_chained_loras_equal_their_sum_in_any_order(tmp_path: Path) -> None:
    a = layout_lora(tmp_path, "kohya", 7, "a.safetensors")
    b = layout_lora(tmp_path, "peft", 8, "b.safetensors")
    model = tiny_dit()
    sd_a, _ = hand_merge(model, a, "kohya", 0.8)
    partial = merged_model(model, sd_a)
    sd_ab, _ = hand_merge(partial, b, "peft", -0.4)
    want = forward(merged_model(model, sd_ab))
    la, lb = load_expert_lora(a, [model], [0.8]), load_expert_lora(b, [model], [-0.4])
    with LoraPatches([model], [la, lb]):
        ab = forward(model)
    with LoraPatches([model], [lb, la]):
        ba = forward(model)
    assert_close(ab, want)
    assert_close(ba, ab, rel=1e-6)


def test_fp8_storage_then_lora_adds_the_delta_to_the_dequantised_weights(tmp_path: Path) -> None:
    file = layout_lora(tmp_path, "comfy_peft", 9, "f.safetensors")
    model = tiny_dit()
    lora = load_expert_lora(file, [model], [1.0])
    storage = store_fp8(model)
    dequantised = {k: v.clone() for k, v in model.state_dict().items()}
    for e in storage._entries:  # what the fp8 storage computes with: fp8 * scale
        name = next(n for n, p in model.named_parameters() if p is e.param)
        dequantised[name] = e.decoded().clone()
    plain = merged_model(model, dequantised)
    base = forward(model)
    assert_close(base, forward(plain), rel=1e-6)
    sd, _ = hand_merge(plain, file, "comfy", 1.0)
    with LoraPatches([model], [lora]):
        got = forward(model)
    assert_close(got, forward(merged_model(model, sd)))
    assert all(e.param.dtype == torch.float8_e4m3fn for e in storage._entries), "fp8 data is back after the run"
    assert torch.equal(forward(model), base)
    storage.remove()


@pytest.mark.parametrize("with_fp8", [False, True], ids=["bf32", "fp8"])
def test_block_streaming_composes_with_lora(tmp_path: Path, with_fp8: bool) -> None:
    """The `blocks` placement hooks (run on the CPU here: same swaps, no copies) + fp8 + LoRA."""
    file = layout_lora(tmp_path, "kohya", 10, "s.safetensors")
    model = tiny_dit()
    storage = store_fp8(model) if with_fp8 else None
    lora = load_expert_lora(file, [model], [1.0])
    with LoraPatches([model], [lora]):
        want = forward(model)
    placement = make_placement([model], "blocks", device="cpu", num_resident_blocks=1)
    with placement, LoraPatches([model], [lora], keep_on_device=False):
        placement.activate(0)
        got = forward(model)
    assert torch.equal(got, want)
    if storage is not None:
        assert all(e.param.dtype == torch.float8_e4m3fn for e in storage._entries)
        storage.remove()


def _experts_and_options(steps: int = 3):
    high, low = tiny_dit(1), tiny_dit(2)
    opts = SamplerOptions(solver="euler", steps=steps, shift=5.0, guide_scale=GuideScale(high=2.0, low=1.0),
                          boundary=0.7, seed=4)
    g = torch.Generator().manual_seed(0)
    ctx, null = torch.randn(6, T2V.dit.text_dim, generator=g), torch.randn(4, T2V.dit.text_dim, generator=g)
    return [high, low], opts, ctx, null


def test_sampler_applies_per_expert_strengths_only_during_the_run(tmp_path: Path) -> None:
    file = layout_lora(tmp_path, "diffusers", 12, "x.safetensors")
    experts, opts, ctx, null = _experts_and_options()
    before = [{k: v.clone() for k, v in e.state_dict().items()} for e in experts]
    lora = load_expert_lora(file, experts, [1.0, 0.25])
    got = sample(experts, T2V, opts, context=ctx, context_null=null, latent_shape=LATENT, loras=[lora])
    strengths = (1.0, 0.25)
    merged = [merged_model(e, hand_merge(e, file, "diffusers", s)[0]) for e, s in zip(experts, strengths, strict=True)]
    want = sample(merged, T2V, opts, context=ctx, context_null=null, latent_shape=LATENT)
    assert_close(got, want, rel=1e-4)
    plain = sample(experts, T2V, opts, context=ctx, context_null=null, latent_shape=LATENT)
    assert not torch.allclose(plain, got, atol=1e-3)
    for e, sd in zip(experts, before, strict=True):
        assert all(torch.equal(v, e.state_dict()[k]) for k, v in sd.items())


def test_interrupted_run_leaves_base_weights_and_no_hooks(tmp_path: Path) -> None:
    file = layout_lora(tmp_path, "kohya", 13, "i.safetensors")
    experts, opts, ctx, null = _experts_and_options()
    before = [{k: v.clone() for k, v in e.state_dict().items()} for e in experts]
    lora = load_expert_lora(file, experts, [1.0, 1.0])

    def stop(i: int, n: int, latent: torch.Tensor) -> None:
        raise SamplingInterrupted("stop")

    with pytest.raises(SamplingInterrupted):
        sample(experts, T2V, opts, context=ctx, context_null=null, latent_shape=LATENT, loras=[lora],
               callback=stop)
    for e, sd in zip(experts, before, strict=True):
        assert all(torch.equal(v, e.state_dict()[k]) for k, v in sd.items())
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in e.modules())


def test_same_model_for_both_experts_needs_equal_strengths(tmp_path: Path) -> None:
    file = layout_lora(tmp_path, "bare", 1, "m.safetensors")
    model = tiny_dit()
    with pytest.raises(ValueError, match="same model"):
        LoraPatches([model, model], [load_expert_lora(file, [model, model], [1.0, 0.5])])


# ---------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------
def _shapes(model: WanDiT) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.named_parameters()}


def test_lora_of_another_width_names_the_tensor_and_both_shapes(tmp_path: Path) -> None:
    narrow = T2V_A14B.dit.tiny().__class__(**{**T2V_A14B.dit.tiny().__dict__, "dim": 32, "num_heads": 2,
                                               "ffn_dim": 64})
    spec = TinyLora(task=T2V_A14B, style="lightning", layout="comfy")
    with torch.device("meta"):
        params = _shapes(WanDiT(narrow))
    from wanbench.tiny_models import tiny_lora_targets
    from wanbench.wan_core.checkpoints.lora import save_lora

    file = save_lora(tiny_lora_targets(params, spec.style, seed=1), tmp_path / "wan21_1.3B_like.safetensors")
    with pytest.raises(CheckpointError) as e:
        read_lora(file, _shapes(tiny_dit()))
    text = str(e.value)
    assert "diffusion_model.blocks.0." in text and "(64, 64)" in text and ("(32, 4)" in text or "(4, 32)" in text)
    assert "another model" in text


def test_ti2v_lora_on_an_a14b_expert_is_refused(tmp_path: Path) -> None:
    file = write_tiny_lora(tmp_path / "ti2v.safetensors", TinyLora(task=TI2V_5B, style="full", layout="comfy"), seed=3)
    with pytest.raises(CheckpointError, match=r"\(64, 48, 1, 2, 2\).*\(64, 16, 1, 2, 2\)|head.head"):
        read_lora(file, _shapes(tiny_dit()))


def _write(tmp_path: Path, tensors: dict[str, torch.Tensor], name: str = "x.safetensors", metadata=None) -> Path:
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def _pair(module: str, rank: int = 2, dim: int = 64, prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    return {f"{prefix}{module}.lora_up.weight": torch.randn(dim, rank) * 0.1,
            f"{prefix}{module}.lora_down.weight": torch.randn(rank, dim) * 0.1}


def test_unmatched_keys_are_counted_listed_and_refused_below_90_percent(tmp_path: Path) -> None:
    good = {k: v for i in range(2) for attn in ("self_attn", "cross_attn") for m in "qkvo"
            for k, v in _pair(f"blocks.{i}.{attn}.{m}").items()}  # 32 keys
    extra = "diffusion_model.extra_thing.lora_up.weight"
    lora = read_lora(_write(tmp_path, {**good, extra: torch.randn(3, 2)}), _shapes(tiny_dit()))
    assert lora.num_matched == 32 and lora.unmatched == (extra,)
    assert "32 of 33 keys" in lora.summary()
    few = {**_pair("blocks.0.self_attn.q"), **_pair("blocks.1.self_attn.k"),
           **{f"lora_te_text_model_encoder_layers_{i}_mlp_fc1.lora_up.weight": torch.randn(8, 2)
              for i in range(3)}}
    with pytest.raises(CheckpointError) as e:
        read_lora(_write(tmp_path, few, "few.safetensors"), _shapes(tiny_dit()))
    text = str(e.value)
    assert "only 4 of its 7 keys" in text and "3 match nothing" in text
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in text and "90%" in text


def test_wan21_image_keys_are_skipped_and_counted(tmp_path: Path) -> None:
    tensors = {**_pair("blocks.0.cross_attn.q"), **_pair("blocks.0.cross_attn.k_img"),
               "diffusion_model.blocks.0.cross_attn.norm_k_img.diff": torch.randn(64),
               "diffusion_model.img_emb.proj.1.diff_b": torch.randn(64)}
    lora = read_lora(_write(tmp_path, tensors), _shapes(tiny_dit()))
    assert lora.num_image_keys == 4 and lora.num_matched == 2 and lora.unmatched == ()
    assert "4 Wan2.1 image keys skipped" in lora.summary()


def test_corrupt_incomplete_and_unsupported_files_are_clear_errors(tmp_path: Path) -> None:
    shapes = _shapes(tiny_dit())
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_lora(corrupt, shapes)
    with pytest.raises(CheckpointError, match="not found"):
        read_lora(tmp_path / "missing.safetensors", shapes)
    half = {"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(64, 2)}
    with pytest.raises(CheckpointError, match="no down matrix"):
        read_lora(_write(tmp_path, half, "half.safetensors"), shapes)
    dora = {**_pair("blocks.0.self_attn.q"), "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.ones(64, 1)}
    with pytest.raises(CheckpointError, match="DoRA"):
        read_lora(_write(tmp_path, dora, "dora.safetensors"), shapes)
    ranks = {"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(64, 3),
             "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(2, 64)}
    with pytest.raises(CheckpointError, match="different ranks"):
        read_lora(_write(tmp_path, ranks, "ranks.safetensors"), shapes)


def test_peft_metadata_alpha_sets_the_scale(tmp_path: Path) -> None:
    rank = 4
    tensors = {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(rank, 64),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.randn(64, rank)}
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": 2,
                                                 "transformer.use_rslora": False})}
    lora = read_lora(_write(tmp_path, tensors, metadata=meta), _shapes(tiny_dit()))
    assert lora.targets["blocks.0.self_attn.q.weight"].pairs[0].scale == 0.5
    rs = {"lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": 2,
                                               "transformer.use_rslora": True})}
    lora = read_lora(_write(tmp_path, tensors, "rs.safetensors", metadata=rs), _shapes(tiny_dit()))
    assert lora.targets["blocks.0.self_attn.q.weight"].pairs[0].scale == 2 / math.sqrt(rank)
    plain = read_lora(_write(tmp_path, tensors, "plain.safetensors"), _shapes(tiny_dit()))
    assert plain.targets["blocks.0.self_attn.q.weight"].pairs[0].scale == 1.0
    assert plain.layout == "diffusers"


def test_wan_fun_double_underscore_and_kohya_alpha_zero(tmp_path: Path) -> None:
    tensors = {"lora_unet__blocks_0_cross_attn_k.lora_up.weight": torch.randn(64, 2),
               "lora_unet__blocks_0_cross_attn_k.lora_down.weight": torch.randn(2, 64),
               "lora_unet__blocks_0_cross_attn_k.alpha": torch.tensor(0.0)}
    lora = read_lora(_write(tmp_path, tensors), _shapes(tiny_dit()))
    pair = lora.targets["blocks.0.cross_attn.k.weight"].pairs[0]
    assert lora.layout == "kohya" and pair.scale == 1.0  # alpha 0 means "no alpha", as kohya reads it


def test_expert_lora_with_wrong_strength_count_is_refused(tmp_path: Path) -> None:
    file = layout_lora(tmp_path, "bare", 1, "w.safetensors")
    model = tiny_dit()
    with pytest.raises(ValueError, match="one strength per expert"):
        load_expert_lora(file, [model, model], [1.0])
    with pytest.raises(ValueError, match="finite"):
        load_expert_lora(file, [model], [float("nan")])
    lora = load_expert_lora(file, [model], [1.0])
    with pytest.raises(ValueError, match="strengths"):
        LoraPatches([model, tiny_dit(1)], [ExpertLora(lora=lora.lora, strengths=(1.0,))])


def test_lora_on_compiled_blocks_is_refused(tmp_path: Path) -> None:
    """torch.compile traces the hooks into the block graph, which then outlives them; refused."""
    from wanbench.wan_core.compile import CompileConfig, apply_compile

    file = layout_lora(tmp_path, "kohya", 14)
    model = tiny_dit()
    lora = load_expert_lora(file, [model], [1.0])
    regions = apply_compile(model, CompileConfig(backend="eager"))  # lazy: nothing is compiled here
    try:
        with pytest.raises(ValueError, match="cannot be applied to a compiled WanBlock"):
            LoraPatches([model], [lora]).open()
    finally:
        regions.remove()
    with LoraPatches([model], [lora]) as patches:
        assert patches.num_patched > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_weights_get_the_merged_value_to_one_rounding(tmp_path: Path, dtype: torch.dtype) -> None:
    """Half-precision weights: the update is summed in float32 and added with one rounding, so the
    patched weight is the exactly merged value (float64 here) rounded to the nearest bf16/fp16."""
    file = layout_lora(tmp_path, "comfy_peft", 15)
    model = tiny_dit().to(dtype)
    lora = load_expert_lora(file, [model], [0.6])
    want, _ = hand_merge(model, file, "comfy", 0.6)  # float64 sums of the half weights, then cast
    seen: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in model.named_parameters()}

    def grab(module, args):
        for p in module.parameters():
            seen[names[id(p)]] = p.data.clone()

    with LoraPatches([model], [lora]):
        hooks = [model.blocks[0].register_forward_pre_hook(grab), model.head.register_forward_pre_hook(grab)]
        got = forward(model)
        for h in hooks:
            h.remove()
    base = {k: v.double() for k, v in model.state_dict().items()}
    exact, _ = hand_merge(model.double(), file, "comfy", 0.6)
    model.to(dtype)
    assert set(seen) >= {"blocks.0.self_attn.q.weight", "blocks.0.modulation", "head.head.weight"}
    for name, value in seen.items():
        assert value.dtype == dtype
        # one rounding to nearest: at most half a step of the dtype at the merged value
        bound = torch.finfo(dtype).eps * exact[name].abs() / 2 * (1 + 1e-3) + torch.finfo(dtype).tiny
        assert ((value.double() - exact[name]).abs() <= bound).all(), name
        assert not torch.equal(value.double(), base[name]), name
    ref = forward(merged_model(model, want).to(dtype))
    assert_close(got.float(), ref.float(), rel=5e-2)
