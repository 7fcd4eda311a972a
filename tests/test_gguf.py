"""GGUF: the torch decoders against the `gguf` package's reference, the K-quant encoders, reading and
writing files (DiT and UMT5 layouts, the tokenizer metadata) and the errors for what cannot be read."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import golden_dir
from wanbench.wan_core.checkpoints import gguf_quants
from wanbench.wan_core.checkpoints.dit import load_dit, read_dit_config, save_dit
from wanbench.wan_core.checkpoints.fp8 import QuantizedTensor
from wanbench.wan_core.checkpoints.gguf import ORIG_SHAPE_KEY, quantised_state_dict, read_gguf, write_gguf
from wanbench.wan_core.checkpoints.gguf_quants import QUANT_TYPES, GGUFQuant, dequantize, quantize
from wanbench.wan_core.checkpoints.gguf_tokenizer import fields_from_spiece, spiece_from_fields
from wanbench.wan_core.checkpoints.io import read_shapes, read_state_dict
from wanbench.wan_core.config import preset
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.errors import CheckpointError
from wanbench.wan_core.tokenizer import train_tiny_spiece

gguf = pytest.importorskip("gguf")  # a test dependency (pyproject [test]); the pack runs without it

# byte offsets of the float16 scale fields of each block type (they must be finite in random blocks)
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
              "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(qtype: str, num_blocks: int, seed: int = 0) -> torch.Tensor:
    """Random bytes for every field, finite positive float16 scales: every bit of the layout is used."""
    _, _, size = QUANT_TYPES[qtype]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (num_blocks, size), generator=g, dtype=torch.uint8)
    for start in F16_FIELDS[qtype]:
        scale = (torch.rand(num_blocks, generator=g) * 0.05 + 1e-3).to(torch.float16)
        raw[:, start:start + 2] = scale.view(torch.uint8).reshape(num_blocks, 2)
    return raw


@pytest.mark.parametrize("qtype", sorted(QUANT_TYPES))
def test_decoders_match_the_gguf_reference_bit_for_bit(qtype: str) -> None:
    _, block, _ = QUANT_TYPES[qtype]
    raw = random_blocks(qtype, 24).reshape(4, -1)  # 4 rows of 6 blocks
    shape = (4, 6 * block)
    ours = dequantize(raw, qtype, shape)
    reference = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[qtype]))
    assert ours.dtype == torch.float32 and tuple(ours.shape) == shape
    assert torch.equal(ours, reference)


# relative L2 error of encode -> decode on N(0, 0.02) weights (a bound, and what it measures here)
ENCODER_BOUNDS = {"Q8_0": 0.01, "Q5_0": 0.06, "Q4_0": 0.11, "Q6_K": 0.03, "Q5_K": 0.05, "Q4_K": 0.1}


@pytest.mark.parametrize("qtype", sorted(ENCODER_BOUNDS))
def test_encoders_round_trip_within_their_precision(qtype: str) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 512, generator=g) * 0.02
    raw = quantize(w, qtype)
    assert raw.dtype == torch.uint8 and raw.shape == (32, 512 // QUANT_TYPES[qtype][1] * QUANT_TYPES[qtype][2])
    back = dequantize(raw, qtype, tuple(w.shape))
    reference = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[qtype]))
    assert torch.equal(back, reference)  # the bytes are valid ggml blocks
    rel = ((back - w).norm() / w.norm()).item()
    assert rel < ENCODER_BOUNDS[qtype], rel


def test_k_quant_encoders_reach_every_level() -> None:
    """The encoders use the whole code range (a min-max bug would leave levels unused)."""
    w = torch.linspace(-1, 1, 256).repeat(8, 1)
    q4 = quantize(w, "Q4_K")
    assert {int(b) & 15 for b in q4[:, 16:].flatten()} == set(range(16))


def test_wrong_byte_count_and_unencodable_types_are_refused() -> None:
    with pytest.raises(ValueError, match="Q8_0 data for shape"):
        dequantize(torch.zeros(33, dtype=torch.uint8), "Q8_0", (32,))
    with pytest.raises(ValueError, match="cannot encode Q3_K"):
        quantize(torch.zeros(1, 256), "Q3_K")
    with pytest.raises(ValueError, match="rows of a multiple of 256"):
        quantize(torch.zeros(1, 64), "Q4_K")
    with pytest.raises(ValueError, match="unsupported GGUF quantisation 'IQ4_XS'"):
        GGUFQuant("IQ4_XS", (256,))


def tiny_dit(dim: int = 256) -> WanDiT:
    cfg = dataclasses.replace(preset("t2v", tiny=True).dit, dim=dim, ffn_dim=2 * dim, num_heads=4, num_layers=2)
    torch.manual_seed(0)
    model = WanDiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.02)
    return model


def test_dit_file_follows_the_comfyui_gguf_layout(tmp_path: Path) -> None:
    model = tiny_dit()
    path = save_dit(model, tmp_path / "dit_Q4_K_M.gguf", layout="gguf", gguf_type="Q4_K_M")
    f = read_gguf(path)
    assert f.architecture == "wan"
    types = {k: (v.format.name if isinstance(v, QuantizedTensor) else str(v.dtype)) for k, v in f.tensors.items()}
    assert types["blocks.0.self_attn.q.weight"] == "Q4_K" and types["blocks.0.ffn.0.weight"] == "Q4_K"
    assert types["blocks.0.self_attn.v.weight"] == "Q6_K" and types["blocks.1.ffn.2.weight"] == "Q6_K"
    assert types["patch_embedding.weight"] == "torch.float32" and f.tensors["patch_embedding.weight"].dim() == 5
    assert types["blocks.0.modulation"] == "torch.float32" and types["blocks.0.norm3.weight"] == "torch.float32"
    assert types["text_embedding.0.weight"] == "torch.float16" and types["head.head.weight"] == "torch.float16"
    assert read_dit_config(path) == model.config  # from the header and the wanbench.dit_config field
    shapes = read_shapes(path)
    assert all(shapes[k].shape == v.shape for k, v in model.state_dict().items())


def test_dit_rows_that_are_not_whole_k_blocks_fall_back_to_f16() -> None:
    sd = {"blocks.0.self_attn.q.weight": torch.randn(64, 64)}
    out = quantised_state_dict(sd, "Q4_K_M")
    assert out["blocks.0.self_attn.q.weight"].dtype == torch.float16
    assert isinstance(quantised_state_dict(sd, "Q8_0")["blocks.0.self_attn.q.weight"], QuantizedTensor)


@pytest.mark.parametrize("recipe", ["Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K"])
@torch.no_grad()
def test_quantised_dit_forward_equals_the_dequantised_then_float_path(tmp_path: Path, recipe: str) -> None:
    """The compact GGUF model (decoded per block) gives the very numbers of decoding at load."""
    path = save_dit(tiny_dit(), tmp_path / f"dit_{recipe}.gguf", layout="gguf", gguf_type=recipe)
    compact = load_dit(path)  # default: GGUF stays quantised
    assert compact.blocks[0].self_attn.q.weight.dtype == torch.uint8
    dense = WanDiT(compact.config).eval()
    dense.load_state_dict(read_state_dict(path))  # every tensor decoded to float32 at load
    x, t, ctx = torch.randn(1, 16, 2, 8, 8), torch.tensor([700]), [torch.randn(6, compact.config.text_dim)]
    assert torch.equal(compact(x, t, ctx), dense(x, t, ctx))
    assert compact.blocks[0].self_attn.q.weight.dtype == torch.uint8  # back to blocks after the forward


def test_orig_shape_metadata_gives_the_torch_shape(tmp_path: Path) -> None:
    w = torch.randn(4, 64)
    raw = quantize(w.reshape(8, 32), "Q8_0")  # stored as (8, 32) rows, as sd1/sdxl files do
    path = write_gguf(tmp_path / "x.gguf", {"w": QuantizedTensor(raw, GGUFQuant("Q8_0", (8, 32)))}, arch="x",
                      fields={ORIG_SHAPE_KEY + "w": [4, 64]})
    value = read_gguf(path).tensors["w"]
    assert value.shape == (4, 64)
    torch.testing.assert_close(value.dequantise(), w, rtol=0, atol=float(w.abs().max()) / 127)  # half a Q8_0 step


def test_unsupported_types_and_corrupt_files_are_named(tmp_path: Path) -> None:
    writer_raw = np.zeros((4, 136), dtype=np.uint8)  # one IQ4_XS row of 256 weights per row
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "wan")
    w.add_tensor("blocks.0.self_attn.q.weight", writer_raw, raw_dtype=gguf.GGMLQuantizationType.IQ4_XS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="IQ4_XS, which this package cannot decode.*Q4_K_M"):
        read_gguf(tmp_path / "iq.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        read_gguf(bad)


def test_missing_gguf_package_gives_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.import_module

    def no_gguf(name: str, *args: object) -> object:
        if name == "gguf":
            raise ImportError("No module named 'gguf'")
        return real(name, *args)

    monkeypatch.setattr(gguf_quants.importlib, "import_module", no_gguf)
    with pytest.raises(ImportError, match="pip install gguf"):
        read_gguf(tmp_path / "any.gguf")


@pytest.mark.parametrize("source", ["golden", "trained"])
def test_tokenizer_metadata_rebuilds_the_same_sentencepiece_model(source: str) -> None:
    data = ((golden_dir() / "tokenizer_tiny" / "spiece.model").read_bytes() if source == "golden"
            else train_tiny_spiece(1024))
    fields = fields_from_spiece(data)
    assert fields["tokenizer.ggml.model"] == "t5" and "tokenizer.ggml.precompiled_charsmap" in fields
    rebuilt = spiece_from_fields(fields)
    original, copy = spm.SentencePieceProcessor(model_proto=data), spm.SentencePieceProcessor(model_proto=rebuilt)
    texts = ["A cat jumps over the fence", "  spaces   and\ttabs ", "Ｆｕｌｌｗｉｄｔｈ ①②③ ﬁ ligature",
             "色调艳丽，过曝，静态", "naïve café Ünïcödé", "12345 6.78 -9", "emoji 😀 and \u200b zero width", ""]
    for text in texts:
        assert copy.encode(text) == original.encode(text), text
    assert copy.piece_size() == original.piece_size() and copy.eos_id() == original.eos_id()


def test_tokenizer_metadata_errors() -> None:
    assert spiece_from_fields({}) is None
    with pytest.raises(CheckpointError, match="the GGUF tokenizer is 'gpt2'"):
        spiece_from_fields({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(CheckpointError, match="1 tokens, 2 scores"):
        spiece_from_fields({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"],
                            "tokenizer.ggml.scores": [0.0, 1.0], "tokenizer.ggml.token_type": [1]})


@pytest.mark.slow  # the gguf reader parses the tokenizer's 240k-byte character map element by element
@torch.no_grad()
def test_umt5_gguf_file_brings_its_tokenizer(tmp_path: Path) -> None:
    """A UMT5 GGUF (llama.cpp layout, tokenizer as metadata) loads as a text encoder: same token ids
    as the SentencePiece model it was written from, weights decoded per block."""
    from wanbench.wan_core.checkpoints.t5 import load_text_encoder, save_text_encoder
    from wanbench.wan_core.t5 import UMT5Encoder

    cfg = preset("t2v", tiny=True).t5
    spiece = train_tiny_spiece(cfg.vocab_size)
    path = save_text_encoder(UMT5Encoder(cfg), tmp_path / "umt5_Q8_0.gguf", layout="gguf", gguf_type="Q8_0",
                             spiece_bytes=spiece)
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert {"token_embd.weight", "enc.blk.0.attn_q.weight", "enc.blk.1.ffn_down.weight",
            "enc.output_norm.weight", "enc.blk.0.attn_rel_b.weight"} <= names
    te = load_text_encoder(path, dtype=torch.float32)
    assert te.tokenizer.source.endswith("tokenizer.ggml metadata")
    original = spm.SentencePieceProcessor(model_proto=spiece)
    for text in ("a cat jumps", "Ｆｕｌｌｗｉｄｔｈ text ①"):
        assert te.tokenizer.encode_pieces(text) == original.encode(text, out_type=int)
    assert te.encoder.blocks[0].attn.q.weight.dtype == torch.uint8
