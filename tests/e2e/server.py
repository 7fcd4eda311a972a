"""Start and stop a private ComfyUI server on 127.0.0.1 for the end-to-end tests.

Each server gets its own base directory (models, custom_nodes, input, output, temp, user and its
own SQLite database), listens on a free loopback port with ``--cpu``, and is stopped by PID:
SIGTERM, then SIGKILL after a timeout. ``WANBENCH_FRONTEND_ROOT`` serves another frontend build
(the ``static`` folder of a ``comfyui-frontend-package`` wheel) through ``--front-end-root``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from .processes import stop_process
from .provision import ComfyInstall

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
RUN_SUBDIRS = ("custom_nodes", "models", "input", "output", "temp", "user")


def frontend_args() -> list[str]:
    """``--front-end-root DIR`` when WANBENCH_FRONTEND_ROOT names a frontend build, else nothing."""
    root = os.environ.get("WANBENCH_FRONTEND_ROOT")
    if not root:
        return []
    if not (Path(root) / "index.html").is_file():
        raise FileNotFoundError(f"WANBENCH_FRONTEND_ROOT={root} holds no index.html (pass a frontend's static/ folder)")
    return ["--front-end-root", str(Path(root).resolve())]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class ComfyServer:
    """One ComfyUI process with a private base directory ``run_dir``."""

    def __init__(
        self, install: ComfyInstall, run_dir: Path, *, port: int | None = None, extra_args: Sequence[str] = ()
    ) -> None:
        self.install = install
        self.extra_args = list(extra_args)
        self.run_dir = run_dir.resolve()
        self.port = port if port is not None else free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = self.run_dir / "comfyui.log"
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        for name in RUN_SUBDIRS:
            (self.run_dir / name).mkdir(parents=True, exist_ok=True)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def link_custom_node(self, source: Path, name: str) -> Path:
        """Symlink a custom node folder into ``run_dir/custom_nodes/<name>`` (before ``start``)."""
        link = self.run_dir / "custom_nodes" / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source.resolve(), target_is_directory=True)
        return link

    def command(self) -> list[str]:
        database = f"sqlite:///{self.run_dir / 'user' / 'comfyui.db'}"
        return [
            str(self.install.python),
            "main.py",
            "--cpu",
            "--listen",
            HOST,
            "--port",
            str(self.port),
            "--disable-auto-launch",
            "--base-directory",
            str(self.run_dir),
            "--database-url",
            database,
            *frontend_args(),
            *self.extra_args,
        ]

    def start(self, *, timeout_s: float = 180.0) -> None:
        """Launch the server and wait until ``/system_stats`` answers."""
        if self._process is not None:
            raise RuntimeError(f"server on port {self.port} already started (pid {self.pid})")
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", DO_NOT_TRACK="1")
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                self.command(),
                cwd=self.install.comfy_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        logger.info("ComfyUI pid %d on %s, log %s", self._process.pid, self.url, self.log_path)
        while time.monotonic() - started < timeout_s:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with code {self._process.returncode} during start-up.\n"
                    f"--- end of {self.log_path} ---\n{self.log_tail()}"
                )
            if self._answers():
                self.startup_seconds = time.monotonic() - started
                logger.info("ComfyUI answered after %.1f s", self.startup_seconds)
                return
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(
            f"ComfyUI did not answer on {self.url} within {timeout_s:.0f} s.\n"
            f"--- end of {self.log_path} ---\n{self.log_tail()}"
        )

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as response:
                json.load(response)
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            return False

    def stop(self, *, timeout_s: float = 15.0) -> int | None:
        """SIGTERM the server's PID, SIGKILL it after ``timeout_s``; returns its exit code."""
        process, self._process = self._process, None
        if process is None:
            return None
        return stop_process(process, timeout_s=timeout_s, name="ComfyUI")

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, num_chars: int = 6000) -> str:
        if not self.log_path.is_file():
            return "(no log written)"
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def __enter__(self) -> ComfyServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
