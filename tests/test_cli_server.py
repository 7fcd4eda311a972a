"""`wanbench run --server`: the HTTP + websocket client against a small stand-in server.

The stand-in speaks the parts of ComfyUI's protocol the client uses (POST /prompt, /ws frames
including a fragmented message, a binary preview and a ping, /history, /view). The real server is
exercised by the end-to-end tests.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from wanbench.cli import API_WORKFLOWS_DIR, main
from wanbench.client import ServerError, download_target, run_on_server

PROMPT_ID = "p-123"
FILES = {
    "v_00001_.mp4": b"\x00\x00\x00\x18ftypmp42",
    "r_00001_.json": b'{"schema": "x"}',
    "r_00001_.md": b"# r",
}


REFUSAL = {
    "error": {
        "type": "prompt_outputs_failed_validation",
        "message": "Prompt outputs failed validation",
        "details": "",
        "extra_info": {},
    },
    "node_errors": {
        "7": {
            "errors": [
                {
                    "type": "custom_validation_failed",
                    "message": "Custom validation failed for node",
                    "details": "length - length must be 4k+1 (e.g. 81 or 121); got 80; use 77 or 81",
                    "extra_info": {"input_name": "length"},
                }
            ],
            "dependent_outputs": ["10", "11"],
            "class_type": "WanBenchEmptyLatent",
        },
        "8": {
            "errors": [
                {
                    "type": "value_smaller_than_min",
                    "message": "Value -1 smaller than min of 0",
                    "details": "steps",
                    "extra_info": {"input_name": "steps", "received_value": -1},
                }
            ],
            "dependent_outputs": ["10", "11"],
            "class_type": "WanBenchSampler",
        },
    },
}


def _frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        return head + bytes([n]) + payload
    return head + bytes([126]) + struct.pack(">H", n) + payload


def _text(message: dict) -> bytes:
    return _frame(0x1, json.dumps(message).encode())


def _case_name(body: dict) -> str:
    """The profiler's case name in a posted prompt ("" when it has none)."""
    for node in body.get("prompt", {}).values():
        if isinstance(node, dict) and "case_name" in node.get("inputs", {}):
            return str(node["inputs"]["case_name"])
    return ""


class Handler(BaseHTTPRequestHandler):
    # "ok" | "refuse" | "error" | "escape" | "suite" (refuse prompts whose case name mentions "bad") |
    # "no_ws" (no websocket route) | "close" (closes the websocket early) | "silent" (sends nothing)
    mode = "ok"
    received: list = []
    files: dict[str, bytes] = FILES

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _json(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.received.append(body)
        # Only the case name decides: the random client_id (hex) may itself contain "bad".
        if Handler.mode == "refuse" or (Handler.mode == "suite" and "bad" in _case_name(body)):
            self._json(400, REFUSAL)  # what ComfyUI 0.3.75 answers (execution.validate_inputs)
        else:
            self._json(200, {"prompt_id": PROMPT_ID, "number": 1, "node_errors": {}})

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/ws" and Handler.mode != "no_ws":
            self._websocket()
        elif url.path == f"/history/{PROMPT_ID}":
            outputs = {
                "10": {
                    "images": [{"filename": "v_00001_.mp4", "subfolder": "wanbench", "type": "output"}],
                    "animated": [True],
                },
                "11": {
                    "text": ["summary"],
                    "wanbench_report": [
                        {"filename": "r_00001_.md", "subfolder": "wanbench", "type": "output", "kind": "markdown"},
                        {"filename": "r_00001_.json", "subfolder": "wanbench", "type": "output", "kind": "json"},
                    ],
                },
            }
            if Handler.mode == "escape":  # a server naming a file outside the client's --out
                outputs["10"]["images"][0]["subfolder"] = "../../escaped"
            self._json(200, {PROMPT_ID: {"outputs": outputs}})
        elif url.path == "/view":
            data = Handler.files[parse_qs(url.query)["filename"][0]]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self._json(404, {})

    def _websocket(self) -> None:
        import base64
        import hashlib

        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        )
        self.wfile.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        posted_before = len(Handler.received)
        self.wfile.write(_text({"type": "status", "data": {"status": {}}}))
        # Wait for this connection's prompt to be posted before sending its messages (in a suite
        # earlier cases have posted already, so wait for one more than were there at connect).
        for _ in range(200):
            if len(Handler.received) > posted_before:
                break
            threading.Event().wait(0.01)
        data = {"prompt_id": PROMPT_ID}
        frames = [
            _text({"type": "execution_start", "data": data}),
            _frame(0x9, b"ping"),
            _frame(0x2, b"\x00\x00\x00\x01binary-preview"),
            _text({"type": "progress", "data": {**data, "node": "8", "value": 1, "max": 2}}),
        ]
        half = json.dumps({"type": "progress", "data": {**data, "node": "8", "value": 2, "max": 2}}).encode()
        frames += [_frame(0x1, half[:10], fin=False), _frame(0x0, half[10:])]
        if Handler.mode == "silent":
            frames = []
        elif Handler.mode == "close":
            frames = [frames[0], _frame(0x8, struct.pack(">H", 1000))]
        elif Handler.mode == "error":
            frames.append(
                _text(
                    {
                        "type": "execution_error",
                        "data": {
                            **data,
                            "node_id": "8",
                            "node_type": "WanBenchSampler",
                            "exception_type": "ValueError",
                            "exception_message": "boom",
                        },
                    }
                )
            )
        else:
            frames += [
                _text({"type": "executing", "data": {"node": "11", "prompt_id": PROMPT_ID}}),
                _text({"type": "executing", "data": {"node": None, "prompt_id": PROMPT_ID}}),
            ]
        for frame in frames:
            self.wfile.write(frame)
        self.wfile.flush()
        self.rfile.read(2)  # the pong (or close) from the client


@pytest.fixture
def server():
    Handler.received = []
    Handler.files = FILES
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_run_on_server_follows_progress_and_fetches_files(server: str, tmp_path: Path) -> None:
    Handler.mode = "ok"
    progress: list = []
    run = run_on_server(
        {"1": {"class_type": "X", "inputs": {}}},
        server,
        tmp_path,
        timeout_s=20,
        on_progress=lambda node, value, maximum: progress.append((node, value, maximum)),
    )
    assert run.prompt_id == PROMPT_ID
    assert Handler.received[0]["prompt"] == {"1": {"class_type": "X", "inputs": {}}}
    assert progress == [("8", 1, 2), ("8", 2, 2)]
    assert run.files["videos"] == [str(tmp_path / "wanbench" / "v_00001_.mp4")]
    assert run.files["reports"] == [str(tmp_path / "wanbench" / "r_00001_.json")]
    assert (tmp_path / "wanbench" / "r_00001_.md").read_bytes() == FILES["r_00001_.md"]
    # Downloads are written to a temporary name and renamed: nothing else is left behind.
    assert sorted(p.name for p in (tmp_path / "wanbench").iterdir()) == sorted(FILES)


def test_download_refuses_a_path_outside_out(server: str, tmp_path: Path) -> None:
    Handler.mode = "escape"
    out = tmp_path / "a" / "b"
    with pytest.raises(ServerError, match=r"outside --out: subfolder '\.\./\.\./escaped'.*refusing to write"):
        run_on_server({"1": {"class_type": "X", "inputs": {}}}, server, out, timeout_s=20)
    assert not (tmp_path / "escaped").exists()
    for subfolder, filename in (("", "../x.mp4"), ("/etc", "x"), ("a", ""), ("", "/abs.mp4")):
        with pytest.raises(ServerError, match="outside --out"):
            download_target(out, subfolder, filename)
    assert download_target(out, "wanbench/sub", "v.mp4") == (out / "wanbench" / "sub" / "v.mp4").resolve()


def test_refused_prompt_and_failed_node_are_errors(server: str, tmp_path: Path) -> None:
    prompt = json.loads((API_WORKFLOWS_DIR / "tiny_ti2v_5B_t2v.api.json").read_text(encoding="utf-8"))
    Handler.mode = "refuse"
    with pytest.raises(ServerError) as info:
        run_on_server(prompt, server, tmp_path, timeout_s=20)
    assert str(info.value).splitlines() == [
        "the server refused the workflow (HTTP 400): Prompt outputs failed validation",
        "  - node 7 'Wan Empty Latent' (WanBenchEmptyLatent), input 'length': "
        "length must be 4k+1 (e.g. 81 or 121); got 80; use 77 or 81",
        "  - node 8 'Wan Sampler' (WanBenchSampler), input 'steps': Value -1 smaller than min of 0",
    ]
    assert [(p.node_id, p.input) for p in info.value.problems] == [("7", "length"), ("8", "steps")]
    Handler.mode = "error"
    with pytest.raises(ServerError, match="node 8 'Wan Sampler' \\(WanBenchSampler\\) failed: ValueError: boom$"):
        run_on_server(prompt, server, tmp_path, timeout_s=20)
    with pytest.raises(ServerError, match="node 8 'WanBenchSampler' failed: ValueError: boom$"):
        run_on_server({}, server, tmp_path, timeout_s=20)  # no titles in the prompt: the class type


@pytest.mark.parametrize(
    ("mode", "timeout_s", "needle"),
    [
        ("no_ws", 20, r"websocket upgrade refused by ws://127\.0\.0\.1:\d+/ws\?clientId=\w+: HTTP 404"),
        # a generous timeout: the close must be seen as a close however slowly the fake server answers
        ("close", 20, "the server closed the websocket before the prompt finished"),
        ("silent", 0.5, "no message from the server for 0.5 s while the prompt ran"),
    ],
)
def test_websocket_failures_are_server_errors(
    server: str, tmp_path: Path, mode: str, timeout_s: float, needle: str
) -> None:
    Handler.mode = mode
    with pytest.raises(ServerError, match=needle):
        run_on_server({"1": {"class_type": "X", "inputs": {}}}, server, tmp_path, timeout_s=timeout_s)
    assert not list(tmp_path.iterdir())  # nothing fetched


def test_unreachable_server_and_bad_url(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ServerError, match=f"cannot reach a ComfyUI server at http://127.0.0.1:{port} .*--server URL"):
        run_on_server({}, f"http://127.0.0.1:{port}/", tmp_path, timeout_s=5)
    with pytest.raises(ValueError, match="--server must be a plain http:// URL"):
        run_on_server({}, "https://example.invalid", tmp_path, timeout_s=5)


def test_cli_names_the_missing_websocket_package(tmp_path: Path, monkeypatch, caplog) -> None:
    """Without websocket-client, `run --server` fails with one line naming the package and the pip line."""
    monkeypatch.setitem(sys.modules, "websocket", None)  # makes `import websocket` raise ImportError
    monkeypatch.delitem(sys.modules, "wanbench.client")
    argv = ["run", "tiny_ti2v_5B_t2v.api.json", "--server", "http://127.0.0.1:9", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "ImportError: `wanbench run --server` needs the websocket-client package" in caplog.text
    assert "pip install 'websocket-client>=1.6'" in caplog.text


def test_cli_run_with_server(server: str, tmp_path: Path, capsys) -> None:
    Handler.mode = "ok"
    assert (
        main(
            [
                "run",
                "tiny_ti2v_5B_t2v.api.json",
                "--server",
                server,
                "--out",
                str(tmp_path),
                "--set",
                "WanBenchSampler.steps=2",
            ]
        )
        == 0
    )
    assert Handler.received[0]["prompt"]["8"]["inputs"]["steps"] == 2
    out = capsys.readouterr().out
    assert "  Wan Sampler (node 8): 1/2" in out and "  Wan Sampler (node 8): 2/2" in out
    assert f"  video: {tmp_path / 'wanbench' / 'v_00001_.mp4'}" in out
    assert f"  report: {tmp_path / 'wanbench' / 'r_00001_.md'}" in out
    assert f"  report data (JSON): {tmp_path / 'wanbench' / 'r_00001_.json'}" in out
    assert "othe:" not in out and "node 8: " not in out


def test_cli_prints_a_refused_workflow_problem_by_problem(server: str, tmp_path: Path, caplog) -> None:
    Handler.mode = "refuse"
    argv = ["run", "tiny_ti2v_5B_t2v.api.json", "--server", server, "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "ServerError: the server refused the workflow (HTTP 400): Prompt outputs failed validation" in caplog.text
    assert "  - node 7 'Wan Empty Latent' (WanBenchEmptyLatent), input 'length': length must be 4k+1" in caplog.text
    assert "node_errors" not in caplog.text and '{"' not in caplog.text  # not the raw server JSON


def _real_report_json(tmp_path: Path) -> bytes:
    """A valid report JSON (one short CPU session), as the server's Wan Benchmark Report writes it."""
    from wanbench.profiling import ProfileSession, write_report

    with ProfileSession(case_name="served_case", sample_interval_s=None) as session:
        pass
    return write_report(session, tmp_path / "made", chart=False).json.read_bytes()


def test_cli_suite_with_server_reports_a_failed_case(server: str, tmp_path: Path, capsys, caplog) -> None:
    Handler.mode = "suite"
    Handler.files = {**FILES, "r_00001_.json": _real_report_json(tmp_path)}
    suite = {
        "name": "served",
        "cases": [
            {
                "name": "good_case",
                "workflow": "../tiny_ti2v_5B_t2v.api.json",
                "overrides": {"WanBenchProfiler.case_name": "good_case"},
            },
            {
                "name": "bad_case",
                "workflow": "../tiny_ti2v_5B_t2v.api.json",
                "overrides": {"WanBenchProfiler.case_name": "bad_case"},
            },
            {
                "name": "later_case",
                "workflow": "../tiny_t2v_A14B.api.json",
                "overrides": {"WanBenchProfiler.case_name": "later_case"},
            },
        ],
    }
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "served.json").write_text(json.dumps(suite), encoding="utf-8")
    for name in ("tiny_ti2v_5B_t2v.api.json", "tiny_t2v_A14B.api.json"):
        (tmp_path / name).write_text((API_WORKFLOWS_DIR / name).read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["suite", str(suites / "served.json"), "--server", server, "--out", str(out)]) == 1

    # Every case was posted (the failed one did not stop the suite), in order.
    cases = [body["prompt"]["1"]["inputs"]["case_name"] for body in Handler.received]
    assert cases == ["good_case", "bad_case", "later_case"]
    stdout = capsys.readouterr().out
    assert "FAILED bad_case: ServerError: the server refused the workflow (HTTP 400)" in stdout
    assert "2/3 cases passed" in stdout
    assert "Traceback" in caplog.text and "case bad_case failed" in caplog.text  # the full error is logged
    for case in ("good_case", "later_case"):
        assert (out / case / "wanbench" / "v_00001_.mp4").is_file()
    combined = (out / "served_report.md").read_text(encoding="utf-8")
    assert "served_case" in combined  # the merged runs
    failed = combined[combined.index("## Failed cases") :]
    assert "| bad_case | FAILED | ServerError: the server refused the workflow (HTTP 400)" in failed
    assert "good_case" not in failed and "later_case" not in failed
    assert not list(out.glob("*.tmp"))
