"""LoRAs, the 4-step recipe and split sampling through a real ComfyUI server: the LATENT with its
exact continuation crosses ComfyUI's executor and cache, and a bad LoRA is a clear error after
which the server keeps working. (The tiny 4-step workflows themselves run in test_server_e2e.)
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from wanbench.client import ServerError, run_on_server, view_bytes

from .comfy_api import history_outputs, load_api, nodes_of_type, only_node_of_type
from .server import ComfyServer

pytestmark = pytest.mark.e2e

WORKFLOW = "tiny_t2v_A14B_4steps_lora.api.json"


def _frames(server: str, images: list[dict[str, Any]]) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(view_bytes(server, image))).convert("RGB")) for image in images]


def test_split_over_two_samplers_equals_one_sampler(comfy_server: ComfyServer, tmp_path: Path) -> None:
    """One Wan Sampler (4 steps) and the templates' split (steps 0-2 with leftover noise, then 2-4
    with add_noise off) in one prompt: the decoded frames are identical."""
    prompt = load_api(WORKFLOW)
    sampler_id = only_node_of_type(prompt, "WanBenchSampler")
    decode_id = only_node_of_type(prompt, "WanBenchVAEDecode")
    for node_id in nodes_of_type(prompt, "WanBenchSaveVideo") + nodes_of_type(prompt, "WanBenchReport"):
        del prompt[node_id]
    sampler = prompt[sampler_id]
    high = copy.deepcopy(sampler)
    high["inputs"]["end_step"] = 2
    low = copy.deepcopy(sampler)
    low["inputs"].update(start_step=2, add_noise=False, seed=0, latent=["950", 0])
    decode = copy.deepcopy(prompt[decode_id])
    decode["inputs"]["latent"] = ["951", 0]
    save = {"class_type": "SaveImage"}
    prompt.update({
        "950": high, "951": low, "952": decode,
        "960": {**save, "inputs": {"images": [decode_id, 0], "filename_prefix": "split/one"}},
        "961": {**save, "inputs": {"images": ["952", 0], "filename_prefix": "split/two"}},
    })
    run = run_on_server(prompt, comfy_server.url, tmp_path, timeout_s=600)
    outputs = history_outputs(comfy_server.url, run.prompt_id)
    one = _frames(comfy_server.url, outputs["960"]["images"])
    two = _frames(comfy_server.url, outputs["961"]["images"])
    assert len(one) == len(two) > 1
    assert all(np.array_equal(a, b) for a, b in zip(one, two, strict=True))
    assert not all(np.array_equal(one[0], frame) for frame in one[1:]), "frames differ from each other"


def test_lora_for_another_model_is_a_clear_error_then_the_server_runs_on(
    comfy_server: ComfyServer, tmp_path: Path
) -> None:
    prompt = load_api(WORKFLOW)
    lora_ids = nodes_of_type(prompt, "WanBenchLora")
    bad = copy.deepcopy(prompt)
    bad[lora_ids[0]]["inputs"]["lora_name"] = "wanbench_tiny_i2v_4steps_lora_high_noise.safetensors"
    expected = "does not fit this model: tensor 'diffusion_model.patch_embedding.diff'"
    with pytest.raises(ServerError, match=expected):
        run_on_server(bad, comfy_server.url, tmp_path / "bad", timeout_s=600)
    run = run_on_server(prompt, comfy_server.url, tmp_path / "good", timeout_s=600)
    assert len(run.files["videos"]) == 1 and len(run.files["reports"]) == 1
