"""ComfyUI node classes of the pack. Importing this never imports ComfyUI.

Node ids (the keys below) are stored in workflows and never change.
"""

from __future__ import annotations

from .images import WanTestImage
from .latents import WanEmptyLatent, WanImageToVideo
from .loaders import WanModelLoader, WanTextEncoderLoader, WanVAELoader
from .lora import WanLora
from .profiling import WanBenchmarkReport, WanProfiler
from .sampling import WanSampler
from .text import WanTextEncode
from .vae import WanVAEDecode
from .video import WanSaveVideo

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "WanBenchProfiler": WanProfiler,
    "WanBenchModelLoader": WanModelLoader,
    "WanBenchLora": WanLora,
    "WanBenchTextEncoderLoader": WanTextEncoderLoader,
    "WanBenchTextEncode": WanTextEncode,
    "WanBenchVAELoader": WanVAELoader,
    "WanBenchEmptyLatent": WanEmptyLatent,
    "WanBenchImageToVideo": WanImageToVideo,
    "WanBenchTestImage": WanTestImage,
    "WanBenchSampler": WanSampler,
    "WanBenchVAEDecode": WanVAEDecode,
    "WanBenchSaveVideo": WanSaveVideo,
    "WanBenchReport": WanBenchmarkReport,
}

NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "WanBenchProfiler": "Wan Profiler",
    "WanBenchModelLoader": "Wan Model Loader",
    "WanBenchLora": "Wan LoRA",
    "WanBenchTextEncoderLoader": "Wan Text Encoder Loader",
    "WanBenchTextEncode": "Wan Text Encode",
    "WanBenchVAELoader": "Wan VAE Loader",
    "WanBenchEmptyLatent": "Wan Empty Latent",
    "WanBenchImageToVideo": "Wan Image To Video",
    "WanBenchTestImage": "Wan Test Image",
    "WanBenchSampler": "Wan Sampler",
    "WanBenchVAEDecode": "Wan VAE Decode",
    "WanBenchSaveVideo": "Wan Save Video",
    "WanBenchReport": "Wan Benchmark Report",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
