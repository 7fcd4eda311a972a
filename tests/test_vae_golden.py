"""Wan2.1 / Wan2.2 VAE parity with the official code, driven by `MANIFEST_VAE.json`.

Every VAE and every case listed in the manifest is checked; the weights are loaded through
`load_vae` (config detected from shapes) and must match the manifest's tiny config. Case tensors
are named `<case>.<what>`: `.video` + `.mu` (encode), `.latent` (normalised), `.patchified`
(Wan2.2 input), `.video_raw` / `.video` (decode of `.latent`, unclamped / clamped), `.recon_raw`
(decode of `.latent`).
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from conftest import golden_dir, golden_params, load_manifest, read_manifest
from safetensors.torch import load_file
from wanbench.wan_core.checkpoints.vae import load_vae
from wanbench.wan_core.latents import denormalize_latent, normalize_latent
from wanbench.wan_core.vae_blocks import patchify

MANIFEST = "MANIFEST_VAE.json"


def _cases() -> list[tuple[str, str]]:
    """(vae, case) of every case listed in the manifest; raises `GoldenSetError` if it is missing."""
    out = []
    for vae_name, vae in read_manifest(MANIFEST).get("vaes", {}).items():
        for case in dict.fromkeys(name.split(".", 1)[0] for name in vae["tensors"]):
            out.append((vae_name, case))
    return out


# An empty or missing manifest gives one failing parameter (folder and WANBENCH_GOLDEN_DIR named).
VAE_PARAMS = golden_params(lambda: [pytest.param(n, id=n) for n in dict.fromkeys(n for n, _ in _cases())],
                           fail_id="golden-missing-vae")
CASE_PARAMS = golden_params(lambda: [pytest.param(n, c, id=f"{n}-{c}") for n, c in _cases()],
                            fail_id="golden-missing-vae-cases", num_args=2)
_MODELS: dict[str, object] = {}


def _vae(name: str):
    if name not in _MODELS:
        entry = load_manifest(MANIFEST)["vaes"][name]
        _MODELS[name] = load_vae(golden_dir() / entry["weights_file"], dtype=torch.float32)
    return _MODELS[name]


def _tensors(name: str, case: str) -> dict[str, torch.Tensor]:
    entry = load_manifest(MANIFEST)["vaes"][name]
    every = load_file(str(golden_dir() / entry["cases_file"]))
    return {k.split(".", 1)[1]: v for k, v in every.items() if k.split(".", 1)[0] == case}


def _assert_allclose(got: torch.Tensor, exp: torch.Tensor, what: str) -> None:
    tol = load_manifest(MANIFEST)["tolerance"]["float32"]
    assert got.shape == exp.shape, f"{what}: shape {tuple(got.shape)} != golden {tuple(exp.shape)}"
    err = (got.double() - exp.double()).abs()
    bound = tol["atol"] + tol["rtol"] * exp.double().abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: max abs error {err.max().item():.3e} exceeds atol+rtol*|golden| somewhere"


@pytest.mark.parametrize("name", VAE_PARAMS)
def test_config_detected_from_weights(name: str) -> None:
    entry = load_manifest(MANIFEST)["vaes"][name]
    cfg = _vae(name).config
    want = entry["config"]
    assert cfg.dim == want["dim"]
    assert cfg.dec_dim == want.get("dec_dim", want["dim"])
    assert cfg.z_dim == want["z_dim"]
    assert list(cfg.dim_mult) == want["dim_mult"]
    assert cfg.num_res_blocks == want["num_res_blocks"]
    assert list(cfg.temperal_downsample) == want["temperal_downsample"]
    assert cfg.stride == (entry["compression"]["t"], entry["compression"]["h"], entry["compression"]["w"])
    assert list(cfg.latents_mean) == pytest.approx(entry["latents_mean"])
    assert list(cfg.latents_std) == pytest.approx(entry["latents_std"])
    model = _vae(name)
    assert sum(p.numel() for p in model.parameters()) == entry["num_parameters"]
    assert set(model.state_dict()) == set(entry["weight_shapes"])
    for key, shape in entry["weight_shapes"].items():
        assert list(model.state_dict()[key].shape) == shape, key


@pytest.mark.parametrize(("name", "case"), CASE_PARAMS)
def test_golden_case(name: str, case: str) -> None:
    vae = _vae(name)
    cfg = vae.config
    t = _tensors(name, case)
    checked = 0
    if "video" in t and "mu" in t:
        video = t["video"]
        if "patchified" in t:
            usable = cfg.pixel_frames(cfg.latent_frames(video.shape[2]))
            _assert_allclose(
                patchify(video[:, :, :usable], cfg.patch_size),
                t["patchified"][:, :, :usable],
                f"{name}/{case} patchify",
            )
        mu = vae.encode(video, drop_trailing_frames=True)
        _assert_allclose(mu, t["mu"], f"{name}/{case} mu")
        checked += 1
        if "latent" in t:
            _assert_allclose(normalize_latent(mu, cfg), t["latent"], f"{name}/{case} normalised latent")
    if "latent" in t and any(k in t for k in ("video_raw", "video", "recon_raw")):
        raw = denormalize_latent(t["latent"], cfg)
        out = vae.decode(raw, clamp=False)
        for key in ("video_raw", "recon_raw"):
            if key in t:
                _assert_allclose(out, t[key], f"{name}/{case} {key}")
                checked += 1
        if "video" in t and "mu" not in t:  # the pipeline output: the same decode clamped to [-1, 1]
            _assert_allclose(out.clamp(-1.0, 1.0), t["video"], f"{name}/{case} clamped video")
            checked += 1
    assert checked, f"{name}/{case}: no encode or decode tensors recognised in {sorted(t)}"


def test_manifest_files_listed() -> None:
    manifest = load_manifest(MANIFEST)
    assert manifest.get("vaes"), f"{MANIFEST} in {golden_dir()} lists no VAE (check WANBENCH_GOLDEN_DIR)"
    for vae in manifest["vaes"].values():
        for key in ("weights_file", "cases_file"):
            assert (golden_dir() / vae[key]).is_file(), vae[key]
    groups: dict[str, set[str]] = defaultdict(set)
    for name, case in _cases():
        groups[name].add(case)
    assert all(groups.values())


@pytest.mark.parametrize("name", VAE_PARAMS)
def test_bf16_smoke(name: str) -> None:
    """bf16 weights and activations (norms in fp32) against the fp32 golden: relative L2 only."""
    manifest = load_manifest(MANIFEST)
    entry = manifest["vaes"][name]
    bound = manifest["tolerance"]["bf16_smoke"]["rel_l2"]
    decode_cases = [c for n, c in _cases() if n == name and f"{c}.video_raw" in entry["tensors"]]
    if not decode_cases:
        pytest.skip(f"{name}: this fixture set has no decode case (no `<case>.video_raw` tensor)")
    vae = load_vae(golden_dir() / entry["weights_file"], dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    case = min(decode_cases, key=lambda c: math.prod(entry["tensors"][f"{c}.video_raw"]["shape"]))
    t = _tensors(name, case)
    out = vae.decode(denormalize_latent(t["latent"], vae.config), clamp=False)
    assert out.dtype == torch.float32
    rel = ((out - t["video_raw"]).norm() / t["video_raw"].norm()).item()
    assert rel < bound, f"{name}/{case}: bf16 relative L2 error {rel:.4f} >= {bound}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("name", "case"), CASE_PARAMS)
def test_golden_case_cuda(name: str, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same parity on CUDA in float32 with TF32 off (the manifest's comparison rule)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    entry = load_manifest(MANIFEST)["vaes"][name]
    vae = load_vae(golden_dir() / entry["weights_file"], device="cuda")
    t = _tensors(name, case)
    if "video" in t and "mu" in t:
        mu = vae.encode(t["video"].cuda(), drop_trailing_frames=True).cpu()
        _assert_allclose(mu, t["mu"], f"{name}/{case} mu (cuda)")
    if "latent" in t and "video_raw" in t:
        out = vae.decode(denormalize_latent(t["latent"], vae.config).cuda(), clamp=False).cpu()
        _assert_allclose(out, t["video_raw"], f"{name}/{case} video_raw (cuda)")
