"""Headless Chromium driven through the DevTools protocol, for the browser end-to-end tests.

Chromium starts with a fresh ``--user-data-dir`` and ``--remote-debugging-port=0``; the port it
picked is read from ``DevToolsActivePort``. A page target is opened over HTTP (``/json/new``) and
driven over its websocket with ``Runtime.evaluate`` (``awaitPromise``, ``returnByValue``). Events
the page sends meanwhile are kept: ``console_messages()`` lists what the page logged (console
calls, browser log entries, uncaught exceptions) since ``Runtime``/``Log`` were enabled, which
``open`` does before it navigates, so messages of the page's start-up are included.
Chromium is stopped by PID (SIGTERM, then SIGKILL), and whatever is left of the process group it
was started in is killed by that group's id.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import websocket

from .processes import stop_process

logger = logging.getLogger(__name__)

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


def find_chromium() -> str | None:
    """Path of Debian's ``chromium`` (or ``chromium-browser``) on PATH, else None."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


class JavaScriptError(RuntimeError):
    """An expression evaluated in the page threw."""


class CdpPage:
    """One page target: evaluate JavaScript, wait for conditions, read what the page logged."""

    def __init__(self, ws_url: str, *, timeout_s: float = 120.0) -> None:
        self._ws = websocket.create_connection(ws_url, timeout=timeout_s, suppress_origin=True)
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        self._ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"DevTools {method} failed: {message['error']}")
                return message["result"]
            if "method" in message:
                self.events.append(message)

    def open(self, url: str) -> None:
        """Start recording console messages, then load `url`."""
        self.call("Runtime.enable")
        self.call("Log.enable")
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def mark(self) -> int:
        """A position in the page's events: `console_messages(since=mark)` lists what came after."""
        self.evaluate("0")  # collect the events that arrived since the last call
        return len(self.events)

    def console_messages(self, *, since: int = 0, until: int | None = None) -> list[tuple[str, str]]:
        """(level, text) of what the page logged between two marks (default: everything): console
        calls ("log", "warning", "error", ...; the text ends with `@ <script URLs of the call stack>`),
        browser log entries, uncaught exceptions ("exception")."""
        self.evaluate("0")  # collect the events that arrived since the last call
        found = []
        for event in self.events[since:until]:
            params = event.get("params", {})
            if event["method"] == "Runtime.consoleAPICalled":
                text = " ".join(
                    str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])
                )
                # where it was logged from: the script URLs of the call stack
                urls = dict.fromkeys(f.get("url", "") for f in params.get("stackTrace", {}).get("callFrames", []))
                found.append((params.get("type", "log"), f"{text} @ {' '.join(u for u in urls if u)}"))
            elif event["method"] == "Log.entryAdded":
                entry = params.get("entry", {})
                found.append((entry.get("level", "info"), f"{entry.get('text', '')} {entry.get('url', '')}".strip()))
            elif event["method"] == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = details.get("exception", {}).get("description") or details.get("text", "")
                found.append(("exception", text))
        return found

    def evaluate(self, expression: str) -> Any:
        """Value of ``expression`` (awaited when it is a promise), returned as JSON."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise JavaScriptError(f"page threw: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.evaluate(expression):
                return
            time.sleep(0.25)
        raise TimeoutError(f"{what}: `{expression}` still false after {timeout_s:.0f} s")

    def close(self) -> None:
        self._ws.close()


class Chromium:
    """A headless Chromium process with a private profile folder."""

    def __init__(self, executable: str, profile_dir: Path) -> None:
        self.executable = executable
        self.profile_dir = profile_dir
        self.log_path = profile_dir.with_name(profile_dir.name + ".log")
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self, *, timeout_s: float = 60.0) -> None:
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        command = [self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile_dir}", "about:blank"]
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        port_file = self.profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"chromium exited with code {self._process.returncode} at start-up; "
                    f"end of {self.log_path}:\n{self.log_tail()}"
                )
            if port_file.is_file():
                lines = port_file.read_text().split()
                if lines:
                    self.port = int(lines[0])
                    return
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(
            f"chromium wrote no DevToolsActivePort within {timeout_s:.0f} s; "
            f"end of {self.log_path}:\n{self.log_tail()}"
        )

    def open_page(self, url: str) -> CdpPage:
        """A new tab showing `url`, recording its console from before the page starts loading."""
        if self.port is None:
            raise RuntimeError("chromium is not started")
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(request, timeout=30) as response:
            target = json.load(response)
        page = CdpPage(target["webSocketDebuggerUrl"])
        page.open(url)
        return page

    def stop(self, *, timeout_s: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        stop_process(process, timeout_s=timeout_s, name="chromium")
        try:
            os.killpg(process.pid, signal.SIGKILL)  # helpers left in the group chromium was started in
        except ProcessLookupError:
            pass

    def log_tail(self, num_chars: int = 4000) -> str:
        if not self.log_path.is_file():
            return "(no log written)"
        return self.log_path.read_text(errors="replace")[-num_chars:]
