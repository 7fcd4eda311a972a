"""Attention backends: the sdpa reference against float64 math, the registry and its errors."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import pytest
import torch
from wanbench.wan_core import attention as attn_mod
from wanbench.wan_core import dit as dit_mod
from wanbench.wan_core.attention import BACKENDS, attention, available_backends
from wanbench.wan_core.config import preset
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.errors import BackendUnavailableError


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        k_lens: torch.Tensor | None) -> torch.Tensor:
    """Plain float64 softmax attention with key padding, (B, L, N, Dh) layout."""
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, N, L, Dh)
    scores = q64 @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if k_lens is not None:
        keep = torch.arange(k.shape[1])[None, :] < k_lens[:, None]
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v64).transpose(1, 2)


def qkv(batch: int = 2, lq: int = 10, lk: int = 12, heads: int = 3, dh: int = 16,
        dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(11)
    return tuple(torch.randn(batch, n, heads, dh, generator=g).to(device=device, dtype=dtype)
                 for n in (lq, lk, lk))


def test_sdpa_matches_float64_reference_with_key_padding() -> None:
    q, k, v = qkv()
    k_lens = torch.tensor([12, 5])
    got = attention(q, k, v, k_lens=k_lens)
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, k_lens), rtol=1e-5, atol=1e-6)
    assert got.dtype == torch.float32 and got.shape == q.shape
    full = attention(q, k, v, k_lens=torch.tensor([12, 12]))
    torch.testing.assert_close(full, attention(q, k, v), rtol=0, atol=0)


def test_key_padding_ignores_padded_keys() -> None:
    q, k, v = qkv()
    k_lens = torch.tensor([7, 7])
    k2, v2 = k.clone(), v.clone()
    k2[:, 7:] = 100.0
    v2[:, 7:] = -100.0
    torch.testing.assert_close(attention(q, k2, v2, k_lens=k_lens), attention(q, k, v, k_lens=k_lens))


def test_unknown_backend_is_named() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown attention backend 'magic'.*sdpa"):
        attention(q, k, v, backend="magic")


@pytest.mark.parametrize("name", ["flash_attn", "flash_attn3", "sage", "sage3"])
def test_unavailable_backend_gives_install_hint(name: str) -> None:
    backend = BACKENDS[name]
    if backend.is_installed():
        pytest.skip(f"{backend.module} is installed here")
    q, k, v = qkv()
    with pytest.raises(BackendUnavailableError, match=f"'{name}' is not available.*{re.escape(backend.install_hint)}"):
        attention(q, k, v, backend=name)
    assert name not in available_backends()


def test_supports_gives_reasons_on_cpu() -> None:
    q, k, v = qkv()
    for name in ("flash_attn", "flash_attn3", "sage", "sage3", "sdpa_efficient", "sdpa_cudnn"):
        assert "CUDA" in BACKENDS[name].supports(q, k, v, None), name
    for name in ("sdpa", "sdpa_flash", "sdpa_math"):
        assert BACKENDS[name].supports(q, k, v, None) is None, name
    assert {"sdpa", "sdpa_flash", "sdpa_math", "auto"} <= set(available_backends())


def test_sage_hint_names_version_2_and_the_source_build() -> None:
    """The registry's `sageattention` is SageAttention 1: the hint must not send users there."""
    hint = BACKENDS["sage"].install_hint
    assert "SageAttention 2" in hint and "git+https://github.com/thu-ml/SageAttention" in hint
    assert "pip install sageattention" not in hint


@pytest.mark.parametrize("name", ["sdpa_flash", "sdpa_math"])
def test_pinned_sdpa_kernels_match_the_reference_on_cpu(name: str) -> None:
    q, k, v = qkv()
    k_lens = torch.tensor([12, 5])
    torch.testing.assert_close(attention(q, k, v, backend=name, k_lens=k_lens).double(),
                               reference_attention(q, k, v, k_lens), rtol=1e-5, atol=1e-6)
    bias = torch.randn(q.shape[0], k.shape[1])
    torch.testing.assert_close(attention(q, k, v, backend=name, key_bias=bias),
                               attention(q, k, v, backend="sdpa", key_bias=bias), rtol=1e-5, atol=1e-6)


def test_pinned_kernel_that_cannot_run_fails_loudly_on_cpu() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match="sdpa_cudnn.*needs CUDA"):
        attention(q, k, v, backend="sdpa_cudnn")


def test_bad_shapes_are_rejected() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match="attention expects q"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="k_lens must have shape"):
        attention(q, k, v, k_lens=torch.tensor([1, 2, 3]))


@torch.no_grad()
def test_model_runs_with_auto_backend() -> None:
    torch.manual_seed(0)
    model = WanDiT(preset("ti2v", tiny=True).dit).eval()
    x = torch.randn(1, 48, 2, 4, 4)
    ctx = [torch.randn(4, model.config.text_dim)]
    ref = model(x, torch.tensor([500]), ctx)
    auto = WanDiT(model.config, attention="auto").eval()
    auto.load_state_dict(model.state_dict())
    assert (model.attention_backend, auto.attention_backend) == ("sdpa", "auto")
    torch.testing.assert_close(auto(x, torch.tensor([500]), ctx), ref)


def _counting(backend: attn_mod.AttentionBackend, *, key_bias: bool,
              calls: dict[str, int]) -> attn_mod.AttentionBackend:
    """`backend` with its functions counted; without its key-bias function when `key_bias` is False."""
    def fn(*args: Any) -> torch.Tensor:
        calls["fn"] += 1
        return backend.fn(*args)

    def key_bias_fn(*args: Any) -> torch.Tensor:
        calls["key_bias_fn"] += 1
        return backend.key_bias_fn(*args)

    return dataclasses.replace(backend, name=f"counted_{backend.name}", fn=fn,
                               key_bias_fn=key_bias_fn if key_bias else None)


@pytest.mark.parametrize("key_bias", [True, False], ids=["with_key_bias", "without_key_bias"])
@torch.no_grad()
def test_model_resolves_once_per_forward_and_runs_every_attention_through_it(
        key_bias: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """One resolution per forward; self-attention, and the compacted cross-attention keys with their
    key bias, all run through the resolved backend. A backend without a key bias gets the full
    padded context instead (same result up to rounding)."""
    torch.manual_seed(0)
    model = WanDiT(preset("t2v", tiny=True).dit).eval()
    x, t = torch.randn(1, 16, 2, 4, 4), torch.tensor([500])
    ctx = [torch.randn(4, model.config.text_dim)]
    ref = model(x, t, ctx)
    calls = {"resolve": 0, "fn": 0, "key_bias_fn": 0}

    def resolve(name: str, **spec: Any) -> attn_mod.AttentionBackend:
        calls["resolve"] += 1
        assert name == "sdpa" and spec["dtype"] == torch.float32, (name, spec)
        return _counting(BACKENDS["sdpa"], key_bias=key_bias, calls=calls)

    monkeypatch.setattr(dit_mod, "resolve_backend_for", resolve)
    monkeypatch.setattr(attn_mod, "resolve_backend", None)  # nothing may look a backend up again
    monkeypatch.setattr(attn_mod, "get_backend", None)
    out = model(x, t, ctx)
    layers = model.config.num_layers
    assert calls == {"resolve": 1, "fn": layers if key_bias else 2 * layers,
                     "key_bias_fn": layers if key_bias else 0}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_key_bias_needs_a_backend_that_has_one() -> None:
    q, k, v = qkv()
    bias = torch.zeros(q.shape[0], k.shape[1])
    no_bias = dataclasses.replace(BACKENDS["sdpa"], name="plain", key_bias_fn=None)
    with pytest.raises(ValueError, match="key_bias is supported by the sdpa backends only.*got backend 'plain'"):
        attention(q, k, v, backend=no_bias, key_bias=bias)
    torch.testing.assert_close(attention(q, k, v, backend=BACKENDS["sdpa"], key_bias=bias), attention(q, k, v))


def test_unknown_or_missing_backend_fails_at_construction() -> None:
    cfg = preset("ti2v", tiny=True).dit
    with pytest.raises(ValueError, match="unknown attention backend 'magic'"):
        WanDiT(cfg, attention="magic")
    for name in ("flash_attn", "flash_attn3", "sage", "sage3"):
        if not BACKENDS[name].is_installed():
            with pytest.raises(BackendUnavailableError, match=re.escape(BACKENDS[name].install_hint)):
                WanDiT(cfg, attention=name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flash_attn", "flash_attn3", "sage", "sage3", "sdpa_flash", "sdpa_efficient",
                                  "sdpa_cudnn"])
def test_fast_backend_error_within_twice_sdpa_bf16(name: str) -> None:
    """Each fast backend in bf16 stays within 2x the reference's own bf16 error (vs float64)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not BACKENDS[name].is_installed():
        pytest.skip(f"{BACKENDS[name].module} not installed")
    q, k, v = qkv(batch=2, lq=512, lk=512, heads=4, dh=128, dtype=torch.bfloat16, device="cuda")
    if BACKENDS[name].supports(q, k, v, None) is not None:
        pytest.skip(BACKENDS[name].supports(q, k, v, None))
    masked = name not in ("sage", "sage3", "sdpa_flash")
    k_lens = torch.tensor([512, 300], device="cuda") if masked else None
    exact = reference_attention(q.cpu(), k.cpu(), v.cpu(), None if k_lens is None else k_lens.cpu())
    sdpa_err = (attention(q, k, v, k_lens=k_lens).double().cpu() - exact).abs().max().item()
    fast_err = (attention(q, k, v, backend=name, k_lens=k_lens).double().cpu() - exact).abs().max().item()
    slack = 1.0 if BACKENDS[name].exact else 4.0  # sage quantises QK^T to int8
    assert fast_err <= 2 * slack * sdpa_err, f"{name}: {fast_err:.3e} vs sdpa {sdpa_err:.3e}"
