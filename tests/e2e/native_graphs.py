"""The shipped native graphs (ComfyUI's Wan2.2 templates as core nodes, profiler dropped in) made tiny.

Model files become the tiny ones core's loaders accept (`native_models`), core's CLIPLoader becomes
the test-only tiny UMT5 loader (`native_pack`: core CLIPTextEncode still encodes), sizes and step
counts become CPU-sized; the T2V-A14B expert switch moves to the step where the pack's boundary
falls for that step count, so the pack's own tiny workflow can run the same job.
"""

from __future__ import annotations

from typing import Any

from wanbench.wan_core.config import T2V_A14B
from wanbench.workflows.native_workflows import COMFY_SAVE_VIDEO_CRF, NATIVE_NAMES, high_noise_steps

from .comfy_api import load_api
from .native_models import CORE_DIT_FILES, CORE_TEXT_ENCODER, FULL_WAN22_VAE, TINY_WAN21_VAE

CORE_TI2V, CORE_HIGH, CORE_LOW = list(CORE_DIT_FILES)
T2V_SIZE = (64, 48, 5)
TI2V_SIZE = (32, 32, 5)


def tiny_native(model_type: str, *, steps: int, seed: int, case_name: str) -> dict[str, Any]:
    """The native graph of `model_type` ("ti2v" / "t2v") on tiny files, `steps` steps, `seed`."""
    prompt = load_api(f"{NATIVE_NAMES[model_type]}.api.json")
    width, height, length = TI2V_SIZE if model_type == "ti2v" else T2V_SIZE
    split = high_noise_steps(T2V_A14B, steps)
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            name = inputs["unet_name"]
            inputs["unet_name"] = CORE_HIGH if "high_noise" in name else CORE_LOW if "low_noise" in name else CORE_TI2V
        elif kind == "CLIPLoader":
            node["class_type"], node["inputs"] = "WanBenchTestTinyUMT5Loader", {"clip_name": CORE_TEXT_ENCODER}
        elif kind == "VAELoader":
            inputs["vae_name"] = FULL_WAN22_VAE if model_type == "ti2v" else TINY_WAN21_VAE
        elif kind in ("Wan22ImageToVideoLatent", "EmptyHunyuanLatentVideo"):
            inputs.update(width=width, height=height, length=length)
        elif kind == "KSampler":
            inputs.update(steps=steps, seed=seed)
        elif kind == "KSamplerAdvanced":
            inputs["steps"] = steps
            if inputs["add_noise"] == "enable":
                inputs.update(noise_seed=seed, end_at_step=split)
            else:
                inputs["start_at_step"] = split
        elif kind == "SaveVideo":
            inputs["filename_prefix"] = f"e2e/{case_name}"
        elif kind == "WanBenchProfiler":
            inputs["case_name"] = case_name
        elif kind == "WanBenchReport":
            inputs["filename_prefix"] = f"e2e/{case_name}_report"
    return prompt


def pack_twin_overrides(*, steps: int, seed: int, case_name: str) -> dict[str, Any]:
    """Overrides that make the pack's tiny T2V-A14B workflow run `tiny_native("t2v", ...)`'s job."""
    width, height, length = T2V_SIZE
    s = T2V_A14B.sampler
    texts = [
        n["inputs"]["text"]
        for n in load_api(f"{NATIVE_NAMES['t2v']}.api.json").values()
        if n["class_type"] == "CLIPTextEncode"
    ]
    return {
        "WanBenchTextEncode.prompt": texts[0],
        "WanBenchTextEncode.negative_prompt": texts[1],
        "WanBenchProfiler.case_name": case_name,
        "WanBenchModelLoader.model_high": CORE_HIGH,
        "WanBenchModelLoader.model_low": CORE_LOW,
        "WanBenchTextEncoderLoader.text_encoder": CORE_TEXT_ENCODER,
        "WanBenchVAELoader.vae": TINY_WAN21_VAE,
        "WanBenchEmptyLatent.width": width,
        "WanBenchEmptyLatent.height": height,
        "WanBenchEmptyLatent.length": length,
        "WanBenchSampler.steps": steps,
        "WanBenchSampler.seed": seed,
        "WanBenchSampler.solver": "euler",
        "WanBenchSampler.shift": s.shift,
        "WanBenchSampler.boundary": s.boundary,
        "WanBenchSampler.guidance_high": s.guide_scale.high,
        "WanBenchSampler.guidance_low": s.guide_scale.low,
        "WanBenchSampler.placement": "none",
        "WanBenchSaveVideo.filename_prefix": f"e2e/{case_name}",
        "WanBenchSaveVideo.crf": COMFY_SAVE_VIDEO_CRF,
        "WanBenchReport.filename_prefix": f"e2e/{case_name}_report",
    }
