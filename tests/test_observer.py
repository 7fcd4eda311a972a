"""The workflow observer without ComfyUI: stage mapping, the prompt observation fed with node and
sampler events (fake clock), step numbering, cached nodes, progress-timed steps, the model tap's
FLOP count and the on-prompt graph rewrite."""

from __future__ import annotations

import json
import time
import types

import pytest
import torch
from wanbench.nodes import NODE_CLASS_MAPPINGS
from wanbench.nodes import observed_stages as roles
from wanbench.nodes.model_tap import dit_config_of, forward_flops
from wanbench.nodes.observation import PromptObservation
from wanbench.nodes.observed_graph import NodeMemory, PromptGraph
from wanbench.nodes.observed_sampling import ModelLabel, RunSpan, StepNumbering, _Eval, cfg_mode_of
from wanbench.nodes.prompt_rewrite import TAP_CLASS, insert_model_taps, model_output_slots, on_prompt
from wanbench.profiling import (
    FakeClock,
    FakeDevice,
    FakeHost,
    FakeNvml,
    ProfileSession,
    check_report,
    write_report,
)
from wanbench.wan_core.config import BATCHED_CFG, CFG_MIXED, CFG_OFF, SEQUENTIAL_CFG, DiTConfig


# ------------------------------------------------------------------------------------------------
# Stage mapping
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("class_type", "role", "stage"),
    [
        ("UNETLoader", roles.LOADER, "DiT_Initialization"),
        ("CLIPLoader", roles.LOADER, "Text_Encoder_Initialization"),
        ("VAELoader", roles.LOADER, "VAE_Initialization"),
        ("LoraLoaderModelOnly", roles.LOADER, "LoRA_Initialization"),
        ("WanVideoModelLoader", roles.LOADER, "DiT_Initialization"),
        ("CLIPTextEncode", roles.STAGE, "T5_Encoding"),
        ("WanVideoTextEncode", roles.STAGE, "T5_Encoding"),
        ("Wan22ImageToVideoLatent", roles.STAGE, "TI2V_Preprocess"),
        ("WanImageToVideo", roles.STAGE, "TI2V_Preprocess"),
        ("EmptyHunyuanLatentVideo", roles.STAGE, "TI2V_Preprocess"),
        ("VAEDecode", roles.STAGE, "VAE_Decoding"),
        ("VAEDecodeTiled", roles.STAGE, "VAE_Decoding"),
        ("WanVideoDecode", roles.STAGE, "VAE_Decoding"),
        ("WanVideoEmptyEmbeds", roles.STAGE, "TI2V_Preprocess"),
        ("WanVideoImageClipEncode", roles.STAGE, "TI2V_Preprocess"),
        ("LoadWanVideoT5TextEncoder", roles.LOADER, "Text_Encoder_Initialization"),
        ("WanVideoVAELoader", roles.LOADER, "VAE_Initialization"),
        ("KSampler", roles.SAMPLER, None),
        ("KSamplerAdvanced", roles.SAMPLER, None),
        ("SamplerCustomAdvanced", roles.SAMPLER, None),
        ("WanVideoSampler", roles.PROGRESS_SAMPLER, None),
        ("WanBenchProfiler", roles.APPARATUS, None),
        ("WanBenchModelTap", roles.APPARATUS, None),
        ("ModelSamplingSD3", roles.OTHER, "ModelSamplingSD3"),
        ("CR Apply LoRA | Stack (x)", roles.OTHER, "CR_Apply_LoRA_Stack_x"),
        ("Unknown", roles.OTHER, "Node_Unknown"),
        ("3D Thing", roles.OTHER, "Node_3D_Thing"),
    ],
)
def test_roles_of_node_classes(class_type: str, role: str, stage: str | None) -> None:
    found = roles.role_of(class_type)
    assert found.role == role
    assert (found.stage.name if found.stage else None) == stage
    if role == roles.OTHER:
        assert found.stage.kind == "other"


def test_pack_stage_nodes_record_their_own_stages() -> None:
    own = {k for k, cls in NODE_CLASS_MAPPINGS.items() if roles.role_of(k, cls).role == roles.SELF}
    assert own == {
        "WanBenchModelLoader",
        "WanBenchLora",
        "WanBenchTextEncoderLoader",
        "WanBenchVAELoader",
        "WanBenchTextEncode",
        "WanBenchEmptyLatent",
        "WanBenchImageToVideo",
        "WanBenchSampler",
        "WanBenchVAEDecode",
    }
    assert roles.role_of("WanBenchSaveVideo", NODE_CLASS_MAPPINGS["WanBenchSaveVideo"]).role == roles.OTHER


def test_expert_from_the_file_name() -> None:
    assert roles.expert_from_file("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors") == "high"
    assert roles.expert_from_file("Wan2_2-T2V-A14B-LOW-Noise.gguf") == "low"
    assert roles.expert_from_file("wan2.2_ti2v_5B_fp16.safetensors") is None
    assert roles.model_file_of({"unet_name": "a.safetensors", "weight_dtype": "default"}) == "a.safetensors"


# ------------------------------------------------------------------------------------------------
# CFG mode and step numbering
# ------------------------------------------------------------------------------------------------
def test_cfg_mode_from_model_calls() -> None:
    assert cfg_mode_of([]) is None
    assert cfg_mode_of([_Eval(has_uncond=True, calls=[(1, 0)])]) == BATCHED_CFG
    assert cfg_mode_of([_Eval(has_uncond=True, calls=[(0,), (1,)])]) == SEQUENTIAL_CFG
    assert cfg_mode_of([_Eval(has_uncond=False, calls=[(0,)])]) == CFG_OFF
    mixed = [_Eval(has_uncond=True, calls=[(0, 1)]), _Eval(has_uncond=True, calls=[(0,), (1,)])]
    assert cfg_mode_of(mixed) == CFG_MIXED


def test_step_numbering_follows_sigma_continuity() -> None:
    numbering = StepNumbering()
    assert numbering.place("10", 1.0, starts_schedule=True, earlier=[]) == (0, None)
    numbering.add(RunSpan("10", 0, 2, 1.0, 0.8))
    assert numbering.place("11", 0.8, starts_schedule=False, earlier=[]) == (2, None)
    numbering.add(RunSpan("11", 2, 2, 0.8, 0.0))
    offset, note = numbering.place("20", 1.0, starts_schedule=True, earlier=[])
    assert offset == 4 and "numbered after the 4 steps" in note
    # a run that continues a sampler served from the cache (remembered from an earlier prompt)
    fresh = StepNumbering()
    assert fresh.place("11", 0.8, starts_schedule=False, earlier=[RunSpan("10", 0, 2, 1.0, 0.8)]) == (2, None)
    offset, note = StepNumbering().place("5", 0.6, starts_schedule=False, earlier=[])
    assert offset == 0 and "start inside a schedule" in note


# ------------------------------------------------------------------------------------------------
# A prompt observed from node and sampler events (fake clock)
# ------------------------------------------------------------------------------------------------
NATIVE = {
    "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "x_high_noise.safetensors"}},
    "2": {"class_type": "UNETLoader", "inputs": {"unet_name": "x_low_noise.safetensors"}},
    "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5.safetensors"}},
    "4": {"class_type": "VAELoader", "inputs": {"vae_name": "vae.safetensors"}},
    "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["3", 0]}},
    "6": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 48, "length": 9, "batch_size": 1}},
    "7": {"class_type": "ModelSamplingSD3", "inputs": {"shift": 8.0, "model": ["1", 0]}},
    "8": {"class_type": "ModelSamplingSD3", "inputs": {"shift": 8.0, "model": ["2", 0]}},
    "10": {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            "noise_seed": 3,
            "sampler_name": "euler",
            "scheduler": "simple",
            "model": ["7", 0],
            "positive": ["5", 0],
            "latent_image": ["6", 0],
        },
    },
    "11": {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            "noise_seed": 0,
            "sampler_name": "euler",
            "scheduler": "simple",
            "model": ["8", 0],
            "positive": ["5", 0],
            "latent_image": ["10", 0],
        },
    },
    "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["4", 0]}},
    "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0]}},
    "90": {"class_type": "WanBenchProfiler", "inputs": {"case_name": "native", "sample_interval_ms": 100}},
}
SIGMAS = [1.0, 0.9, 0.7, 0.4, 0.0]
FORWARD = 1.0e9


def _observation(memory: NodeMemory, prompt: dict = NATIVE) -> tuple[PromptObservation, FakeClock]:
    clock = FakeClock()
    session = ProfileSession(
        case_name="native", sample_interval_s=None, clock=clock, device_probe=FakeDevice(), host=FakeHost()
    )
    session.open()
    return PromptObservation(prompt_id="p", session=session, graph=PromptGraph(prompt), memory=memory), clock


def _node(obs: PromptObservation, clock: FakeClock, node_id: str, seconds: float) -> None:
    obs.node_started(node_id)
    clock.advance(seconds)
    obs.node_finished(node_id)
    clock.advance(0.01)  # ComfyUI between nodes


def _sampler(
    obs: PromptObservation,
    clock: FakeClock,
    node_id: str,
    expert: str,
    sigmas: list[float],
    *,
    batched: bool = True,
    first_step: float = 0.5,
    step: float = 0.25,
) -> None:
    obs.node_started(node_id)
    clock.advance(0.02)
    run = obs.begin_sampler_run(
        node_id,
        ModelLabel(node_id, f"x_{expert}_noise.safetensors", expert),
        sigmas,
        cfg=3.5,
        sigma_max=1.0,
        latent_shape=(1, 16, 3, 6, 8),
        dtype="float16",
    )
    frame = run.begin_loading()
    clock.advance(0.1)
    run.end_loading(frame, None)
    for i in range(len(sigmas) - 1):
        run.model_evaluation()
        run.cond_batch(has_uncond=True)
        for call in ([1, 0],) if batched else ([0], [1]):
            run.model_call(call)
            run.forward(FORWARD * len(call), None)
        clock.advance(first_step if i == 0 else step)
        run.step_done(i)
        clock.advance(0.005)  # the latent preview in the callback
    obs.end_sampler_run(run, None)
    obs.node_finished(node_id)
    clock.advance(0.01)


def _run_native(memory: NodeMemory, *, cached: set[str] = frozenset()) -> tuple:
    obs, clock = _observation(memory)
    obs.seed({"90": "running"})
    for node_id, seconds in (("4", 0.3), ("3", 0.4), ("5", 0.2), ("6", 0.01), ("1", 0.5), ("7", 0.001)):
        if node_id not in cached:
            _node(obs, clock, node_id, seconds)
    if "10" not in cached:
        _sampler(obs, clock, "10", "high", SIGMAS[:3])
    for node_id, seconds in (("2", 0.5), ("8", 0.001)):
        _node(obs, clock, node_id, seconds)
    _sampler(obs, clock, "11", "low", SIGMAS[2:], batched=False)
    _node(obs, clock, "12", 0.3)
    _node(obs, clock, "13", 0.05)
    return obs, obs.finish()


def test_native_prompt_stages_experts_cfg_and_flops(tmp_path) -> None:
    obs, record = _run_native(NodeMemory())
    top = [s.name for s in record.top_level]
    assert top == [
        "Model_Initialization",
        "T5_Encoding",
        "TI2V_Preprocess",
        "Model_Initialization",
        "ModelSamplingSD3",
        "Step_0_Loading",
        "Step_0_Inference",
        "Step_1_Inference",
        "Model_Initialization",
        "ModelSamplingSD3",
        "Step_2_Loading",
        "Step_2_Inference",
        "Step_3_Inference",
        "VAE_Decoding",
        "SaveImage",
    ]
    # the three loaders before the encoder are one Model_Initialization with a child per loader
    children = [s.name for s in record.stages if s.parent == record.top_level[0].index]
    assert children == ["VAE_Initialization", "Text_Encoder_Initialization"]
    steps = {s.step: s for s in record.stages if s.kind == "step-inference"}
    assert [steps[i].expert for i in range(4)] == ["high", "high", "low", "low"]
    assert [steps[i].cfg_mode for i in range(4)] == ["batched", "batched", "sequential", "sequential"]
    assert all(steps[i].flops == pytest.approx(2 * FORWARD) for i in range(4))
    assert steps[0].duration_s == pytest.approx(0.5) and steps[1].duration_s == pytest.approx(0.25)
    assert steps[2].facts["sampler_node"] == "11" and steps[2].facts["local_step"] == 0
    context = record.context
    assert (context.steps, context.width, context.height, context.frames) == (4, 64, 48, 9)
    assert (context.solver, context.seed, context.dit_dtype) == ("euler/simple", 3, "float16")
    assert record.status == "completed"
    inside_sampler = [o for o in record.outside if o.after == "ModelSamplingSD3" and o.before == "Step_0_Loading"]
    assert [o.in_node for o in inside_sampler] == [False, True]  # ComfyUI between nodes, then the sampler node
    written = write_report(record, tmp_path, basename="native")
    assert check_report(written.json) == []
    md = written.markdown.read_text(encoding="utf-8")
    assert "Step_0_Inference [high]" in md and "Unknown" not in md


def test_cached_nodes_carry_the_time_they_took_and_step_numbers_continue() -> None:
    memory = NodeMemory()
    _, first = _run_native(memory)
    measured = {s.name: s.duration_s for s in first.stages if s.name in ("T5_Encoding", "TI2V_Preprocess")}
    # Second prompt: ComfyUI serves the encoder, latent, high loader and the high sampler from its cache.
    obs, second = _run_native(memory, cached={"3", "5", "6", "1", "7", "10"})
    cached = {s.name: s for s in second.stages if s.cached}
    assert {"T5_Encoding", "TI2V_Preprocess", "DiT_Initialization", "Step_0_Inference", "Step_1_Inference"} <= set(
        cached
    )
    assert cached["T5_Encoding"].facts["measured_s"] == pytest.approx(measured["T5_Encoding"])
    live = sorted(s.step for s in second.stages if s.kind == "step-inference" and not s.cached)
    assert live == [2, 3]  # the low sampler continues after the cached high one
    assert second.context.steps == 4
    assert check_report({"schema": "wanbench.report/1", "runs": [_doc(second)]}) == []


def _doc(record) -> dict:
    from wanbench.profiling import run_document

    return json.loads(json.dumps(run_document(record)))


def test_a_node_started_again_is_timed_from_its_last_start() -> None:
    obs, clock = _observation(NodeMemory())
    obs.node_started("12")  # lazy inputs: ComfyUI starts it, runs what it needs, starts it again
    clock.advance(1.0)
    _node(obs, clock, "4", 0.2)
    obs.node_started("12")
    clock.advance(0.3)
    obs.node_finished("12")
    record = obs.finish()
    decode = next(s for s in record.stages if s.name == "VAE_Decoding")
    assert decode.duration_s == pytest.approx(0.3)
    assert [s.name for s in record.top_level if not s.cached] == ["Model_Initialization", "VAE_Decoding"]
    # what node 12 needs and did not run was served from ComfyUI's cache: rows under its stage names
    cached = {s.name for s in record.top_level if s.cached}
    assert {"DiT_Initialization", "T5_Encoding", "TI2V_Preprocess", "ModelSamplingSD3"} <= cached
    assert any("sampler node 11 (KSamplerAdvanced) was served from ComfyUI's cache" in n for n in record.notes)


def test_a_node_that_never_finished_fails_the_run() -> None:
    obs, clock = _observation(NodeMemory())
    _node(obs, clock, "4", 0.2)
    obs.node_started("12")
    clock.advance(0.1)
    record = obs.finish()
    assert record.status == "failed: PromptStopped"
    assert any("12 (VAEDecode)" in n for n in record.notes)
    assert next(s for s in record.stages if s.name == "VAE_Decoding").facts["unfinished"] is True


def test_progress_timed_steps_and_throttled_updates() -> None:
    prompt = {
        "1": {"class_type": "WanVideoSampler", "inputs": {}},
        "2": {"class_type": "WanVideoSampler", "inputs": {}},
    }
    obs, clock = _observation(NodeMemory(), prompt)
    obs.node_started("1")
    for value in (1, 2, 3):
        clock.advance(0.5 if value == 1 else 0.2)
        obs.node_progress("1", value, 3)
    obs.node_finished("1")
    record_steps = [s for s in obs.session._stages if s.kind == "step-inference"]
    assert [s.name for s in record_steps] == ["Step_0_Inference", "Step_1_Inference", "Step_2_Inference"]
    assert record_steps[0].facts["includes_loading"] is True
    obs.node_started("2")  # a second sampler whose updates skip values (ComfyUI 0.3.76+ throttling)
    clock.advance(0.2)
    obs.node_progress("2", 1, 4)
    clock.advance(0.3)
    obs.node_progress("2", 4, 4)
    obs.node_finished("2")
    record = obs.finish()
    names = [s.name for s in record.stages if s.kind == "step-inference"]
    assert names[3:] == ["Step_3_Inference", "Steps_4-6_Inference"]
    merged = record.stages[-1]
    assert merged.step is None and merged.facts["steps_in_stage"] == 3
    assert record.context.steps is None  # not attributable: n/a, with the reason
    assert any("number of denoising steps is n/a" in n for n in record.notes)
    assert any("skipped values" in n for n in record.notes)


# kijai's ComfyUI-WanVideoWrapper (commit 721cd65) as ComfyUI 0.3.75 ran it: the class names and widget
# values of its nodes, in the order ComfyUI executed them, and its sampler's progress (one update per
# step from `latent_preview.prepare_callback`, values 1..steps). Its model type WANVIDEOMODEL gets no tap.
KIJAI = {
    "1": {"class_type": "WanBenchProfiler", "inputs": {"case_name": "kijai", "sample_interval_ms": 100}},
    "2": {
        "class_type": "WanVideoModelLoader",
        "inputs": {"model": "wan2.1_t2v_1.3B_fp16.safetensors", "base_precision": "fp32", "quantization": "disabled",
                   "load_device": "main_device", "attention_mode": "sdpa"},
    },
    "3": {
        "class_type": "LoadWanVideoT5TextEncoder",
        "inputs": {"model_name": "umt5-xxl-enc-bf16.safetensors", "precision": "bf16", "load_device": "offload_device"},
    },
    "4": {
        "class_type": "WanVideoVAELoader",
        "inputs": {"model_name": "Wan2_1_VAE_bf16.safetensors", "precision": "bf16"},
    },
    "5": {
        "class_type": "WanVideoTextEncode",
        "inputs": {"t5": ["3", 0], "positive_prompt": "a cat", "negative_prompt": ""},
    },
    "6": {"class_type": "WanVideoEmptyEmbeds", "inputs": {"width": 64, "height": 48, "num_frames": 5}},
    "7": {
        "class_type": "WanVideoSampler",
        "inputs": {"model": ["2", 0], "text_embeds": ["5", 0], "image_embeds": ["6", 0], "steps": 4, "cfg": 6.0,
                   "shift": 5.0, "seed": 7, "force_offload": True, "scheduler": "unipc", "riflex_freq_index": 0},
    },
    "8": {"class_type": "WanVideoDecode", "inputs": {"vae": ["4", 0], "samples": ["7", 0], "enable_vae_tiling": False}},
    "9": {"class_type": "CreateVideo", "inputs": {"images": ["8", 0], "fps": 16.0}},
    "10": {"class_type": "SaveVideo", "inputs": {"video": ["9", 0], "filename_prefix": "kijai/x"}},
    "11": {"class_type": "WanBenchReport", "inputs": {"filename_prefix": "kijai/x_report"}},
}


def test_kijai_wrapper_nodes_give_stages_progress_steps_and_run_facts() -> None:
    assert insert_model_taps(KIJAI, NODE_CLASS_MAPPINGS.get) == KIJAI  # no core MODEL output: nothing tapped
    obs, clock = _observation(NodeMemory(), KIJAI)
    obs.seed({"11": "running"})
    for node_id, seconds in (("6", 0.001), ("3", 5.5), ("5", 100.0), ("2", 0.4)):
        _node(obs, clock, node_id, seconds)
    obs.node_started("7")
    for value in (1, 2, 3, 4):
        clock.advance(0.5 if value == 1 else 0.12)
        obs.node_progress("7", value, 4)
    clock.advance(0.01)  # the sampler offloads the model after its last step
    obs.node_finished("7")
    for node_id, seconds in (("4", 0.9), ("8", 1.1), ("9", 0.001), ("10", 0.02)):
        _node(obs, clock, node_id, seconds)
    record = obs.finish()
    assert [s.name for s in record.top_level] == [
        "TI2V_Preprocess",
        "Model_Initialization",
        "T5_Encoding",
        "Model_Initialization",
        "Step_0_Inference",
        "Step_1_Inference",
        "Step_2_Inference",
        "Step_3_Inference",
        "Model_Initialization",
        "VAE_Decoding",
        "CreateVideo",
        "SaveVideo",
    ]
    children = {s.name: s.facts for s in record.stages if s.parent is not None}
    assert children["DiT_Initialization"]["model_file"] == "wan2.1_t2v_1.3B_fp16.safetensors"
    assert children["Text_Encoder_Initialization"]["class_type"] == "LoadWanVideoT5TextEncoder"
    assert children["VAE_Initialization"]["model_file"] == "Wan2_1_VAE_bf16.safetensors"
    steps = [s for s in record.stages if s.kind == "step-inference"]
    assert [s.step for s in steps] == [0, 1, 2, 3]
    assert steps[0].facts["includes_loading"] is True and steps[0].duration_s == pytest.approx(0.5)
    assert all(s.facts["timed_from"] == "progress updates" and s.facts["sampler_node"] == "7" for s in steps)
    context = record.context
    assert (context.steps, context.width, context.height, context.frames) == (4, 64, 48, 5)
    assert (context.solver, context.seed, context.task) == ("unipc", 7, None)
    assert record.status == "completed"


# ------------------------------------------------------------------------------------------------
# Observed stages have the pack's telemetry guarantees
# ------------------------------------------------------------------------------------------------
class _FailingHost(FakeHost):
    """A host probe whose reads raise once `failing` is set (an unreadable /proc)."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False

    def read(self):  # noqa: ANN201 - same contract as FakeHost.read
        if self.failing:
            raise OSError("/proc/self/statm: Input/output error")
        return super().read()


def test_observed_core_node_stages_survive_failing_probes_and_take_activity_by_overlap(tmp_path) -> None:
    clock, gpu, host = FakeClock(), FakeNvml(), _FailingHost()
    session = ProfileSession(case_name="native", sample_interval_s=None, clock=clock, gpu=gpu,
                             device_probe=FakeDevice(), host=host)
    session.open()
    obs = PromptObservation(prompt_id="p", session=session, graph=PromptGraph(NATIVE), memory=NodeMemory())
    obs.seed({"90": "running"})
    gpu.fail(RuntimeError("NVML_ERROR_GPU_IS_LOST"), on="memory")  # every stage boundary of every node
    host.failing = True
    for node_id, seconds in (("4", 0.3), ("3", 0.4)):
        _node(obs, clock, node_id, seconds)
    gpu.set(activity_pct=20.0)
    session.sample_now()  # covers the loaders, up to the encoder's start
    obs.node_started("5")  # CLIPTextEncode: T5_Encoding, 2 s at 80 %
    gpu.set(activity_pct=80.0)
    clock.advance(1.0)
    session.sample_now()
    clock.advance(1.0)
    obs.node_finished("5")
    session.sample_now()  # taken as the stage ends: covers its last second
    clock.advance(0.5)
    _node(obs, clock, "6", 0.004)  # a latent node far shorter than the reading around it
    session.sample_now()
    host.failing = False
    gpu.fail(RuntimeError("NVML_ERROR_UNKNOWN"), on="activity")  # the activity reads fail from here on
    _node(obs, clock, "1", 0.5)
    _node(obs, clock, "7", 0.001)
    _sampler(obs, clock, "10", "high", SIGMAS[:3])
    session.sample_now()
    gpu.fail(None)
    for node_id, seconds in (("2", 0.5), ("8", 0.001)):
        _node(obs, clock, node_id, seconds)
    _sampler(obs, clock, "11", "low", SIGMAS[2:])
    _node(obs, clock, "12", 0.3)
    _node(obs, clock, "13", 0.05)
    record = obs.finish()
    assert record.status == "completed"
    stages = {s.name: s for s in record.stages}
    assert len([s for s in record.stages if s.kind == "step-inference"]) == 4
    encode, latent = stages["T5_Encoding"], stages["TI2V_Preprocess"]
    assert encode.activity_mean_pct == pytest.approx(80.0) and encode.num_samples == 2
    assert latent.activity_mean_pct is None
    assert "too short for the activity readings" in latent.facts["activity_unmeasured"]
    assert encode.memory.device_used_start is None and encode.memory.device_used_end is None  # unmeasured, not 0
    assert encode.cpu_pct is None and encode.rss_max_bytes is None
    notes = " ".join(record.notes)
    assert "NVML memory reading failed" in notes and "NVML_ERROR_GPU_IS_LOST" in notes
    assert "NVML activity reading failed" in notes and "NVML_ERROR_UNKNOWN" in notes
    assert "host probe (CPU time, RSS) failed" in notes
    written = write_report(record, tmp_path, basename="native")
    assert check_report(written.json) == []


def test_observed_core_node_takes_its_activity_from_the_background_sampler() -> None:
    gpu = FakeNvml()
    gpu.set(activity_pct=70.0)
    session = ProfileSession(case_name="native", sample_interval_s=0.005, gpu=gpu, device_probe=FakeDevice(),
                             host=FakeHost())
    session.open()
    obs = PromptObservation(prompt_id="p", session=session, graph=PromptGraph(NATIVE), memory=NodeMemory())
    obs.seed({"90": "running"})
    obs.node_started("12")  # VAEDecode, timed by the real clock while the thread reads activity
    reads = gpu.num_activity_reads
    deadline = time.monotonic() + 10.0
    while gpu.num_activity_reads < reads + 5:
        assert time.monotonic() < deadline, "the sampler thread did not take its readings in time"
        time.sleep(0.005)
    obs.node_finished("12")
    record = obs.finish()
    decode = next(s for s in record.stages if s.name == "VAE_Decoding")
    assert decode.activity_mean_pct == pytest.approx(70.0) and decode.num_samples >= 3
    assert all(s.activity_pct in (None, 70.0) for s in record.samples)


# ------------------------------------------------------------------------------------------------
# The model tap: FLOPs from the loaded model's dims
# ------------------------------------------------------------------------------------------------
def _fake_wan_model() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        model_type="t2v",
        patch_size=(1, 2, 2),
        in_dim=16,
        dim=128,
        ffn_dim=256,
        freq_dim=256,
        text_dim=4096,
        out_dim=16,
        num_heads=1,
        num_layers=2,
    )


def test_forward_flops_from_the_model_dims_and_shapes() -> None:
    model = _fake_wan_model()
    x, context = torch.zeros(2, 16, 3, 6, 7), torch.zeros(2, 512, 4096)
    flops, reason, config = forward_flops(model, (x, torch.zeros(2), context), {})
    expected = DiTConfig(
        model_type="t2v",
        in_dim=16,
        dim=128,
        ffn_dim=256,
        freq_dim=256,
        text_dim=4096,
        out_dim=16,
        num_heads=1,
        num_layers=2,
    ).flops_forward(3 * 3 * 4, batch=2)
    assert reason is None and flops == pytest.approx(expected) and config == dit_config_of(model, 512)
    flops, reason, _ = forward_flops(types.SimpleNamespace(), (x, torch.zeros(2), context), {})
    assert flops is None and "not a Wan DiT" in reason


# ------------------------------------------------------------------------------------------------
# The on-prompt rewrite
# ------------------------------------------------------------------------------------------------
class _Loader:
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"unet_name": (["a"],)}}


class _Patch:
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": ("MODEL",), "shift": ("FLOAT", {})}}


class _Checkpoint:
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"ckpt_name": (["c"],)}}


CLASSES = {"UNETLoader": _Loader, "ModelSamplingSD3": _Patch, "CheckpointLoaderSimple": _Checkpoint}


def test_taps_follow_every_model_source_with_its_expert() -> None:
    prompt = {k: json.loads(json.dumps(v)) for k, v in NATIVE.items()}
    out = insert_model_taps(prompt, CLASSES.get)
    taps = {k: v for k, v in out.items() if v["class_type"] == TAP_CLASS}
    assert set(taps) == {"wanbench_tap_1_0", "wanbench_tap_2_0"}
    assert taps["wanbench_tap_1_0"]["inputs"] == {
        "model": ["1", 0],
        "source_node": "1",
        "model_file": "x_high_noise.safetensors",
        "expert": "high",
    }
    assert out["7"]["inputs"]["model"] == ["wanbench_tap_1_0", 0]
    assert out["8"]["inputs"]["model"] == ["wanbench_tap_2_0", 0]
    assert prompt["7"]["inputs"]["model"] == ["1", 0]  # the input prompt is not modified
    assert model_output_slots(_Checkpoint) == [0] and model_output_slots(_Patch) == []


def test_one_model_source_is_the_single_model_and_unprofiled_prompts_pass_unchanged(monkeypatch) -> None:
    import sys

    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "wan2.2_ti2v_5B.safetensors"}},
        "2": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["1", 1]}},
    }
    out = insert_model_taps(prompt, CLASSES.get)
    (tap,) = [v for v in out.values() if v["class_type"] == TAP_CLASS]
    assert tap["inputs"]["expert"] == "model" and out["2"]["inputs"]["positive"] == ["1", 1]
    monkeypatch.setitem(sys.modules, "nodes", types.SimpleNamespace(NODE_CLASS_MAPPINGS=CLASSES))
    untouched = {"prompt": json.loads(json.dumps(prompt))}
    assert on_prompt(untouched) == {"prompt": prompt}
    profiled = {"prompt": {**json.loads(json.dumps(prompt)), "9": {"class_type": "WanBenchReport", "inputs": {}}}}
    assert any(v["class_type"] == TAP_CLASS for v in on_prompt(profiled)["prompt"].values())


def test_latent_geometry_reads_the_video_behind_a_wan_latent() -> None:
    """Run facts of a native graph fall back on the sampled latent: Wan2.1 (16 channels, 8x) and
    Wan2.2 (48 channels, 16x) strides, 4x in time; any other latent gives no geometry (n/a)."""
    from wanbench.nodes.observed_facts import latent_geometry

    assert latent_geometry((1, 16, 2, 8, 8)) == (64, 64, 5)
    assert latent_geometry((1, 48, 3, 4, 6)) == (96, 64, 9)
    assert latent_geometry((1, 4, 2, 8, 8)) is None and latent_geometry((1, 16, 8, 8)) is None
