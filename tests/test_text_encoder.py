"""The whole text path (tokenizer + UMT5 encoder) on a prompt far longer than `text_len`."""

from __future__ import annotations

import logging

import pytest
import torch
from wanbench.wan_core.config import UMT5Config
from wanbench.wan_core.t5 import TextEncoder, UMT5Encoder
from wanbench.wan_core.tokenizer import WanTokenizer, train_tiny_spiece

TINY = UMT5Config().tiny()  # text_len 512, as the real encoder
LONG_PROMPT = "A slow aerial shot over a misty pine forest at dawn, birds rising, soft golden light. " * 120


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    torch.manual_seed(7)
    tokenizer = WanTokenizer.from_spiece_bytes(train_tiny_spiece(TINY.vocab_size), text_len=TINY.text_len)
    return TextEncoder(UMT5Encoder(TINY).eval(), tokenizer)


def test_very_long_prompt_is_truncated_with_a_warning(text_encoder: TextEncoder,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = text_encoder.tokenizer
    num_pieces = len(tokenizer.encode_pieces(LONG_PROMPT))
    keep = TINY.text_len - 1  # room for EOS
    assert num_pieces > 4 * TINY.text_len
    with caplog.at_level(logging.WARNING):
        long_embeds, short_embeds = text_encoder.encode([LONG_PROMPT, "a cat"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # only the long prompt, once
    assert f"{num_pieces - keep} tokens dropped" in warnings[0] and "prompt 0 " in warnings[0]
    assert long_embeds.shape == (TINY.text_len, TINY.dim)  # 511 pieces + EOS: every position
    assert short_embeds.shape == (len(tokenizer.encode_pieces("a cat")) + 1, TINY.dim)
    assert long_embeds.dtype == torch.float32 and bool(torch.isfinite(long_embeds).all())

    # truncation keeps the first 511 pieces: the same text cut there encodes to the same tensor
    cut = tokenizer.decode(tokenizer.encode_pieces(LONG_PROMPT)[:keep])
    assert torch.equal(text_encoder.encode([cut])[0], long_embeds)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        context, context_null = text_encoder.encode_pair(LONG_PROMPT)
    assert torch.equal(context, long_embeds)
    assert context_null.shape[1] == TINY.dim and context_null.shape[0] < TINY.text_len
    assert sum("tokens dropped" in r.getMessage() for r in caplog.records) == 1
