"""ComfyUI's own Wan modules as a benchmark peer: same tensors, same outputs, clear errors.

ComfyUI is imported in child processes only (its `comfy` package would stay in this one). The tree
is the one the end-to-end tests use (provisioned and cached under .cache/comfyui, or COMFYUI_DIR).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.comfy_peer import ComfyPeerError, comfyui_dir, read_version

REPO_ROOT = Path(__file__).resolve().parents[1]

PARITY_SCRIPT = r"""
import json, sys, torch
from pathlib import Path
from bench.comfy_peer import load_comfy_peer, ComfyPeerError
from bench.bench_vae import random_vae
from bench.bench_dit import TINY_CASES as DIT, build_wan_dit, make_inputs
from bench.bench_t5 import TINY_CASES as T5, build_encoder, make_inputs as t5_inputs
from wanbench.wan_core.config import WAN21_VAE, WAN22_VAE

peer = load_comfy_peer(Path(sys.argv[1]))
out = {"name": peer.name, "attention": peer.attention, "diffs": {}, "shared": {}}
with torch.inference_mode():
    for cfg in (WAN21_VAE.tiny(), WAN22_VAE.tiny()):
        ours = random_vae(cfg)
        twin = peer.vae(ours)
        out["shared"][cfg.variant] = ours.decoder.conv1.weight.data_ptr() == twin.decoder.conv1.weight.data_ptr()
        z = torch.randn(1, cfg.z_dim, 3, 2, 2)
        out["diffs"][cfg.variant] = (ours.decode(z, clamp=False) - twin.decode(z)).abs().max().item()
    case = DIT["tiny"]
    dit = build_wan_dit(case.config(), device="cpu", dtype=torch.float32)
    inputs = make_inputs(case, device="cpu", dtype=torch.float32)
    twin = peer.dit(dit)
    out["shared"]["dit"] = dit.blocks[0].ffn[0].weight.data_ptr() == twin.blocks[0].ffn[0].weight.data_ptr()
    ref = dit(inputs["x"], inputs["t"], inputs["context"])
    out["diffs"]["dit"] = (ref - twin(inputs["x"], inputs["t"], inputs["context"])).abs().max().item()
    case = T5["tiny"]
    enc = build_encoder(case.config(), device="cpu", dtype=torch.float32)
    ids = t5_inputs(case, device="cpu")
    twin = peer.umt5(enc)
    n = case.num_real_tokens
    got = twin(ids["ids"], ids["mask"])[0][:, :n]
    out["diffs"]["umt5"] = (enc(ids["ids"], ids["mask"])[:, :n] - got).abs().max().item()
try:
    load_comfy_peer(Path(sys.argv[1]).parent)  # a second tree in the same process
except ComfyPeerError as exc:
    out["second_tree_error"] = str(exc)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def comfy_tree() -> Path:
    from e2e.provision import install_from_env, provision

    return (install_from_env() or provision()).comfy_dir


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.mark.slow
def test_comfyui_twins_share_our_tensors_and_compute_the_same(comfy_tree: Path) -> None:
    done = _python(PARITY_SCRIPT, str(comfy_tree))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["name"] == f"comfyui-{read_version(comfy_tree)}"
    assert result["attention"] == "attention_pytorch"  # SDPA, ComfyUI's fastest attention on a CPU
    assert all(result["shared"].values()), result["shared"]
    for model, diff in result["diffs"].items():
        assert diff < 1e-4, (model, diff)
    assert "already imported" in result["second_tree_error"] and "once per ComfyUI tree" in result["second_tree_error"]


@pytest.mark.slow
def test_bench_vae_compares_with_comfyui_and_counts_its_flops(comfy_tree: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_vae", "--sizes", "16x16x1", "--vaes", "wan2.1", "--repeats", "1",
         "--no-memory", "--tiles", "--threads", "1", "--comfyui", str(comfy_tree), "--results-dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "vae_decode.json").read_text())
    peer = f"comfyui-{read_version(comfy_tree)}"
    entries = {e["impl"]: e for e in data["results"]}
    assert set(entries) == {"ours", "ours-whole-clip", "diffusers", peer}
    assert data["settings"]["comfyui"]["name"] == peer
    assert entries[peer]["max_abs_diff_vs_ours"] < 1e-4
    assert set(entries["ours"]["vs"]) == {"diffusers", peer}
    assert data["best_peer"]["wan2.1 16x16x1"] in ("diffusers", peer)
    if read_version(comfy_tree) == "0.3.75":  # the official algorithm: executed == reference
        assert entries[peer]["executed_flops"] == entries[peer]["reference_flops"]


def test_a_named_tree_must_be_a_comfyui_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ComfyPeerError, match="comfy/ldm/wan"):
        comfyui_dir(str(tmp_path))
    monkeypatch.setenv("COMFYUI_DIR", str(tmp_path))
    with pytest.raises(ComfyPeerError, match=r"\$COMFYUI_DIR"):
        comfyui_dir(None)
    assert comfyui_dir("none") is None


def test_a_missing_comfyui_requirement_is_named_with_the_fix(tmp_path: Path) -> None:
    tree = tmp_path / "ComfyUI"
    (tree / "comfy" / "ldm" / "wan").mkdir(parents=True)
    (tree / "comfy" / "__init__.py").write_text("")
    (tree / "comfy" / "cli_args.py").write_text("import not_installed_requirement\n")
    (tree / "comfyui_version.py").write_text('__version__ = "9.9.9"\n')
    code = ("import sys; from pathlib import Path; from bench.comfy_peer import load_comfy_peer, ComfyPeerError\n"
            "try:\n    load_comfy_peer(Path(sys.argv[1]))\nexcept ComfyPeerError as e:\n    print(e)\n")
    done = _python(code, str(tree))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "'not_installed_requirement' is missing" in done.stdout and "requirements" in done.stdout
    assert read_version(tree) == "9.9.9"
