"""The pack inside a real ComfyUI server on 127.0.0.1: object_info, the tiny workflows through
``POST /prompt`` and the websocket, refused prompts, interrupts, and interop with core nodes.
"""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image
from wanbench.client import ServerError, http_json, run_on_server, view_bytes
from wanbench.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from wanbench.profiling import check_report
from wanbench.wan_core.config import (
    DIT_INIT_STAGE,
    PREPROCESS_STAGE,
    T5_ENCODE_STAGE,
    TEXT_ENCODER_INIT_STAGE,
    VAE_INIT_STAGE,
)

from .comfy_api import (
    WORKFLOWS_DIR,
    geometry_node,
    history_outputs,
    load_api,
    nodes_of_type,
    only_node_of_type,
    tiny_api_workflows,
)
from .server import ComfyServer

pytestmark = pytest.mark.e2e

CORE_NODES = (
    "KSampler",
    "VAEDecode",
    "VAELoader",
    "SaveImage",
    "PreviewImage",
    "EmptyImage",
    "CreateVideo",
    "SaveVideo",
)
INTERRUPT_STEPS = 400  # enough sampling steps that the prompt is still running when the interrupt lands


def decode_video(path: Path) -> tuple[int, int, int]:
    """(frames, width, height) of the first video stream, counted by decoding every frame."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame for frame in container.decode(stream)]
    return len(frames), frames[0].width, frames[0].height


def sampler_progress(messages: list[dict[str, Any]], sampler_id: str) -> list[tuple[int, int]]:
    return [
        (m["data"]["value"], m["data"]["max"])
        for m in messages
        if m.get("type") == "progress" and str(m["data"].get("node")) == sampler_id
    ]


def progress_is_throttled(server: ComfyServer) -> bool:
    """Current ComfyUI (0.3.76+) throttles `progress` messages: the first and the last value of a bar
    are always sent, those in between at most every 100 ms. 0.3.75 sends every value."""
    utils = server.install.comfy_dir / "comfy" / "utils.py"
    return "PROGRESS_THROTTLE_MIN_INTERVAL" in utils.read_text(encoding="utf-8")


def assert_full_progress(progress: list[tuple[int, int]], total: int, *, throttled: bool) -> None:
    """Progress of one bar of `total`: every value 1..total, or with throttling at least the first
    and the last, in increasing order."""
    values = [value for value, _ in progress]
    assert {maximum for _, maximum in progress} == {total}, progress
    if throttled:
        assert values and values[0] == 1 and values[-1] == total, progress
        assert values == sorted(set(values)), progress
    else:
        assert sorted(set(values)) == list(range(1, total + 1)), progress


def wait_for_empty_queue(server: str, *, timeout_s: float) -> bool:
    """True once ``/queue`` has nothing running or pending (False after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, queue = http_json("GET", server + "/queue")
        if status == 200 and queue["queue_running"] == [] and queue["queue_pending"] == []:
            return True
        time.sleep(0.2)
    return False


def test_server_reports_its_version(comfy_server: ComfyServer) -> None:
    status, stats = http_json("GET", comfy_server.url + "/system_stats")
    assert status == 200
    assert stats["system"]["comfyui_version"] == comfy_server.install.version
    assert stats["devices"][0]["type"] == "cpu"


def test_object_info_lists_every_pack_node(comfy_server: ComfyServer) -> None:
    status, info = http_json("GET", comfy_server.url + "/object_info")
    assert status == 200
    missing_core = [name for name in CORE_NODES if name not in info]
    assert not missing_core, f"core nodes missing from /object_info: {missing_core}"
    missing = sorted(set(NODE_CLASS_MAPPINGS) - set(info))
    assert not missing, f"pack nodes missing from /object_info (import error in the pack?): {missing}"
    for node_type, cls in NODE_CLASS_MAPPINGS.items():
        served = info[node_type]
        assert served["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[node_type]
        declared = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            assert set(served["input"].get(section, {})) == set(declared.get(section, {})), (
                node_type,
                section,
            )
        assert tuple(served["output"]) == tuple(cls.RETURN_TYPES), node_type


def test_core_graph_runs(comfy_server: ComfyServer, tmp_path: Path) -> None:
    graph = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 40, "height": 24, "batch_size": 2, "color": 0xFF8000},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "core/empty"}},
    }
    run = run_on_server(graph, comfy_server.url, tmp_path, timeout_s=120)
    pngs = [Path(p) for p in run.files["other"] if p.endswith(".png")]
    assert len(pngs) == 2
    pixels = np.asarray(Image.open(pngs[0]).convert("RGB"))
    assert pixels.shape == (24, 40, 3)
    assert tuple(pixels[0, 0]) == (0xFF, 0x80, 0x00)


@pytest.mark.parametrize("workflow", tiny_api_workflows())
def test_tiny_workflow_runs(comfy_server: ComfyServer, tmp_path: Path, workflow: str) -> None:
    prompt = load_api(workflow)
    sampler_id = only_node_of_type(prompt, "WanBenchSampler")
    steps = prompt[sampler_id]["inputs"]["steps"]
    geometry_id = geometry_node(prompt)
    geometry = prompt[geometry_id]["inputs"]
    run = run_on_server(prompt, comfy_server.url, tmp_path, timeout_s=600)

    assert len(run.files["videos"]) == 1, run.files
    frames, width, height = decode_video(Path(run.files["videos"][0]))
    assert frames == geometry["length"]
    if prompt[geometry_id]["class_type"] == "WanBenchImageToVideo":
        # I2V sizes follow the start image's aspect within about width x height pixels
        assert width * height <= geometry["width"] * geometry["height"] and width >= 16 and height >= 16
    else:
        assert (width, height) == (geometry["width"], geometry["height"])

    assert len(run.files["reports"]) == 1, run.files
    problems = check_report(run.files["reports"][0])
    assert problems == [], problems
    (report_run,) = json.loads(Path(run.files["reports"][0]).read_text(encoding="utf-8"))["runs"]
    case_name = prompt[only_node_of_type(prompt, "WanBenchProfiler")]["inputs"]["case_name"]
    context = report_run["context"]
    assert (context["case_name"], context["steps"], context["frames"]) == (
        case_name,
        steps,
        geometry["length"],
    )
    assert (context["width"], context["height"]) == (width, height)
    stage_names = {stage["name"] for stage in report_run["stages"]}
    expected_steps = {f"Step_{i}_Inference" for i in range(steps)}  # 0-based, as in the reference reports
    assert expected_steps <= stage_names, sorted(stage_names)

    throttled = progress_is_throttled(comfy_server)
    assert_full_progress(sampler_progress(run.messages, sampler_id), steps, throttled=throttled)
    # Wan VAE Decode reports one progress value per decoded chunk: 1..num_chunks of num_chunks.
    decode_progress = sampler_progress(run.messages, only_node_of_type(prompt, "WanBenchVAEDecode"))
    (num_chunks,) = {maximum for _, maximum in decode_progress} or {0}
    assert num_chunks >= 1, decode_progress
    assert_full_progress(decode_progress, num_chunks, throttled=throttled)
    kinds = [m["type"] for m in run.messages]
    assert "execution_success" in kinds and "execution_error" not in kinds


def _with_length(prompt: dict[str, Any], length: int) -> tuple[dict[str, Any], str]:
    changed = copy.deepcopy(prompt)
    node_id = geometry_node(changed)
    changed[node_id]["inputs"]["length"] = length
    return changed, node_id


def _failed_report(server: ComfyServer, prefix: str) -> dict[str, Any]:
    """The report an accepted-but-partial prompt left (its only valid outputs: profiler and report)."""
    assert wait_for_empty_queue(server.url, timeout_s=120)
    (path,) = sorted((server.run_dir / "output" / "e2e").glob(f"{prefix}_*.json"))
    assert check_report(path) == []
    (run,) = json.loads(path.read_text(encoding="utf-8"))["runs"]
    return run


def test_invalid_frame_count_is_refused(comfy_server: ComfyServer) -> None:
    """The latent node is refused with its message. Wan Profiler and Wan Benchmark Report need no
    input, so ComfyUI keeps them and runs them alone: their report says the outputs did not run."""
    prompt, node_id = _with_length(load_api("tiny_ti2v_5B_t2v.api.json"), 80)
    prompt[only_node_of_type(prompt, "WanBenchReport")]["inputs"]["filename_prefix"] = "e2e/invalid_length"
    status, answer = http_json(
        "POST", comfy_server.url + "/prompt", {"prompt": prompt, "client_id": "e2e-invalid"}
    )
    assert status == 200, answer
    assert node_id in answer["node_errors"], answer
    run = _failed_report(comfy_server, "invalid_length")
    assert run["status"] == "failed: OutputsNotRun" and run["stages"] == []
    assert any("did not run" in note and "WanBenchSaveVideo" in note for note in run["notes"])
    errors = answer["node_errors"][node_id]["errors"]
    about_length = [e for e in errors if "length" in e["details"] and "80" in e["details"]]
    assert about_length, errors
    assert answer["node_errors"][node_id]["class_type"] == prompt[node_id]["class_type"]


def full_size_api_workflows() -> list[str]:
    return sorted(set(p.name for p in WORKFLOWS_DIR.glob("*.api.json")) - set(tiny_api_workflows()))


@pytest.mark.parametrize("workflow", full_size_api_workflows())
def test_full_size_workflow_fails_only_on_absent_models(comfy_server: ComfyServer, workflow: str) -> None:
    """The real-size workflows validate on the server except for the model files it does not have."""
    prompt = load_api(workflow)
    reports = [k for k, v in prompt.items() if v["class_type"] == "WanBenchReport"]
    for node_id in reports:
        prompt[node_id]["inputs"]["filename_prefix"] = f"e2e/full_{workflow.split('.')[0]}"
    body = {"prompt": prompt, "client_id": "e2e-full"}
    status, answer = http_json("POST", comfy_server.url + "/prompt", body)
    # Only the profiler and its report (no inputs, nothing to load) may be kept and run.
    assert status == 200 and answer["node_errors"], answer
    run = _failed_report(comfy_server, f"full_{workflow.split('.')[0]}")
    assert run["status"] == "failed: OutputsNotRun" and run["stages"] == []
    for node_id, node_error in answer["node_errors"].items():
        for error in node_error["errors"]:
            received = str(error.get("extra_info", {}).get("received_value", ""))
            assert error["type"] == "value_not_in_list" and received.endswith((".safetensors", ".pth")), (
                node_id,
                error,
            )


def test_interrupt_during_sampling_then_next_prompt_runs(comfy_server: ComfyServer, tmp_path: Path) -> None:
    """The interrupt lands in Wan Sampler and stops it within one step (interrupts are checked after
    every step): no sampler progress more than 2 steps past the one that triggered the interrupt."""
    prompt = load_api("tiny_ti2v_5B_t2v.api.json")
    sampler_id = only_node_of_type(prompt, "WanBenchSampler")
    long_prompt = copy.deepcopy(prompt)
    long_prompt[sampler_id]["inputs"].update(steps=INTERRUPT_STEPS, seed=1001)
    seen: list[int] = []  # every sampler progress value, in arrival order
    sent_at: list[int] = []  # the progress value that triggered the interrupt

    def interrupt_on_first_step(node: Any, value: Any, maximum: Any) -> None:
        if str(node) != sampler_id:
            return
        seen.append(int(value))
        if not sent_at:
            status, _ = http_json("POST", comfy_server.url + "/interrupt", {})
            assert status == 200
            sent_at.append(int(value))

    with pytest.raises(ServerError, match=f"interrupted at node {sampler_id}$"):
        run_on_server(
            long_prompt,
            comfy_server.url,
            tmp_path / "interrupted",
            timeout_s=600,
            on_progress=interrupt_on_first_step,
        )
    assert sent_at and sent_at[0] < INTERRUPT_STEPS
    # The step running when the interrupt arrived may finish (and report); none after it may.
    assert max(seen) <= sent_at[0] + 2, f"interrupt sent at step {sent_at[0]}; progress went on: {seen}"

    assert wait_for_empty_queue(comfy_server.url, timeout_s=60)
    status, history = http_json("GET", comfy_server.url + "/history")
    assert status == 200
    interrupted = [
        entry
        for entry in history.values()
        if entry["prompt"][2].get(sampler_id, {}).get("inputs", {}).get("steps") == INTERRUPT_STEPS
    ]
    assert len(interrupted) == 1
    assert interrupted[0]["status"]["status_str"] == "error"
    messages = dict((name, data) for name, data in interrupted[0]["status"]["messages"])
    assert "execution_interrupted" in messages
    assert str(messages["execution_interrupted"]["node_id"]) == sampler_id
    assert messages["execution_interrupted"]["node_type"] == "WanBenchSampler"

    next_prompt = copy.deepcopy(prompt)
    next_prompt[sampler_id]["inputs"]["seed"] = 1002
    run = run_on_server(next_prompt, comfy_server.url, tmp_path / "next", timeout_s=600)
    assert len(run.files["videos"]) == 1
    steps = prompt[sampler_id]["inputs"]["steps"]
    assert_full_progress(
        sampler_progress(run.messages, sampler_id), steps, throttled=progress_is_throttled(comfy_server)
    )
    assert len(run.files["reports"]) == 1 and check_report(run.files["reports"][0]) == []


def _report_stages(run_files: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    (report_path,) = run_files["reports"]
    (report_run,) = json.loads(Path(report_path).read_text(encoding="utf-8"))["runs"]
    return {stage["name"]: stage for stage in report_run["stages"]}


def test_second_run_reports_cached_stages(comfy_server: ComfyServer, tmp_path: Path) -> None:
    """Queued twice with only the seed changed: ComfyUI serves the loaders, the text encode and the
    preprocess from its cache, so the second report marks them cached (with the time measured in the
    first run), and measures the sampling steps and the decode again."""
    prompt = load_api("tiny_ti2v_5B_t2v.api.json")
    sampler_id = only_node_of_type(prompt, "WanBenchSampler")
    steps = prompt[sampler_id]["inputs"]["steps"]
    prompt[only_node_of_type(prompt, "WanBenchProfiler")]["inputs"]["case_name"] = "e2e_cache_check"
    # Loader inputs of their own (device "cpu": the same device here), so that no earlier test's
    # cached loader outputs match: the first run measures every stage.
    for loader in ("WanBenchModelLoader", "WanBenchTextEncoderLoader", "WanBenchVAELoader"):
        prompt[only_node_of_type(prompt, loader)]["inputs"]["device"] = "cpu"
    prompt[sampler_id]["inputs"]["seed"] = 5001
    first = _report_stages(run_on_server(prompt, comfy_server.url, tmp_path / "first", timeout_s=600).files)
    prompt[sampler_id]["inputs"]["seed"] = 5002
    second = _report_stages(run_on_server(prompt, comfy_server.url, tmp_path / "second", timeout_s=600).files)

    # The stages each skipped node recorded when it ran (loaders: DiT, text encoder, VAE loads).
    cached = (DIT_INIT_STAGE, TEXT_ENCODER_INIT_STAGE, VAE_INIT_STAGE, T5_ENCODE_STAGE, PREPROCESS_STAGE)
    cached_names = [name for name, _ in cached]
    for name in cached_names:
        assert first[name]["cached"] is False, first[name]
        stage = second[name]
        assert stage["cached"] is True, (name, stage)
        # Not a measured zero: the stage carries the time it took when it last ran.
        measured = first[name]["end_s"] - first[name]["start_s"]
        assert stage["facts"]["measured_s"] == pytest.approx(measured, abs=1e-3) and measured > 0
    for name in [f"Step_{i}_Inference" for i in range(steps)] + ["VAE_Decoding"]:
        stage = second[name]
        assert stage["cached"] is False and stage["end_s"] > stage["start_s"], (name, stage)


def _decode_only_prompt(seed: int) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """The tiny TI2V text workflow without Wan Save Video and the report: (prompt, decode id, geometry)."""
    prompt = load_api("tiny_ti2v_5B_t2v.api.json")
    decode_id = only_node_of_type(prompt, "WanBenchVAEDecode")
    geometry = prompt[geometry_node(prompt)]["inputs"]
    for node_id in nodes_of_type(prompt, "WanBenchSaveVideo") + nodes_of_type(prompt, "WanBenchReport"):
        del prompt[node_id]
    prompt[only_node_of_type(prompt, "WanBenchSampler")]["inputs"]["seed"] = seed
    return prompt, decode_id, geometry


def test_pack_image_feeds_core_save_image(comfy_server: ComfyServer, tmp_path: Path) -> None:
    prompt, decode_id, geometry = _decode_only_prompt(2001)
    prompt["900"] = {
        "class_type": "SaveImage",
        "inputs": {"images": [decode_id, 0], "filename_prefix": "interop/pack"},
    }
    run = run_on_server(prompt, comfy_server.url, tmp_path, timeout_s=600)
    outputs = history_outputs(comfy_server.url, run.prompt_id)
    images = outputs["900"]["images"]
    assert len(images) == geometry["length"]
    first = Image.open(io.BytesIO(view_bytes(comfy_server.url, images[0])))
    assert first.size == (geometry["width"], geometry["height"])


def _widget_defaults(inputs: dict[str, Any], skip: set[str], prefix: str = "") -> dict[str, Any]:
    """Values for a core node's required widget inputs (`/object_info` "input"): each input's default,
    else the first choice of a list. Works whatever inputs this ComfyUI version gives the node:
    0.3.75's plain combos, and current ComfyUI's dynamic combos (the chosen option's own inputs
    are then sent as "<name>.<input>", as the frontend does)."""
    values: dict[str, Any] = {}
    for name, entry in inputs.get("required", {}).items():
        if name in skip:
            continue
        kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
        key = prefix + name
        if isinstance(kind, list):  # old-style combo: the list of choices
            values[key] = opts.get("default", kind[0])
        elif kind == "COMBO":  # new-style combo: choices in the options
            values[key] = opts.get("default", opts["options"][0])
        elif kind == "COMFY_DYNAMICCOMBO_V3":  # an option key; its own inputs follow under "name."
            choices = {option["key"]: option for option in opts["options"]}
            values[key] = opts.get("default", next(iter(choices)))
            values.update(_widget_defaults(choices[values[key]]["inputs"], set(), prefix=f"{key}."))
        elif "default" in opts:
            values[key] = opts["default"]
        else:
            raise AssertionError(f"input {key} ({kind}) has no default; the test must set it")
    return values


def test_pack_frames_feed_core_create_video_and_save_video(comfy_server: ComfyServer, tmp_path: Path) -> None:
    """Wan VAE Decode -> core CreateVideo -> core SaveVideo; widget values come from /object_info
    (SaveVideo's inputs differ between 0.3.75 and current ComfyUI)."""
    status, info = http_json("GET", comfy_server.url + "/object_info")
    assert status == 200
    prompt, decode_id, geometry = _decode_only_prompt(6001)
    create = _widget_defaults(info["CreateVideo"]["input"], {"images"})
    create["fps"] = 16.0
    save = _widget_defaults(info["SaveVideo"]["input"], {"video"})
    save["filename_prefix"] = "interop/core_video"
    prompt["910"] = {"class_type": "CreateVideo", "inputs": {"images": [decode_id, 0], **create}}
    prompt["911"] = {"class_type": "SaveVideo", "inputs": {"video": ["910", 0], **save}}
    run = run_on_server(prompt, comfy_server.url, tmp_path, timeout_s=600)

    outputs = history_outputs(comfy_server.url, run.prompt_id)
    (entry,) = outputs["911"]["images"]
    assert entry["type"] == "output" and entry["filename"].startswith("core_video")
    assert len(run.files["videos"]) == 1, run.files
    frames, width, height = decode_video(Path(run.files["videos"][0]))
    assert (frames, width, height) == (geometry["length"], geometry["width"], geometry["height"])
    with av.open(run.files["videos"][0]) as container:
        assert float(container.streams.video[0].average_rate) == 16.0


def test_pack_frames_feed_core_preview_image(comfy_server: ComfyServer, tmp_path: Path) -> None:
    prompt, decode_id, geometry = _decode_only_prompt(6002)
    prompt["920"] = {"class_type": "PreviewImage", "inputs": {"images": [decode_id, 0]}}
    run = run_on_server(prompt, comfy_server.url, tmp_path, timeout_s=600)
    images = history_outputs(comfy_server.url, run.prompt_id)["920"]["images"]
    assert len(images) == geometry["length"]
    assert {image["type"] for image in images} == {"temp"}
    first = Image.open(io.BytesIO(view_bytes(comfy_server.url, images[0])))
    assert first.size == (geometry["width"], geometry["height"])


def test_core_vae_decode_of_pack_latent_matches_pack_decode(
    comfy_server: ComfyServer, tmp_path: Path
) -> None:
    """ComfyUI's own VAELoader reads the tiny Wan2.1 VAE file; its VAEDecode of the pack's LATENT
    must give the pack's decode (both saved as 8-bit PNG frames by core SaveImage)."""
    prompt = load_api("tiny_t2v_A14B.api.json")
    sampler_id = only_node_of_type(prompt, "WanBenchSampler")
    decode_id = only_node_of_type(prompt, "WanBenchVAEDecode")
    vae_file = prompt[only_node_of_type(prompt, "WanBenchVAELoader")]["inputs"]["vae"]
    for node_id in nodes_of_type(prompt, "WanBenchSaveVideo") + nodes_of_type(prompt, "WanBenchReport"):
        del prompt[node_id]
    prompt[sampler_id]["inputs"]["seed"] = 3001
    prompt["900"] = {
        "class_type": "SaveImage",
        "inputs": {"images": [decode_id, 0], "filename_prefix": "interop/a"},
    }
    prompt["901"] = {"class_type": "VAELoader", "inputs": {"vae_name": vae_file}}
    prompt["902"] = {"class_type": "VAEDecode", "inputs": {"samples": [sampler_id, 0], "vae": ["901", 0]}}
    prompt["903"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["902", 0], "filename_prefix": "interop/b"},
    }
    run = run_on_server(prompt, comfy_server.url, tmp_path, timeout_s=600)
    outputs = history_outputs(comfy_server.url, run.prompt_id)
    ours, core = outputs["900"]["images"], outputs["903"]["images"]
    assert len(ours) == len(core) > 1
    for mine, theirs in zip(ours, core, strict=True):
        a = np.asarray(
            Image.open(io.BytesIO(view_bytes(comfy_server.url, mine))).convert("RGB"), dtype=np.int16
        )
        b = np.asarray(
            Image.open(io.BytesIO(view_bytes(comfy_server.url, theirs))).convert("RGB"), dtype=np.int16
        )
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 2, (
            f"frame {mine['filename']} differs by up to {np.abs(a - b).max()} levels"
        )


def test_cli_run_against_server(comfy_server: ComfyServer, tmp_path: Path) -> None:
    workflow = "tiny_ti2v_5B_i2v.api.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wanbench",
            "run",
            workflow,
            "--server",
            comfy_server.url,
            "--out",
            str(tmp_path),
            "--set",
            "WanBenchSampler.seed=4001",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    videos = sorted(tmp_path.rglob("*.mp4"))
    reports = sorted(p for p in tmp_path.rglob("*.json"))
    assert len(videos) == 1 and len(reports) == 1, (videos, reports)
    assert check_report(reports[0]) == []
