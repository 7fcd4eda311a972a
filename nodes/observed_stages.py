"""What the workflow observer makes of each node of a prompt, by its class name (pure data).

The observer (`observer.py`) times every node of a profiled prompt. What a node becomes in the
report depends on its `class_type`:

- `loader`: a piece of `Model_Initialization` with one child stage naming what was loaded
  (`DiT_Initialization`, `Text_Encoder_Initialization`, `VAE_Initialization`, `LoRA_Initialization`,
  `CLIP_Vision_Initialization`); consecutive pieces are joined into one stage by the report.
- `stage`: one stage with the seed name (`T5_Encoding`, `TI2V_Preprocess`, `VAE_Decoding`).
- `sampler`: no row of its own; its denoising steps become `Step_<i>_Loading` / `Step_<i>_Inference`
  (from model wrappers for ComfyUI's core samplers, from progress updates otherwise).
- `progress_sampler`: a sampler of another pack that drives its own model (kijai's WanVideoWrapper):
  steps from its progress updates, weight loading inside the first step.
- `self`: a node of this pack that records its own stages (`RECORDS_STAGES = True`).
- `apparatus`: the profiler's own nodes (Wan Profiler, Wan Benchmark Report, the model tap).
- `other`: anything else: a row under its class name (kind "other"), never "Unknown".

Shapes: none (no tensors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..wan_core.config import (
    CLIP_VISION_INIT_STAGE,
    DIT_INIT_STAGE,
    EXPERT_HIGH,
    EXPERT_LOW,
    LORA_INIT_STAGE,
    PREPROCESS_STAGE,
    T5_ENCODE_STAGE,
    TEXT_ENCODER_INIT_STAGE,
    VAE_DECODE_STAGE,
    VAE_INIT_STAGE,
    Stage,
)

LOADER, STAGE, SAMPLER, PROGRESS_SAMPLER, SELF, APPARATUS, OTHER = (
    "loader",
    "stage",
    "sampler",
    "progress_sampler",
    "self",
    "apparatus",
    "other",
)
OTHER_KIND = "other"
APPARATUS_NODES = frozenset({"WanBenchProfiler", "WanBenchReport", "WanBenchModelTap"})

# ComfyUI core (0.3.75 and 0.33) and kijai's ComfyUI-WanVideoWrapper, by class name.
_LOADERS: dict[str, Stage] = {
    "UNETLoader": DIT_INIT_STAGE,
    "UnetLoaderGGUF": DIT_INIT_STAGE,
    "CheckpointLoaderSimple": DIT_INIT_STAGE,
    "ImageOnlyCheckpointLoader": DIT_INIT_STAGE,
    "WanVideoModelLoader": DIT_INIT_STAGE,
    "CLIPLoader": TEXT_ENCODER_INIT_STAGE,
    "DualCLIPLoader": TEXT_ENCODER_INIT_STAGE,
    "CLIPLoaderGGUF": TEXT_ENCODER_INIT_STAGE,
    "LoadWanVideoT5TextEncoder": TEXT_ENCODER_INIT_STAGE,
    "VAELoader": VAE_INIT_STAGE,
    "WanVideoVAELoader": VAE_INIT_STAGE,
    "WanVideoTinyVAELoader": VAE_INIT_STAGE,
    "LoraLoaderModelOnly": LORA_INIT_STAGE,
    "LoraLoader": LORA_INIT_STAGE,
    "CLIPVisionLoader": CLIP_VISION_INIT_STAGE,
    "LoadWanVideoClipTextEncoder": CLIP_VISION_INIT_STAGE,
}
_STAGES: dict[str, Stage] = {
    "CLIPTextEncode": T5_ENCODE_STAGE,
    "WanVideoTextEncode": T5_ENCODE_STAGE,
    "WanVideoTextEncodeCached": T5_ENCODE_STAGE,
    "WanVideoTextEncodeSingle": T5_ENCODE_STAGE,
    "WanImageToVideo": PREPROCESS_STAGE,
    "Wan22ImageToVideoLatent": PREPROCESS_STAGE,
    "WanFirstLastFrameToVideo": PREPROCESS_STAGE,
    "WanFunInpaintToVideo": PREPROCESS_STAGE,
    "EmptyHunyuanLatentVideo": PREPROCESS_STAGE,
    "WanVideoImageToVideoEncode": PREPROCESS_STAGE,
    "WanVideoImageClipEncode": PREPROCESS_STAGE,  # the wrapper's I2V start-image encode before its split
    "WanVideoEmptyEmbeds": PREPROCESS_STAGE,
    "WanVideoEncode": PREPROCESS_STAGE,
    "VAEDecode": VAE_DECODE_STAGE,
    "VAEDecodeTiled": VAE_DECODE_STAGE,
    "WanVideoDecode": VAE_DECODE_STAGE,
}
CORE_SAMPLERS = frozenset({"KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"})
_PROGRESS_SAMPLERS = frozenset({"WanVideoSampler", "WanVideoSamplerv2", "WanVideoSamplerFromSettings"})
# (width, height, frames) inputs of preprocess nodes (first complete set found is used): core's Wan
# latent nodes, kijai's WanVideoEmptyEmbeds, its WanVideoImageClipEncode.
GEOMETRY_INPUTS = (
    ("width", "height", "length"),
    ("width", "height", "num_frames"),
    ("generation_width", "generation_height", "num_frames"),
)
# Inputs that name the model file a model source node loads (first one found is used).
MODEL_FILE_INPUTS = ("unet_name", "ckpt_name", "model", "model_name")
_HIGH = re.compile(r"high[\s_.-]*noise", re.IGNORECASE)
_LOW = re.compile(r"low[\s_.-]*noise", re.IGNORECASE)
_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class NodeRole:
    """How the observer treats one class of node: `role` (module constants) and its stage."""

    role: str
    stage: Stage | None = None


def role_of(class_type: str, node_class: Any = None) -> NodeRole:
    """The role of a node class; `node_class` (the class itself, when known) marks this pack's
    self-recording nodes by their `RECORDS_STAGES` attribute."""
    if class_type in APPARATUS_NODES:
        return NodeRole(APPARATUS)
    if node_class is not None and getattr(node_class, "RECORDS_STAGES", False) is True:
        return NodeRole(SELF)
    if class_type in _LOADERS:
        return NodeRole(LOADER, _LOADERS[class_type])
    if class_type in _STAGES:
        return NodeRole(STAGE, _STAGES[class_type])
    if class_type in CORE_SAMPLERS:
        return NodeRole(SAMPLER)
    if class_type in _PROGRESS_SAMPLERS:
        return NodeRole(PROGRESS_SAMPLER)
    return NodeRole(OTHER, Stage(stage_name_for_class(class_type), OTHER_KIND))


def stage_name_for_class(class_type: str) -> str:
    """A report row name for a node class: the class name itself, with characters a stage name
    cannot hold (spaces, `|`, brackets) replaced by `_` (the exact name is kept as a fact)."""
    name = _BAD_NAME_CHARS.sub("_", str(class_type)).strip("_") or "Node"
    if not name[0].isalpha():
        name = "Node_" + name
    if name.lower() == "unknown" or name == "Total_Execution":
        name = "Node_" + name
    return name


def model_file_of(inputs: dict[str, Any]) -> str | None:
    """The model file a model source node names in its widgets, or None."""
    for key in MODEL_FILE_INPUTS:
        value = inputs.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def expert_from_file(file_name: str | None) -> str | None:
    """'high' / 'low' when a model file name says which Wan2.2 A14B expert it is, else None."""
    if not file_name:
        return None
    if _HIGH.search(file_name):
        return EXPERT_HIGH
    if _LOW.search(file_name):
        return EXPERT_LOW
    return None
