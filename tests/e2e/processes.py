"""Stopping the processes the end-to-end tests start (ComfyUI, Chromium): by PID, never by name."""

from __future__ import annotations

import logging
import signal
import subprocess

logger = logging.getLogger(__name__)


def stop_process(process: subprocess.Popen[bytes], *, timeout_s: float, name: str) -> int:
    """SIGTERM `process`, SIGKILL it when it is still running after `timeout_s`; its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s pid %d ignored SIGTERM for %.0f s; sending SIGKILL", name, process.pid, timeout_s)
            process.kill()
            process.wait(timeout=timeout_s)
    return process.returncode
