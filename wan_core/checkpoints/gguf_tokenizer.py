"""The UMT5 tokenizer of a GGUF text encoder: SentencePiece model <-> `tokenizer.ggml.*` metadata.

llama.cpp's T5 converter stores the SentencePiece (unigram) vocabulary as GGUF metadata: the
pieces, their scores and types, the normaliser's precompiled character map and its two flags, and
the special token ids. `spiece_from_fields` rebuilds a SentencePiece `ModelProto` from them (the
same pieces, normaliser and ids, so the same token ids for every text: tested against the original
model); `fields_from_spiece` is the inverse, for writing GGUF files. The protobuf wire format is
written and read here directly (no protobuf dependency); only the fields below are used.

ModelProto: 1 pieces {1 piece, 2 score, 3 type}, 2 trainer_spec {3 model_type, 4 vocab_size,
35 byte_fallback, 40 unk_id, 41 bos_id, 42 eos_id, 43 pad_id}, 3 normalizer_spec {1 name,
2 precompiled_charsmap, 3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_whitespaces}.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import CheckpointError

TOKENIZER_MODEL_KEY = "tokenizer.ggml.model"
TOKENS_KEY = "tokenizer.ggml.tokens"
SCORES_KEY = "tokenizer.ggml.scores"
TYPES_KEY = "tokenizer.ggml.token_type"
CHARSMAP_KEY = "tokenizer.ggml.precompiled_charsmap"
ADD_PREFIX_KEY = "tokenizer.ggml.add_space_prefix"
REMOVE_SPACES_KEY = "tokenizer.ggml.remove_extra_whitespaces"
ID_KEYS = {"unk_id": "tokenizer.ggml.unknown_token_id", "bos_id": "tokenizer.ggml.bos_token_id",
           "eos_id": "tokenizer.ggml.eos_token_id", "pad_id": "tokenizer.ggml.padding_token_id"}
T5_TOKENIZER = "t5"  # llama.cpp's name for a SentencePiece unigram vocabulary
_TRAINER_IDS = {"unk_id": 40, "bos_id": 41, "eos_id": 42, "pad_id": 43}
_UNIGRAM, _BYTE_PIECE = 1, 6
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


# --------------------------------------------------------------------------------------------
# protobuf wire format
# --------------------------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 values are written as 10-byte two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _len_field(field: int, data: bytes) -> bytes:
    return _key(field, _LEN) + _varint(len(data)) + data


def _int_field(field: int, value: int) -> bytes:
    return _key(field, _VARINT) + _varint(value)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise CheckpointError("truncated SentencePiece model (a varint runs past the end)")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of each field of a message: ints, or bytes for LEN/fixed."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire == _LEN:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire in (_FIXED32, _FIXED64):
            size = 4 if wire == _FIXED32 else 8
            value, pos = data[pos:pos + size], pos + size
        else:
            raise CheckpointError(f"unsupported protobuf wire type {wire} in a SentencePiece model")
        yield field, wire, value


def _signed32(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


# --------------------------------------------------------------------------------------------
# conversions
# --------------------------------------------------------------------------------------------
def fields_from_spiece(model_proto: bytes) -> dict[str, Any]:
    """The `tokenizer.ggml.*` metadata of a SentencePiece unigram model (llama.cpp's T5 keys)."""
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    trainer: dict[int, int] = {}
    normalizer: dict[int, Any] = {}
    for field, _, value in _fields(model_proto):
        if field == 1:
            piece = {f: v for f, _, v in _fields(value)}
            tokens.append(piece.get(1, b"").decode("utf-8"))
            scores.append(struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0)
            types.append(int(piece.get(3, 1)))
        elif field == 2:
            trainer = {f: v for f, w, v in _fields(value) if w == _VARINT}
        elif field == 3:
            normalizer = {f: v for f, _, v in _fields(value)}
    if trainer.get(3, _UNIGRAM) != _UNIGRAM:
        raise ValueError(f"only unigram SentencePiece models map to GGUF's t5 tokenizer; got model_type {trainer[3]}")
    out: dict[str, Any] = {TOKENIZER_MODEL_KEY: T5_TOKENIZER, TOKENS_KEY: tokens, SCORES_KEY: scores,
                           TYPES_KEY: types, ADD_PREFIX_KEY: bool(normalizer.get(3, 1)),
                           REMOVE_SPACES_KEY: bool(normalizer.get(4, 1))}
    if normalizer.get(2):
        out[CHARSMAP_KEY] = bytes(normalizer[2])
    defaults = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}
    for name, number in _TRAINER_IDS.items():
        value = _signed32(trainer.get(number, defaults[name] & ((1 << 64) - 1)))
        if value >= 0:
            out[ID_KEYS[name]] = value
    return out


def spiece_from_fields(fields: Mapping[str, Any]) -> bytes | None:
    """A SentencePiece `ModelProto` rebuilt from GGUF tokenizer metadata (None when the file has none).

    Raises `CheckpointError` when the metadata is not a T5 (unigram) vocabulary or is inconsistent.
    """
    if TOKENS_KEY not in fields:
        return None
    model = fields.get(TOKENIZER_MODEL_KEY)
    if model != T5_TOKENIZER:
        raise CheckpointError(f"the GGUF tokenizer is {model!r}, expected {T5_TOKENIZER!r} (a UMT5 "
                              "SentencePiece vocabulary); is this a UMT5 text encoder file?")
    tokens, scores = list(fields[TOKENS_KEY]), list(fields.get(SCORES_KEY, []))
    types = list(fields.get(TYPES_KEY, [1] * len(tokens)))
    if not len(tokens) == len(scores) == len(types):
        raise CheckpointError(f"GGUF tokenizer metadata is inconsistent: {len(tokens)} tokens, {len(scores)} "
                              f"scores, {len(types)} types; the file is corrupt")
    proto = bytearray()
    for token, score, kind in zip(tokens, scores, types, strict=True):
        piece = _len_field(1, str(token).encode("utf-8")) + _key(2, _FIXED32) + struct.pack("<f", float(score))
        proto += _len_field(1, piece + _int_field(3, int(kind)))
    trainer = _int_field(3, _UNIGRAM) + _int_field(4, len(tokens))
    trainer += _int_field(35, int(_BYTE_PIECE in types))
    for name, number in _TRAINER_IDS.items():
        trainer += _int_field(number, int(fields.get(ID_KEYS[name], -1)))
    proto += _len_field(2, trainer)
    charsmap = bytes(fields.get(CHARSMAP_KEY, b""))
    normalizer = _len_field(1, b"nmt_nfkc" if charsmap else b"identity")
    if charsmap:
        normalizer += _len_field(2, charsmap)
    normalizer += _int_field(3, int(bool(fields.get(ADD_PREFIX_KEY, True))))
    normalizer += _int_field(4, int(bool(fields.get(REMOVE_SPACES_KEY, True))))
    normalizer += _int_field(5, 1)
    proto += _len_field(3, normalizer)
    return bytes(proto)
