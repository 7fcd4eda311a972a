"""UMT5 encoder: file layouts (official, ComfyUI, fp8 scaled), transformers cross-check, TextEncoder."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from wanbench.wan_core.checkpoints.t5 import (
    detect_t5_config,
    hf_to_official,
    load_text_encoder,
    load_umt5_encoder,
    official_to_hf,
    read_t5_state_dict,
    save_text_encoder,
)
from wanbench.wan_core.config import DEFAULT_NEGATIVE_PROMPT, UMT5Config
from wanbench.wan_core.errors import CheckpointError, WanError
from wanbench.wan_core.t5 import TextEncoder, UMT5Encoder, pad_text_embeds
from wanbench.wan_core.tokenizer import WanTokenizer, train_tiny_spiece
from wanbench.wan_core.trace import use_tracer

TINY = UMT5Config().tiny()
TEXT_LEN = 48  # short padding keeps the tests fast; 512 is covered by the tokenizer tests
PROMPTS = ["A cat runs on the beach under golden sunset light", "", "一只猫 🐱 über die Straße " * 3]


@pytest.fixture(scope="module")
def spiece() -> bytes:
    return train_tiny_spiece(TINY.vocab_size)


@pytest.fixture(scope="module")
def encoder() -> UMT5Encoder:
    torch.manual_seed(1)
    model = UMT5Encoder(TINY).eval()
    with torch.no_grad():
        for block in model.blocks:  # non-trivial norms and biases
            block.norm1.weight.uniform_(0.5, 1.5)
            block.pos_embedding.embedding.weight.normal_(0, 2.0)
    return model


def _ids_mask(spiece: bytes, texts: list[str], text_len: int = TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    return WanTokenizer.from_spiece_bytes(spiece, text_len=text_len)(texts)


def _max_rel_err(got: torch.Tensor, exp: torch.Tensor) -> float:
    return ((got.double() - exp.double()).abs().max() / exp.double().abs().max()).item()


def test_key_map_both_ways(encoder: UMT5Encoder, tmp_path: Path) -> None:
    sd = encoder.state_dict()
    hf = official_to_hf(sd)
    assert "shared.weight" in hf and "encoder.block.1.layer.1.DenseReluDense.wi_0.weight" in hf
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in hf
    back = hf_to_official(hf)
    assert back.keys() == sd.keys()
    assert all(back[k] is sd[k] for k in sd)
    path = save_text_encoder(hf, tmp_path / "from_hf.pth", layout="official", dtype=torch.float32)
    assert torch.load(path, weights_only=True).keys() == sd.keys()
    assert back["blocks.1.ffn.gate.0.weight"] is hf["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"]
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        hf_to_official({**hf, "encoder.block.0.layer.2.foo.weight": torch.zeros(1)})


def test_matches_transformers_umt5(spiece: bytes, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.UMT5Config(vocab_size=TINY.vocab_size, d_model=TINY.dim, d_kv=TINY.head_dim,
                                     d_ff=TINY.dim_ffn, num_layers=TINY.num_layers, num_heads=TINY.num_heads,
                                     relative_attention_num_buckets=TINY.num_buckets,
                                     relative_attention_max_distance=TINY.max_distance,
                                     feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                     layer_norm_epsilon=TINY.eps)
    torch.manual_seed(3)
    hf_model = transformers.UMT5EncoderModel(hf_cfg).eval()
    path = tmp_path / "hf_umt5.safetensors"
    save_file({k: v.clone().contiguous() for k, v in hf_model.state_dict().items()}, str(path))
    ours = load_umt5_encoder(path, dtype=torch.float32)
    assert ours.config == TINY
    ids, mask = _ids_mask(spiece, PROMPTS)
    with torch.no_grad():
        exp = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    for b, n in enumerate(mask.sum(1).tolist()):
        assert _max_rel_err(got[b, :n], exp[b, :n]) < 2e-5


def test_comfy_file_with_embedded_tokenizer_equals_official_folder(encoder: UMT5Encoder, spiece: bytes,
                                                                    tmp_path: Path) -> None:
    official = save_text_encoder(encoder, tmp_path / "ckpt" / "models_t5_umt5-xxl-enc-bf16.pth",
                                 spiece_bytes=spiece, layout="official", dtype=torch.float32)
    assert (tmp_path / "ckpt" / "google" / "umt5-xxl" / "spiece.model").read_bytes() == spiece
    comfy = save_text_encoder(encoder, tmp_path / "text_encoders" / "umt5_xxl_fp32.safetensors",
                              spiece_bytes=spiece, layout="comfy", dtype=torch.float32)
    keys = load_file(str(comfy)).keys()
    assert "spiece_model" in keys and "shared.weight" in keys and "token_embedding.weight" not in keys
    from_folder = load_text_encoder(official, dtype=torch.float32, text_len=TEXT_LEN)
    from_comfy = load_text_encoder(comfy, dtype=torch.float32, text_len=TEXT_LEN)
    assert from_comfy.tokenizer.spiece_bytes == from_folder.tokenizer.spiece_bytes == spiece
    outputs = (from_comfy.encode(PROMPTS), from_folder.encode(PROMPTS), _reference(encoder, spiece))
    for got, exp, ref in zip(*outputs, strict=True):
        assert torch.equal(got, exp)
        assert torch.equal(got, ref)


def _reference(encoder: UMT5Encoder, spiece: bytes) -> list[torch.Tensor]:
    ids, mask = WanTokenizer.from_spiece_bytes(spiece, text_len=TEXT_LEN)(PROMPTS)
    with torch.no_grad():
        out = encoder(ids, mask)
    return [out[b, :n] for b, n in enumerate(mask.sum(1).tolist())]


@pytest.mark.parametrize("layout, name", [("comfy", "umt5_xxl.safetensors"),
                                          ("official", "models_t5_umt5-xxl-enc-bf16.pth")])
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_16bit_files_load_and_encode(encoder: UMT5Encoder, spiece: bytes, tmp_path: Path, layout: str,
                                     name: str, dtype: torch.dtype, tol: float) -> None:
    path = save_text_encoder(encoder, tmp_path / name, spiece_bytes=spiece, dtype=dtype, layout=layout)
    if layout == "comfy":
        assert load_file(str(path))["shared.weight"].dtype == dtype
    else:
        assert torch.load(path, weights_only=True)["token_embedding.weight"].dtype == dtype
    text_encoder = load_text_encoder(path, dtype=dtype, text_len=TEXT_LEN)
    assert text_encoder.encoder.blocks[0].attn.q.weight.dtype == dtype
    for got, ref in zip(text_encoder.encode(PROMPTS), _reference(encoder, spiece), strict=True):
        assert got.dtype == dtype and got.shape == ref.shape
        assert _max_rel_err(got, ref) < tol


def test_fp8_scaled_file(encoder: UMT5Encoder, spiece: bytes, tmp_path: Path) -> None:
    path = save_text_encoder(encoder, tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                             spiece_bytes=spiece, dtype=torch.float16, fp8_scaled=True)
    raw = load_file(str(path))
    assert raw["scaled_fp8"].dtype == torch.float8_e4m3fn
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert raw[q].dtype == torch.float8_e4m3fn
    assert raw[q.replace(".weight", ".scale_weight")].dtype == torch.float32
    assert raw["shared.weight"].dtype == torch.float16
    sd, embedded = read_t5_state_dict(path, dtype=torch.float32)
    assert embedded == spiece
    exp_q = encoder.blocks[0].attn.q.weight
    assert sd["blocks.0.attn.q.weight"].dtype == torch.float32
    assert _max_rel_err(sd["blocks.0.attn.q.weight"], exp_q) < 0.07  # e4m3: 3 mantissa bits
    text_encoder = load_text_encoder(path, dtype=torch.float32, text_len=TEXT_LEN)
    for got, ref in zip(text_encoder.encode(PROMPTS), _reference(encoder, spiece), strict=True):
        assert got.shape == ref.shape and _max_rel_err(got, ref) < 0.15


class _Float32Watch(TorchDispatchMode):
    """Records the sizes of float32 CPU tensors produced by any op."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu":
                self.sizes.append(t.numel())
        return out


@pytest.mark.parametrize("name, stored, fp8", [("te.safetensors", torch.bfloat16, False),
                                               ("te.pth", torch.bfloat16, False),
                                               ("te.safetensors", torch.float16, False),
                                               ("te.safetensors", torch.float16, True)])
def test_16bit_load_never_stages_the_model_in_float32(encoder: UMT5Encoder, tmp_path: Path, name: str,
                                                      stored: torch.dtype, fp8: bool) -> None:
    layout = "official" if name.endswith(".pth") else "comfy"
    path = save_text_encoder(encoder, tmp_path / name, dtype=stored, fp8_scaled=fp8, layout=layout)
    largest = max(p.numel() for p in encoder.parameters())
    watch = _Float32Watch()
    with watch:
        loaded = load_umt5_encoder(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    if fp8:  # one weight at a time is dequantised in float32
        assert watch.sizes and max(watch.sizes) <= largest
    else:
        assert all(n <= 1 for n in watch.sizes), f"float32 tensors of {sorted(watch.sizes)[-3:]} elements"


def test_prefixed_and_alias_hf_keys(encoder: UMT5Encoder, tmp_path: Path) -> None:
    hf = official_to_hf(encoder.state_dict())
    hf["encoder.embed_tokens.weight"] = hf.pop("shared.weight")
    prefixed = {"text_encoders.umt5xxl.transformer." + k: v.clone() for k, v in hf.items()}
    save_file(prefixed, str(tmp_path / "bundle.safetensors"))
    loaded = load_umt5_encoder(tmp_path / "bundle.safetensors", dtype=torch.float32)
    for k, v in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_detect_config_from_shapes(encoder: UMT5Encoder) -> None:
    assert detect_t5_config(encoder.state_dict()) == TINY
    big = UMT5Config()
    with torch.device("meta"):
        xxl = UMT5Encoder(big)
    assert detect_t5_config(xxl.state_dict()) == big
    assert 5.6e9 < sum(p.numel() for p in xxl.parameters()) < 5.8e9  # spec: UMT5-XXL encoder ~5.7 B


def test_bad_files_have_clear_messages(encoder: UMT5Encoder, tmp_path: Path) -> None:
    save_file({"patch_embedding.weight": torch.zeros(2, 2), "blocks.0.self_attn.q.weight": torch.zeros(2, 2)},
              str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match="not a UMT5 text encoder.*Wan DiT"):
        load_umt5_encoder(tmp_path / "dit.safetensors")
    sd = {k: v.clone() for k, v in encoder.state_dict().items()
          if k != "blocks.1.pos_embedding.embedding.weight"}
    save_file(sd, str(tmp_path / "t5v11.safetensors"))
    with pytest.raises(CheckpointError, match="T5 v1.1"):
        load_umt5_encoder(tmp_path / "t5v11.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_umt5_encoder(tmp_path / "broken.safetensors")
    save_text_encoder(encoder, tmp_path / "lonely" / "enc.pth", layout="official")
    with pytest.raises(FileNotFoundError) as err:
        load_text_encoder(tmp_path / "lonely" / "enc.pth")
    assert str(tmp_path / "lonely" / "google/umt5-xxl/spiece.model") in str(err.value)
    assert "tokenizer_path" in str(err.value)
    with pytest.raises(ValueError, match="layout must be one of"):
        save_text_encoder(encoder, tmp_path / "x.safetensors", layout="diffusers")


def test_tokenizer_path_overrides_and_vocab_check(encoder: UMT5Encoder, spiece: bytes,
                                                  tmp_path: Path) -> None:
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "spiece.model").write_bytes(spiece)
    path = save_text_encoder(encoder, tmp_path / "enc.pth", layout="official", dtype=torch.float32)
    text_encoder = load_text_encoder(path, tokenizer_path=tmp_path / "tok", dtype=torch.float32)
    assert text_encoder.tokenizer.spiece_bytes == spiece
    small = UMT5Encoder(UMT5Config(vocab_size=64, dim=16, dim_attn=16, dim_ffn=32, num_heads=2, num_layers=1))
    with pytest.raises(ValueError, match="pieces but the encoder embeds only 64"):
        TextEncoder(small, text_encoder.tokenizer)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 64\)"):
        small(torch.tensor([[70, 1]]))


class _Tracer:
    def __init__(self) -> None:
        self.stages: list[tuple[str, str, dict[str, Any]]] = []

    def stage(self, name: str, kind: str, facts: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
        self.stages.append((name, kind, facts))
        return contextlib.nullcontext()

    def event(self, name: str, facts: dict[str, Any]) -> None:
        raise AssertionError(f"unexpected event {name}")


def test_encode_pair_default_negative_and_trace(encoder: UMT5Encoder, spiece: bytes) -> None:
    text_encoder = TextEncoder(encoder, WanTokenizer.from_spiece_bytes(spiece, text_len=TEXT_LEN))
    tracer = _Tracer()
    with use_tracer(tracer):
        context, context_null = text_encoder.encode_pair("a cat on the beach")
    assert [(n, k) for n, k, _ in tracer.stages] == [("T5_Encoding", "encode")]
    assert tracer.stages[0][2]["flops"] == TINY.flops_forward(TEXT_LEN, batch=2)
    assert torch.equal(context_null, text_encoder.encode([DEFAULT_NEGATIVE_PROMPT])[0])
    assert torch.equal(context, text_encoder.encode(["a cat on the beach"])[0])
    _, explicit = text_encoder.encode_pair("a cat", "blurry")
    assert torch.equal(explicit, text_encoder.encode(["blurry"])[0])
    _, spaces = text_encoder.encode_pair("a cat", " ")
    assert spaces.shape[0] == 1  # only the empty string is replaced, as in the official code


def test_encode_outputs_trimmed_rows_and_padding(encoder: UMT5Encoder, spiece: bytes) -> None:
    text_encoder = TextEncoder(encoder, WanTokenizer.from_spiece_bytes(spiece, text_len=TEXT_LEN))
    embeds = text_encoder.encode(PROMPTS)
    _, mask = WanTokenizer.from_spiece_bytes(spiece, text_len=TEXT_LEN)(PROMPTS)
    assert [e.shape for e in embeds] == [(n, TINY.dim) for n in mask.sum(1).tolist()]
    assert embeds[1].shape[0] == 1  # empty prompt: EOS only
    padded, lens = pad_text_embeds(embeds, TEXT_LEN)
    assert padded.shape == (3, TEXT_LEN, TINY.dim) and lens.tolist() == mask.sum(1).tolist()
    for b, e in enumerate(embeds):
        assert torch.equal(padded[b, : e.shape[0]], e) and not padded[b, e.shape[0]:].any()
    with pytest.raises(ValueError, match="empty"):
        text_encoder.encode([])
    with pytest.raises(TypeError, match=r"prompts\[0\] must be a str; got NoneType"):
        text_encoder.encode([None])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="prompt and negative prompt"):
        text_encoder.encode_pair(5)  # type: ignore[arg-type]


def test_release_frees_the_encoder(spiece: bytes) -> None:
    tokenizer = WanTokenizer.from_spiece_bytes(spiece, text_len=TEXT_LEN)
    text_encoder = TextEncoder(UMT5Encoder(TINY), tokenizer, device="cpu")
    model = text_encoder.encoder
    text_encoder.release()
    assert text_encoder.is_released
    assert all(p.device.type == "meta" for p in model.parameters())
    with pytest.raises(WanError, match="released"):
        text_encoder.encode(["a cat"])
    text_encoder.release()  # idempotent
    assert text_encoder.tokenizer(["a cat"])[0].shape == (1, TEXT_LEN)


@pytest.mark.gpu
def test_gpu_encode_matches_cpu(encoder: UMT5Encoder, spiece: bytes) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = TextEncoder(encoder, WanTokenizer.from_spiece_bytes(spiece, text_len=TEXT_LEN)).encode(PROMPTS)
    tokenizer = WanTokenizer.from_spiece_bytes(spiece, text_len=TEXT_LEN)
    gpu_encoder = TextEncoder(UMT5Encoder(TINY), tokenizer, device="cuda")
    gpu_encoder.encoder.load_state_dict(encoder.state_dict())
    gpu = gpu_encoder.encode(PROMPTS, output_device="cpu")
    for g, c in zip(gpu, cpu, strict=True):
        assert g.device.type == "cpu" and _max_rel_err(g, c) < 1e-4
    gpu_encoder.to("cpu")
    assert gpu_encoder.encoder.token_embedding.weight.device.type == "cpu"
