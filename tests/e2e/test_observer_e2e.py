"""ComfyUI's own Wan2.2 graphs profiled on a real server with Wan Profiler + Wan Benchmark Report
dropped in (no wires): steps with their experts, the T5 / VAE stages, cached nodes on a second run,
interrupts and errors that leave nothing behind, a dropped report, and the native-vs-pack suite
run headless."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from wanbench.client import ServerError, http_json, run_on_server
from wanbench.profiling import check_report
from wanbench.wan_core.config import T2V_A14B
from wanbench.workflows.native_workflows import high_noise_steps

from .comfy_api import history_outputs
from .native_graphs import pack_twin_overrides, tiny_native
from .native_models import FULL_WAN22_VAE, full_size_wan22_vae
from .provision import repo_root
from .server import ComfyServer

pytestmark = pytest.mark.e2e

STEPS = 4
SAMPLER_THREAD = "wanbench-profiler-sampler"
OBSERVER_KEY = "wanbench.observer"


def _report(files: dict[str, list[str]]) -> dict[str, Any]:
    (path,) = files["reports"]
    assert check_report(path) == [], check_report(path)
    (run,) = json.loads(Path(path).read_text(encoding="utf-8"))["runs"]
    return run


def _steps(run: dict[str, Any], *, cached: bool = False) -> dict[int, dict[str, Any]]:
    return {s["step"]: s for s in run["stages"] if s["kind"] == "step-inference" and s["cached"] is cached}


def _top(run: dict[str, Any]) -> list[str]:
    return [s["name"] for s in run["stages"] if s["parent"] is None and not s["cached"]]


def _probe(server: str, out: Path, label: str) -> dict[str, Any]:
    """A prompt without the profiler: what the server process holds now (threads, observations,
    the wrapper keys on the model the loader returns)."""
    prompt = tiny_native("t2v", steps=1, seed=1, case_name="probe")
    prompt = {k: v for k, v in prompt.items() if v["class_type"] in ("UNETLoader",)}
    prompt["900"] = {"class_type": "WanBenchTestProbe", "inputs": {"label": label, "model": ["2", 0]}}
    run = run_on_server(prompt, server, out, timeout_s=300)
    return history_outputs(server, run.prompt_id)["900"]


def _assert_nothing_left(server: str, out: Path) -> None:
    probe = _probe(server, out, "after")
    assert SAMPLER_THREAD not in probe["threads"], probe["threads"]
    assert probe["open_observations"] == [] and probe["observer_modules"] == [1]
    assert OBSERVER_KEY not in probe["wrapper_keys"] and OBSERVER_KEY not in probe["callback_keys"]


def _wait_idle(server: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, queue = http_json("GET", server + "/queue")
        if queue["queue_running"] == [] and queue["queue_pending"] == []:
            return
        time.sleep(0.2)
    raise TimeoutError("the server's queue did not empty")


def test_native_t2v_a14b_graph_profiled_without_wires(comfy_server: ComfyServer, tmp_path: Path) -> None:
    prompt = tiny_native("t2v", steps=STEPS, seed=7, case_name="native_t2v_e2e")
    assert not any(isinstance(v, list) and v[0] in ("1", "16") for n in prompt.values() for v in n["inputs"].values())
    run = _report(run_on_server(prompt, comfy_server.url, tmp_path / "first", timeout_s=600).files)
    split = high_noise_steps(T2V_A14B, STEPS)
    steps = _steps(run)
    assert sorted(steps) == list(range(STEPS))
    assert [steps[i]["expert"] for i in range(STEPS)] == ["high"] * split + ["low"] * (STEPS - split)
    assert {steps[i]["cfg_mode"] for i in steps} == {"batched"}
    assert all(steps[i]["flops"] > 0 and steps[i]["facts"]["model_file"] for i in steps)
    top = _top(run)
    for name in ("Model_Initialization", "T5_Encoding", "TI2V_Preprocess", "VAE_Decoding", "CreateVideo", "SaveVideo"):
        assert name in top, top
    (t5,) = [s for s in run["stages"] if s["name"] == "T5_Encoding"]
    assert t5["facts"]["pieces"] == 2  # both CLIPTextEncode nodes, one after the other: one stage
    assert "Step_0_Loading" in top and f"Step_{split}_Loading" in top
    children = [s["name"] for s in run["stages"] if s["parent"] is not None]
    assert children.count("DiT_Initialization") == 2 and "VAE_Initialization" in children
    assert "WanBenchTestTinyUMT5Loader" in top  # another pack's node: a row under its class name
    context = run["context"]
    assert (context["steps"], context["width"], context["height"], context["frames"]) == (STEPS, 64, 48, 5)
    assert (context["solver"], context["seed"]) == ("euler/simple", 7)

    # Again with only the low-noise sampler changed: ComfyUI serves the rest from its cache.
    for node in prompt.values():
        if node["class_type"] == "KSamplerAdvanced" and node["inputs"]["add_noise"] == "disable":
            node["inputs"]["cfg"] = 2.5
    second = _report(run_on_server(prompt, comfy_server.url, tmp_path / "second", timeout_s=600).files)
    assert sorted(_steps(second)) == list(range(split, STEPS))  # numbered after the cached high steps
    assert sorted(_steps(second, cached=True)) == list(range(split))
    cached = {s["name"] for s in second["stages"] if s["cached"]}
    assert {"T5_Encoding", "DiT_Initialization", "VAE_Initialization", "TI2V_Preprocess"} <= cached
    assert all(s["facts"]["measured_s"] > 0 for s in second["stages"] if s["cached"])
    _assert_nothing_left(comfy_server.url, tmp_path / "probe")


@pytest.mark.slow
def test_native_ti2v_5b_graph_with_a_full_size_vae(comfy_server: ComfyServer, tmp_path: Path) -> None:
    """Core's VAELoader builds the Wan2.2 VAE at full size: a random full-size one at a tiny latent."""
    vae = full_size_wan22_vae(repo_root() / ".cache" / "e2e_models")
    link = comfy_server.run_dir / "models" / "vae" / FULL_WAN22_VAE
    if not link.exists():
        link.symlink_to(vae)
    prompt = tiny_native("ti2v", steps=3, seed=9, case_name="native_ti2v_e2e")
    run = _report(run_on_server(prompt, comfy_server.url, tmp_path, timeout_s=900).files)
    steps = _steps(run)
    assert sorted(steps) == [0, 1, 2] and {s["expert"] for s in steps.values()} == {"model"}
    top = _top(run)
    for name in ("Model_Initialization", "T5_Encoding", "TI2V_Preprocess", "Step_0_Loading", "VAE_Decoding"):
        assert name in top, top
    assert (run["context"]["width"], run["context"]["height"], run["context"]["frames"]) == (32, 32, 5)


def test_interrupt_and_error_leave_no_hook_behind(comfy_server: ComfyServer, tmp_path: Path) -> None:
    prompt = tiny_native("t2v", steps=400, seed=11, case_name="native_interrupted")
    sent: list[float] = []

    def interrupt_on_progress(node: Any, value: Any, maximum: Any) -> None:
        if not sent and maximum and int(maximum) > 100:
            sent.append(time.monotonic())
            threading.Thread(target=http_json, args=("POST", comfy_server.url + "/interrupt", {})).start()

    with pytest.raises(ServerError, match="interrupted"):
        run_on_server(prompt, comfy_server.url, tmp_path / "i", timeout_s=600, on_progress=interrupt_on_progress)
    _wait_idle(comfy_server.url)
    reports = sorted((comfy_server.run_dir / "output" / "e2e").glob("native_interrupted_report_*.json"))
    assert reports, "the report of what ran before the interrupt is written"
    (run,) = json.loads(reports[-1].read_text(encoding="utf-8"))["runs"]
    assert run["status"] == "failed: PromptStopped" and check_report(reports[-1]) == []
    assert any("KSamplerAdvanced" in note for note in run["notes"])
    _assert_nothing_left(comfy_server.url, tmp_path / "p1")

    # An error in a node (a core VAEDecode given an image latent) ends the prompt the same way.
    broken = tiny_native("t2v", steps=2, seed=12, case_name="native_error")
    broken["30"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    (decode,) = [k for k, v in broken.items() if v["class_type"] == "VAEDecode"]
    broken[decode]["inputs"]["samples"] = ["30", 0]
    with pytest.raises(ServerError, match="VAEDecode"):
        run_on_server(broken, comfy_server.url, tmp_path / "e", timeout_s=600)
    _wait_idle(comfy_server.url)
    (path,) = sorted((comfy_server.run_dir / "output" / "e2e").glob("native_error_report_*.json"))
    assert json.loads(path.read_text(encoding="utf-8"))["runs"][0]["status"] == "failed: PromptStopped"
    _assert_nothing_left(comfy_server.url, tmp_path / "p2")


def test_report_dropped_for_an_invalid_input_leaves_no_session(comfy_server: ComfyServer, tmp_path: Path) -> None:
    prompt = tiny_native("t2v", steps=2, seed=13, case_name="native_dropped")
    (report,) = [k for k, v in prompt.items() if v["class_type"] == "WanBenchReport"]
    prompt[report]["inputs"]["filename_prefix"] = "../outside"  # refused: ComfyUI drops the node, runs the rest
    status, answer = http_json("POST", comfy_server.url + "/prompt", {"prompt": prompt, "client_id": "e2e-drop"})
    assert status == 200 and report in answer["node_errors"], answer
    _wait_idle(comfy_server.url)
    _assert_nothing_left(comfy_server.url, tmp_path)


def test_native_vs_pack_suite_runs_headless(comfy_server: ComfyServer, tmp_path: Path) -> None:
    """The same tiny T2V-A14B job through ComfyUI's native nodes and through the pack's, compared."""
    native = tiny_native("t2v", steps=STEPS, seed=21, case_name="native_t2v")
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "native.api.json").write_text(json.dumps(native), encoding="utf-8")
    pack_workflow = repo_root() / "workflows" / "tiny_t2v_A14B.api.json"
    suite = {
        "name": "native_vs_pack_tiny",
        "cases": [
            {"name": "native_t2v", "workflow": "native.api.json", "overrides": {}},
            {
                "name": "pack_t2v",
                "workflow": str(pack_workflow),
                "overrides": pack_twin_overrides(steps=STEPS, seed=21, case_name="pack_t2v"),
            },
        ],
        "comparisons": [{"title": "tiny T2V-A14B", "baseline": "native_t2v", "candidate": "pack_t2v"}],
    }
    (workflows / "suite.json").write_text(json.dumps(suite), encoding="utf-8")
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wanbench",
            "suite",
            str(workflows / "suite.json"),
            "--server",
            comfy_server.url,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = (out / "native_vs_pack_tiny_report.md").read_text(encoding="utf-8")
    assert "| native_t2v |" in text and "| pack_t2v |" in text  # both rows of the summary table
    section = text[text.index("## Runtimes side by side") :]
    assert "| Step inference |" in section and "| **Total_Execution** |" in section
    assert "Not the same job" not in section, section
    output = next(line for line in section.splitlines() if line.startswith("- **Output difference**"))
    # measured on the PNG frames both cases saved (lossless): the same job gives nearly the same video
    # (ComfyUI feeds the float timestep sigma x 1000, the pack the integer one: a few levels apart)
    assert "saved as PNG, 8-bit, lossless" in output, output
    psnr = float(output.split("PSNR ")[1].split(" dB")[0]) if "PSNR " in output else float("inf")
    assert psnr > 35.0, output
    reports = {p.parent.parent.name: p for p in out.rglob("*_report_*.json")}
    runs = {name: json.loads(p.read_text(encoding="utf-8"))["runs"][0] for name, p in reports.items()}
    experts = {name: [_steps(run)[i]["expert"] for i in range(STEPS)] for name, run in runs.items()}
    assert experts["native_t2v"] == experts["pack_t2v"]  # the experts switch at the same step
    assert runs["native_t2v"]["context"]["seed"] == runs["pack_t2v"]["context"]["seed"] == 21
