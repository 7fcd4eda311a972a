"""Shared test fixtures: the golden fixture folder and its manifests; one torch thread per process.

The folder comes from WANBENCH_GOLDEN_DIR (default: ../shared/golden next to the checkout), so the
same tests run unchanged on another fixture set with the same manifest format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# One intra-op thread per test process (and the subprocesses it starts) unless the caller chose:
# the tiny models gain nothing from more, and on a busy 2-core machine OpenMP threads waiting on
# each other made the unit tests about 2.3x slower (4m56 vs 2m07 wall, 2m42 vs 1m08 CPU).
# Set before torch is imported so that it takes effect.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    return Path(os.environ.get("WANBENCH_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden")).resolve()


def load_manifest(name: str = "MANIFEST.json") -> dict:
    path = golden_dir() / name
    if not path.is_file():
        pytest.skip(f"golden manifest {path} not found (set WANBENCH_GOLDEN_DIR)")
    return json.loads(path.read_text(encoding="utf-8"))


def manifest_fixtures(name: str = "MANIFEST.json", *, kind_prefix: str = "", name_prefix: str = "") -> list[dict]:
    """Fixture entries of a manifest, for parametrization at collection time (empty if missing)."""
    path = golden_dir() / name
    if not path.is_file():
        return []
    fixtures = json.loads(path.read_text(encoding="utf-8"))["fixtures"]
    return [f for f in fixtures if f.get("kind", "").startswith(kind_prefix) and f["name"].startswith(name_prefix)]


def assert_close_manifest(got: torch.Tensor, exp: torch.Tensor, *, atol: float, rtol: float, what: str) -> None:
    """Manifest rule: max|got - exp| <= atol + rtol * max|exp| (per tensor)."""
    assert got.shape == exp.shape, f"{what}: shape {tuple(got.shape)} != expected {tuple(exp.shape)}"
    got64, exp64 = got.double(), exp.double()
    err = (got64 - exp64).abs().max().item()
    bound = atol + rtol * exp64.abs().max().item()
    assert err <= bound, f"{what}: max abs error {err:.3e} > bound {bound:.3e}"


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    torch.manual_seed(0)
    yield
