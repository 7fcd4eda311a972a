"""Node schemas, validation messages, ComfyUI bridge, Save Video, Test Image and the profiler nodes.

Nodes are called directly, without ComfyUI (the bridge is exercised with stand-in ComfyUI modules).
"""

from __future__ import annotations

import math
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import av
import pytest
import torch
from wanbench.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_bridge
from wanbench.nodes.comfy_bridge import Bridge
from wanbench.nodes.context import use_bridge
from wanbench.nodes.images import WanTestImage
from wanbench.nodes.latents import WanEmptyLatent, WanImageToVideo
from wanbench.nodes.loader_options import resolve_device
from wanbench.nodes.loaders import WanModelLoader
from wanbench.nodes.profiler_handle import ProfilerHandle, maybe_profile
from wanbench.nodes.profiling import WanBenchmarkReport, WanProfiler
from wanbench.nodes.sampling import WanSampler
from wanbench.nodes.text import WanTextEncode
from wanbench.nodes.vae import WanVAEDecode, video_to_images
from wanbench.nodes.validation import input_problems, validated_inputs
from wanbench.nodes.video import FORMATS, WanSaveVideo, images_to_uint8, write_mp4
from wanbench.wan_core import trace
from wanbench.wan_core.config import sampling_stages

WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN")


def _inputs(cls: type) -> dict[str, tuple]:
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


# ------------------------------------------------------------------------------------------------
# Schemas
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_schema_is_complete(node_id: str) -> None:
    cls = NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("WanBench") and NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("Wan ")
    assert cls.CATEGORY in ("WanBench", "WanBench/internal") and hasattr(cls, cls.FUNCTION)
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
    for name, entry in _inputs(cls).items():
        opts = entry[1]
        assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        if entry[0] in ("INT", "FLOAT"):
            assert opts["min"] <= opts["default"] <= opts["max"], (
                f"{node_id}.{name} default outside its range"
            )
        if isinstance(entry[0], list) and "default" in opts:
            assert opts["default"] in entry[0]


def test_stage_nodes_take_an_optional_profiler() -> None:
    stage_nodes = (
        "WanBenchModelLoader",
        "WanBenchTextEncoderLoader",
        "WanBenchTextEncode",
        "WanBenchVAELoader",
        "WanBenchEmptyLatent",
        "WanBenchImageToVideo",
        "WanBenchSampler",
        "WanBenchVAEDecode",
    )
    for node_id in stage_nodes:
        spec = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
        assert spec["optional"]["profiler"][0] == "WANBENCH_PROFILER"
        assert spec["hidden"] == {"unique_id": "UNIQUE_ID"}


def test_widgets_encode_the_rules() -> None:
    geometry = _inputs(WanEmptyLatent)
    assert (geometry["length"][1]["min"], geometry["length"][1]["step"]) == (1, 4)  # 1, 5, 9, ... = 4k+1
    assert geometry["width"][1]["step"] == 16 and geometry["width"][1]["min"] == 16
    seed = _inputs(WanSampler)["seed"][1]
    assert seed["control_after_generate"] is True and seed["max"] == 2**64 - 1
    video_path = _inputs(WanBenchmarkReport)["video_path"][1]
    assert video_path["forceInput"] is True and video_path["lazy"] is True  # never waited for
    assert "profiler" in WanBenchmarkReport.INPUT_TYPES()["optional"]  # no wire needed
    assert WanBenchmarkReport().check_lazy_status(video_path=None) == []
    assert math.isnan(WanBenchmarkReport.IS_CHANGED(profiler=None))
    assert WanSaveVideo.OUTPUT_NODE and WanBenchmarkReport.OUTPUT_NODE and WanProfiler.OUTPUT_NODE


def test_import_does_not_touch_comfyui() -> None:
    code = (
        "import sys, wanbench, wanbench.runner, wanbench.cli\n"
        "for cls in wanbench.NODE_CLASS_MAPPINGS.values(): cls.INPUT_TYPES()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'server')]\n"
        "assert not bad, bad\n"
        "assert not any(m.startswith('wanbench.wan_core.dit') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------
# Validation messages
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "kwargs", "on_input", "needle"),
    [
        (
            WanEmptyLatent,
            {"width": 1280, "height": 704, "length": 80},
            "length",
            "length must be 4k+1 (e.g. 81 or 121); got 80; use 77 or 81",
        ),
        (WanEmptyLatent, {"width": 1280, "height": 8, "length": 81}, "height", "height: 8 is below the minimum 16"),
        (
            WanImageToVideo,
            {"width": 1280, "height": 704, "length": 0},
            "length",
            "length must be between 1 and 1025; got 0",
        ),
        (WanSampler, {"boundary": 1.0}, "boundary", "boundary: 1.0 is above the maximum 0.999"),
        (WanSampler, {"steps": -1}, "steps", "steps: -1 is below the minimum 0"),
        (WanSampler, {"shift": float("nan")}, "shift", "shift: expected a finite number"),
        (WanTextEncode, {"prompt": "  ", "negative_prompt": ""}, "prompt", "prompt is empty"),
        (
            WanTextEncode,
            {"prompt": "\u200b\u200c\ufeff \u3164", "negative_prompt": ""},
            "prompt",
            "only invisible characters",
        ),
        (
            WanSaveVideo,
            {"fps": 24, "filename_prefix": "../escape", "crf": 19},
            "filename_prefix",
            "relative path inside the output folder",
        ),
        (
            WanSaveVideo,
            {"fps": 24, "filename_prefix": "wanbench/a\x00b", "crf": 19},
            "filename_prefix",
            "a NUL byte (\\x00) at position 10",
        ),
        (
            WanSaveVideo,
            {"fps": 24, "filename_prefix": "x" * 243, "crf": 19},
            "filename_prefix",
            "each part may have at most 242",
        ),
        (WanSaveVideo, {"fps": -1, "filename_prefix": "a", "crf": 19}, "fps", "fps: -1 is below the minimum 0"),
        (WanProfiler, {"case_name": "", "sample_interval_ms": 100}, "case_name", "case_name must be a visible text"),
        (WanProfiler, {"case_name": "ok", "sample_interval_ms": 1}, "sample_interval_ms", "below the minimum 10"),
        (WanTestImage, {"width": 4, "height": 64}, "width", "width: 4 is below the minimum 8"),
    ],
)
def test_each_problem_lands_on_its_input(cls: type, kwargs: dict, on_input: str, needle: str) -> None:
    """What ComfyUI attaches where: the node's VALIDATE_INPUTS names one input, so its message lands
    there only; every other input gets ComfyUI's own min/max checks (mimicked by input_problems)."""
    problems = input_problems(cls, kwargs)
    assert [name for name, _ in problems] == [on_input], problems
    assert needle in problems[0][1], problems


def test_validate_inputs_names_one_input_per_node() -> None:
    """A message lands on every input VALIDATE_INPUTS names: one input per node, except the
    sampler's two schedule texts (a problem with one shows on both; the message names which)."""
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        allowed = {("timesteps", "sigmas")} if node_id == "WanBenchSampler" else set()
        names = validated_inputs(cls)
        assert len(names) <= 1 or names in allowed, f"{node_id}.VALIDATE_INPUTS takes {names}"


def test_validate_inputs_accepts_good_and_linked_values() -> None:
    assert WanEmptyLatent.VALIDATE_INPUTS(length=121) is True
    assert WanEmptyLatent.VALIDATE_INPUTS(length=None) is True  # a linked input
    assert input_problems(WanSampler, {"steps": 0, "shift": 0.0, "boundary": 0.0, "guidance_high": 0.0}) == []
    assert WanTextEncode.VALIDATE_INPUTS(prompt="a fox") is True
    for prefix in ("wanbench/a:b", "x" * 235, "wanbench/Füchse im Schnee", "a b/c-d_e.f"):
        assert WanSaveVideo.VALIDATE_INPUTS(filename_prefix=prefix) is True, prefix


def test_the_pixel_grid_is_checked_when_the_task_is_known() -> None:
    from wanbench.wan_core.config import T2V_A14B

    vae = types.SimpleNamespace(config=T2V_A14B.vae)  # only the config is read before the check
    with pytest.raises(ValueError) as info:
        WanEmptyLatent().make(vae, 1000, 710, 81)
    message = str(info.value)
    assert "width must be a multiple of 16; got 1000; use 992 or 1008" in message
    assert "height must be a multiple of 16; got 710; use 704 or 720" in message


def test_node_errors_at_run_time() -> None:
    with pytest.raises(ValueError, match="model_low must differ from model_high"):
        WanModelLoader().load("a.safetensors", "a.safetensors", "float32", "sdpa", "cpu")
    with pytest.raises(FileNotFoundError, match="not found as a path nor in the 'diffusion_models' folder"):
        WanModelLoader().load("missing.safetensors", "none", "float32", "sdpa", "cpu")
    with pytest.raises(ImportError, match="attention backend 'sage' is not available"):
        WanModelLoader().load("a.safetensors", "none", "float32", "sage", "cpu")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
    with pytest.raises(TypeError, match="must come from a Wan Profiler node"):
        with maybe_profile(object(), "1", []):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match=r"images must be an IMAGE \(F, H, W, 3\)"):
        WanSaveVideo().save(torch.zeros(2, 3, 8, 8), 24, "x", "mp4 (h264)", 19)
    with pytest.raises(ValueError, match=r"decoded video must be \(1, 3, F, H, W\)"):
        video_to_images(torch.zeros(3, 5, 8, 8))
    with pytest.raises(ValueError, match="pattern: value 'noise' is not one of"):
        WanTestImage().make(16, 16, "noise")


# ------------------------------------------------------------------------------------------------
# ComfyUI bridge (stand-in ComfyUI modules) and standalone behaviour
# ------------------------------------------------------------------------------------------------
def test_bridge_standalone(tmp_path) -> None:
    (tmp_path / "models" / "vae").mkdir(parents=True)
    (tmp_path / "models" / "vae" / "v.safetensors").write_bytes(b"x")
    bridge = Bridge.for_models_root(tmp_path / "models", tmp_path / "out")
    with use_bridge(bridge):
        assert comfy_bridge.list_models("vae") == ["v.safetensors"]
        assert comfy_bridge.list_models("text_encoders") == []
        assert comfy_bridge.resolve_model("vae", "v.safetensors") == str(
            tmp_path / "models" / "vae" / "v.safetensors"
        )
        name = comfy_bridge.claim_output("runs/clip", ".mp4", 64, 64)
        folder = (tmp_path / "out" / "runs").resolve()
        assert (name.folder, name.stem, name.counter, name.subfolder) == (folder, "clip", 1, "runs")
        assert name.path == folder / "clip_00001_.mp4" and name.path.is_file()  # claimed
        assert name.sibling(".md") == folder / "clip_00001_.md"
        (folder / "clip_00004_.png").write_bytes(b"")  # numbering goes on after the highest counter
        assert comfy_bridge.claim_output("runs/clip", ".mp4").counter == 5
        # a stem with glob characters and a colon is numbered like any other
        assert comfy_bridge.claim_output("runs/[a]:b*", ".mp4").path.name == "[a]:b*_00001_.mp4"
        comfy_bridge.check_interrupt()  # no ComfyUI: never interrupts


def test_bridge_inside_comfyui(monkeypatch, tmp_path) -> None:
    calls: list = []
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_filename_list = lambda folder: [f"{folder}.safetensors"]
    folder_paths.get_full_path = lambda folder, name: (
        str(tmp_path / name) if name.startswith(folder) else None
    )
    folder_paths.get_folder_paths = lambda folder: [str(tmp_path / folder)]
    folder_paths.get_output_directory = lambda: str(tmp_path)
    folder_paths.get_save_image_path = lambda prefix, out, w, h: (str(tmp_path), prefix, 7, "", prefix)
    (tmp_path / "diffusion_models" / "sub").mkdir(parents=True)
    (tmp_path / "diffusion_models" / "sub" / "dit_Q4_K_M.gguf").write_bytes(b"GGUF")  # ComfyUI lists no .gguf

    class ProgressBar:
        def __init__(self, total: int) -> None:
            calls.append(("bar", total))

        def update_absolute(self, value: int, total: int, preview: object = None) -> None:
            calls.append(("update", value, total, preview))

    class Interrupted(Exception):
        pass

    def throw() -> None:
        raise Interrupted("cancelled")

    utils = types.SimpleNamespace(ProgressBar=ProgressBar)
    mm = types.SimpleNamespace(throw_exception_if_processing_interrupted=throw)
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    assert comfy_bridge.inside_comfyui()
    assert comfy_bridge.list_models("vae") == ["vae.safetensors"]
    assert WanModelLoader.INPUT_TYPES()["required"]["model_low"][0] == [
        "none",
        "diffusion_models.safetensors",
        "sub/dit_Q4_K_M.gguf",
    ]
    assert comfy_bridge.resolve_model("vae", "vae.safetensors") == str(tmp_path / "vae.safetensors")
    with pytest.raises(FileNotFoundError, match="not in ComfyUI's 'vae' folder"):
        comfy_bridge.resolve_model("vae", "other.safetensors")
    claimed = comfy_bridge.claim_output("p", ".mp4", 8, 8)
    assert (claimed.folder, claimed.stem, claimed.counter, claimed.subfolder) == (tmp_path, "p", 7, "")
    (tmp_path / "p_00008_.mp4").write_bytes(b"")  # written meanwhile by another process
    assert comfy_bridge.claim_output("p", ".mp4", 8, 8).counter == 9  # ComfyUI said 7: 7 and 8 are taken
    step = comfy_bridge.make_progress(3, "x")
    step(1)
    step(2, ("JPEG", "picture", 512))
    assert calls == [("bar", 3), ("update", 1, 3, None), ("update", 2, 3, ("JPEG", "picture", 512))]
    with pytest.raises(Interrupted):
        comfy_bridge.check_interrupt()


# ------------------------------------------------------------------------------------------------
# Save Video and Test Image
# ------------------------------------------------------------------------------------------------
def test_save_video_writes_a_decodable_mp4(tmp_path) -> None:
    (image,) = WanTestImage().make(48, 32, "checker")
    assert image.shape == (1, 32, 48, 3) and 0.0 <= image.min() and image.max() <= 1.0
    frames = image.expand(9, -1, -1, -1) * torch.linspace(0.2, 1.0, 9)[:, None, None, None]
    with use_bridge(Bridge(output_dir=tmp_path)):
        out = WanSaveVideo().save(frames, 16, "clips/test", "mp4 (h264)", 19)
    path = out["result"][0]
    assert out["ui"] == {
        "images": [{"filename": "test_00001_.mp4", "subfolder": "clips", "type": "output"}],
        "animated": (True,),
    }
    with av.open(path) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert float(stream.average_rate) == 16
    assert len(decoded) == 9 and decoded[0].shape == (32, 48, 3)


def test_gradient_image_and_video_conversion() -> None:
    (image,) = WanTestImage().make(16, 8, "gradient")
    assert image[0, 0, 0].tolist() == [0.0, 0.0, 1.0] and image[0, -1, -1].tolist() == [1.0, 1.0, 0.0]
    video = torch.linspace(-1, 1, 3 * 5 * 4 * 6).view(1, 3, 5, 4, 6)
    images = video_to_images(video)
    assert images.shape == (5, 4, 6, 3)
    assert torch.equal(images[2, 1, 3], (video[0, :, 2, 1, 3] + 1) / 2)


# ------------------------------------------------------------------------------------------------
# Profiler nodes (the observer behind them: test_observer.py, test_observer_glue.py)
# ------------------------------------------------------------------------------------------------
def test_sampler_stage_names() -> None:
    assert sampling_stages(2) == [
        ("Step_0_Loading", "step-loading"),
        ("Step_0_Inference", "step-inference"),
        ("Step_1_Loading", "step-loading"),
        ("Step_1_Inference", "step-inference"),
    ]


def test_profiler_outside_a_prompt_returns_its_settings() -> None:
    (handle,) = WanProfiler().start("cache_case", 50)
    assert isinstance(handle, ProfilerHandle) and handle.settings.case_name == "cache_case"
    with pytest.raises(ValueError, match="case_name must be a visible text"):
        WanProfiler().start(" ", 50)
    with maybe_profile(None, "2", [("Model_Initialization", "init")]):  # no prompt observed: nothing recorded
        assert trace.current_tracer() is None


def _observed(prompt_id: str, nodes: dict) -> Any:
    """The in-process runner's view of a prompt (`observer.InProcessPrompt`) for nodes called directly."""
    from wanbench.nodes.observer import InProcessPrompt

    return InProcessPrompt(prompt_id=prompt_id, nodes=nodes, node_classes=NODE_CLASS_MAPPINGS)


PROFILED = {
    "1": {"class_type": "WanBenchProfiler", "inputs": {"case_name": "cache_case", "sample_interval_ms": 20}},
    "5": {"class_type": "WanBenchModelLoader", "inputs": {}},
    "11": {"class_type": "WanBenchReport", "inputs": {"filename_prefix": "reports/run"}},
}


def test_report_node_writes_files(tmp_path) -> None:
    """The report's files (claimed under one name) and what the UI gets: one summary card per run and
    each file with its kind, no server paths."""
    import asyncio

    from wanbench.nodes.observer import in_process_prompt
    from wanbench.profiling import check_report

    observed = _observed("files", PROFILED)
    with use_bridge(Bridge(output_dir=tmp_path)), in_process_prompt(observed):
        (handle,) = WanProfiler().start("cache_case", 20, unique_id="1")
        observed.node_started("5")
        with maybe_profile(handle, "5", [("Model_Initialization", "init")]):
            with trace.stage("Model_Initialization", kind="init"):
                pass
        observed.node_finished("5")
        observed.node_started("11")
        out = asyncio.run(WanBenchmarkReport().report("reports/run", profiler=handle, unique_id="11"))
        observed.node_finished("11")
        observed.ended(None)
    summary, json_path = out["result"]
    assert "cache_case" in summary and json_path.endswith("run_00001_.json")
    files = {e["kind"]: e for e in out["ui"]["wanbench_report"]}
    assert [files[k]["filename"] for k in ("markdown", "json", "chart")] == [
        "run_00001_.md",
        "run_00001_.json",
        "run_00001_.png",
    ]
    assert all(e["subfolder"] == "reports" and e["type"] == "output" and "path" not in e for e in files.values())
    (card,) = out["ui"]["wanbench_summary"]
    assert card["case"] == "cache_case" and card["status"] == "completed"
    assert card["activity"].startswith("n/a (") and card["mfu"] == "n/a"  # a CPU run: not measured, never 0
    assert float(card["total_s"]) > 0 and card["top_finding"] != "n/a"
    assert check_report(json_path) == []
    assert "text" not in out["ui"] and "images" not in out["ui"]  # the pack's UI draws the report itself


def test_report_node_saves_the_latent_beside_the_report(tmp_path) -> None:
    """The optional latent input (the last one) is written beside the report, in the same group of
    files; the in-process runner lists it as an "other" file, the JSON as the report data."""
    import asyncio

    from wanbench.nodes.observer import in_process_prompt, open_prompt_ids
    from wanbench.runner import RunResult, output_files
    from wanbench.wan_core.checkpoints.latent import load_latent

    assert list(WanBenchmarkReport.INPUT_TYPES()["optional"])[-1] == "latent"
    samples = torch.randn(1, 16, 2, 3, 4)
    prompt = {
        "1": {"class_type": "WanBenchProfiler", "inputs": {"case_name": "c", "sample_interval_ms": 20}},
        "11": {"class_type": "WanBenchReport", "inputs": {"filename_prefix": "reports/run"}},
    }
    observed = _observed("latent", prompt)
    with use_bridge(Bridge(output_dir=tmp_path)), in_process_prompt(observed):
        WanProfiler().start("c", 20)
        observed.node_started("11")
        out = asyncio.run(WanBenchmarkReport().report("reports/run", unique_id="11", latent={"samples": samples}))
        observed.node_finished("11")
        observed.ended(None)
    entries = {e["kind"]: e for e in out["ui"]["wanbench_report"]}
    assert entries["latent"]["filename"] == "run_00001_latent.safetensors"
    assert [entries[k]["filename"] for k in ("markdown", "json")] == ["run_00001_.md", "run_00001_.json"]
    folder = tmp_path / "reports"
    assert torch.equal(load_latent(folder / entries["latent"]["filename"]), samples)
    assert out["result"][1] == str(folder / "run_00001_.json")
    result = RunResult(order=["11"], ui={"11": out["ui"]}, outputs={"11": out["result"]})
    files = output_files(result, tmp_path)
    assert files["reports"] == [str(folder / "run_00001_.json")]
    assert files["markdown"] == [str(folder / "run_00001_.md")]
    assert files["other"] == [str(folder / "run_00001_latent.safetensors")]
    # a wrong latent is refused before any observation is opened
    with use_bridge(Bridge(output_dir=tmp_path)), pytest.raises(ValueError, match="latent must be a LATENT"):
        asyncio.run(WanBenchmarkReport().report("reports/run", latent={"images": samples}))
    assert open_prompt_ids() == [] and not _sampler_threads()


def test_a_latent_that_cannot_be_written_leaves_no_report_file(tmp_path, monkeypatch) -> None:
    """The latent joins the report's group of files: when writing it fails, no Markdown, JSON or
    chart is left behind, nor the claimed name."""
    import asyncio

    from wanbench.nodes.observer import in_process_prompt
    from wanbench.wan_core.checkpoints import latent as latent_files

    def broken(samples, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(latent_files, "save_latent", broken)
    prompt = {k: v for k, v in PROFILED.items() if k != "5"}
    observed = _observed("latent-fails", prompt)
    with use_bridge(Bridge(output_dir=tmp_path)), in_process_prompt(observed):
        WanProfiler().start("c", 20)
        observed.node_started("11")
        with pytest.raises(OSError, match="no space left on the device while writing .*_latent.safetensors"):
            asyncio.run(WanBenchmarkReport().report("reports/run", unique_id="11", latent={"samples": torch.ones(1)}))
        observed.ended(None)
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == []


def test_wired_profiler_opens_the_prompt_and_a_dropped_report_leaves_no_thread(tmp_path) -> None:
    """A workflow whose report ComfyUI dropped (invalid input): the profiler still measures the
    prompt, and its session closes when the prompt ends: no sampler thread keeps running."""
    from wanbench.nodes.observer import in_process_prompt, open_prompt_ids

    prompt = {"1": {"class_type": "WanBenchProfiler", "inputs": {"case_name": "c", "sample_interval_ms": 20}}}
    observed = _observed("drop", prompt)
    with in_process_prompt(observed):
        (handle,) = WanProfiler().start("c", 20)
        with maybe_profile(handle, "2", [("T5_Encoding", "encode")]):
            with trace.stage("T5_Encoding", kind="encode"):
                assert _sampler_threads()
        observed.ended(None)
    assert open_prompt_ids() == [] and not _sampler_threads()


def _sampler_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "wanbench-profiler-sampler" and t.is_alive()]


# ------------------------------------------------------------------------------------------------
# Nodes on the tiny models (real wan_core calls, CPU)
# ------------------------------------------------------------------------------------------------
TI2V_DIT = "wanbench_tiny_ti2v_5B_fp16.safetensors"
T2V_HIGH = "wanbench_tiny_t2v_high_noise_14B_fp16.safetensors"
T2V_LOW = "wanbench_tiny_t2v_low_noise_14B_fp16.safetensors"
I2V_HIGH = "wanbench_tiny_i2v_high_noise_14B_fp16.safetensors"
I2V_LOW = "wanbench_tiny_i2v_low_noise_14B_fp16.safetensors"
VAE22, VAE21 = "wanbench_tiny_wan2.2_vae.safetensors", "wanbench_tiny_wan_2.1_vae.safetensors"
SAMPLER_ARGS = {
    "seed": 1,
    "steps": 2,
    "shift": 5.0,
    "boundary": 0.875,
    "guidance_high": 5.0,
    "guidance_low": 3.0,
    "resident_blocks": 0,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny models (make_tiny_models) and a bridge onto them: loaded once for this module."""
    from wanbench.nodes.encoder_loaders import WanTextEncoderLoader, WanVAELoader
    from wanbench.tiny_models import make_tiny_models

    root = tmp_path_factory.mktemp("tiny_models")
    make_tiny_models(root, seed=0)
    bridge = Bridge.for_models_root(root, tmp_path_factory.mktemp("tiny_out"))
    with use_bridge(bridge):
        (encoder,) = WanTextEncoderLoader().load("wanbench_tiny_umt5_xxl_fp16.safetensors", "float32", "cpu")
        (embeds,) = WanTextEncode().encode(encoder, "a fox in the snow", "")
        loaded = types.SimpleNamespace(
            bridge=bridge,
            embeds=embeds,
            ti2v=WanModelLoader().load(TI2V_DIT, "none", "float32", "sdpa", "cpu")[0],
            i2v=WanModelLoader().load(I2V_HIGH, I2V_LOW, "float32", "sdpa", "cpu")[0],
            vae22=WanVAELoader().load(VAE22, "float32", "cpu")[0],
            vae21=WanVAELoader().load(VAE21, "float32", "cpu")[0],
        )
    return loaded


def _sample(tiny, model, latent, *, solver="unipc", batched_cfg=True, placement="none") -> torch.Tensor:
    (out,) = WanSampler().sample(
        model, tiny.embeds, latent, solver=solver, batched_cfg=batched_cfg, placement=placement, **SAMPLER_ARGS
    )["result"]
    return out["samples"]


def test_sampler_refuses_bad_latents_with_the_fix(tiny) -> None:
    (latent,) = WanEmptyLatent().make(tiny.vae22, 32, 32, 5)
    with pytest.raises(ValueError, match=r"must be a video LATENT .*got \(1, 4, 8, 8\).*Wan Empty Latent"):
        _sample(tiny, tiny.ti2v, {"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(ValueError, match=r"got NoneType.*Feed it from Wan Empty Latent"):
        _sample(tiny, tiny.ti2v, {"noise": 1})
    (wrong,) = WanEmptyLatent().make(tiny.vae21, 32, 32, 5)  # 16 channels for a 48-channel task
    with pytest.raises(ValueError, match=r"latent channels; got a latent of shape \(1, 16, .*Use the VAE of the task"):
        _sample(tiny, tiny.ti2v, wrong)
    (t2v_latent,) = WanEmptyLatent().make(tiny.vae21, 32, 32, 5)
    with pytest.raises(ValueError, match="needs a start image: feed the latent from Wan Image To Video"):
        _sample(tiny, tiny.i2v, t2v_latent)
    assert latent["samples"].shape == (1, 48, 2, 2, 2)


def test_sampler_cfg_modes_solvers_and_placements(tiny) -> None:
    (latent,) = WanEmptyLatent().make(tiny.vae22, 32, 32, 5)
    reference = _sample(tiny, tiny.ti2v, latent)
    assert reference.shape == (1, 48, 2, 2, 2) and torch.isfinite(reference).all()
    # Batched CFG (one batch-2 forward) and two passes give the same numbers.
    torch.testing.assert_close(_sample(tiny, tiny.ti2v, latent, batched_cfg=False), reference, atol=1e-4, rtol=1e-4)
    for solver in ("dpm++", "euler"):
        out = _sample(tiny, tiny.ti2v, latent, solver=solver)
        assert out.shape == reference.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, reference), f"{solver} gave the UniPC result"
    # Placement moves weights, never the numbers (on CPU the blocks stream from CPU to CPU).
    for placement in ("blocks", "model"):
        torch.testing.assert_close(_sample(tiny, tiny.ti2v, latent, placement=placement), reference)


def test_ti2v_sizes_must_be_multiples_of_32(tiny) -> None:
    assert input_problems(WanEmptyLatent, {"width": 48, "height": 32, "length": 5}) == []  # the 16-grid
    with pytest.raises(ValueError, match=r"ti2v-5B: width must be a multiple of 32; got 48; use 32 or 64"):
        WanEmptyLatent().make(tiny.vae22, 48, 32, 5)
    (latent,) = WanEmptyLatent().make(tiny.vae21, 48, 32, 5)  # the Wan2.1 VAE (A14B) takes it
    assert latent["samples"].shape[-2:] == (4, 6)


def test_vae_decode_refuses_a_wrong_latent_and_tiles_on_request(tiny) -> None:
    wrong = r"samples \(B, 48, T, h, w\) for the wan2.2 VAE; got \(1, 16, 2, 4, 4\)"
    with pytest.raises(ValueError, match=wrong):
        WanVAEDecode().decode(tiny.vae22, {"samples": torch.zeros(1, 16, 2, 4, 4)}, "none")
    with pytest.raises(ValueError, match="tiling must be one of"):
        WanVAEDecode().decode(tiny.vae22, {"samples": torch.zeros(1, 48, 2, 2, 2)}, "always")
    latent = {"samples": torch.randn(1, 48, 2, 2, 2, generator=torch.Generator().manual_seed(0))}
    (whole,) = WanVAEDecode().decode(tiny.vae22, latent, "none")
    (tiled,) = WanVAEDecode().decode(tiny.vae22, latent, "auto")
    assert whole.shape == tiled.shape == (5, 32, 32, 3)
    assert 0.0 <= tiled.min() and tiled.max() <= 1.0


def test_image_to_video_refuses_a_bad_start_image(tiny) -> None:
    bad_shape = r"start_image must be an IMAGE \(B, H, W, 3\) in \[0, 1\]; got \(32, 32, 3\)\."
    with pytest.raises(ValueError, match=bad_shape):
        WanImageToVideo().make(tiny.vae22, torch.zeros(32, 32, 3), 32, 32, 5)
    with pytest.raises(ValueError, match=r"got \(1, 32, 32, 4\).*connect an IMAGE"):
        WanImageToVideo().make(tiny.vae22, torch.zeros(1, 32, 32, 4), 32, 32, 5)
    with pytest.raises(ValueError, match="got str"):
        WanImageToVideo().make(tiny.vae22, "image.png", 32, 32, 5)  # type: ignore[arg-type]


def test_model_loader_expert_count_errors(tiny) -> None:
    with use_bridge(tiny.bridge):
        two_experts = r"t2v-A14B needs two experts; got only .*Choose the low_noise file as model_low"
        with pytest.raises(ValueError, match=two_experts):
            WanModelLoader().load(T2V_HIGH, "none", "float32", "sdpa", "cpu")
        # A second TI2V-5B file (a copy) as model_low: the task has one model only.
        folder = tiny.bridge.model_dirs["diffusion_models"]
        copy = folder / "ti2v_copy.safetensors"
        copy.write_bytes((folder / TI2V_DIT).read_bytes())
        try:
            with pytest.raises(ValueError, match=r"ti2v-5B is a single model; set model_low to 'none'"):
                WanModelLoader().load(TI2V_DIT, copy.name, "float32", "sdpa", "cpu")
        finally:
            copy.unlink()


@pytest.mark.parametrize("size", [(33, 32), (32, 31)])
def test_save_video_refuses_odd_sizes_with_the_fix(tmp_path, size) -> None:
    width, height = size
    with use_bridge(Bridge(output_dir=tmp_path)):
        with pytest.raises(ValueError, match=rf"needs an even width and height; got {width}x{height}\. .*crop"):
            WanSaveVideo().save(torch.rand(3, height, width, 3), 16, "odd/clip", "mp4 (h264)", 19)
    assert not list(tmp_path.rglob("*.mp4"))


@pytest.mark.parametrize("video_format", list(FORMATS))
def test_save_video_each_format(tmp_path, video_format) -> None:
    frames = torch.rand(5, 32, 48, 3, generator=torch.Generator().manual_seed(0))
    with use_bridge(Bridge(output_dir=tmp_path)):
        out = WanSaveVideo().save(frames, 16, "fmt/clip", video_format, 23)
    path = out["result"][0]
    assert path.endswith(".mp4")
    with av.open(path) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == {"mp4 (h264)": "h264", "mp4 (mpeg4)": "mpeg4"}[video_format]
        assert sum(1 for _ in container.decode(stream)) == 5
    assert [p.name for p in (tmp_path / "fmt").iterdir()] == [Path(path).name]  # no temporary left
    with use_bridge(Bridge(output_dir=tmp_path)), pytest.raises(ValueError, match="format: value 'gif' is not one"):
        WanSaveVideo().save(frames, 16, "fmt/clip", "gif", 23)


def test_failing_encoder_leaves_no_file(tmp_path) -> None:
    frames = images_to_uint8(torch.rand(3, 32, 32, 3))
    target = tmp_path / "clip.mp4"
    with pytest.raises(Exception) as caught:  # PyAV's error for an unknown codec
        write_mp4(frames, target, fps=16, codec="no-such-codec")
    assert "no-such-codec" in str(caught.value) or caught.type.__module__.startswith("av")
    assert list(tmp_path.iterdir()) == []  # neither the video nor a temporary file


def test_save_video_fps_from_the_task(tiny, tmp_path) -> None:
    frames = torch.rand(5, 32, 32, 3)
    fps_options = _inputs(WanSaveVideo)["fps"][1]
    assert fps_options["default"] == 0 and "0 = the task's fps" in fps_options["tooltip"]
    assert input_problems(WanSaveVideo, {"fps": 0, "filename_prefix": "a", "crf": 19}) == []

    def saved_fps(**kwargs) -> float:
        with use_bridge(Bridge(output_dir=tmp_path)):
            out = WanSaveVideo().save(frames, filename_prefix="fps/clip", format="mp4 (h264)", crf=19, **kwargs)
        path = out["result"][0]
        with av.open(path) as container:
            return float(container.streams.video[0].average_rate)

    assert saved_fps(fps=0, model=tiny.ti2v) == 24  # TI2V-5B
    assert saved_fps(fps=0, model=tiny.i2v) == 16  # A14B
    assert saved_fps(fps=30, model=tiny.i2v) == 30  # an explicit fps wins
    assert saved_fps(fps=12) == 12
    with pytest.raises(ValueError, match="fps is 0 .* no model is connected.*connect Wan Model Loader's model"):
        saved_fps(fps=0)


def test_single_model_task_uses_the_high_noise_guidance_widget(tiny) -> None:
    """TI2V-5B has one scale: `guidance_high` (its tooltip says so); `guidance_low` is unused."""
    (latent,) = WanEmptyLatent().make(tiny.vae22, 32, 32, 5)
    args = {**SAMPLER_ARGS, "guidance_high": 5.0}
    runs = [
        WanSampler().sample(tiny.ti2v, tiny.embeds, latent, solver="unipc", batched_cfg=True, placement="none",
                            **{**args, "guidance_low": low})["result"][0]["samples"]
        for low in (3.0, 7.0)
    ]
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
    (other,) = WanSampler().sample(tiny.ti2v, tiny.embeds, latent, solver="unipc", batched_cfg=True,
                                   placement="none", **{**args, "guidance_high": 2.0})["result"]
    assert not torch.equal(other["samples"], runs[0])


# ------------------------------------------------------------------------------------------------
# Sampler defaults from the task
# ------------------------------------------------------------------------------------------------
def test_zero_widgets_take_the_tasks_presets_and_explicit_values_stay(tiny) -> None:
    from wanbench.nodes import observer
    from wanbench.wan_core.config import I2V_A14B, TI2V_5B

    (latent,) = WanEmptyLatent().make(tiny.vae22, 32, 32, 5)
    defaults = {**SAMPLER_ARGS, "steps": 2, "shift": 0.0, "boundary": 0.0, "guidance_high": 0.0, "guidance_low": 0.0}
    prompt = {"1": PROFILED["1"], "8": {"class_type": "WanBenchSampler", "inputs": {}}}
    observed = _observed("defaults", prompt)
    with use_bridge(tiny.bridge), observer.in_process_prompt(observed):
        (handle,) = WanProfiler().start("cache_case", 20)
        observed.node_started("8")
        out = WanSampler().sample(
            tiny.ti2v, tiny.embeds, latent, solver="unipc", batched_cfg=True, placement="none",
            profiler=handle, unique_id="8", **defaults,
        )
        observed.node_finished("8")
        record = observer.end_observation(observer.current_observation(), error=None)
        observed.ended(None)
    ti2v = TI2V_5B.sampler
    assert out["ui"]["wanbench_sampler"] == [
        {"task": "ti2v-5B", "steps": 2, "shift": ti2v.shift, "solver": "unipc", "guidance": ti2v.guide_scale.high}
    ]
    context = record.context
    assert (context.steps, context.shift, context.boundary) == (2, ti2v.shift, None)
    assert (context.guidance_high, context.guidance_low) == (None, ti2v.guide_scale.high)
    # explicit values are used as given
    explicit = {**defaults, "shift": 3.5, "guidance_high": 2.5}
    out = WanSampler().sample(tiny.ti2v, tiny.embeds, latent, solver="unipc", batched_cfg=True, placement="none",
                              **explicit)
    assert out["ui"]["wanbench_sampler"][0]["shift"] == 3.5 and out["ui"]["wanbench_sampler"][0]["guidance"] == 2.5
    # an A14B task: the expert switch and both scales from its preset
    (i2v_latent,) = WanImageToVideo().make(tiny.vae21, torch.rand(1, 32, 32, 3), 32, 32, 5)
    out = WanSampler().sample(tiny.i2v, tiny.embeds, i2v_latent, solver="unipc", batched_cfg=True,
                              placement="none", **{**defaults, "guidance_low": 1.5})
    i2v = I2V_A14B.sampler
    assert out["ui"]["wanbench_sampler"][0] == {
        "task": "i2v-A14B", "steps": 2, "shift": i2v.shift, "solver": "unipc", "boundary": i2v.boundary,
        "guidance_high": i2v.guide_scale.high, "guidance_low": 1.5,
    }


def test_sampler_widgets_default_to_the_task() -> None:
    inputs = _inputs(WanSampler)
    for name in ("steps", "shift", "boundary", "guidance_high", "guidance_low"):
        opts = inputs[name][1]
        assert opts["default"] == 0 and opts["min"] == 0 and "0 = the task's" in opts["tooltip"], name
    assert "40 for T2V-A14B" in inputs["steps"][1]["tooltip"] and "12.0 for T2V" in inputs["shift"][1]["tooltip"]


# ------------------------------------------------------------------------------------------------
# Latent previews (ComfyUI's preview setting)
# ------------------------------------------------------------------------------------------------
def _comfy_preview_setting(monkeypatch, method: str, size: int = 512) -> list:
    """Stand-in `comfy.cli_args` (the preview setting) and `comfy.utils` (a recording ProgressBar)."""
    calls: list = []

    class ProgressBar:
        def __init__(self, total: int) -> None:
            self.total = total

        def update_absolute(self, value: int, total: int, preview: object = None) -> None:
            calls.append((value, total, preview))

    method_enum = types.SimpleNamespace(value=method)
    monkeypatch.setitem(sys.modules, "comfy.cli_args", types.SimpleNamespace(
        args=types.SimpleNamespace(preview_method=method_enum, preview_size=size)))
    monkeypatch.setitem(sys.modules, "comfy.utils", types.SimpleNamespace(ProgressBar=ProgressBar))
    return calls


@pytest.mark.parametrize("method", ["latent2rgb", "auto", "taesd"])
def test_sampler_sends_a_latent_preview_per_step_when_previews_are_on(tiny, monkeypatch, method) -> None:
    calls = _comfy_preview_setting(monkeypatch, method, size=256)
    (latent,) = WanEmptyLatent().make(tiny.vae22, 64, 32, 5)
    _sample(tiny, tiny.ti2v, latent)
    assert [(value, total) for value, total, _ in calls] == [(1, 2), (2, 2)]
    for _, _, preview in calls:
        kind, image, max_size = preview
        assert (kind, max_size) == ("JPEG", 256)
        assert image.size == (4, 2) and image.mode == "RGB"  # the latent's width x height (1/16 for Wan2.2)


def test_no_preview_when_previews_are_off(tiny, monkeypatch) -> None:
    calls = _comfy_preview_setting(monkeypatch, "none")
    (latent,) = WanEmptyLatent().make(tiny.vae22, 32, 32, 5)
    _sample(tiny, tiny.ti2v, latent)
    assert [preview for _, _, preview in calls] == [None, None]


def test_the_preview_projection_uses_the_wan_latent_colours() -> None:
    from wanbench.wan_core.config import T2V_A14B, TI2V_5B
    from wanbench.wan_core.latents import LATENT_RGB, latent_preview_rgb

    for cfg in (T2V_A14B.vae, TI2V_5B.vae):
        factors, bias = LATENT_RGB[cfg.variant]
        assert len(factors) == cfg.z_dim and all(len(row) == 3 for row in factors)
        latent = torch.zeros(cfg.z_dim, 3, 2, 2)  # (C, T, h, w)
        channel = cfg.z_dim - 1
        latent[channel, 1, 0, 0] = 1.0  # the middle frame, one pixel, one channel
        rgb = latent_preview_rgb(latent, cfg)
        assert rgb.shape == (2, 2, 3) and rgb.dtype == torch.uint8

        def expected(values) -> list[int]:
            return [int(min(max(round((v + 1.0) * 127.5), 0), 255)) for v in values]

        assert rgb[0, 0].tolist() == expected([f + b for f, b in zip(factors[channel], bias, strict=True)])
        assert rgb[1, 1].tolist() == expected(bias)  # zero latent: the bias colour
        assert latent_preview_rgb(latent, cfg, frame=0)[0, 0].tolist() == expected(bias)
    with pytest.raises(ValueError, match="a preview needs one normalised latent"):
        latent_preview_rgb(torch.zeros(16, 3, 2, 2), TI2V_5B.vae)
