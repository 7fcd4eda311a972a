"""Session fixtures for the end-to-end tests: one provisioned ComfyUI, one server for the session.

The server runs ComfyUI 0.3.75 (or the tree named by ``COMFYUI_DIR``) on 127.0.0.1 with a private
base directory; the pack is symlinked into its ``custom_nodes/`` and the tiny models written by
``wanbench make-tiny-models`` sit in its ``models/`` folders. A failing test that used the server
gets the end of the server's log in its report.

``tests/e2e`` is a package (it has ``__init__.py``) so that this conftest does not take the name
``conftest`` from ``tests/conftest.py``.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .native_models import make_core_tiny_models
from .provision import ComfyInstall, ensure_optional_packages, install_from_env, provision, repo_root
from .server import ComfyServer

logger = logging.getLogger(__name__)

PACK_LINK_NAME = "ComfyUI-WanBench"
TEST_PACK_LINK_NAME = "wanbench_test_pack"  # test-only nodes (tests/e2e/native_pack), never shipped


@pytest.fixture(scope="session")
def comfy_install() -> ComfyInstall:
    """The ComfyUI tree and interpreter (provisioned and cached under .cache/comfyui, or COMFYUI_DIR)."""
    from_env = install_from_env()
    install = from_env or provision()
    if from_env is None:  # the cached install: top up gguf, which the GGUF e2e tests need in the server
        ensure_optional_packages(install)
    if install.reused:
        logger.info("using ComfyUI %s at %s", install.version, install.comfy_dir)
    else:
        logger.info("provisioned ComfyUI %s in %s s", install.version, install.install_seconds)
    return install


def make_tiny_models(models_dir: Path) -> None:
    """Run ``wanbench make-tiny-models DIR --gguf`` with the project's interpreter (GGUF files too)."""
    result = subprocess.run(
        [sys.executable, "-m", "wanbench", "make-tiny-models", str(models_dir), "--gguf"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"`wanbench make-tiny-models {models_dir}` failed with exit {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )


@pytest.fixture(scope="session")
def comfy_server(
    comfy_install: ComfyInstall, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComfyServer]:
    """One ComfyUI server with the pack and the tiny models, shared by every e2e test of the session."""
    run_dir = tmp_path_factory.mktemp("comfyui_run")
    server = ComfyServer(comfy_install, run_dir)
    server.link_custom_node(repo_root(), PACK_LINK_NAME)
    server.link_custom_node(Path(__file__).resolve().parent / "native_pack", TEST_PACK_LINK_NAME)
    for sample in sorted((comfy_install.comfy_dir / "input").glob("*.png")):
        shutil.copy2(sample, run_dir / "input" / sample.name)  # example.png, which LoadImage defaults to
    started = time.monotonic()
    make_tiny_models(run_dir / "models")
    make_core_tiny_models(run_dir / "models")  # what ComfyUI's own loaders accept, for its native graphs
    logger.info("tiny models written in %.1f s", time.monotonic() - started)
    server.start()
    try:
        yield server
    finally:
        code = server.stop()
        logger.info("ComfyUI server stopped (exit code %s)", code)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    server = getattr(item, "funcargs", {}).get("comfy_server")
    if isinstance(server, ComfyServer):
        report.sections.append(
            (f"ComfyUI server log (pid {server.pid}, {server.log_path})", server.log_tail())
        )
