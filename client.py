"""Run an API-format workflow on a ComfyUI server: the client behind `wanbench run --server`.

`POST /prompt`, follow the prompt on the websocket (`/ws`: progress, errors, interrupts), read
`/history/<id>` and download its videos and report files through `/view` into a local folder.
HTTP goes through the standard library, the websocket through the `websocket-client` package.
Whatever the server says is checked: a refused prompt, a failed or interrupted node, a websocket
that closes early and an output name that would land outside the local folder are `ServerError`s.

Shapes: none (HTTP plumbing only).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .util.atomic import atomic_output
from .wan_core.errors import WanError

_INSTALL_HINT = "install it with: pip install 'websocket-client>=1.6'"
try:
    import websocket  # the websocket-client package
except ImportError as err:
    raise ImportError(
        "`wanbench run --server` needs the websocket-client package (imported as `websocket`), "
        f"which is not installed; {_INSTALL_HINT}"
    ) from err
if not hasattr(websocket, "create_connection"):
    raise ImportError(
        f"the module `websocket` at {getattr(websocket, '__file__', '?')} is not websocket-client "
        f"(no create_connection); pip uninstall websocket, then {_INSTALL_HINT}"
    )

ProgressCallback = Callable[[Any, Any, Any], None]  # (node id, value, max) of a `progress` message
HTTP_TIMEOUT_S = 60.0  # one HTTP request (submit, history, a file view)
CLOSE_TIMEOUT_S = 2.0  # how long closing the websocket waits for the server's close frame
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov")


class ServerError(WanError, RuntimeError):
    """The server refused the prompt or the prompt failed there."""


@dataclass
class ServerRun:
    """What a prompt produced on a server, with the files copied to `out_dir`."""

    prompt_id: str
    files: dict[str, list[str]]
    messages: list[dict[str, Any]]


# ------------------------------------------------------------------------------------------------
# HTTP: JSON requests and output files
# ------------------------------------------------------------------------------------------------
def http_json(method: str, url: str, body: Any = None, *, timeout_s: float = HTTP_TIMEOUT_S) -> tuple[int, Any]:
    """(status, parsed JSON body) of one request; HTTP error statuses are returned, not raised.

    An error answer that is not JSON comes back as its text.
    """
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, raw.decode(errors="replace")


def view_bytes(server: str, entry: Mapping[str, Any], *, timeout_s: float = HTTP_TIMEOUT_S) -> bytes:
    """The file a history entry (`{"filename", "subfolder", "type"}`) names, through `/view`."""
    query = urllib.parse.urlencode(
        {
            "filename": str(entry["filename"]),
            "subfolder": str(entry.get("subfolder", "")),
            "type": entry.get("type", "output"),
        }
    )
    with urllib.request.urlopen(f"{server}/view?{query}", timeout=timeout_s) as response:
        return response.read()


def download_target(out_dir: Path, subfolder: str, filename: str) -> Path:
    """Where a server output (`subfolder`/`filename` from the history) is saved under `out_dir`.

    The names come from the server: one that is absolute or climbs out of `out_dir` (`..`) is
    refused, so a server can never make the client write outside the folder it was given.
    """
    root = out_dir.resolve()
    relative = Path(subfolder.replace("\\", "/")) / filename.replace("\\", "/")
    target = (root / relative).resolve()
    if relative.is_absolute() or not filename or root not in target.parents:
        raise ServerError(
            f"the server named an output outside --out: subfolder {subfolder!r}, filename {filename!r}; "
            f"refusing to write it (expected a path inside {root})"
        )
    return target


def download(server: str, entry: Mapping[str, Any], out_dir: Path, *, timeout_s: float) -> Path:
    """Copy the output a history entry names into `out_dir` (same subfolder); never half-written."""
    target = download_target(out_dir, str(entry.get("subfolder", "")), str(entry["filename"]))
    target.parent.mkdir(parents=True, exist_ok=True)
    data = view_bytes(server, entry, timeout_s=timeout_s)
    with atomic_output(target) as tmp:
        tmp.write_bytes(data)
    return target


# ------------------------------------------------------------------------------------------------
# One prompt: submit, follow on the websocket, fetch the outputs
# ------------------------------------------------------------------------------------------------
def check_server_url(server: str) -> str:
    """`server` without a trailing slash; only plain `http://` URLs are supported."""
    server = server.rstrip("/")
    if not server.startswith("http://"):
        raise ValueError(f"--server must be a plain http:// URL such as http://127.0.0.1:8188; got {server!r}")
    return server


def open_websocket(server: str, client_id: str, *, timeout_s: float) -> websocket.WebSocket:
    """The server's `/ws` for `client_id`; every later receive waits at most `timeout_s`."""
    url = server.replace("http://", "ws://", 1) + f"/ws?clientId={client_id}"
    try:
        return websocket.create_connection(url, timeout=timeout_s)
    except websocket.WebSocketBadStatusException as err:
        raise ServerError(
            f"websocket upgrade refused by {url}: HTTP {err.status_code}; is {server} a ComfyUI server?"
        ) from err
    except (OSError, websocket.WebSocketException) as err:
        raise ServerError(
            f"cannot reach a ComfyUI server at {server} ({type(err).__name__}: {err}); start ComfyUI "
            "(python main.py --listen 127.0.0.1 --port 8188) or fix the --server URL"
        ) from err


def submit_prompt(server: str, prompt: Mapping[str, Any], client_id: str) -> str:
    """`POST /prompt`; returns the prompt id. A refusal (HTTP error, or 200 with `node_errors`)
    is a `ServerError` that shows the server's answer."""
    status, answer = http_json("POST", f"{server}/prompt", {"prompt": dict(prompt), "client_id": client_id})
    if status != 200 or not isinstance(answer, dict) or answer.get("node_errors"):
        raise ServerError(f"the server refused the workflow (HTTP {status}): {json.dumps(answer)[:2000]}")
    return answer["prompt_id"]


def _next_text(ws: websocket.WebSocket, *, timeout_s: float) -> str:
    """The next text message (binary ones, such as previews, are skipped; pings are answered)."""
    closed = "the server closed the websocket before the prompt finished"
    while True:
        try:
            opcode, payload = ws.recv_data()
        except websocket.WebSocketTimeoutException as err:
            raise ServerError(
                f"no message from the server for {timeout_s:g} s while the prompt ran; "
                "raise the timeout or check the server's log"
            ) from err
        except websocket.WebSocketConnectionClosedException as err:
            raise ServerError(closed) from err
        except websocket.WebSocketException as err:
            raise ServerError(f"bad websocket data from the server ({type(err).__name__}: {err})") from err
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            raise ServerError(closed)
        if opcode == websocket.ABNF.OPCODE_TEXT:
            return payload.decode("utf-8") if isinstance(payload, bytes) else payload


def follow_prompt(
    ws: websocket.WebSocket, prompt_id: str, *, timeout_s: float, on_progress: ProgressCallback | None = None
) -> list[dict[str, Any]]:
    """The messages about `prompt_id` (and those naming no prompt) until it has finished.

    Finished means `executing` with `node: null` for the prompt: `execution_success` comes before
    the prompt is in `/history`. `execution_error` and `execution_interrupted` are `ServerError`s.
    """
    messages: list[dict[str, Any]] = []
    while True:
        message = json.loads(_next_text(ws, timeout_s=timeout_s))
        data = message.get("data", {})
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        messages.append(message)
        kind = message.get("type")
        if kind == "progress" and on_progress is not None:
            on_progress(data.get("node"), data.get("value"), data.get("max"))
        elif kind == "execution_error":
            raise ServerError(
                f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                f"{data.get('exception_type')}: {data.get('exception_message')}"
            )
        elif kind == "execution_interrupted":
            raise ServerError(f"the prompt was interrupted at node {data.get('node_id')}")
        elif kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
            return messages


def fetch_outputs(server: str, prompt_id: str, out_dir: Path, *, timeout_s: float) -> dict[str, list[str]]:
    """Download what `/history/<prompt_id>` lists into `out_dir`: {"videos", "reports" (JSON), "other"}."""
    _, history = http_json("GET", f"{server}/history/{prompt_id}")
    outputs = history.get(prompt_id, {}).get("outputs", {}) if isinstance(history, dict) else {}
    files: dict[str, list[str]] = {"videos": [], "reports": [], "other": []}
    for node_output in outputs.values():
        for entry in node_output.get("wanbench_report", []):
            path = download(server, entry, out_dir, timeout_s=timeout_s)
            files["reports" if path.suffix == ".json" else "other"].append(str(path))
        for entry in node_output.get("images", []) + node_output.get("gifs", []):
            path = download(server, entry, out_dir, timeout_s=timeout_s)
            files["videos" if path.suffix in VIDEO_SUFFIXES else "other"].append(str(path))
    return files


def free_server_memory(server: str) -> None:
    """Ask the server to unload models and drop its execution cache (`POST /free`).

    ComfyUI's prompt worker does it when it next wakes (right away when it is idle); there is no
    answer that says it is done, so a caller that needs it done before the next prompt waits a
    moment (`ladders.FREE_SETTLE_S`).
    """
    server = check_server_url(server)
    status, answer = http_json("POST", f"{server}/free", {"unload_models": True, "free_memory": True})
    if status != 200:
        raise ServerError(f"the server refused to free its memory (POST /free, HTTP {status}): {answer!r:.300}")


def run_on_server(
    prompt: Mapping[str, Any],
    server: str,
    out_dir: Path,
    *,
    timeout_s: float = 3600.0,
    on_progress: ProgressCallback | None = None,
) -> ServerRun:
    """Submit `prompt`, follow its progress on the websocket, then fetch its videos and report files.

    The websocket is opened before the prompt is posted, so no message about it is missed.
    """
    server = check_server_url(server)
    client_id = uuid.uuid4().hex
    ws = open_websocket(server, client_id, timeout_s=timeout_s)
    try:
        prompt_id = submit_prompt(server, prompt, client_id)
        messages = follow_prompt(ws, prompt_id, timeout_s=timeout_s, on_progress=on_progress)
    finally:
        ws.close(timeout=CLOSE_TIMEOUT_S)
    files = fetch_outputs(server, prompt_id, out_dir, timeout_s=timeout_s)
    return ServerRun(prompt_id=prompt_id, files=files, messages=messages)
