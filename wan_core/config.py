"""Configuration of the Wan2.2 components, the three task presets, and every shared vocabulary.

Every value comes from the reference spec (`spec/WAN22_DIT_T5_SAMPLER.md` section 1 and
`spec/WAN_VAE.md` sections 1 and 6). Each preset has a `tiny()` twin with the same structure
(channel counts that other components depend on are kept) and sizes that run in seconds on a CPU.

The vocabularies that nodes, workflows, the CLI and the profiling report share are spelled here
once: solvers (and which get float timesteps), CFG modes, placements, tilings, weight dtypes, LoRA
key layouts and stage names (with their kinds); also the 4-step distilled recipe.
Attention backend names belong to the registry in `attention.py`.

Shapes: F pixel frames, T latent frames (F = 4(T-1)+1), H/W pixel size, h/w latent size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import NamedTuple

import torch

NUM_TRAIN_TIMESTEPS = 1000

# The shared negative prompt of the official configs (used when the negative prompt is empty).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
WAN22_LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

MODEL_TYPES = ("t2v", "i2v", "ti2v")


# --------------------------------------------------------------------------------------------
# DiT
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DiTConfig:
    """One Wan2.2 diffusion transformer (`WanModel`). Field names follow the official config.

    The official `qk_norm` and `cross_attn_norm` are True in every Wan2.2 model, so they are not
    fields: `WanDiT` always has the RMS norms of q and k and the affine cross-attention pre-norm.
    """

    model_type: str
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int
    dim: int
    ffn_dim: int
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int
    num_heads: int
    num_layers: int
    window_size: tuple[int, int] = (-1, -1)
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}; got {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head dim must be even and >= 6 for 3-D RoPE; got {self.head_dim}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even; got {self.freq_dim}")
        if tuple(self.window_size) != (-1, -1):
            raise ValueError("only global attention (window_size (-1, -1)) exists in Wan2.2")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Real channels of the head dim given to the (t, h, w) RoPE axes: (44, 42, 42) for 128."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    def token_grid(self, latent_thw: tuple[int, int, int]) -> tuple[int, int, int]:
        """(f, h, w) token grid for a latent of (T, h, w)."""
        t, h, w = latent_thw
        pt, ph, pw = self.patch_size
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent (T, h, w) = {latent_thw} is not divisible by patch {self.patch_size}")
        return t // pt, h // ph, w // pw

    def num_tokens(self, latent_thw: tuple[int, int, int]) -> int:
        f, h, w = self.token_grid(latent_thw)
        return f * h * w

    def num_params(self) -> int:
        """Parameter count from the module definitions (spec section 3.10)."""
        d, fd = self.dim, self.ffn_dim
        p = math.prod(self.patch_size)
        count = d * self.in_dim * p + d  # patch embedding
        count += self.text_dim * d + d + d * d + d  # text embedding
        count += self.freq_dim * d + d + d * d + d  # time embedding
        count += d * 6 * d + 6 * d  # time projection
        block = 6 * d  # modulation
        block += 4 * (d * d + d) + 2 * d  # self attention + qk norms
        block += 2 * d  # norm3
        block += 4 * (d * d + d) + 2 * d  # cross attention + qk norms
        block += d * fd + fd + fd * d + d  # ffn
        count += self.num_layers * block
        count += 2 * d + d * self.out_dim * p + self.out_dim * p  # head
        return count

    def flops_forward(self, num_tokens: int, *, batch: int = 1, per_token_time: bool = False,
                      num_text_rows: int | None = None) -> float:
        """Analytic FLOPs (multiply-add = 2) of one forward with `num_tokens` video tokens per sample.

        Spec section 8: the text side always has `text_len` rows (no text masking). With
        `per_token_time` the time MLP is counted per token, as the official code runs it.
        `num_text_rows` counts fewer text rows (text MLP, k/v projections, cross-attention): the
        work actually done when the zero padding rows are compacted (`dit.compact_text_keys`).
        """
        L, D, Fd = num_tokens, self.dim, self.ffn_dim
        S = self.text_len if num_text_rows is None else num_text_rows
        block = 12 * L * D * D + 4 * S * D * D + 4 * L * L * D + 4 * L * S * D + 4 * L * D * Fd
        p = math.prod(self.patch_size)
        patch = 2 * L * (p * self.in_dim) * D
        text = 2 * S * (self.text_dim * D + D * D)
        time_rows = L if per_token_time else 1
        time = 2 * time_rows * (self.freq_dim * D + 7 * D * D)
        head = 2 * L * D * (p * self.out_dim)
        return float(batch * (self.num_layers * block + patch + text + time + head))

    def tiny(self) -> DiTConfig:
        """Same task and channels, 2 layers of width 64 (4 heads of 16)."""
        return replace(self, dim=64, ffn_dim=128, freq_dim=32, text_dim=UMT5_XXL.tiny().dim,
                       num_heads=4, num_layers=2)


# --------------------------------------------------------------------------------------------
# UMT5 text encoder
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class UMT5Config:
    """UMT5-XXL encoder (spec section 4.1)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    shared_pos: bool = False
    eps: float = 1e-6
    text_len: int = 512

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn ({self.dim_attn}) must be divisible by num_heads ({self.num_heads})")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    def flops_forward(self, num_tokens: int, *, batch: int = 1) -> float:
        """Matmul FLOPs of one encoder pass over `num_tokens` positions."""
        L, D, A, Fd = num_tokens, self.dim, self.dim_attn, self.dim_ffn
        layer = 2 * L * D * A * 4 + 4 * L * L * A + 2 * L * D * Fd * 3
        return float(batch * self.num_layers * layer)

    def tiny(self) -> UMT5Config:
        return replace(self, vocab_size=1024, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2)


UMT5_XXL = UMT5Config()


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """Wan2.1 (z 16, stride 4x8x8) or Wan2.2 (z 48, stride 4x16x16, 2x2 patchify) video VAE."""

    variant: str  # "wan2.1" | "wan2.2"
    dim: int
    dec_dim: int
    z_dim: int
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    patch_size: int = 1
    latents_mean: tuple[float, ...] = field(default=(), repr=False)
    latents_std: tuple[float, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.variant not in ("wan2.1", "wan2.2"):
            raise ValueError(f"VAE variant must be 'wan2.1' or 'wan2.2'; got {self.variant!r}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1 (Wan VAEs use 2); got {self.num_res_blocks}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/std need {self.z_dim} values each")

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size

    @property
    def stride(self) -> tuple[int, int, int]:
        return self.temporal_stride, self.spatial_stride, self.spatial_stride

    def latent_frames(self, num_frames: int) -> int:
        return 1 + (num_frames - 1) // self.temporal_stride

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + self.temporal_stride * (latent_frames - 1)

    def tiny(self) -> VAEConfig:
        if self.variant == "wan2.1":
            return replace(self, dim=8, dec_dim=8)
        return replace(self, dim=8, dec_dim=12)


WAN21_VAE = VAEConfig(variant="wan2.1", dim=96, dec_dim=96, z_dim=16, patch_size=1,
                      latents_mean=WAN21_LATENT_MEAN, latents_std=WAN21_LATENT_STD)
WAN22_VAE = VAEConfig(variant="wan2.2", dim=160, dec_dim=256, z_dim=48, patch_size=2,
                      latents_mean=WAN22_LATENT_MEAN, latents_std=WAN22_LATENT_STD)


# --------------------------------------------------------------------------------------------
# Vocabularies (the values nodes, workflows and the CLI store: never renamed without an alias)
# --------------------------------------------------------------------------------------------
DISTILL_SOLVER = "euler_distill"  # Euler over the step-distilled schedule (docs/sampler.md)
SOLVERS = ("unipc", "dpm++", "euler", DISTILL_SOLVER)
# Solvers whose model timesteps are the float sigma * 1000 (the others truncate to integers, as the
# official code does). The distilled recipes feed t = 937.5, 833.33..., the values they were trained on.
FLOAT_TIMESTEP_SOLVERS = (DISTILL_SOLVER,)
BATCHED_CFG = "batched"  # cond and uncond as one forward of batch 2
SEQUENTIAL_CFG = "sequential"  # cond and uncond as two forwards of batch 1
CFG_MODES = (BATCHED_CFG, SEQUENTIAL_CFG)
CFG_OFF = "off"  # what a step reports when its guidance scale is 1: the conditional pass alone
CFG_MIXED = "mixed"  # a step observed from outside that ran some evaluations batched, some not
# Expert names a step reports: the two A14B experts, and the single model of TI2V-5B.
EXPERT_HIGH, EXPERT_LOW, EXPERT_SINGLE = "high", "low", "model"
AUTO_PLACEMENT = "auto"  # the memory planner picks none / model / blocks (runtime/planner.py)
PLACEMENTS = (AUTO_PLACEMENT, "none", "model", "blocks")  # where DiT weights live while sampling (placement.py)
# Parallel runs (runtime/distributed.py): how the ranks share each denoising step. "cfg" puts the
# conditional and unconditional passes on two ranks; "ulysses" splits the video tokens across the
# ranks (all-to-all around self-attention); "cfg+ulysses" does both (2 x k ranks).
NO_PARALLEL = "none"
CFG_PARALLEL = "cfg"
ULYSSES_PARALLEL = "ulysses"
CFG_ULYSSES_PARALLEL = "cfg+ulysses"
PARALLEL_MODES = (NO_PARALLEL, CFG_PARALLEL, ULYSSES_PARALLEL, CFG_ULYSSES_PARALLEL)
# Collectives of a parallel step, by what they do (the communication event's facts name them).
COMM_ALL_TO_ALL = "all_to_all"  # Ulysses: tokens <-> heads around self-attention
COMM_GATHER = "all_gather"  # Ulysses: the rows of the head output
COMM_CFG_COMBINE = "cfg_combine"  # CFG-parallel: cond and uncond predictions meet
COMM_WEIGHTS = "weight_gather"  # sharded weights: FSDP gathers a block's weights before it runs
COMM_KINDS = (COMM_ALL_TO_ALL, COMM_GATHER, COMM_CFG_COMBINE, COMM_WEIGHTS)
PARALLEL_PLAN_EVENT = "parallel_plan"  # once per sampling run: rank, world size, plan, run group
COMMUNICATION_EVENT = "communication"  # once per denoising step: seconds and bytes per kind
NO_TILING = "none"
AUTO_TILING = "auto"
TILINGS = (NO_TILING, AUTO_TILING)  # VAE decode tiling by name (a VAETiling object for the rest); in the
# pipeline's decode stage `auto` is the memory planner's choice (whole frames when they fit)
# Key layouts of LoRA files (`checkpoints/lora.py`), named after the key prefix they use:
# kohya `lora_unet_blocks_0_self_attn_q.*`; comfy `diffusion_model.blocks.0.self_attn.q.*`;
# diffusers `transformer.blocks.0.attn1.to_q.*`; peft `base_model.model.blocks.0.self_attn.q.*`;
# bare `blocks.0.self_attn.q.*` (no prefix).
LORA_LAYOUTS = ("kohya", "comfy", "diffusers", "peft", "bare")
# Step caching (`runtime/step_cache.py`): reuse the previous guided prediction for a step whose input
# is judged close enough to the last computed one. "off" is no cache (the default).
STEP_CACHE_OFF = "off"
TEACACHE = "teacache"  # accumulated relative change of the time modulation, polynomial-rescaled
MAGCACHE = "magcache"  # accumulated error of calibrated magnitude ratios
STEP_CACHE_MODES = (STEP_CACHE_OFF, TEACACHE, MAGCACHE)
STEP_CACHE_EXPERTS = ("all", "high", "low")  # which experts may reuse steps (TI2V-5B: its one model)
CALIBRATION_AUTO = "auto"  # the published calibration for the task, or none where none exists
# What a step-inference stage records about the cache (fact names and values; the report reads them).
STEP_CACHE_FACT = "step_cache"  # "computed" or "reused"
STEP_CACHE_REASON_FACT = "step_cache_reason"  # why a step was computed (STEP_CACHE_REASONS)
STEP_COMPUTED = "computed"
STEP_REUSED = "reused"
STEP_CACHE_REASONS = ("warm-up", "last step", "max skip", "change", "expert excluded", "threshold 0")
# File suffixes read as safetensors: ComfyUI lists `.sft` files next to `.safetensors` ones in its
# model dropdowns and reads them the same way (compared in lower case).
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")

# Weight dtypes by torch's names (what workflows store); the short names are accepted aliases.
WEIGHT_DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
})
WEIGHT_DTYPE_ALIASES: Mapping[str, str] = MappingProxyType({
    "bf16": "bfloat16", "fp16": "float16", "fp32": "float32",
})
HALF_DTYPES = (torch.float16, torch.bfloat16)

# How the transformer blocks' matrices are kept in memory (`runtime/compact.py`; the loaders'
# `weight_dtype`). `default`: in the compute dtype (fp8 files dequantised at load; GGUF files kept).
DEFAULT_STORAGE = "default"
STORED_STORAGE = "as_stored"  # as the file stores them: fp8 + scale, GGUF blocks, bf16 / fp16
FP8_STORAGE = "fp8_e4m3fn"  # cast to fp8 e4m3fn without a scale (as ComfyUI's weight_dtype fp8_e4m3fn)
SCALED_FP8_STORAGE = "fp8_e4m3fn_scaled"  # fp8 e4m3fn with a per-tensor scale (absmax / 448)
FP8_MATMUL_STORAGE = "fp8_e4m3fn_scaled_mm"  # scaled fp8, matmuls as fp8 x fp8 (`runtime/fp8_matmul.py`)
FP8_STORAGES = (FP8_STORAGE, SCALED_FP8_STORAGE, FP8_MATMUL_STORAGE)
WEIGHT_STORAGES = (DEFAULT_STORAGE, STORED_STORAGE, *FP8_STORAGES, "bfloat16", "float16")
FP8_ACTIVATION_SCALINGS = ("row", "tensor")  # how the fp8 matmul path scales its activations

# Execution options applied while sampling (`runtime/execution.py`).
COMPILE_OFF = "off"
COMPILE_CHOICES = (COMPILE_OFF, "default", "max-autotune-no-cudagraphs")  # regional torch.compile modes

# Trace event names (the report reads them).
ATTENTION_CHOICE_EVENT = "attention_choice"  # `auto` attention: the kernel measured fastest for a shape
RECOMPILE_EVENT = "Recompile"  # torch.compile recompiled a region after its warm-up
COMPILE_SUMMARY_EVENT = "compile_summary"  # a compiled run's compile time, compiles and recompiles


def weight_dtype(name: str) -> torch.dtype:
    """A weight dtype by name: 'bfloat16' | 'float16' | 'float32', or 'bf16' | 'fp16' | 'fp32'."""
    dtype = WEIGHT_DTYPES.get(WEIGHT_DTYPE_ALIASES.get(name, name))
    if dtype is None:
        raise ValueError(f"weight dtype must be one of {list(WEIGHT_DTYPES)} (or {list(WEIGHT_DTYPE_ALIASES)}); "
                         f"got {name!r}")
    return dtype


class Stage(NamedTuple):
    """A profiling stage: its name in the report and its kind (`trace.STAGE_KINDS`)."""

    name: str
    kind: str


MODEL_INIT_STAGE = Stage("Model_Initialization", "init")  # joins the loaders' pieces below
DIT_INIT_STAGE = Stage("DiT_Initialization", "init")
TEXT_ENCODER_INIT_STAGE = Stage("Text_Encoder_Initialization", "init")
VAE_INIT_STAGE = Stage("VAE_Initialization", "init")
LORA_INIT_STAGE = Stage("LoRA_Initialization", "init")  # reading a LoRA file (Wan LoRA node, core LoRA loaders)
CLIP_VISION_INIT_STAGE = Stage("CLIP_Vision_Initialization", "init")
COMPILE_STAGE = Stage("Compile", "init")
PREPROCESS_STAGE = Stage("TI2V_Preprocess", "preprocess")
VAE_ENCODE_STAGE = Stage("VAE_Encoding", "preprocess")
T5_ENCODE_STAGE = Stage("T5_Encoding", "encode")
VAE_DECODE_STAGE = Stage("VAE_Decoding", "decode")


def step_stages(index: int) -> tuple[Stage, Stage]:
    """The two stages of denoising step `index`: moving weights into place, then the step itself."""
    return Stage(f"Step_{index}_Loading", "step-loading"), Stage(f"Step_{index}_Inference", "step-inference")


def sampling_stages(num_steps: int, *, first: int = 0) -> list[Stage]:
    """Every stage one sampling run of steps `first` .. `num_steps - 1` records, in order."""
    return [stage for i in range(first, num_steps) for stage in step_stages(i)]


# --------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class GuideScale:
    """The classifier-free guidance scale of each expert, by name (no order to remember).

    The official configs write `sample_guide_scale = (low, high)`, the reverse of the expert order
    [high_noise, low_noise]; `from_official` and `official` convert. A single-model task (no
    boundary) runs its one model with `low`; its presets give both experts the same scale.
    """

    high: float
    low: float

    def __post_init__(self) -> None:
        for name in ("high", "low"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"guide_scale must be finite numbers; got {name}={value!r}")
            object.__setattr__(self, name, float(value))

    @classmethod
    def same(cls, scale: float) -> GuideScale:
        """One scale for both experts (and for a single model)."""
        return cls(high=scale, low=scale)

    @classmethod
    def from_official(cls, low_high: Sequence[float]) -> GuideScale:
        """From the official `(low, high)` pair."""
        low, high = low_high
        return cls(high=high, low=low)

    def official(self) -> tuple[float, float]:
        """The official `(low, high)` pair."""
        return self.low, self.high

    def for_expert(self, expert: str) -> float:
        """The scale of expert 'high' or 'low'; 'model' (a single-model task) uses `low`."""
        return self.high if expert == "high" else self.low


@dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    """Defaults of the denoising loop (spec sections 1, 5, 6). `boundary` is None for single-model
    tasks."""

    solver: str = "unipc"
    steps: int
    shift: float
    guide_scale: GuideScale
    boundary: float | None = None
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}; got {self.solver!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1; got {self.steps}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0; got {self.shift}")
        if self.boundary is not None and not 0.0 < self.boundary < 1.0:
            raise ValueError(f"boundary must lie in (0, 1); got {self.boundary}")
        if not isinstance(self.guide_scale, GuideScale):
            raise TypeError(f"guide_scale must be a GuideScale(high=..., low=...); got {self.guide_scale!r}")

    @property
    def boundary_timestep(self) -> float | None:
        return None if self.boundary is None else self.boundary * self.num_train_timesteps


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class WanConfig:
    """One Wan2.2 task: its DiT(s), text encoder, VAE and sampling defaults."""

    name: str
    dit: DiTConfig
    t5: UMT5Config
    vae: VAEConfig
    sampler: SamplerConfig
    num_experts: int
    frame_num: int
    fps: int
    sizes: tuple[tuple[int, int], ...]  # (width, height)
    default_size: tuple[int, int]  # (width, height)
    expert_names: tuple[str, ...] = ("high_noise_model", "low_noise_model")

    def __post_init__(self) -> None:
        if self.dit.in_dim not in (self.vae.z_dim, 2 * self.vae.z_dim + 4):
            raise ValueError(f"DiT in_dim {self.dit.in_dim} does not fit VAE z_dim {self.vae.z_dim}")
        if self.dit.text_dim != self.t5.dim:
            raise ValueError(f"DiT text_dim {self.dit.text_dim} != text encoder dim {self.t5.dim}")
        if self.num_experts not in (1, 2) or (self.num_experts == 2) != (self.sampler.boundary is not None):
            raise ValueError("two-expert tasks need a boundary; single-model tasks must not have one")

    @property
    def is_moe(self) -> bool:
        return self.num_experts == 2

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be multiples of this (VAE stride times the DiT patch)."""
        return self.vae.spatial_stride * self.dit.patch_size[1]

    def validate_video(self, width: int, height: int, num_frames: int) -> None:
        m, ts = self.size_multiple, self.vae.temporal_stride
        if width <= 0 or height <= 0 or width % m or height % m:
            near_w, near_h = max(m, round(width / m) * m), max(m, round(height / m) * m)
            raise ValueError(f"{self.name}: width and height must be positive multiples of {m}; "
                             f"got {width}x{height}; the nearest valid size is {near_w}x{near_h} "
                             f"(default {self.default_size[0]}x{self.default_size[1]})")
        if num_frames < 1 or (num_frames - 1) % ts:
            raise ValueError(f"{self.name}: num_frames must be {ts}k+1 (e.g. {self.frame_num}); got {num_frames}")

    def latent_shape(self, width: int, height: int, num_frames: int) -> tuple[int, int, int, int]:
        """(C, T, h, w) of the noise latent for a (width, height, frames) video."""
        self.validate_video(width, height, num_frames)
        s = self.vae.spatial_stride
        return self.dit.out_dim, self.vae.latent_frames(num_frames), height // s, width // s

    def num_tokens(self, width: int, height: int, num_frames: int) -> int:
        _, t, h, w = self.latent_shape(width, height, num_frames)
        return self.dit.num_tokens((t, h, w))

    def flops_forward(self, width: int, height: int, num_frames: int, *, batch: int = 1) -> float:
        return self.dit.flops_forward(self.num_tokens(width, height, num_frames), batch=batch)

    def flops_per_step(self, width: int, height: int, num_frames: int, *, use_cfg: bool = True) -> float:
        return self.flops_forward(width, height, num_frames, batch=2 if use_cfg else 1)

    def tiny(self) -> WanConfig:
        """A CPU-sized twin: tiny DiT/UMT5/VAE, 17 frames at a small size, 4 steps."""
        vae = self.vae.tiny()
        m = self.size_multiple
        return replace(
            self,
            name=self.name + "-tiny",
            dit=self.dit.tiny(),
            t5=self.t5.tiny(),
            vae=vae,
            sampler=replace(self.sampler, steps=4),
            frame_num=17,
            sizes=((4 * m, 3 * m), (3 * m, 4 * m)),
            default_size=(4 * m, 3 * m),
        )


T2V_A14B = WanConfig(
    name="t2v-A14B",
    dit=DiTConfig(model_type="t2v", in_dim=16, dim=5120, ffn_dim=13824, out_dim=16, num_heads=40, num_layers=40),
    t5=UMT5_XXL,
    vae=WAN21_VAE,
    sampler=SamplerConfig(steps=40, shift=12.0, guide_scale=GuideScale(high=4.0, low=3.0), boundary=0.875),
    num_experts=2,
    frame_num=81,
    fps=16,
    sizes=((1280, 720), (720, 1280), (832, 480), (480, 832)),
    default_size=(1280, 720),
)
I2V_A14B = WanConfig(
    name="i2v-A14B",
    dit=DiTConfig(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, out_dim=16, num_heads=40, num_layers=40),
    t5=UMT5_XXL,
    vae=WAN21_VAE,
    sampler=SamplerConfig(steps=40, shift=5.0, guide_scale=GuideScale.same(3.5), boundary=0.900),
    num_experts=2,
    frame_num=81,
    fps=16,
    sizes=((1280, 720), (720, 1280), (832, 480), (480, 832)),
    default_size=(1280, 720),
)
TI2V_5B = WanConfig(
    name="ti2v-5B",
    dit=DiTConfig(model_type="ti2v", in_dim=48, dim=3072, ffn_dim=14336, out_dim=48, num_heads=24, num_layers=30),
    t5=UMT5_XXL,
    vae=WAN22_VAE,
    sampler=SamplerConfig(steps=50, shift=5.0, guide_scale=GuideScale.same(5.0), boundary=None),
    num_experts=1,
    frame_num=121,
    fps=24,
    sizes=((1280, 704), (704, 1280)),
    default_size=(1280, 704),
    expert_names=("model",),
)

# The few-step recipe of the Wan2.2-Lightning / LightX2V 4-step distill LoRAs (docs/sampler.md):
# 4 steps at shift 5 (sigmas 1, 0.9375, 0.8333, 0.625, 0), Euler, guidance 1 (no uncond pass) for both
# experts, the expert switch at the task's boundary (both split the 4 steps 2 + 2).
DISTILL_STEPS = 4
DISTILL_SHIFT = 5.0


def distilled_sampler(task: WanConfig) -> SamplerConfig:
    """The task's sampler settings for the 4-step distilled recipe (boundary kept from the task)."""
    return replace(task.sampler, solver=DISTILL_SOLVER, steps=DISTILL_STEPS, shift=DISTILL_SHIFT,
                   guide_scale=GuideScale.same(1.0))


PRESETS: dict[str, WanConfig] = {c.name: c for c in (T2V_A14B, I2V_A14B, TI2V_5B)}
TASK_BY_MODEL_TYPE: dict[str, WanConfig] = {c.dit.model_type: c for c in (T2V_A14B, I2V_A14B, TI2V_5B)}


def preset(name: str, *, tiny: bool = False) -> WanConfig:
    """Look a task preset up by name ('t2v-A14B', 'i2v-A14B', 'ti2v-5B') or model type."""
    cfg = PRESETS.get(name) or TASK_BY_MODEL_TYPE.get(name)
    if cfg is None:
        raise ValueError(f"unknown Wan2.2 task {name!r}; expected one of {sorted(PRESETS)}")
    return cfg.tiny() if tiny else cfg
