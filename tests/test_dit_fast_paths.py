"""The speed paths of the DiT and the UMT5 encoder give the results of the plain computations.

Each fast path (complex RoPE, patch embedding as a matmul, padding rows of the text computed once,
compacted cross-attention keys with a count bias, in-place updates without autograd, trimmed T5
padding, T5 attention through SDPA) is checked against the straightforward form on tiny sizes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from wanbench.wan_core.attention import attention
from wanbench.wan_core.config import DiTConfig, UMT5Config
from wanbench.wan_core.dit import (
    WanDiT,
    WanPatchEmbedding,
    WanRMSNorm,
    WanTextEmbedding,
    compact_text_keys,
    nonzero_rows,
)
from wanbench.wan_core.rope import RopeCache, apply_rope, apply_rope_complex, rotate
from wanbench.wan_core.t5 import UMT5Encoder, relative_position_bucket

TINY_DIT = DiTConfig(model_type="t2v", in_dim=4, out_dim=4, dim=32, ffn_dim=64, num_heads=2, num_layers=2,
                     text_dim=24, freq_dim=16, text_len=16)
TINY_T5 = UMT5Config(vocab_size=64, dim=32, dim_attn=32, dim_ffn=48, num_heads=4, num_layers=2,
                     num_buckets=8, max_distance=16, text_len=24)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim >= 2 else 0.1) + (p.ndim == 1) * 1.0)
    return model.eval()


def test_complex_rope_equals_real_rope() -> None:
    cache = RopeCache(16)
    grid = (2, 3, 4)
    x = torch.randn(2, 24, 3, 16)
    cos, sin = cache.cos_sin(grid, x.device)
    exact = dict(rtol=2e-7, atol=5e-7)  # float32 rounding (fused multiply-adds may differ)
    torch.testing.assert_close(apply_rope_complex(x, cache.freqs(grid, x.device)), apply_rope(x, cos, sin), **exact)
    longer = torch.randn(2, 30, 3, 16)  # rows past the grid pass through unchanged
    got = apply_rope_complex(longer, cache.freqs(grid, x.device))
    torch.testing.assert_close(got, apply_rope(longer, cos, sin), **exact)
    assert torch.equal(got[:, 24:], longer[:, 24:])
    torch.testing.assert_close(rotate(x, cache.tables(grid, x.device)), rotate(x, (cos, sin)), **exact)


def test_patch_embedding_matmul_equals_conv3d() -> None:
    layer = _randomize(WanPatchEmbedding(4, 8, (1, 2, 2)))
    x = torch.randn(2, 4, 3, 6, 7)  # width 7: the last column does not fill a patch and is dropped
    got = layer(x)
    exp = F.conv3d(x, layer.weight, layer.bias, stride=(1, 2, 2))
    assert got.shape == exp.shape == (2, 8, 3, 3, 3)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_text_embedding_computes_padding_rows_once_with_the_same_result() -> None:
    mlp = _randomize(WanTextEmbedding(24, 32))
    x = torch.zeros(2, 10, 24)
    x[0, :3] = torch.randn(3, 24)
    x[1, :6] = torch.randn(6, 24)
    x[1, 1] = 0.0  # a zero row before real rows is still a real row
    assert nonzero_rows(x).tolist() == [3, 6]
    exp = nn.Sequential.forward(mlp, torch.cat((x, x.new_zeros(2, 6, 24)), dim=1))
    got = mlp(x, pad_to=16)
    assert got.shape == (2, 16, 32)
    torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-6)


def test_compacted_keys_with_count_bias_equal_attention_over_all_duplicates() -> None:
    torch.manual_seed(0)
    b, s, d, heads = 2, 12, 16, 2
    rows = torch.tensor([3, 7])
    context = torch.randn(b, s, d)
    pad = torch.randn(d)
    for i, n in enumerate(rows.tolist()):
        context[i, n:] = pad  # every sample's padding embeds to the same row
    compact, bias = compact_text_keys(context, rows)
    assert compact.shape == (b, 8, d) and bias is not None
    expected_bias = math.log((s - 3) / (8 - 3))
    assert bias[0, 3].item() == pytest.approx(expected_bias) and bias[0, 2].item() == 0.0
    q = torch.randn(b, 5, heads, d // heads)
    full = attention(q, context.unflatten(-1, (heads, -1)), context.unflatten(-1, (heads, -1)))
    got = attention(q, compact.unflatten(-1, (heads, -1)), compact.unflatten(-1, (heads, -1)), key_bias=bias)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)
    assert compact_text_keys(context, torch.tensor([3, s]))[1] is None  # nothing to drop


def test_key_bias_is_refused_where_it_is_not_supported() -> None:
    q = torch.randn(1, 4, 2, 8)
    bias = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="key_bias is supported by the sdpa backends only"):
        attention(q, q, q, backend="flash_attn", key_bias=bias)
    with pytest.raises(ValueError, match="cannot be combined"):
        attention(q, q, q, key_bias=bias, k_lens=torch.tensor([2]))
    with pytest.raises(ValueError, match="key_bias must have shape"):
        attention(q, q, q, key_bias=torch.zeros(1, 3))


def _reference_forward(model: WanDiT, x: torch.Tensor, t: torch.Tensor, context: list[torch.Tensor]) -> torch.Tensor:
    """The plain path: conv patch embedding, full 512-style padded context, real RoPE, no key bias."""
    patches = F.conv3d(x, model.patch_embedding.weight, model.patch_embedding.bias,
                       stride=model.config.patch_size)
    grid = tuple(patches.shape[2:])
    tokens = patches.flatten(2).transpose(1, 2)
    e, e0 = model.embed_time(t[:, None])
    ctx = model.embed_text(context)
    assert ctx.shape[1] == model.config.text_len
    rope = model.rope.cos_sin(grid, x.device)
    with torch.enable_grad():  # out-of-place block path
        for block in model.blocks:
            tokens = block(tokens, e0, ctx, rope, "sdpa")
        out = model.head(tokens, e)
    f, h, w = grid
    return out.detach().view(x.shape[0], f, h, w, 1, 2, 2, -1).permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape)


def test_dit_fast_forward_equals_plain_forward() -> None:
    torch.manual_seed(0)
    model = _randomize(WanDiT(TINY_DIT))
    x = torch.randn(2, 4, 2, 4, 6)
    t = torch.tensor([700.0, 300.0])
    context = [torch.randn(5, 24), torch.randn(9, 24)]
    with torch.no_grad():
        exp = _reference_forward(model, x, t, context)
        got = model(x, t, context)
    with torch.inference_mode():
        got_inference = model(x, t, context)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, got_inference)


def test_dit_forward_with_autograd_matches_and_backpropagates() -> None:
    model = _randomize(WanDiT(TINY_DIT)).train()
    x = torch.randn(1, 4, 1, 4, 4)
    t = torch.tensor([500.0])
    context = [torch.randn(3, 24)]
    out = model(x, t, context)
    out.square().mean().backward()
    assert model.blocks[0].self_attn.q.weight.grad is not None
    assert model.text_embedding[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(out.detach(), model(x, t, context), rtol=1e-5, atol=1e-6)


def test_padded_context_tensor_rows_past_lens_are_ignored() -> None:
    model = _randomize(WanDiT(TINY_DIT))
    x = torch.randn(2, 4, 1, 4, 4)
    t = torch.tensor([100.0, 100.0])
    padded = torch.randn(2, 12, 24)  # rows past the lengths hold garbage that must not count
    lens = torch.tensor([4, 7])
    with torch.no_grad():
        got = model(x, t, padded, context_lens=lens)
        exp = model(x, t, [padded[0, :4], padded[1, :7]])
    torch.testing.assert_close(got, exp, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="context_lens must have shape"):
        model(x, t, padded, context_lens=torch.tensor([4]))


def test_t5_trimmed_padding_equals_the_untrimmed_computation() -> None:
    encoder = _randomize(UMT5Encoder(TINY_T5), seed=1)
    ids = torch.randint(2, 64, (2, 20))
    mask = torch.zeros(2, 20, dtype=torch.int64)
    mask[0, :5], mask[1, :9] = 1, 1
    ids = ids * mask
    with torch.no_grad():
        got = encoder(ids, mask)
        x = encoder.token_embedding(ids)
        for block in encoder.blocks:  # every position, as the official encoder runs it
            x = block(x, mask)
        exp = encoder.norm(x)
    assert got.shape == exp.shape
    for b, n in enumerate(mask.sum(1).tolist()):
        torch.testing.assert_close(got[b, :n], exp[b, :n], rtol=1e-4, atol=1e-5)
    assert torch.equal(got[:, 9:], torch.zeros_like(got[:, 9:]))


def test_t5_attention_through_sdpa_equals_the_explicit_softmax() -> None:
    encoder = _randomize(UMT5Encoder(TINY_T5), seed=2)
    attn = encoder.blocks[0].attn
    x = torch.randn(2, 7, 32)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    pos_bias = encoder.blocks[0].pos_embedding(7, 7)
    with torch.no_grad():
        got = attn(x, mask, pos_bias)
        q, k, v = (layer(x).unflatten(-1, (4, -1)) for layer in (attn.q, attn.k, attn.v))
        logits = torch.einsum("binc,bjnc->bnij", q, k) + pos_bias
        logits = logits.masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
        exp = attn.o(torch.einsum("bnij,bjnc->binc", logits.softmax(-1), v).flatten(2))
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length", [1, 2, 9, 300])
def test_t5_toeplitz_bias_equals_the_per_entry_lookup(length: int) -> None:
    # the per-offset window must give exactly the table entry of bucket(j - i) for every (i, j)
    emb = _randomize(UMT5Encoder(TINY_T5), seed=3).blocks[0].pos_embedding
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    buckets = relative_position_bucket(rel, num_buckets=emb.num_buckets, max_distance=emb.max_distance)
    with torch.no_grad():
        exp = emb.embedding(buckets).permute(2, 0, 1)[None]  # (1, N, L, L)
        got = emb(length, length)
        assert torch.equal(got, exp) and got.is_contiguous()
        rect = torch.arange(5)[None, :] - torch.arange(3)[:, None]  # 3 queries, 5 keys: the general path
        rect_buckets = relative_position_bucket(rect, num_buckets=emb.num_buckets, max_distance=emb.max_distance)
        assert torch.equal(emb(3, 5), emb.embedding(rect_buckets).permute(2, 0, 1)[None])


def test_t5_full_mask_is_dropped_and_equals_no_mask() -> None:
    # an all-ones mask takes the unmasked path; results equal the explicit mask-free run
    encoder = _randomize(UMT5Encoder(TINY_T5), seed=4)
    ids = torch.randint(1, TINY_T5.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(encoder(ids, torch.ones_like(ids)), encoder(ids, None))


def test_in_place_norm_and_rope_equal_the_allocating_forms() -> None:
    # the inference path overwrites the projections' outputs; the numbers must not change
    cache = RopeCache(16)
    grid = (2, 3, 4)
    x = torch.randn(2, 24, 4, 16)
    tables = cache.tables(grid, torch.device("cpu"))
    owned = x.clone()
    got = rotate(owned, tables, inplace=True)
    assert torch.equal(got, rotate(x, tables)) and got.data_ptr() == owned.data_ptr()
    norm = WanRMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        y = torch.randn(3, 5, 64)
        owned = y.clone()
        got = norm(owned, inplace=True)
        assert torch.equal(got, norm(y)) and got.data_ptr() == owned.data_ptr()
