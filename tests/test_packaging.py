"""What ships and how it installs: requirements.txt for ComfyUI-Manager, the LICENSE, the package
list in pyproject.toml against the tree, the registry package (.comfyignore) and a clean wheel."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from wanbench.util.deps import RUNTIME_PACKAGES

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# Folders that are not part of the package (development, tests, caches, build output).
NOT_SHIPPED = {"tests", "bench", "docs", "build", "dist", "wanbench_out", "tiny_models", "__pycache__"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower()


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_requirements_txt_lists_what_the_nodes_import() -> None:
    """ComfyUI-Manager installs requirements.txt line by line; torch is the user's own."""
    names = {_name(line) for line in _requirements()}
    assert "torch" not in names
    for module, (requirement, _) in RUNTIME_PACKAGES.items():
        assert requirement in _requirements(), f"{module}: {requirement} missing from requirements.txt"
    declared = {_name(d) for d in PYPROJECT["project"]["dependencies"]}
    declared |= {_name(d) for d in PYPROJECT["project"]["optional-dependencies"]["chart"]}
    assert names <= declared, f"requirements.txt names packages pyproject.toml does not: {names - declared}"
    assert "matplotlib" in names  # the report node's chart in the UI


def test_the_license_file_matches_pyproject() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]


def _shipped_folders() -> set[str]:
    """Every folder below the root that holds files and is part of the package, as `wanbench.x.y`."""
    found = set()
    for path in ROOT.rglob("*"):
        if not path.is_file():
            continue
        parts = path.relative_to(ROOT).parts[:-1]
        if any(p in NOT_SHIPPED or p.startswith(".") or p.endswith(".egg-info") for p in parts):
            continue
        found.add(".".join(("wanbench", *parts)))
    return found


def test_pyproject_lists_every_shipped_folder() -> None:
    """Each Python package and data folder is named, so setuptools has nothing to guess (it warns,
    and leaves a folder out of the wheel, for any it would have to)."""
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert packages == _shipped_folders()
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    assert {"wanbench.web", "wanbench.workflows.api", "wanbench.example_workflows"} <= set(data)


def _ignored(path: str, patterns: list[str]) -> bool:
    """The .comfyignore rules the file uses: `dir/` (a folder anywhere) and plain names."""
    parts = path.split("/")
    for pattern in patterns:
        if pattern.endswith("/"):
            if pattern.rstrip("/") in parts[:-1]:
                return True
        elif pattern in (path, parts[-1]):
            return True
    return False


def test_the_registry_package_leaves_out_tests_and_benchmarks() -> None:
    """`comfy node pack/publish` zips the git-tracked files minus .comfyignore matches."""
    lines = (ROOT / ".comfyignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert all(re.fullmatch(r"[\w./-]+", p) for p in patterns), "only the simple forms _ignored knows"
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.splitlines()
    if not tracked:
        pytest.skip("not a git checkout")
    shipped = [path for path in tracked if not _ignored(path, patterns)]
    assert not [p for p in shipped if p.startswith(("tests/", "bench/", ".ci/"))]
    for needed in ("__init__.py", "nodes/__init__.py", "web/wanbench.js", "requirements.txt", "LICENSE",
                   "pyproject.toml", "README.md", "wan_core/checkpoints/io.py"):
        assert needed in shipped, needed
    assert any(p.startswith("example_workflows/") and p.endswith(".jpg") for p in shipped)


def test_the_readme_says_how_to_get_the_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "python -m pip install -r custom_nodes/ComfyUI-WanBench/requirements.txt" in readme
    assert "python -m pip install -e custom_nodes/ComfyUI-WanBench" in readme and "`wanbench`" in readme


def _copy_of_the_checkout(target: Path) -> Path:
    """The git-tracked files (what a clone holds) copied to `target`: building there leaves the
    checkout without a build/ folder."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False)
    if tracked.returncode != 0 or not tracked.stdout:
        pytest.skip("not a git checkout")
    for name in tracked.stdout.splitlines():
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.mark.slow
def test_the_wheel_builds_without_warnings_and_holds_the_package(tmp_path: Path) -> None:
    source = _copy_of_the_checkout(tmp_path / "checkout")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "Warning" not in output and "is absent from the `packages`" not in output, output[-3000:]
    (wheel,) = tmp_path.glob("comfyui_wanbench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("wanbench/wan_core/checkpoints/io.py", "wanbench/web/wanbench.js", "wanbench/nodes/live_view.py",
                   "wanbench/workflows/api/tiny_ti2v_5B_t2v.api.json", "wanbench/errors.py"):
        assert needed in names, needed
    assert any(n.startswith("wanbench/example_workflows/") and n.endswith(".jpg") for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("wanbench/tests/", "wanbench/bench/", "tests/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "wanbench = wanbench.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
