"""Measure one call's peak host memory in a fresh process, next to the planner's estimate for it.

Run as `python memory_probe.py '<json list of cases>'`; prints one JSON line per case,
{"estimate": bytes, "measured": bytes}. The measured figure is the rise of the process's resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs) over its resident set just before the call. With
`MALLOC_MMAP_THRESHOLD_` set low by the caller, glibc serves every large tensor from its own
mapping and returns it on free, so the high-water mark follows the live tensors (no reuse of
memory kept from earlier calls hides a peak).

Cases ("what"): "dit" (one WanDiT forward), "vae" (one WanVAE.decode), "t5" (one UMT5 block and
its rows, as the planner counts them). Sizes are given in the case.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import torch
from wanbench.wan_core.config import UMT5_XXL, WAN21_VAE, DiTConfig
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.runtime.estimates import (
    attention_kernel,
    dit_forward_bytes,
    t5_encode_bytes,
    vae_attention_dim,
    vae_decode_bytes,
)
from wanbench.wan_core.t5 import T5Block
from wanbench.wan_core.vae import WanVAE

CPU = torch.device("cpu")


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(fn) -> int:  # noqa: ANN001 - a zero-argument callable
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # reset VmHWM to the current resident set
    base = _status("VmRSS")
    with torch.no_grad():
        out = fn()
    peak = _status("VmHWM") - base
    del out
    return peak


def dit_case(case: dict) -> tuple[int, int]:
    cfg = DiTConfig(model_type="ti2v", in_dim=48, out_dim=48, dim=case["dim"], ffn_dim=case["ffn_dim"],
                    num_heads=case["heads"], num_layers=case["layers"], text_dim=case["text_dim"], freq_dim=64)
    dtype = getattr(torch, case["dtype"])
    model = WanDiT(cfg).to(dtype).eval().requires_grad_(False)
    t, h, w = case["thw"]
    batch, rows = case["batch"], case["text_rows"]
    x = torch.randn(1, cfg.out_dim, t, h, w).expand(batch, -1, -1, -1, -1)  # as the sampler passes it
    seq_len = cfg.num_tokens((t, h, w))
    steps = torch.full((batch, seq_len), 500.0)
    if case["per_token"]:
        steps[:, : seq_len // t] = 0.0  # frame-0 tokens pinned (TI2V with a start image)
    contexts = [torch.randn(rows, cfg.text_dim, dtype=dtype) for _ in range(batch)]
    model(x[:, :, :1, :2, :2], steps[:, :1], contexts, seq_len=1)  # first-call set-up outside the measure
    kernel = attention_kernel("sdpa", device=CPU, dtype=dtype, head_dim=cfg.head_dim)
    masked = attention_kernel("sdpa", device=CPU, dtype=dtype, head_dim=cfg.head_dim, with_mask=True)
    estimate = dit_forward_bytes(cfg, dtype, batch=batch, latent_thw=(t, h, w), text_rows=rows, kernel=kernel,
                                 masked=masked, token_time="per_token" if case["per_token"] else "uniform")
    return estimate, measure(lambda: model(x, steps, contexts, seq_len=seq_len))


def vae_case(case: dict) -> tuple[int, int]:
    cfg = replace(WAN21_VAE, dim=case["dim"], dec_dim=case["dim"])
    vae = WanVAE(cfg).eval()
    latent = torch.randn(1, cfg.z_dim, *case["thw"])
    vae.decode(latent[:, :, :1, :2, :2])  # first-call set-up outside the measure
    kernel = attention_kernel("sdpa", device=CPU, dtype=torch.float32, head_dim=vae_attention_dim(cfg))
    estimate = vae_decode_bytes(cfg, torch.float32, tuple(latent.shape), tiling=None, kernel=kernel)
    return estimate, measure(lambda: vae.decode(latent))


def t5_case(case: dict) -> tuple[int, int]:
    cfg = replace(UMT5_XXL, dim=case["dim"], dim_attn=case["dim"], dim_ffn=case["dim_ffn"],
                  num_heads=case["heads"], num_layers=1, vocab_size=256, text_len=case["text_len"])
    block = T5Block(cfg).eval()
    x = torch.randn(1, cfg.text_len, cfg.dim)
    buckets = block.pos_embedding.offset_buckets(cfg.text_len)
    block(x[:, :4], None, block.pos_embedding.offset_buckets(4))  # first-call set-up outside the measure
    estimate = t5_encode_bytes(cfg, torch.float32, device_type="cpu")
    rows = x.numel() * x.element_size()

    def encode() -> torch.Tensor:
        embedded = x.clone()  # the embedding rows the encoder makes
        return block(embedded, None, buckets)

    return estimate, measure(encode) + rows  # + the returned rows the encoder pads to text_len


CASES = {"dit": dit_case, "vae": vae_case, "t5": t5_case}

if __name__ == "__main__":
    torch.set_num_threads(1)
    for case in json.loads(sys.argv[1]):
        estimate, measured = CASES[case["what"]](case)
        sys.stdout.write(json.dumps({"estimate": estimate, "measured": measured}) + "\n")
