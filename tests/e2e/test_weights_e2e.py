"""Compact weights and kernel options through a real ComfyUI server: GGUF files are listed in the
loaders' choices (ComfyUI's own lists leave `.gguf` out) and run, with `auto` attention measured and
TF32 on, and the report names the storage, TF32 and the measured kernels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from wanbench.client import http_json, run_on_server
from wanbench.profiling import check_report

from .comfy_api import load_api, only_node_of_type
from .server import ComfyServer

pytestmark = pytest.mark.e2e

GGUF_DIT = "wanbench_tiny_ti2v_5B_d256_Q4_K_M.gguf"
GGUF_TEXT_ENCODER = "wanbench_tiny_umt5_xxl_Q8_0.gguf"


def test_loaders_list_gguf_files(comfy_server: ComfyServer) -> None:
    status, info = http_json("GET", comfy_server.url + "/object_info")
    assert status == 200
    loader = info["WanBenchModelLoader"]["input"]
    assert GGUF_DIT in loader["required"]["model_high"][0]
    assert loader["optional"]["weight_dtype"][0][0] == "default"
    assert GGUF_TEXT_ENCODER in info["WanBenchTextEncoderLoader"]["input"]["required"]["text_encoder"][0]


def test_gguf_workflow_with_auto_attention_and_tf32(comfy_server: ComfyServer, tmp_path: Path) -> None:
    prompt = load_api("tiny_ti2v_5B_t2v.api.json")
    loader = prompt[only_node_of_type(prompt, "WanBenchModelLoader")]["inputs"]
    loader.update(model_high=GGUF_DIT, attention="auto", tf32=True, weight_dtype="default")
    prompt[only_node_of_type(prompt, "WanBenchTextEncoderLoader")]["inputs"]["text_encoder"] = GGUF_TEXT_ENCODER
    run = run_on_server(prompt, comfy_server.url, tmp_path, timeout_s=600)
    assert len(run.files["videos"]) == 1 and len(run.files["reports"]) == 1, run.files
    report = Path(run.files["reports"][0])
    assert check_report(report) == []
    (record,) = json.loads(report.read_text(encoding="utf-8"))["runs"]
    assert record["context"]["weight_dtype"] == "default" and record["context"]["tf32"] is True
    choices = [e for e in record["events"] if e["name"] == "attention_choice"]
    assert len(choices) == 2 and all(e["facts"]["tflops"] > 0 for e in choices)  # self- and cross-attention
    markdown = report.with_suffix(".md").read_text(encoding="utf-8")
    assert "DiT weights default; TF32 yes" in markdown and "**Attention kernel**" in markdown
