"""VAE checkpoints: config detection, the official / ComfyUI / diffusers layouts, bad files, and a
numerical cross-check against diffusers' `AutoencoderKLWan` on tiny random configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from wanbench.wan_core.checkpoints.io import write_safetensors
from wanbench.wan_core.checkpoints.vae import (
    detect_vae_config,
    diffusers_config,
    from_diffusers,
    load_vae,
    save_vae,
    to_diffusers,
)
from wanbench.wan_core.config import WAN21_VAE, WAN22_VAE
from wanbench.wan_core.errors import CheckpointError
from wanbench.wan_core.vae import WanVAE

TINY = {"wan2.1": WAN21_VAE.tiny(), "wan2.2": WAN22_VAE.tiny()}


def _random_vae(variant: str, seed: int = 5) -> WanVAE:
    torch.manual_seed(seed)
    model = WanVAE(TINY[variant])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / max(1, p[0].numel()) ** 0.5)
    return model


def _same_weights(a: WanVAE, b: WanVAE) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("variant", sorted(TINY))
def test_detect_config_from_shapes(variant: str) -> None:
    model = _random_vae(variant)
    assert detect_vae_config(model.state_dict()) == TINY[variant]
    real = {"wan2.1": WAN21_VAE, "wan2.2": WAN22_VAE}[variant]
    meta = WanVAE(real, device="meta")
    assert detect_vae_config(meta.state_dict()) == real
    expected_params = {"wan2.1": 126_892_531, "wan2.2": 704_688_668}[variant]
    assert sum(p.numel() for p in meta.parameters()) == expected_params  # spec section 1


@pytest.mark.parametrize("variant", sorted(TINY))
@pytest.mark.parametrize("layout", ["comfy", "official", "diffusers"])
def test_save_load_round_trip(variant: str, layout: str, tmp_path: Path) -> None:
    model = _random_vae(variant)
    name = {"comfy": "vae.safetensors", "official": "vae.pth", "diffusers": "diffusers_vae"}[layout]
    written = save_vae(model, tmp_path / name, layout=layout, dtype=torch.float32)
    assert written.exists()
    loaded = load_vae(written)
    assert loaded.config == model.config
    _same_weights(loaded, model)


@pytest.mark.parametrize("prefix", ["vae.", "first_stage_model."])
def test_prefixed_comfy_file(prefix: str, tmp_path: Path) -> None:
    model = _random_vae("wan2.1")
    tensors = {prefix + k: v.half() for k, v in model.state_dict().items()}
    tensors["model.diffusion_model.other.weight"] = torch.zeros(2)  # an all-in-one file keeps only the VAE
    write_safetensors(tensors, tmp_path / "prefixed.safetensors")
    loaded = load_vae(tmp_path / "prefixed.safetensors", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.half().to(torch.bfloat16)), k


def test_not_a_wan_vae(tmp_path: Path) -> None:
    write_safetensors({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)}, tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="not a Wan2.1/Wan2.2 VAE checkpoint"):
        load_vae(tmp_path / "dit.safetensors")
    sd = _random_vae("wan2.1").state_dict()
    sd["conv2.weight"] = torch.zeros(4, 4, 1, 1, 1)  # a 4-channel latent space: another model's VAE
    with pytest.raises(CheckpointError, match="z=4 latent channels"):
        detect_vae_config(sd)
    sd = dict(_random_vae("wan2.2").state_dict())
    sd.pop("decoder.head.2.bias")
    sd["decoder.extra.weight"] = torch.zeros(1)
    write_safetensors(sd, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing \['decoder.head.2.bias'\], 1 unexpected"):
        load_vae(tmp_path / "broken.safetensors")


@pytest.mark.parametrize("variant", sorted(TINY))
def test_matches_diffusers_autoencoder(variant: str) -> None:
    diffusers = pytest.importorskip("diffusers")
    model = _random_vae(variant)
    kwargs = {k: v for k, v in diffusers_config(model.config).items() if not k.startswith("_")}
    reference = diffusers.AutoencoderKLWan(**kwargs).eval()
    reference.load_state_dict(to_diffusers(model.state_dict(), model.config), strict=True)
    assert set(from_diffusers(reference.state_dict())) == set(model.state_dict())

    torch.manual_seed(7)
    s = model.config.spatial_stride
    video = torch.rand(1, 3, 5, s, 2 * s) * 2 - 1
    with torch.no_grad():
        ref_mu = reference.encode(video).latent_dist.mean
        ours_mu = model.encode(video)
        assert (ours_mu - ref_mu).abs().max().item() < 1e-4
        latent = torch.randn(1, model.config.z_dim, 2, 1, 2)
        ref_video = reference.decode(latent).sample.clamp(-1, 1)
        assert (model.decode(latent) - ref_video).abs().max().item() < 1e-4
