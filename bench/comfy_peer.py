"""ComfyUI's own Wan implementation as a benchmark peer, imported from a ComfyUI tree on disk.

Nothing of ComfyUI is vendored or committed: the benchmarks import `comfy.ldm.wan.vae`,
`comfy.ldm.wan.vae2_2`, `comfy.ldm.wan.model` and `comfy.text_encoders.t5` from a ComfyUI checkout
named by `--comfyui DIR`, else by the `COMFYUI_DIR` environment variable (the one the end-to-end
tests use), else the ComfyUI 0.3.75 that the end-to-end tests cache under `.cache/comfyui/ComfyUI`.
One tree per process (its package is called `comfy`): to compare two ComfyUI versions, run the
benchmark once per tree.

The peer models are built the way ComfyUI builds them for these checkpoints (the VAE configs of
`comfy/sd.py`, `comfy.ops.disable_weight_init` layers, the UMT5 config of
`comfy/text_encoders/wan.py`) and take our parameters with `load_state_dict(assign=True)`: both
sides hold the very same tensors. ComfyUI runs in CPU mode where no CUDA device exists (its
`--cpu` flag) and with PyTorch's SDPA attention (its `--use-pytorch-cross-attention` flag), the
fastest attention it offers on a CPU; the chosen attention is recorded with every result.

ComfyUI's own imports need its requirements: 0.3.75 needs `psutil` (in this project's `bench`
extra); 0.33 also needs `comfy-aimdo` and `comfy-kitchen` (its requirements.txt), which this
project does not install: put them on PYTHONPATH to benchmark that tree.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
COMFYUI_ENV = "COMFYUI_DIR"
DEFAULT_COMFYUI = REPO_ROOT / ".cache" / "comfyui" / "ComfyUI"
NO_COMFYUI = "none"  # `--comfyui none`: run without the ComfyUI peer


class ComfyPeerError(RuntimeError):
    """The ComfyUI tree cannot serve as a peer (missing, a second tree, or an unmet requirement)."""


def comfyui_dir(option: str | None) -> Path | None:
    """The ComfyUI tree to compare with: `option`, else $COMFYUI_DIR, else the cached 0.3.75.

    Returns None for `option == "none"`, and when neither is given and no cached tree exists (the
    benchmark then says so in its table and JSON). A tree that is named but is not a ComfyUI
    checkout is an error.
    """
    if option == NO_COMFYUI:
        return None
    raw = option or os.environ.get(COMFYUI_ENV)
    if raw is None:
        return DEFAULT_COMFYUI if (DEFAULT_COMFYUI / "comfy").is_dir() else None
    root = Path(raw).expanduser().resolve()
    if not (root / "comfy" / "ldm" / "wan").is_dir():
        source = "--comfyui" if option else f"${COMFYUI_ENV}"
        raise ComfyPeerError(
            f"{source} must name a ComfyUI checkout (the folder holding comfy/ldm/wan); got {root}. "
            f"Fix: point it at ComfyUI's root folder, or pass --comfyui {NO_COMFYUI} to skip the ComfyUI peer")
    return root


def read_version(root: Path) -> str:
    """ComfyUI's version from `comfyui_version.py` (None-safe: 'unknown' when the file is absent)."""
    path = root / "comfyui_version.py"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


@dataclass(frozen=True)
class ComfyPeer:
    """The imported ComfyUI modules of one tree and the settings they run with."""

    root: Path
    version: str
    attention: str
    modules: dict[str, ModuleType]

    @property
    def name(self) -> str:
        """The implementation's label in tables and JSON, e.g. 'comfyui-0.3.75'."""
        return f"comfyui-{self.version}"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "root": str(self.root), "version": self.version, "attention": self.attention,
                "device_mode": "cpu" if not torch.cuda.is_available() else "cuda"}

    # ----------------------------------------------------------------------------------- models
    def vae(self, model: nn.Module) -> nn.Module:
        """ComfyUI's WanVAE for our `WanVAE` (Wan2.1 or Wan2.2), holding the very same tensors."""
        cfg = model.config
        kwargs = {"z_dim": cfg.z_dim, "dim_mult": list(cfg.dim_mult), "num_res_blocks": cfg.num_res_blocks,
                  "attn_scales": [], "temperal_downsample": list(cfg.temperal_downsample), "dropout": 0.0}
        if cfg.variant == "wan2.2":
            module, kwargs = self.modules["vae2_2"], {**kwargs, "dim": cfg.dim, "dec_dim": cfg.dec_dim}
        else:
            module, kwargs = self.modules["vae"], {**kwargs, "dim": cfg.dim}
        with torch.device("meta"):
            twin = module.WanVAE(**kwargs)
        _assign(twin, model.state_dict(), what=f"{cfg.variant} VAE")
        return twin.eval()

    def dit(self, model: nn.Module) -> nn.Module:
        """ComfyUI's WanModel for our `WanDiT` (t2v layout), holding the very same tensors."""
        cfg = model.config
        ops = self.modules["ops"].disable_weight_init
        with torch.device("meta"):
            twin = self.modules["model"].WanModel(
                model_type="t2v", patch_size=tuple(cfg.patch_size), text_len=cfg.text_len, in_dim=cfg.in_dim,
                dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim,
                out_dim=cfg.out_dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers, eps=cfg.eps,
                device="meta", dtype=next(model.parameters()).dtype, operations=ops)
        _assign(twin, model.state_dict(), what="DiT")
        return twin.eval()

    def umt5(self, model: nn.Module) -> nn.Module:
        """ComfyUI's T5 (UMT5 layout, as `comfy/text_encoders/wan.py`) holding our encoder's tensors."""
        from wanbench.wan_core.checkpoints.t5 import official_to_hf

        cfg = model.config
        config = {"num_layers": cfg.num_layers, "d_model": cfg.dim, "d_kv": cfg.head_dim, "num_heads": cfg.num_heads,
                  "d_ff": cfg.dim_ffn, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True,
                  "model_type": "umt5", "vocab_size": cfg.vocab_size}
        ops = self.modules["ops"].disable_weight_init
        with torch.device("meta"):
            twin = self.modules["t5"].T5(config, next(model.parameters()).dtype, "meta", ops)
        sd = official_to_hf(model.state_dict())
        _assign(twin, sd, what="UMT5")
        return twin.eval()


def _assign(twin: nn.Module, sd: dict[str, torch.Tensor], *, what: str) -> None:
    """Load `sd` into a meta-built peer by assignment (shared tensors); any key mismatch is an error."""
    missing, unexpected = twin.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise ComfyPeerError(f"{what} -> ComfyUI key map mismatch: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
    source_on_meta = any(t.is_meta for t in sd.values())  # a meta twin (for FLOP counting) stays on meta
    leftover = [name for name, t in [*twin.named_parameters(), *twin.named_buffers()] if t.is_meta]
    if leftover and not source_on_meta:
        raise ComfyPeerError(f"ComfyUI {what} has tensors that our state dict does not fill: {leftover[:5]}")


def load_comfy_peer(root: Path) -> ComfyPeer:
    """Import ComfyUI's Wan modules from `root` into this process (CPU mode without CUDA, SDPA attention).

    Raises ComfyPeerError when another ComfyUI tree is already imported here, or when ComfyUI's own
    imports fail (naming the missing module and the fix).
    """
    loaded = sys.modules.get("comfy")
    if loaded is not None:
        where = Path(getattr(loaded, "__path__", [""])[0]).resolve().parent
        if where != root:
            raise ComfyPeerError(f"ComfyUI from {where} is already imported in this process; cannot also "
                                 f"import {root}. Fix: run the benchmark once per ComfyUI tree")
    else:
        sys.path.append(str(root))  # appended: ComfyUI's top-level modules never shadow anything
    try:
        import comfy.cli_args as cli_args

        if not torch.cuda.is_available():
            cli_args.args.cpu = True  # ComfyUI's --cpu: its device probe would otherwise ask CUDA
        cli_args.args.use_pytorch_cross_attention = True  # --use-pytorch-cross-attention: SDPA
        import comfy.ldm.modules.attention as attention
        import comfy.ldm.wan.model as dit_model
        import comfy.ldm.wan.vae as vae21
        import comfy.ldm.wan.vae2_2 as vae22
        import comfy.ops as ops
        import comfy.text_encoders.t5 as t5
    except ModuleNotFoundError as exc:
        raise ComfyPeerError(
            f"importing ComfyUI from {root} failed: module {exc.name!r} is missing. Fix: install ComfyUI's "
            f"requirements for this tree ({root / 'requirements.txt'}) into this environment, or put them on "
            f"PYTHONPATH (0.3.75 needs psutil; 0.33 also comfy-aimdo and comfy-kitchen), or pass "
            f"--comfyui {NO_COMFYUI}") from exc
    attention_name = getattr(attention.optimized_attention, "__name__", repr(attention.optimized_attention))
    return ComfyPeer(root=root, version=read_version(root), attention=attention_name,
                     modules={"vae": vae21, "vae2_2": vae22, "model": dit_model, "ops": ops, "t5": t5})


def peer_from_option(option: str | None) -> ComfyPeer | None:
    """`comfyui_dir` then `load_comfy_peer`; None when no tree is given or cached (or `none`)."""
    root = comfyui_dir(option)
    return None if root is None else load_comfy_peer(root)
