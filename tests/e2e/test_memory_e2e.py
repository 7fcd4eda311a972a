"""Memory through a real ComfyUI server: the largest accepted size is refused with the figures before
anything is allocated (the server stays up, its memory does not grow), and `POST /free` reaches the
pack's models through ComfyUI's memory manager."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
from wanbench.client import ServerError, http_json, run_on_server
from wanbench.nodes.validation import MAX_FRAMES, MAX_SIZE

from .comfy_api import geometry_node, load_api, only_node_of_type
from .server import ComfyServer

pytestmark = pytest.mark.e2e
GB = 10**9


def _status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise LookupError(f"/proc/{pid}/status has no {field}")


def _reset_high_water_mark(pid: int) -> bool:
    """Reset the server's VmHWM to its current RSS (same user: allowed); False where it cannot be."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def _wait_for_log(server: ComfyServer, text: str, *, count: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    found = 0
    while time.monotonic() < deadline:
        found = server.log_path.read_text(encoding="utf-8", errors="replace").count(text)
        if found >= count:
            return found
        time.sleep(0.2)
    return found


def test_largest_accepted_size_is_refused_and_the_server_stays_up(comfy_server: ComfyServer, tmp_path: Path) -> None:
    prompt = load_api("tiny_ti2v_5B_t2v.api.json")
    latent_id = geometry_node(prompt)
    huge = copy.deepcopy(prompt)
    huge[latent_id]["inputs"].update(width=MAX_SIZE, height=MAX_SIZE, length=MAX_FRAMES)
    pid = comfy_server.pid
    assert pid is not None
    rss_before = _status_bytes(pid, "VmRSS")
    hwm_reset = _reset_high_water_mark(pid)

    with pytest.raises(ServerError) as err:
        run_on_server(huge, comfy_server.url, tmp_path / "huge", timeout_s=600)
    message = str(err.value)
    assert f"node {latent_id} (WanBenchEmptyLatent) failed: " in message
    assert f"MemoryPlanError: the video of a {MAX_SIZE}x{MAX_SIZE}, {MAX_FRAMES}-frame latent needs" in message
    assert "decoded video 206.3" in message and "GB free on cpu" in message and "Nothing was allocated" in message

    assert comfy_server.is_running()
    status, stats = http_json("GET", comfy_server.url + "/system_stats")
    assert status == 200 and stats["devices"][0]["type"] == "cpu"
    grown = _status_bytes(pid, "VmRSS") - rss_before
    assert grown < 0.5 * GB, f"the server's RSS grew by {grown / GB:.2f} GB for a refused prompt"
    if hwm_reset:
        peak = _status_bytes(pid, "VmHWM") - rss_before
        assert peak < 0.5 * GB, f"the server's memory peaked {peak / GB:.2f} GB above its RSS for a refused prompt"

    run = run_on_server(prompt, comfy_server.url, tmp_path / "after", timeout_s=600)  # the server still works
    assert len(run.files["videos"]) == 1


def test_post_free_reaches_the_pack_models_through_comfyui(comfy_server: ComfyServer, tmp_path: Path) -> None:
    prompt = load_api("tiny_t2v_A14B.api.json")
    first = run_on_server(prompt, comfy_server.url, tmp_path / "first", timeout_s=600)
    assert len(first.files["videos"]) == 1
    before = comfy_server.log_path.read_text(encoding="utf-8", errors="replace").count("ComfyUI unloaded Wan")

    status, _ = http_json("POST", comfy_server.url + "/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    # ComfyUI's unload_all_models calls the adapter of each listed model: 2 DiT experts, T5, VAE
    seen = _wait_for_log(comfy_server, "ComfyUI unloaded Wan", count=before + 4, timeout_s=30)
    assert seen - before >= 4, comfy_server.log_tail()
    log_text = comfy_server.log_path.read_text(encoding="utf-8", errors="replace")
    for name in ("Wan DiT high_noise_model", "Wan DiT low_noise_model", "Wan text encoder", "Wan VAE"):
        assert f"ComfyUI unloaded {name}" in log_text, name

    again = copy.deepcopy(prompt)
    again[only_node_of_type(again, "WanBenchSampler")]["inputs"]["seed"] = 7
    second = run_on_server(again, comfy_server.url, tmp_path / "second", timeout_s=600)  # models load again
    assert len(second.files["videos"]) == 1
