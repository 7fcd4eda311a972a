"""Shared test fixtures: the golden fixture folder and its manifests; one torch thread per process.

The folder comes from WANBENCH_GOLDEN_DIR (default: ../shared/golden next to the checkout), so the
same tests run unchanged on another fixture set with the same manifest format.

A parity test module never turns into an empty parameter set: when the manifest is missing or
unreadable, or lists no fixture of the kind the module checks, `golden_params` gives one
parameter that fails with a message naming the folder and WANBENCH_GOLDEN_DIR.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

# One intra-op thread per test process (and the subprocesses it starts) unless the caller chose:
# the tiny models gain nothing from more, and on a busy 2-core machine OpenMP threads waiting on
# each other made the unit tests about 2.3x slower (4m56 vs 2m07 wall, 2m42 vs 1m08 CPU).
# Set before torch is imported so that it takes effect.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_ENV = "WANBENCH_GOLDEN_DIR"
DEFAULT_GOLDEN_DIR = REPO_ROOT.parent / "shared" / "golden"


class GoldenSetError(Exception):
    """The golden folder cannot give what a parity test needs (message says what and how to fix)."""


class MissingGolden:
    """Parameter value standing in for fixtures that are not there; a test that gets it fails."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"MissingGolden({self.message!r})"


def golden_dir() -> Path:
    return Path(os.environ.get(GOLDEN_ENV, DEFAULT_GOLDEN_DIR)).resolve()


def _golden_problem(problem: str) -> str:
    source = f"{GOLDEN_ENV}={os.environ[GOLDEN_ENV]!r}" if GOLDEN_ENV in os.environ else \
        f"{GOLDEN_ENV} unset, default {DEFAULT_GOLDEN_DIR}"
    return (f"golden fixtures unavailable in {golden_dir()} ({source}): {problem}. Point {GOLDEN_ENV} at "
            f"a folder holding the official fixtures and their manifests (e.g. ../shared/golden), or "
            f"unset it to use the default")


def read_manifest(name: str = "MANIFEST.json") -> dict:
    """The manifest `name` of the golden folder; raises `GoldenSetError` if missing or unreadable."""
    path = golden_dir() / name
    if not path.is_file():
        raise GoldenSetError(_golden_problem(f"manifest {name} not found"))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GoldenSetError(_golden_problem(f"manifest {name} is unreadable ({e})")) from e
    if not isinstance(manifest, dict):
        raise GoldenSetError(_golden_problem(f"manifest {name} holds a {type(manifest).__name__}, "
                                             "expected a JSON object"))
    return manifest


def load_manifest(name: str = "MANIFEST.json") -> dict:
    """`read_manifest` for use inside a test: a missing or unreadable manifest fails the test."""
    try:
        return read_manifest(name)
    except GoldenSetError as e:
        pytest.fail(str(e), pytrace=False)


def manifest_fixtures(name: str = "MANIFEST.json", *, kind_prefix: str = "", name_prefix: str = "") -> list[dict]:
    """Fixture entries of a manifest whose kind and name start with the given prefixes.

    Raises `GoldenSetError` when the manifest is missing or unreadable or lists no such fixture.
    """
    fixtures = read_manifest(name).get("fixtures")
    if not isinstance(fixtures, list):
        raise GoldenSetError(_golden_problem(f"manifest {name} has no 'fixtures' list"))
    selected = [f for f in fixtures
                if f.get("kind", "").startswith(kind_prefix) and f.get("name", "").startswith(name_prefix)]
    if not selected:
        raise GoldenSetError(_golden_problem(f"manifest {name} lists no fixture of kind {kind_prefix!r}*"
                                             f"{f' named {name_prefix!r}*' if name_prefix else ''}"))
    return selected


def golden_params(build: Callable[[], Iterable], *, fail_id: str, num_args: int = 1) -> list:
    """Parameters for `pytest.mark.parametrize` from `build()` (which reads the golden folder).

    When `build` raises `GoldenSetError` or gives nothing, the result is one parameter with id
    `fail_id` (and `num_args` values) that fails the test with the reason, instead of an empty
    parameter set that pytest would report as skipped.
    """
    try:
        params = list(build())
        if not params:
            raise GoldenSetError(_golden_problem(f"no fixtures for {fail_id}"))
    except GoldenSetError as e:
        return [pytest.param(*[MissingGolden(str(e))] * num_args, id=fail_id)]
    return params


def fixture_params(name: str = "MANIFEST.json", *, kind_prefix: str = "", name_prefix: str = "") -> list:
    """One parameter per matching fixture entry, with the fixture name as id (`pytest -k <name>`)."""
    return golden_params(
        lambda: [pytest.param(f, id=f["name"]) for f in manifest_fixtures(name, kind_prefix=kind_prefix,
                                                                           name_prefix=name_prefix)],
        fail_id=f"golden-missing-{kind_prefix or name}")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> None:
    """Fail (not skip, not error) a test that was given a `MissingGolden` parameter."""
    for value in pyfuncitem.funcargs.values():
        if isinstance(value, MissingGolden):
            pytest.fail(value.message, pytrace=False)


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
