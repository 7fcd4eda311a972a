"""ComfyUI node classes of the pack. Importing this never imports ComfyUI.

Node ids (the keys below) are stored in workflows and never change. Inside a running ComfyUI
server, importing this also registers the profiler's on-prompt hook (`prompt_rewrite.install`),
which inserts Wan Model Tap nodes into prompts that hold a Wan Profiler or Wan Benchmark Report.
"""

from __future__ import annotations

from .encoder_loaders import WanTextEncoderLoader, WanVAELoader
from .images import WanTestImage
from .latents import WanEmptyLatent, WanImageToVideo
from .loaders import WanModelLoader
from .lora import WanLora
from .model_tap import WanModelTap
from .profiling import WanBenchmarkReport, WanProfiler
from .prompt_rewrite import install as _install_prompt_hook
from .sampling import WanSampler
from .step_cache import WanStepCache
from .text import WanTextEncode
from .vae import WanVAEDecode
from .video import WanSaveVideo

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "WanBenchProfiler": WanProfiler,
    "WanBenchModelLoader": WanModelLoader,
    "WanBenchLora": WanLora,
    "WanBenchStepCache": WanStepCache,
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
    "WanBenchModelTap": WanModelTap,
}

NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "WanBenchProfiler": "Wan Profiler",
    "WanBenchModelLoader": "Wan Model Loader",
    "WanBenchLora": "Wan LoRA",
    "WanBenchStepCache": "Wan Step Cache",
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
    "WanBenchModelTap": "Wan Model Tap (internal)",
}

_install_prompt_hook()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
