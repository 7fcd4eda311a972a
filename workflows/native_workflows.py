"""ComfyUI's own Wan2.2 graphs with the profiler dropped in, and the native-vs-pack suite.

`native_graph` writes, in API format, the graph of ComfyUI's Wan2.2 templates (UNETLoader /
CLIPLoader / VAELoader / ModelSamplingSD3 / CLIPTextEncode / Wan22ImageToVideoLatent or
EmptyHunyuanLatentVideo / KSampler or two KSamplerAdvanced / VAEDecode / CreateVideo / SaveVideo)
flattened to core nodes that exist in ComfyUI 0.3.75 and 0.33, plus a Wan Profiler and a Wan
Benchmark Report with no wires. `comparison_suite` pairs each with this pack's workflow for the
same job: task, size, frames, steps, seed, the flow-matching Euler solver (ComfyUI's `euler` with
the `simple` scheduler computes the same sigmas as the pack's `euler`), shift and guidance; the
two A14B experts switch at the same step (the pack's boundary, turned into KSamplerAdvanced's
end_at_step / start_at_step for that schedule).

Shapes: none (graph data only).
"""

from __future__ import annotations

from typing import Any

from ..wan_core.config import T2V_A14B, TI2V_5B, WanConfig
from ..wan_core.schedulers import make_schedule

SOLVER = "euler"
COMFY_SAMPLER, COMFY_SCHEDULER = "euler", "simple"
SEED = 42
# Core SaveVideo encodes h264 (yuv420p) at libx264's default quality, crf 23; the pack's twin saves
# with the same crf so that the two videos differ by their frames, not by their encoder settings.
COMFY_SAVE_VIDEO_CRF = 23
NATIVE_FILES = {
    "ti2v": ("wan2.2_ti2v_5B_fp16.safetensors",),
    "t2v": (
        "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
        "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
    ),
}
NATIVE_TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
NATIVE_VAE = {"ti2v": "wan2.2_vae.safetensors", "t2v": "wan_2.1_vae.safetensors"}
NATIVE_NAMES = {"ti2v": "native_wan22_ti2v_5B", "t2v": "native_wan22_t2v_A14B"}
PACK_TWINS = {"ti2v": "wan22_ti2v_5B_t2v", "t2v": "wan22_t2v_A14B"}
TASKS: dict[str, WanConfig] = {"ti2v": TI2V_5B, "t2v": T2V_A14B}


def high_noise_steps(task: WanConfig, steps: int) -> int:
    """How many of `steps` Euler steps the pack runs on the high-noise expert (t >= boundary x 1000)."""
    boundary = task.sampler.boundary_timestep
    schedule = make_schedule(SOLVER, steps, task.sampler.shift)
    return sum(1 for t in schedule.timesteps.tolist() if boundary is not None and t >= boundary)


def _node(class_type: str, title: str, **inputs: Any) -> dict[str, Any]:
    return {"inputs": inputs, "class_type": class_type, "_meta": {"title": title}}


def native_graph(model_type: str, prompt: str, negative: str) -> dict[str, Any]:
    """The API-format native graph of one task ("ti2v" or "t2v"), at the task's size and steps."""
    task = TASKS[model_type]
    width, height = task.default_size
    s = task.sampler
    g: dict[str, Any] = {
        "1": _node("WanBenchProfiler", "Wan Profiler", case_name=NATIVE_NAMES[model_type], sample_interval_ms=100),
        "4": _node("CLIPLoader", "Load CLIP", clip_name=NATIVE_TEXT_ENCODER, type="wan", device="default"),
        "5": _node("VAELoader", "Load VAE", vae_name=NATIVE_VAE[model_type]),
        "8": _node("CLIPTextEncode", "CLIP Text Encode (Positive Prompt)", text=prompt, clip=["4", 0]),
        "9": _node("CLIPTextEncode", "CLIP Text Encode (Negative Prompt)", text=negative, clip=["4", 0]),
    }
    size = {"width": width, "height": height, "length": task.frame_num, "batch_size": 1}
    common = {"sampler_name": COMFY_SAMPLER, "scheduler": COMFY_SCHEDULER, "positive": ["8", 0], "negative": ["9", 0]}
    if model_type == "ti2v":
        g["2"] = _node("UNETLoader", "Load Diffusion Model", unet_name=NATIVE_FILES["ti2v"][0], weight_dtype="default")
        g["6"] = _node("ModelSamplingSD3", "ModelSamplingSD3", shift=s.shift, model=["2", 0])
        g["10"] = _node("Wan22ImageToVideoLatent", "Wan22ImageToVideoLatent", **size, vae=["5", 0])
        g["11"] = _node(
            "KSampler",
            "KSampler",
            seed=SEED,
            steps=s.steps,
            cfg=s.guide_scale.high,
            denoise=1.0,
            model=["6", 0],
            latent_image=["10", 0],
            **common,
        )
        last = "11"
    else:
        split = high_noise_steps(task, s.steps)
        high, low = NATIVE_FILES["t2v"]
        g["2"] = _node("UNETLoader", "Load Diffusion Model (high noise)", unet_name=high, weight_dtype="default")
        g["3"] = _node("UNETLoader", "Load Diffusion Model (low noise)", unet_name=low, weight_dtype="default")
        g["6"] = _node("ModelSamplingSD3", "ModelSamplingSD3 (high)", shift=s.shift, model=["2", 0])
        g["7"] = _node("ModelSamplingSD3", "ModelSamplingSD3 (low)", shift=s.shift, model=["3", 0])
        g["10"] = _node("EmptyHunyuanLatentVideo", "EmptyHunyuanLatentVideo", **size)
        g["11"] = _node(
            "KSamplerAdvanced",
            "KSampler (high noise)",
            add_noise="enable",
            noise_seed=SEED,
            steps=s.steps,
            cfg=s.guide_scale.high,
            start_at_step=0,
            end_at_step=split,
            return_with_leftover_noise="enable",
            model=["6", 0],
            latent_image=["10", 0],
            **common,
        )
        g["12"] = _node(
            "KSamplerAdvanced",
            "KSampler (low noise)",
            add_noise="disable",
            noise_seed=0,
            steps=s.steps,
            cfg=s.guide_scale.low,
            start_at_step=split,
            end_at_step=10000,
            return_with_leftover_noise="disable",
            model=["7", 0],
            latent_image=["11", 0],
            **common,
        )
        last = "12"
    g["13"] = _node("VAEDecode", "VAE Decode", samples=[last, 0], vae=["5", 0])
    g["14"] = _node("CreateVideo", "Create Video", fps=float(task.fps), images=["13", 0])
    g["15"] = _node(
        "SaveVideo",
        "Save Video",
        filename_prefix=f"wanbench/{NATIVE_NAMES[model_type]}",
        format="auto",
        codec="auto",
        **{"format.codec": "auto"},
        video=["14", 0],
    )
    g["16"] = _node(
        "WanBenchReport", "Wan Benchmark Report", filename_prefix=f"wanbench/{NATIVE_NAMES[model_type]}_report"
    )
    return dict(sorted(g.items(), key=lambda kv: int(kv[0])))


def pack_overrides(model_type: str, case_name: str) -> dict[str, Any]:
    """Overrides that make this pack's workflow run the native graph's job."""
    s = TASKS[model_type].sampler
    return {
        "WanBenchProfiler.case_name": case_name,
        "WanBenchSampler.solver": SOLVER,
        "WanBenchSampler.steps": s.steps,
        "WanBenchSampler.seed": SEED,
        "WanBenchSampler.shift": s.shift,
        "WanBenchSampler.guidance_high": s.guide_scale.high,
        "WanBenchSampler.guidance_low": s.guide_scale.low,
        "WanBenchSaveVideo.crf": COMFY_SAVE_VIDEO_CRF,
    }


def comparison_suite() -> dict[str, Any]:
    """ComfyUI's native nodes vs this pack's, per task: cases and the comparisons between them."""
    cases, comparisons = [], []
    for model_type in ("ti2v", "t2v"):
        task = TASKS[model_type]
        native, pack = f"native_{task.name}", f"pack_{task.name}"
        cases.append(
            {
                "name": native,
                "workflow": f"../{NATIVE_NAMES[model_type]}.api.json",
                "overrides": {"WanBenchProfiler.case_name": native},
            }
        )
        cases.append(
            {
                "name": pack,
                "workflow": f"../{PACK_TWINS[model_type]}.api.json",
                "overrides": pack_overrides(model_type, pack),
            }
        )
        width, height = task.default_size
        comparisons.append(
            {
                "title": f"{task.name} {width}x{height}, {task.frame_num} frames, {task.sampler.steps} "
                f"Euler steps: ComfyUI native vs WanBench",
                "baseline": native,
                "candidate": pack,
            }
        )
    return {
        "name": "wan22_native_vs_pack",
        "description": "The same jobs through ComfyUI's native Wan nodes and through this pack's nodes, side by side",
        "cases": cases,
        "comparisons": comparisons,
    }
