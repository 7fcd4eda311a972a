"""The UMT5 tokenizer: text cleaning plus a SentencePiece model, as the official pipeline uses it.

Spec section 4.3/4.4: every text is cleaned (`ftfy.fix_text`, `html.unescape` twice, strip,
whitespace runs collapsed to one space), encoded by SentencePiece, truncated to `text_len - 1`
pieces, given an EOS (`</s>`, id 1) and right-padded with `<pad>` (id 0) to `text_len` (512).
The mask is 1 on every real piece including the EOS.

The SentencePiece model comes from
- a tokenizer folder (the official release ships `google/umt5-xxl/` with `spiece.model`) or a
  `spiece.model` file: `WanTokenizer.from_path(path)`;
- the `spiece_model` uint8 tensor that ComfyUI's text-encoder safetensors embed:
  `WanTokenizer.from_path(file.safetensors)` or `WanTokenizer.from_spiece_bytes(data)`.

`train_tiny_spiece(vocab_size)` trains a small deterministic model (same special ids as umt5)
on a built-in multilingual text, for tiny test checkpoints.

Shapes: B batch (number of texts), S = text_len token positions.
"""

from __future__ import annotations

import html
import io
import itertools
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..util.deps import require
from .config import SAFETENSORS_SUFFIXES

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
SPIECE_TENSOR_KEY = "spiece_model"
DEFAULT_TEXT_LEN = 512
# Where a tokenizer folder keeps its SentencePiece model, relative to the folder given.
SPIECE_CANDIDATES = (
    "spiece.model",
    "tokenizer.model",
    "google/umt5-xxl/spiece.model",
    "umt5-xxl/spiece.model",
    "tokenizer/spiece.model",
)
_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """The official `clean='whitespace'` cleaning (spec section 4.4).

    `ftfy.fix_text` (mojibake, curly quotes, ligatures, full-width characters), `html.unescape`
    twice, strip, every whitespace run to one space, strip.
    """
    if not isinstance(text, str):
        raise TypeError(f"clean_text expects a str; got {type(text).__name__}")
    text = require("ftfy").fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def check_prompts(texts: Sequence[str], *, what: str = "prompts") -> list[str]:
    """Validate a list of prompts: a non-empty sequence of str (a bare str is refused)."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{what} must be a list of strings; got a single {type(texts).__name__} "
                        f"(wrap it: [{texts!r:.40}])")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{what} is empty; pass at least one string "
                         "(an empty string \"\" is a valid prompt)")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what}[{i}] must be a str; got {type(text).__name__} ({text!r:.40})")
    return texts


class WanTokenizer:
    """SentencePiece tokenizer with the official cleaning, EOS, truncation and padding.

    `pad_id`/`eos_id` are read from the SentencePiece model (0 and 1 for umt5).
    """

    def __init__(self, spiece_bytes: bytes, *, text_len: int = DEFAULT_TEXT_LEN,
                 source: str = "<bytes>") -> None:
        if text_len < 2:
            raise ValueError(f"text_len must be >= 2 (at least one piece plus EOS); got {text_len}")
        if not spiece_bytes:
            raise ValueError(f"empty SentencePiece model from {source}; expected the bytes of a spiece.model")
        processor = require("sentencepiece").SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(bytes(spiece_bytes))
        except RuntimeError as e:
            raise ValueError(f"{source} is not a valid SentencePiece model ({e}); expected a spiece.model "
                             "(e.g. the google/umt5-xxl tokenizer folder)") from e
        if processor.pad_id() < 0 or processor.eos_id() < 0:
            raise ValueError(f"SentencePiece model {source} has no <pad> or </s> piece (pad_id "
                             f"{processor.pad_id()}, eos_id {processor.eos_id()}); expected a T5-style model "
                             "with <pad> = 0 and </s> = 1 such as umt5-xxl's spiece.model")
        self._processor = processor
        self._spiece_bytes = bytes(spiece_bytes)
        self.text_len = text_len
        self.source = source

    # ---------------------------------------------------------------------------------- loading
    @classmethod
    def from_spiece_bytes(cls, data: bytes | bytearray | torch.Tensor, *, text_len: int = DEFAULT_TEXT_LEN,
                          source: str = "<bytes>") -> WanTokenizer:
        """From the bytes of a spiece.model, or the uint8 `spiece_model` tensor of a ComfyUI file."""
        if isinstance(data, torch.Tensor):
            if data.dtype != torch.uint8 or data.dim() != 1:
                raise ValueError(f"spiece_model tensor from {source} must be 1-D uint8; got "
                                 f"{data.dtype} of shape {tuple(data.shape)}")
            data = data.cpu().numpy().tobytes()
        return cls(bytes(data), text_len=text_len, source=source)

    @classmethod
    def from_path(cls, path: PathLike, *, text_len: int = DEFAULT_TEXT_LEN) -> WanTokenizer:
        """From a tokenizer folder, a `spiece.model` file or a `.safetensors` with `spiece_model`.

        A folder is searched for `SPIECE_CANDIDATES` (spiece.model, google/umt5-xxl/spiece.model,
        ...). Raises `FileNotFoundError` naming every place it looked.
        """
        p = Path(path)
        if p.is_dir():
            found = find_spiece_model(p)
            if found is None:
                raise FileNotFoundError(_not_found_message(p))
            return cls(found.read_bytes(), text_len=text_len, source=str(found))
        if not p.exists():
            raise FileNotFoundError(f"tokenizer not found: {p} does not exist; pass a tokenizer folder "
                                    "(e.g. <checkpoints>/google/umt5-xxl), a spiece.model file or a "
                                    "text-encoder .safetensors with an embedded 'spiece_model'")
        if p.suffix.lower() in SAFETENSORS_SUFFIXES:
            data = read_embedded_spiece(p)
            if data is None:
                raise FileNotFoundError(f"{p} has no embedded '{SPIECE_TENSOR_KEY}' tensor; pass the "
                                        "tokenizer folder (google/umt5-xxl) or its spiece.model instead")
            return cls(data, text_len=text_len, source=f"{p}:{SPIECE_TENSOR_KEY}")
        return cls(p.read_bytes(), text_len=text_len, source=str(p))

    # ------------------------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._processor.pad_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    @property
    def unk_id(self) -> int:
        return self._processor.unk_id()

    @property
    def bos_id(self) -> int:
        """-1 for umt5: no BOS is ever added."""
        return self._processor.bos_id()

    @property
    def spiece_bytes(self) -> bytes:
        """The serialized SentencePiece model (what ComfyUI files embed as `spiece_model`)."""
        return self._spiece_bytes

    def spiece_tensor(self) -> torch.Tensor:
        """The model as the 1-D uint8 tensor ComfyUI stores under `spiece_model`."""
        return torch.frombuffer(bytearray(self._spiece_bytes), dtype=torch.uint8).clone()

    # -------------------------------------------------------------------------------- encoding
    def encode_pieces(self, text: str) -> list[int]:
        """Cleaned text -> SentencePiece ids, without EOS and without truncation."""
        return list(self._processor.encode(clean_text(text), out_type=int))

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; pad and EOS ids are skipped."""
        specials = {self.pad_id, self.eos_id}
        return self._processor.decode([int(i) for i in ids if int(i) not in specials])

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize a batch the way the official T5 wrapper does.

        Shapes:
            texts: B strings
            returns ids (B, S) int64 and mask (B, S) int64 with S = text_len; mask.sum(1) are the
            true lengths (pieces + EOS, at least 1).
        """
        texts = check_prompts(texts, what="texts")
        ids = torch.full((len(texts), self.text_len), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(texts), self.text_len), dtype=torch.int64)
        keep = self.text_len - 1
        for b, text in enumerate(texts):
            pieces = self.encode_pieces(text)
            if len(pieces) > keep:
                logger.warning("prompt %d is %d tokens long; only %d fit (text_len %d with EOS): %d tokens "
                               "dropped from the end", b, len(pieces), keep, self.text_len,
                               len(pieces) - keep)
                pieces = pieces[:keep]
            row = pieces + [self.eos_id]
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.int64)
            mask[b, : len(row)] = 1
        return ids, mask

    def __repr__(self) -> str:
        return f"WanTokenizer(vocab_size={self.vocab_size}, text_len={self.text_len}, source={self.source!r})"


def find_spiece_model(folder: PathLike) -> Path | None:
    """The first `SPIECE_CANDIDATES` entry that exists under `folder`, or None."""
    for rel in SPIECE_CANDIDATES:
        candidate = Path(folder) / rel
        if candidate.is_file():
            return candidate
    return None


def searched_places(folder: PathLike) -> list[str]:
    """The paths `find_spiece_model(folder)` tries, for error messages."""
    return [str(Path(folder) / rel) for rel in SPIECE_CANDIDATES]


def _not_found_message(folder: Path) -> str:
    hint = ""
    if (folder / "tokenizer.json").is_file():
        hint = " (a tokenizer.json alone is not enough: the SentencePiece spiece.model is needed)"
    return (f"no SentencePiece tokenizer in {folder}{hint}; "
            f"looked for: {', '.join(searched_places(folder))}. "
            "Pass the google/umt5-xxl folder of the official release, its spiece.model, or a ComfyUI "
            "text-encoder .safetensors with an embedded 'spiece_model'")


def read_embedded_spiece(path: PathLike) -> bytes | None:
    """The `spiece_model` tensor of a safetensors file as bytes (None when absent). Reads only that tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = [k for k in handle.keys() if k == SPIECE_TENSOR_KEY or k.endswith("." + SPIECE_TENSOR_KEY)]
            if not keys:
                return None
            tensor = handle.get_tensor(keys[0])
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-download it") from e
    if tensor.dtype != torch.uint8:
        raise ValueError(f"'{keys[0]}' in {path} must be uint8; got {tensor.dtype}")
    return tensor.numpy().tobytes()


# ------------------------------------------------------------------------------------------------
# A tiny SentencePiece model for test checkpoints
# ------------------------------------------------------------------------------------------------
_TINY_WORDS = {
    "en": "a the cat dog bird horse fish runs walks flies swims jumps on under across through over beach "
          "city street forest river ocean mountain sky golden sunset light night morning rain snow wind "
          "camera slowly quickly pans zooms close-up wide shot cinematic portrait of young old woman man "
          "child smiling dancing reading painting red blue green yellow purple bright dark soft warm cold "
          "waves crashing against rocks lighthouse harbour boats sailing clouds drifting lightning storm "
          "waterfall meadow flowers blooming butterflies autumn leaves falling winter village chimney smoke "
          "astronaut floating spaceship nebula galaxy planets orbit robot walking neon signs reflections "
          "puddles skyscrapers traffic crowded market vendors selling fruit vegetables bicycle riding "
          "musician playing guitar violin piano concert stage spotlight audience cheering applause "
          "chef cooking kitchen steam vegetables knife chopping table wooden window curtains breeze "
          "tracking dolly handheld aerial drone footage slow motion timelapse focus blur depth field "
          "realistic photorealistic animation anime watercolor sketch detailed texture lighting shadows",
    "de": "eine Katze läuft am Strand unter goldenem Licht der Hund springt über den Fluss im Wald bei Nacht "
          "langsam schnell Kamera Straße Berg Himmel Regen Schnee",
    "fr": "un chat court sur la plage sous une lumière dorée le chien saute par-dessus la rivière dans la "
          "forêt la nuit lentement vite caméra rue montagne ciel pluie neige",
    "es": "un gato corre en la playa bajo la luz dorada el perro salta sobre el río en el bosque de noche "
          "despacio rápido cámara calle montaña cielo lluvia nieve",
    "ru": "кошка бежит по пляжу под золотым светом собака прыгает через реку в лесу ночью медленно быстро",
    "zh": "一只猫在金色的阳光下沿着海滩奔跑 小狗在夜晚的森林里跳过河流 "
          "镜头缓慢地推进 城市街道 山脉 天空 下雨 下雪 "
          "色调艳丽 过曝 静态 细节模糊不清 字幕 风格 作品 画作 画面 静止 整体发灰 最差质量 低质量 压缩残留 "
          "丑陋的 残缺的 多余的手指 画得不好的手部 脸部 畸形的 毁容的 "
          "形态畸形的肢体 手指融合 杂乱的背景 三条腿 背景人很多 倒着走",
    "ja": "猫が金色の光の中で浜辺を走る 犬が夜の森で川を飛び越える カメラがゆっくりとパンする",
    "ko": "고양이가 황금빛 햇살 아래 해변을 달린다 강아지가 밤의 숲에서 강을 뛰어넘는다",
    "it": "un gatto corre sulla spiaggia sotto la luce dorata il cane salta sopra il fiume nel bosco di "
          "notte lentamente velocemente telecamera strada montagna cielo pioggia neve tramonto onde "
          "scogliera",
    "pt": "um gato corre na praia sob a luz dourada o cachorro pula sobre o rio na floresta à noite devagar "
          "rapidamente câmera rua montanha céu chuva neve pôr do sol ondas cidade",
    "ar": "قطة تجري على الشاطئ تحت ضوء ذهبي الكلب يقفز فوق النهر في الغابة ليلا الكاميرا ببطء",
    "hi": "एक बिल्ली सुनहरी रोशनी में समुद्र तट पर दौड़ती है कुत्ता रात में जंगल में नदी पार करता है",
    "el": "μια γάτα τρέχει στην παραλία κάτω από το χρυσό φως ο σκύλος πηδά πάνω από το ποτάμι",
    "num": "0 1 2 3 4 5 6 7 8 9 10 16 24 81 121 480 720 1280 2025 4K 8K HDR JPEG 3D 2x",
}


def _tiny_corpus() -> Iterator[str]:
    """Deterministic sentences: each language's words in rotating windows, plus punctuation."""
    marks = (".", ",", "!", "?", ";", ":", "\"", "'", "(", ")", "-", "&", "<3")
    for lang, text in _TINY_WORDS.items():
        yield text
        words = text.split()
        for width, offset in itertools.product((3, 5, 8), range(len(words))):
            window = [words[(offset + k * 7) % len(words)] for k in range(width)]
            joiner = "" if lang in ("zh", "ja") else " "
            yield joiner.join(window) + marks[(offset + width) % len(marks)]


def train_tiny_spiece(vocab_size: int = 1024) -> bytes:
    """Train a small unigram SentencePiece model on a built-in multilingual text. Deterministic.

    Special ids match umt5: 0 = <pad>, 1 = </s>, 2 = <unk>, no BOS; unknown characters fall back
    to byte pieces. Returns the serialized model (what `from_spiece_bytes` and the `spiece_model`
    tensor take). Raises ValueError when the corpus cannot supply `vocab_size` pieces.
    """
    writer = io.BytesIO()
    try:
        require("sentencepiece").SentencePieceTrainer.train(
            sentence_iterator=_tiny_corpus(),
            model_writer=writer,
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            byte_fallback=True,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            num_threads=1,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"cannot train a SentencePiece model with vocab_size {vocab_size} on the built-in "
                         f"text ({e}); use a smaller vocab_size") from e
    return writer.getvalue()
