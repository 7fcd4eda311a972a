"""Socket type names and the small objects that travel between the pack's nodes.

Own types (`WAN22_DIT`, `WAN22_TEXT_ENCODER`, ...) keep the pack's objects from being wired into
core nodes that expect something else; `LATENT` and `IMAGE` are ComfyUI's own formats so core
nodes can be mixed in:

- `LATENT` is `{"samples": raw latents (1, z, T, h, w)}`; Wan Image To Video adds
  `"wan_condition"` (wan_core's `TI2VCondition` or `I2VCondition`). Core nodes ignore the extra key.
- `IMAGE` is (F, H, W, C) float in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..wan_core.config import DEFAULT_STORAGE, WanConfig
from ..wan_core.runtime.compact import resident_bytes
from ..wan_core.runtime.execution import ExecutionOptions

PROFILER = "WANBENCH_PROFILER"
DIT_EXPERTS = "WAN22_DIT"
TEXT_ENCODER = "WAN22_TEXT_ENCODER"
TEXT_EMBEDS = "WAN22_TEXT_EMBEDS"
VAE = "WAN22_VAE"
LATENT = "LATENT"
IMAGE = "IMAGE"
STRING = "STRING"

CATEGORY = "WanBench"

# Optional `profiler` input shared by every stage node.
PROFILER_INPUT: dict[str, Any] = {
    "profiler": (PROFILER, {"tooltip": "Wan Profiler session that records this node's stage (optional)."}),
}
# Hidden inputs ComfyUI fills in (the in-process runner fills them too): the node's own id.
HIDDEN_IDS: dict[str, str] = {"unique_id": "UNIQUE_ID"}


@dataclass(frozen=True)
class DiTExperts:
    """The DiT expert(s) of one task as loaded by Wan Model Loader (socket `WAN22_DIT`).

    `experts` is `(high_noise, low_noise)` for A14B tasks and `(model,)` for TI2V-5B.
    Immutable: ComfyUI caches it and several branches of a graph may share it. `storage` is how
    the experts' block matrices are kept (`config.WEIGHT_STORAGES`, applied at load); `execution`
    holds what is turned on only while sampling (TF32, regional compile: `runtime/execution.py`);
    `loras` are `wan_core.runtime.lora.ExpertLora` entries added by Wan LoRA nodes; `step_cache`
    (`wan_core.runtime.step_cache.StepCacheSettings`, set by Wan Step Cache; None = off) is read
    by the sampler. Execution options, LoRAs and the step cache act on the shared modules only
    while a sampler runs, so a bundle with them and the bundle it came from never affect each other.
    `device` is where the experts compute ("cuda" or "cpu"; None: where their weights are); with a
    GPU the loader keeps the weights in host memory and the sampler's memory plan moves them.
    """

    experts: tuple[Any, ...]
    task: WanConfig
    storage: str = DEFAULT_STORAGE
    execution: ExecutionOptions = ExecutionOptions()
    loras: tuple[Any, ...] = ()
    device: str | None = None
    step_cache: Any = None

    def with_lora(self, lora: Any) -> DiTExperts:
        """A new bundle with the same modules, options, device and LoRAs, and one more LoRA."""
        return replace(self, loras=(*self.loras, lora))

    def with_step_cache(self, settings: Any) -> DiTExperts:
        """A new bundle with the same modules, options, device and LoRAs, and these step-cache settings
        (None: off)."""
        return replace(self, step_cache=settings)

    def lora_descriptions(self) -> list[str]:
        """One line per LoRA (file, strength per expert, layout, matched keys) for the report."""
        names = ("high", "low") if self.task.is_moe else ("model",)
        return [lora.describe(names) for lora in self.loras]

    def resident_bytes(self) -> list[int]:
        """Bytes each expert holds now, compact weights at their stored size (for memory plans)."""
        return [resident_bytes(expert) for expert in self.experts]

    @property
    def attention(self) -> str:
        """The attention backend the experts were built with (reported in the profile)."""
        return self.experts[0].attention_backend


@dataclass(frozen=True)
class TextEmbeds:
    """Prompt and negative prompt embeddings (each a list of (L_i, dim) tensors, one per batch item)."""

    context: list[torch.Tensor]
    context_null: list[torch.Tensor]
    prompt: str
    negative: str
