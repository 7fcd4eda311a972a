"""Compact weights: fp8 file layouts, every storage choice against the decoded-at-load path, the
per-block hooks under placement and exceptions, the order with a later weight transform (LoRA),
the UMT5 encoder, and the memory figures."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import golden_dir
from safetensors.torch import load_file
from wanbench.tiny_models import tiny_lora_targets
from wanbench.wan_core.checkpoints.dit import load_dit, save_dit
from wanbench.wan_core.checkpoints.fp8 import (
    QUANT_METADATA_KEY,
    QuantizedTensor,
    fp8_scaled_state_dict,
    split_fp8,
)
from wanbench.wan_core.checkpoints.io import read_raw_state_dict, read_state_dict, write_safetensors
from wanbench.wan_core.checkpoints.lora import save_lora
from wanbench.wan_core.checkpoints.t5 import load_text_encoder, read_t5_state_dict, save_text_encoder
from wanbench.wan_core.config import T2V_A14B, WEIGHT_STORAGES, preset
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.errors import CheckpointError
from wanbench.wan_core.placement import make_placement
from wanbench.wan_core.runtime.compact import (  # _stored_form: the storage's own conversion, for references
    _stored_form,
    add_weight_transform,
    block_matrix_names,
    compact_weights_of,
    resident_bytes,
    weight_bytes_estimate,
)
from wanbench.wan_core.runtime.lora import LoraPatches, load_expert_lora
from wanbench.wan_core.t5 import UMT5Encoder
from wanbench.wan_core.tokenizer import train_tiny_spiece

CFG = dataclasses.replace(preset("t2v", tiny=True).dit, dim=128, ffn_dim=256, num_heads=4, num_layers=2)


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_dit(seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    model = WanDiT(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    return model


def inputs(seed: int = 1) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 2, 8, 8, generator=g), torch.tensor([600]), [torch.randn(5, CFG.text_dim, generator=g)])


def decoded_at_load(path: Path, storage: str, dtype: torch.dtype) -> WanDiT:
    """The reference: the same stored values decoded once at load into a plain model."""
    raw = read_raw_state_dict(path)
    model = WanDiT(CFG).eval()
    names = block_matrix_names(model)
    sd = {}
    for key, value in raw.items():
        if key in names and storage != "default":
            stored = _stored_form(value, storage, dtype)
            value = stored.dequantise(dtype) if stored is not None else value
        sd[key] = value.dequantise(dtype) if isinstance(value, QuantizedTensor) else value.to(dtype)
    model.load_state_dict(sd)
    return model


# --------------------------------------------------------------------------------------------
# fp8 file layouts
# --------------------------------------------------------------------------------------------
def test_three_fp8_layouts_read_to_the_same_weights(tmp_path: Path) -> None:
    sd = random_dit().state_dict()
    pick = lambda key, value: key.startswith("blocks.") and key.endswith(".weight") and value.dim() == 2  # noqa: E731
    legacy = fp8_scaled_state_dict(sd, is_quantised=pick, dtype=torch.float16, layout="legacy")
    comfy_quant = fp8_scaled_state_dict(sd, is_quantised=pick, dtype=torch.float16, layout="comfy_quant")
    assert "scaled_fp8" in legacy and "blocks.0.ffn.0.scale_weight" in legacy
    assert json.loads(bytes(comfy_quant["blocks.0.ffn.0.comfy_quant"].tolist()))["format"] == "float8_e4m3fn"
    # 0.3.7x "mixed precision": the comfy_quant tensors replaced by one header entry
    layers = {k[: -len(".comfy_quant")]: {"format": "float8_e4m3fn"} for k in comfy_quant if k.endswith(".comfy_quant")}
    metadata_sd = {k: v for k, v in comfy_quant.items() if not k.endswith(".comfy_quant")}
    paths = {"legacy": write_safetensors(legacy, tmp_path / "legacy.safetensors"),
             "comfy_quant": write_safetensors(comfy_quant, tmp_path / "cq.safetensors"),
             "metadata": write_safetensors(metadata_sd, tmp_path / "meta.safetensors", metadata={
                 QUANT_METADATA_KEY: json.dumps({"format_version": "1.0", "layers": layers})})}
    read = {name: read_state_dict(p) for name, p in paths.items()}
    assert set(read["legacy"]) == set(sd)
    for name in ("comfy_quant", "metadata"):
        assert read[name].keys() == read["legacy"].keys()
        assert all(torch.equal(read[name][k], read["legacy"][k]) for k in sd), name
    raw = read_raw_state_dict(paths["metadata"])
    q = raw["blocks.1.self_attn.o.weight"]
    assert isinstance(q, QuantizedTensor) and q.raw.dtype == torch.float8_e4m3fn and q.format.scale.numel() == 1


def test_unsupported_quant_formats_and_bad_scales_are_named() -> None:
    w = torch.zeros(4, 4, dtype=torch.uint8)
    spec = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="layer 'blocks.0.ffn.0' is stored as 'nvfp4'"):
        split_fp8({"blocks.0.ffn.0.weight": w, "blocks.0.ffn.0.comfy_quant": spec})
    fp8 = torch.zeros(4, 4).to(torch.float8_e4m3fn)
    with pytest.raises(CheckpointError, match="holds 4 values; only one scale per tensor"):
        split_fp8({"l.weight": fp8, "l.weight_scale": torch.ones(4)})
    plain, q = split_fp8({"l.weight": fp8})
    assert not plain and float(q["l.weight"].format.scale) == 1.0  # unscaled fp8 has scale 1
    with pytest.raises(CheckpointError, match="not JSON"):
        split_fp8({}, {QUANT_METADATA_KEY: "{oops"})


# --------------------------------------------------------------------------------------------
# every storage against the decoded-at-load path
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("compact")
    model = random_dit()
    return {"fp16": save_dit(model, folder / "fp16.safetensors", dtype=torch.float16),
            "fp8": save_dit(model, folder / "fp8.safetensors", dtype=torch.float16, fp8_scaled=True),
            "gguf": save_dit(model, folder / "q8.gguf", layout="gguf", gguf_type="Q8_0")}


STORAGES = [s for s in WEIGHT_STORAGES if s != "fp8_e4m3fn_scaled_mm"]  # the fp8 matmul has its own tests


@pytest.mark.parametrize("file", ["fp16", "fp8", "gguf"])
@pytest.mark.parametrize("storage", STORAGES)
@torch.no_grad()
def test_compact_forward_equals_decoding_at_load(files: dict[str, Path], file: str, storage: str) -> None:
    if file == "gguf":
        pytest.importorskip("gguf")
    dtype = torch.float32
    model = load_dit(files[file], dtype=dtype, storage=storage)
    reference = decoded_at_load(files[file], "as_stored" if storage == "default" and file == "gguf" else storage,
                                dtype)
    args = inputs()
    out = model(*args)
    assert torch.equal(out, reference(*args)), (file, storage)
    handle = compact_weights_of(model)
    assert (handle is not None) == (storage != "default" or file == "gguf")  # float32 compute: all else is narrower
    if handle is not None:
        stored_dtype = model.blocks[0].ffn[0].weight.dtype
        assert stored_dtype != dtype and torch.equal(model(*args), out)  # stays compact between forwards
        assert resident_bytes(model) < resident_bytes(reference)


def test_fp8_file_as_stored_keeps_its_bytes(files: dict[str, Path]) -> None:
    model = load_dit(files["fp8"], storage="as_stored")
    raw = load_file(str(files["fp8"]))
    for name in block_matrix_names(model):
        param = dict(model.named_parameters())[name]
        assert torch.equal(param.data.view(torch.uint8), raw[name].view(torch.uint8)), name
    assert compact_weights_of(model).format_counts() == {"float8_e4m3fn": len(block_matrix_names(model))}


@torch.no_grad()
def test_compact_weights_stream_under_blocks_placement_and_survive_errors(files: dict[str, Path]) -> None:
    pytest.importorskip("gguf")
    model = load_dit(files["gguf"])
    args = inputs()
    reference = model(*args)
    weight = model.blocks[1].ffn[2].weight
    stored = weight.data.clone()

    def boom(*_: object) -> None:
        raise RuntimeError("simulated failure inside a block")

    with make_placement([model], "blocks", device="cpu", num_resident_blocks=1) as policy:
        active = policy.activate(0)
        assert torch.equal(active(*args), reference)
        hook = model.blocks[1].norm3.register_forward_pre_hook(boom)  # mid-block, after the decode
        with pytest.raises(RuntimeError, match="simulated failure"):
            active(*args)
        hook.remove()
        assert weight.dtype == torch.uint8 and torch.equal(weight.data, stored)
        assert torch.equal(active(*args), reference)


@torch.no_grad()
def test_a_later_weight_transform_sees_decoded_weights_and_restores_first(files: dict[str, Path]) -> None:
    """A LoRA-like delta registered with `add_weight_transform` adds to the decoded weight; the stored
    fp8 bytes are what remains after every forward (restore in reverse order)."""
    model = load_dit(files["fp8"], storage="fp8_e4m3fn_scaled")
    layer = model.blocks[0].self_attn.q
    delta = torch.randn_like(layer.bias)[:, None] * torch.randn(1, CFG.dim) * 1e-2
    seen: list[torch.dtype] = []
    saved: dict[str, torch.Tensor] = {}

    def patch(module: torch.nn.Module, args: object) -> None:
        seen.append(layer.weight.dtype)
        saved["w"] = layer.weight.data
        layer.weight.data = saved["w"] + delta

    def unpatch(module: torch.nn.Module, args: object, output: object) -> None:
        layer.weight.data = saved.pop("w")

    args = inputs()
    plain = load_dit(files["fp8"], storage="fp8_e4m3fn_scaled")
    expected_weight = dict(plain.named_parameters())["blocks.0.self_attn.q.weight"]
    handles = add_weight_transform(model.blocks[0], patch, unpatch)
    out = model(*args)
    assert seen == [torch.float32] and layer.weight.dtype == torch.float8_e4m3fn
    compact_weights_of(plain).remove()  # decode the reference model for good, then merge the delta by hand
    expected_weight.data += delta
    assert torch.equal(out, plain(*args))
    for h in handles:
        h.remove()


def test_remove_decodes_for_good_and_drops_the_hooks(files: dict[str, Path]) -> None:
    model = load_dit(files["fp8"], storage="fp8_e4m3fn_scaled")
    compact_weights_of(model).remove()
    assert compact_weights_of(model) is None
    assert model.blocks[0].ffn[0].weight.dtype == torch.float32
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in model.blocks)


def test_bad_storage_names_are_refused(files: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="weight storage must be one of"):
        load_dit(files["fp16"], storage="int4")


# --------------------------------------------------------------------------------------------
# UMT5
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", ["default", "fp8_e4m3fn_scaled", "bfloat16"])
@torch.no_grad()
def test_umt5_gguf_compact_equals_decoded_at_load(tmp_path: Path, storage: str) -> None:
    pytest.importorskip("gguf")
    cfg = dataclasses.replace(preset("t2v", tiny=True).t5, dim=256, dim_attn=256, dim_ffn=512)
    torch.manual_seed(0)
    encoder = UMT5Encoder(cfg).eval()
    # the tokenizer metadata (tests/test_gguf.py) is left out here: the gguf reader parses its 240k-byte
    # character map element by element, tens of seconds on a loaded machine; the weights are the point here
    path = save_text_encoder(encoder, tmp_path / "umt5_Q4_K_M.gguf", layout="gguf", gguf_type="Q4_K_M")
    te = load_text_encoder(path, dtype=torch.float32, storage=storage,
                           tokenizer_path=golden_dir() / "tokenizer_tiny" / "spiece.model")
    counts = compact_weights_of(te.encoder).format_counts()
    expected = {"default": {"Q4_K", "Q6_K"}, "fp8_e4m3fn_scaled": {"float8_e4m3fn"}, "bfloat16": {"bfloat16"}}
    assert set(counts) == expected[storage]
    sd, _ = read_t5_state_dict(path, dtype=torch.float32)
    dense = UMT5Encoder(cfg).eval()
    if storage == "default":
        dense.load_state_dict(sd)
    else:  # the same second conversion, at load
        names = block_matrix_names(dense)
        dense.load_state_dict({k: (_stored_form(v, storage, torch.float32).dequantise(torch.float32)
                                   if k in names else v) for k, v in sd.items()})
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    assert torch.equal(te.encoder(ids), dense(ids))


def test_umt5_refuses_fp8_matmul(tmp_path: Path) -> None:
    cfg = preset("t2v", tiny=True).t5
    path = save_text_encoder(UMT5Encoder(cfg), tmp_path / "t5.safetensors", spiece_bytes=train_tiny_spiece(1024))
    with pytest.raises(ValueError, match="fp8 matmul is a DiT option"):
        load_text_encoder(path, storage="fp8_e4m3fn_scaled_mm")


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------
def test_resident_bytes_and_the_a14b_estimate(files: dict[str, Path]) -> None:
    dense = load_dit(files["fp16"], dtype=torch.bfloat16)
    fp8 = load_dit(files["fp8"], dtype=torch.bfloat16, storage="as_stored")
    matrices = sum(p.numel() for n, p in dense.named_parameters() if n in block_matrix_names(dense))
    assert resident_bytes(dense) - resident_bytes(fp8) == matrices  # 2 bytes -> 1 byte per weight
    assert weight_bytes_estimate(CFG, "as_stored", torch.bfloat16) == resident_bytes(dense)
    assert weight_bytes_estimate(CFG, "fp8_e4m3fn_scaled", torch.bfloat16) == resident_bytes(fp8)
    a14b = T2V_A14B.dit
    fp8_gb = weight_bytes_estimate(a14b, "fp8_e4m3fn_scaled", torch.bfloat16) / 1e9
    bf16_gb = weight_bytes_estimate(a14b, "default", torch.bfloat16) / 1e9
    assert 14.0 < fp8_gb < 14.8 and 28.0 < bf16_gb < 29.0, (fp8_gb, bf16_gb)
    q8 = weight_bytes_estimate(a14b, "as_stored", torch.bfloat16, gguf_bytes_per_weight=34 / 32) / 1e9
    assert fp8_gb < q8 < bf16_gb


# --------------------------------------------------------------------------------------------
# with the LoRA patches of runtime/lora.py
# --------------------------------------------------------------------------------------------
def lora_file(tmp_path: Path) -> Path:
    """A kohya-layout LoRA with pairs on every block matrix of the CFG model (tiny-model tool content)."""
    with torch.device("meta"):
        params = {name: tuple(p.shape) for name, p in WanDiT(CFG).named_parameters()}
    return save_lora(tiny_lora_targets(params, "lightning", seed=4), tmp_path / "l.safetensors", layout="kohya")


@torch.no_grad()
def test_lora_on_gguf_weights_equals_lora_on_the_decoded_model(tmp_path: Path, files: dict[str, Path]) -> None:
    """GGUF blocks decoded per block, then the LoRA delta (per block, added after the decode): the
    same output as the LoRA on a plain model holding the decoded weights; blocks again after."""
    pytest.importorskip("gguf")
    file = lora_file(tmp_path)
    compact = load_dit(files["gguf"])
    dense = WanDiT(CFG).eval()
    dense.load_state_dict(read_state_dict(files["gguf"]))
    args = inputs()
    with LoraPatches([compact], [load_expert_lora(file, [compact], [0.8])]):
        got = compact(*args)
    with LoraPatches([dense], [load_expert_lora(file, [dense], [0.8])]):
        want = dense(*args)
    assert torch.equal(got, want) and not torch.equal(got, compact(*args))
    assert compact.blocks[0].self_attn.q.weight.dtype == torch.uint8


def test_lora_is_refused_on_fp8_matmul_weights(tmp_path: Path, files: dict[str, Path]) -> None:
    file = lora_file(tmp_path)
    model = load_dit(files["fp8"], dtype=torch.bfloat16, storage="fp8_e4m3fn_scaled_mm")
    with pytest.raises(ValueError, match="LoRA cannot be applied to expert 0.*load it with weight_dtype "
                                         "'fp8_e4m3fn_scaled'"):
        with LoraPatches([model], [load_expert_lora(file, [model], [1.0])]):
            pass
    assert all(not b._forward_pre_hooks or len(b._forward_pre_hooks) == 1 for b in model.blocks)  # storage only
