"""The provisioning helpers on small local inputs (no download, no server): fast, not e2e."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .provision import (
    MARKER_NAME,
    _finished_install,
    _guard_torchvision_nms,
    _requirements_without_torch,
    install_from_env,
    recipe_key,
)

META_REGISTRATIONS = """import torchvision.extension

@torch.library.register_fake("torchvision::nms")
def meta_nms(dets, scores, iou_threshold):
    return dets

@torch.library.register_fake("torchvision::qnms")
def meta_qnms(dets, scores, iou_threshold):
    return dets
"""


def test_requirements_drop_torch_family_only(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(
        "comfyui-frontend-package==1.32.9\ntorch\ntorchsde\ntorchvision\ntorchaudio>=2\n"
        "numpy>=1.25.0\n\n#non essential dependencies:\nkornia>=0.7.1\n"
    )
    kept = _requirements_without_torch(requirements)
    assert kept == ["comfyui-frontend-package==1.32.9", "torchsde", "numpy>=1.25.0", "kornia>=0.7.1"]


def test_torchvision_guard_wraps_both_registrations(tmp_path: Path) -> None:
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "_meta_registrations.py").write_text(META_REGISTRATIONS)
    _guard_torchvision_nms(tmp_path)
    patched = (package / "_meta_registrations.py").read_text()
    assert patched.count("if torchvision.extension._has_ops() else (lambda fn: fn))") == 2
    assert '\n@torch.library.register_fake("torchvision::nms")\n' not in patched
    compile(patched, "_meta_registrations.py", "exec")
    with pytest.raises(RuntimeError, match="no longer holds"):
        _guard_torchvision_nms(tmp_path)  # a second patch finds nothing to guard and says so


def _fake_install(cache_dir: Path, key: str) -> None:
    (cache_dir / "ComfyUI").mkdir(parents=True)
    (cache_dir / "ComfyUI" / "main.py").write_text("")
    (cache_dir / "venv" / "bin").mkdir(parents=True)
    (cache_dir / "venv" / "bin" / "python").write_text("")
    (cache_dir / MARKER_NAME).write_text(
        json.dumps({"recipe": key, "comfyui_version": "0.3.75", "install_seconds": 90.0})
    )


def test_finished_install_needs_marker_matching_recipe(tmp_path: Path) -> None:
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")
    key = recipe_key(constraints)
    cache_dir = tmp_path / "cache"
    _fake_install(cache_dir, key)
    found = _finished_install(cache_dir, key)
    assert found is not None and found.reused and found.version == "0.3.75" and found.install_seconds == 90.0

    constraints.write_text("torch==2.14.0\n")
    assert _finished_install(cache_dir, recipe_key(constraints)) is None  # recipe changed: reinstall
    (cache_dir / "venv" / "bin" / "python").unlink()
    assert _finished_install(cache_dir, key) is None  # half-deleted install: reinstall
    (cache_dir / "venv" / "bin" / "python").write_text("")
    assert _finished_install(cache_dir, key) is not None
    (cache_dir / MARKER_NAME).write_text('{"recipe": ')
    assert _finished_install(cache_dir, key) is None  # torn marker: reinstall
    (cache_dir / MARKER_NAME).unlink()
    assert _finished_install(cache_dir, key) is None  # never finished: reinstall


def test_comfyui_dir_names_another_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMFYUI_PYTHON", raising=False)
    monkeypatch.setenv("COMFYUI_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="main.py"):
        install_from_env()
    (tmp_path / "main.py").write_text("")
    (tmp_path / "comfyui_version.py").write_text('__version__ = "0.33.0"\n')
    with pytest.raises(FileNotFoundError, match="COMFYUI_PYTHON"):
        install_from_env()
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").write_text("")
    install = install_from_env()
    assert install is not None
    assert (install.comfy_dir, install.python, install.version) == (
        tmp_path.resolve(),
        tmp_path.resolve() / ".venv" / "bin" / "python",
        "0.33.0",
    )
    monkeypatch.delenv("COMFYUI_DIR")
    assert install_from_env() is None
