"""Tokenizer: golden parity (cleaning, EOS, truncation, padding), loading paths, bad inputs, tiny model."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import fixture_params, golden_dir
from safetensors.torch import load_file, save_file
from wanbench.wan_core.config import DEFAULT_NEGATIVE_PROMPT, UMT5Config
from wanbench.wan_core.tokenizer import SPIECE_TENSOR_KEY, WanTokenizer, clean_text, train_tiny_spiece

TOKENIZER_FIXTURES = fixture_params(kind_prefix="tokenizer")


def _spiece_path(fixture: dict) -> Path:
    names = [f["file"] for f in fixture["files"] if f["file"].endswith(".model")]
    assert len(names) == 1, f"fixture {fixture['name']} should list one SentencePiece model"
    return golden_dir() / names[0]


def _expected(fixture: dict) -> dict[str, torch.Tensor]:
    name = next(f["file"] for f in fixture["files"] if f["file"].endswith(".safetensors"))
    return load_file(str(golden_dir() / name))


@pytest.fixture(scope="module")
def tiny_spiece() -> bytes:
    return train_tiny_spiece(UMT5Config().tiny().vocab_size)


@pytest.mark.parametrize("fixture", TOKENIZER_FIXTURES)
def test_cleaning_matches_golden(fixture: dict) -> None:
    assert len(fixture["texts"]) == len(fixture["cleaned_texts"])
    for text, cleaned in zip(fixture["texts"], fixture["cleaned_texts"], strict=True):
        assert clean_text(text) == cleaned


@pytest.mark.parametrize("fixture", TOKENIZER_FIXTURES)
def test_raw_pieces_match_golden(fixture: dict) -> None:
    tokenizer = WanTokenizer.from_path(_spiece_path(fixture))
    assert tokenizer.vocab_size == fixture["config"]["spm_vocab_size"]
    assert (tokenizer.pad_id, tokenizer.eos_id) == (fixture["config"]["pad_id"], fixture["config"]["eos_id"])
    for text, raw in zip(fixture["texts"], fixture["raw_spm_ids_of_cleaned_text"], strict=True):
        assert tokenizer.encode_pieces(text) == raw


@pytest.mark.parametrize("fixture", TOKENIZER_FIXTURES)
@pytest.mark.parametrize("source", ["folder", "file", "bytes"])
def test_ids_and_mask_match_golden(fixture: dict, source: str, caplog: pytest.LogCaptureFixture) -> None:
    expected = _expected(fixture)
    path = _spiece_path(fixture)
    for text_len in fixture["config"]["text_lens"]:
        if source == "folder":
            tokenizer = WanTokenizer.from_path(path.parent, text_len=text_len)
        elif source == "file":
            tokenizer = WanTokenizer.from_path(path, text_len=text_len)
        else:
            tokenizer = WanTokenizer.from_spiece_bytes(path.read_bytes(), text_len=text_len)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ids, mask = tokenizer(fixture["texts"])
        assert torch.equal(ids, expected[f"len{text_len}.ids"])
        assert torch.equal(mask, expected[f"len{text_len}.mask"])
        assert torch.equal(mask.sum(1), expected[f"len{text_len}.seq_lens"])
        raw_ids = fixture["raw_spm_ids_of_cleaned_text"]
        too_long = [i for i, raw in enumerate(raw_ids) if len(raw) > text_len - 1]
        warned = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert len(warned) == len(too_long)
        for i, message in zip(too_long, warned, strict=True):
            dropped = len(fixture["raw_spm_ids_of_cleaned_text"][i]) - (text_len - 1)
            assert f"prompt {i} " in message and f"{dropped} tokens dropped" in message


def test_spec_cleaning_examples() -> None:
    assert clean_text("Tom &amp;amp; Jerry &lt;3") == "Tom & Jerry <3"
    fancy = "\ufb01ne \u201ccurly\u201d \uff21\uff22\uff23\uff11\uff12\uff13"
    assert clean_text(fancy) == 'fine "curly" ABC123'
    assert clean_text("  a \t\n b  ") == "a b"
    assert "," in clean_text(DEFAULT_NEGATIVE_PROMPT) and "\uff0c" not in clean_text(DEFAULT_NEGATIVE_PROMPT)


def test_empty_prompt_is_eos_only(tiny_spiece: bytes) -> None:
    ids, mask = WanTokenizer.from_spiece_bytes(tiny_spiece, text_len=8)([""])
    assert ids.tolist() == [[1, 0, 0, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 0, 0, 0, 0, 0, 0, 0]]


def test_unicode_emoji_and_batch_of_different_lengths(tiny_spiece: bytes) -> None:
    tokenizer = WanTokenizer.from_spiece_bytes(tiny_spiece, text_len=64)
    texts = ["a cat", "一只猫在海滩上奔跑 🐱🌅 über die Straße", "кошка", "x " * 10]
    ids, mask = tokenizer(texts)
    lens = mask.sum(1)
    assert ids.shape == mask.shape == (4, 64) and ids.dtype == mask.dtype == torch.int64
    assert len(set(lens.tolist())) == 4
    for b, n in enumerate(lens.tolist()):
        assert ids[b, n - 1] == tokenizer.eos_id and (ids[b, n:] == tokenizer.pad_id).all()
        assert (mask[b, :n] == 1).all() and (mask[b, n:] == 0).all()
        assert tokenizer.decode(ids[b]) == clean_text(texts[b])  # byte fallback keeps the emoji


def test_very_long_prompt_is_truncated_to_text_len(tiny_spiece: bytes,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = WanTokenizer.from_spiece_bytes(tiny_spiece)  # text_len 512
    long_text = "camera slowly pans across the ocean wave " * 200
    pieces = tokenizer.encode_pieces(long_text)
    with caplog.at_level(logging.WARNING):
        ids, mask = tokenizer([long_text, "short"])
    assert ids.shape == (2, 512)
    assert mask[0].sum() == 512 and ids[0, -1] == tokenizer.eos_id
    assert ids[0, :511].tolist() == pieces[:511]
    assert f"{len(pieces) - 511} tokens dropped" in caplog.text
    assert "prompt 1 " not in caplog.text


def test_bad_inputs_have_clear_messages(tiny_spiece: bytes) -> None:
    tokenizer = WanTokenizer.from_spiece_bytes(tiny_spiece)
    with pytest.raises(ValueError, match="empty"):
        tokenizer([])
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str; got int"):
        tokenizer(["ok", 3])
    with pytest.raises(TypeError, match="single str"):
        tokenizer("a bare string")
    with pytest.raises(TypeError, match="expects a str"):
        clean_text(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        WanTokenizer.from_spiece_bytes(b"not a model")
    with pytest.raises(ValueError, match="text_len must be >= 2"):
        WanTokenizer.from_spiece_bytes(tiny_spiece, text_len=1)


def test_missing_tokenizer_says_where_it_looked(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as err:
        WanTokenizer.from_path(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "spiece.model") in message
    assert str(tmp_path / "google/umt5-xxl/spiece.model") in message
    assert "tokenizer.json alone" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WanTokenizer.from_path(tmp_path / "nowhere")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "te.safetensors"))
    with pytest.raises(FileNotFoundError, match="no embedded 'spiece_model'"):
        WanTokenizer.from_path(tmp_path / "te.safetensors")


def test_official_folder_layout_and_embedded_tensor(tiny_spiece: bytes, tmp_path: Path) -> None:
    folder = tmp_path / "google" / "umt5-xxl"
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(tiny_spiece)
    from_checkpoint_dir = WanTokenizer.from_path(tmp_path)
    tensor = from_checkpoint_dir.spiece_tensor()
    assert tensor.dtype == torch.uint8 and tensor.dim() == 1
    save_file({SPIECE_TENSOR_KEY: tensor, "w": torch.zeros(1)}, str(tmp_path / "te.safetensors"))
    from_file = WanTokenizer.from_path(tmp_path / "te.safetensors")
    from_tensor = WanTokenizer.from_spiece_bytes(tensor)
    texts = ["A cat runs on the beach", DEFAULT_NEGATIVE_PROMPT]
    reference = from_checkpoint_dir(texts)
    for other in (from_file, from_tensor):
        assert other.spiece_bytes == tiny_spiece
        for got, exp in zip(other(texts), reference, strict=True):
            assert torch.equal(got, exp)
    with pytest.raises(ValueError, match="1-D uint8"):
        WanTokenizer.from_spiece_bytes(torch.zeros(4))


def test_tiny_spiece_is_deterministic_and_umt5_like(tiny_spiece: bytes) -> None:
    assert train_tiny_spiece(UMT5Config().tiny().vocab_size) == tiny_spiece
    tokenizer = WanTokenizer.from_spiece_bytes(tiny_spiece)
    assert tokenizer.vocab_size == UMT5Config().tiny().vocab_size
    assert (tokenizer.pad_id, tokenizer.eos_id) == (0, 1)
    assert (tokenizer.unk_id, tokenizer.bos_id) == (2, -1)
    ids, _ = tokenizer(["A cat runs on the beach under golden sunset light", DEFAULT_NEGATIVE_PROMPT])
    assert int(ids.max()) < tokenizer.vocab_size
    with pytest.raises(ValueError, match="smaller vocab_size"):
        train_tiny_spiece(100_000)
