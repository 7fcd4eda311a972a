"""Golden parity tests never pass by being empty: a missing, unreadable or incomplete fixture folder
is a test failure that names the folder and WANBENCH_GOLDEN_DIR; a complete one is selectable by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GOLDEN_ENV, REPO_ROOT, MissingGolden, fixture_params, golden_dir, manifest_fixtures

PARITY_MODULES = ["tests/test_dit_golden.py", "tests/test_t5_golden.py", "tests/test_tokenizer.py",
                  "tests/test_dit_ops.py", "tests/test_vae_golden.py", "tests/test_sampler.py",
                  "tests/test_scheduler.py"]


def _pytest(args: list[str], golden: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", GOLDEN_ENV: str(golden)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("content", [None, "{not json", '{"fixtures": [{"name": "x", "kind": "other"}]}'],
                         ids=["missing", "unreadable", "no-such-kind"])
def test_params_fail_with_folder_and_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             content: str | None) -> None:
    if content is not None:
        (tmp_path / "MANIFEST.json").write_text(content, encoding="utf-8")
    monkeypatch.setenv(GOLDEN_ENV, str(tmp_path))
    params = fixture_params(kind_prefix="dit_forward")
    assert len(params) == 1 and params[0].id == "golden-missing-dit_forward"
    (missing,) = params[0].values
    assert isinstance(missing, MissingGolden)
    assert str(tmp_path) in missing.message and GOLDEN_ENV in missing.message


def test_real_folder_gives_one_param_per_fixture_named_by_it() -> None:
    expected = [f["name"] for f in manifest_fixtures(kind_prefix="dit_forward")]
    params = fixture_params(kind_prefix="dit_forward")
    assert [p.id for p in params] == expected and [p.values[0]["name"] for p in params] == expected
    assert all((golden_dir() / file["file"]).is_file() for p in params for file in p.values[0]["files"])


def test_empty_folder_fails_every_parity_module(tmp_path: Path) -> None:
    """Collected and failed (exit 1), never skipped: one failing parameter per parity test."""
    result = _pytest(["tests/test_dit_golden.py", "tests/test_vae_golden.py", "-k", "not cuda"], tmp_path)
    assert result.returncode == 1, result.stdout[-3000:]
    assert f"golden fixtures unavailable in {tmp_path}" in result.stdout and GOLDEN_ENV in result.stdout
    collected = _pytest([*PARITY_MODULES, "--collect-only"], tmp_path).stdout.splitlines()
    for module in PARITY_MODULES:
        node_prefix = Path(module).name + "::"  # node ids are relative to tests/, pytest's root
        assert any(line.startswith(node_prefix) and "golden-missing" in line for line in collected), module


def test_selection_by_fixture_name_still_works() -> None:
    name = manifest_fixtures(kind_prefix="dit_forward")[0]["name"]
    result = _pytest(["tests/test_dit_golden.py", "--collect-only", "-k", name], golden_dir())
    assert result.returncode == 0, result.stdout[-2000:]
    selected = [line for line in result.stdout.splitlines() if "::" in line]
    assert selected and all(f"[{name}]" in line for line in selected)
