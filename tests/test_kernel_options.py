"""The loaders' weight storage, compile and TF32 options end to end through the nodes, what happens
while sampling (and is undone after), the CLI flags, and the tiny GGUF files of the tiny-model tool."""

from __future__ import annotations

import argparse
import contextlib
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from wanbench import cli
from wanbench.nodes.comfy_bridge import Bridge
from wanbench.nodes.context import use_bridge
from wanbench.nodes.encoder_loaders import WanTextEncoderLoader, WanVAELoader
from wanbench.nodes.latents import WanEmptyLatent
from wanbench.nodes.loaders import WanModelLoader
from wanbench.nodes.sampling import WanSampler
from wanbench.nodes.text import WanTextEncode
from wanbench.profiling import check_report
from wanbench.wan_core import trace
from wanbench.wan_core.compile import CompileConfig
from wanbench.wan_core.config import COMPILE_STAGE, COMPILE_SUMMARY_EVENT, preset
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.runtime import execution as execution_mod
from wanbench.wan_core.runtime.compact import compact_weights_of
from wanbench.wan_core.runtime.execution import ExecutionOptions, applied, tf32_matmuls
from wanbench.wan_core.sampler import SamplerOptions, sample

TI2V_DIT = "wanbench_tiny_ti2v_5B_fp16.safetensors"
SAMPLER_ARGS = dict(seed=1, steps=2, shift=5.0, boundary=0.875, guidance_high=5.0, guidance_low=5.0, solver="unipc",
                    batched_cfg=True, placement="none", resident_blocks=0)


class Recorder:
    """A tracer that keeps the stage nesting and the events."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, tuple[str, ...], dict[str, Any]]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._open: list[str] = []

    @contextlib.contextmanager
    def stage(self, name: str, kind: str, facts: dict[str, Any]) -> Any:
        self.stages.append((name, tuple(self._open), facts))
        self._open.append(name)
        try:
            yield
        finally:
            self._open.pop()

    def event(self, name: str, facts: dict[str, Any]) -> None:
        self.events.append((name, facts))


@pytest.fixture
def eager_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compile with Dynamo's `eager` backend: the same regions, guards and counts, no code generation."""
    monkeypatch.setattr(execution_mod, "CompileConfig",
                        lambda backend, mode: CompileConfig(backend="eager", mode=mode))


# --------------------------------------------------------------------------------------------
# while sampling
# --------------------------------------------------------------------------------------------
def test_tf32_is_set_for_the_block_and_restored_even_on_errors() -> None:
    before = torch.get_float32_matmul_precision()
    with tf32_matmuls(True) as precision:
        assert precision == "high" == torch.get_float32_matmul_precision()
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(RuntimeError, match="boom"), applied([], ExecutionOptions(tf32=True)):
        raise RuntimeError("boom")
    assert torch.get_float32_matmul_precision() == before
    with tf32_matmuls(False) as precision:
        assert precision == before


def _experts() -> tuple[list[WanDiT], Any]:
    task = preset("t2v-A14B", tiny=True)
    torch.manual_seed(0)
    return [WanDiT(task.dit).eval(), WanDiT(task.dit).eval()], task


def test_compile_runs_while_sampling_is_its_own_stage_and_is_undone(eager_compile: None) -> None:
    experts, task = _experts()
    opts = SamplerOptions.from_config(task.sampler, steps=3)
    ctx = torch.randn(5, task.dit.text_dim, generator=torch.Generator().manual_seed(2))
    run = dict(context=ctx, context_null=torch.zeros_like(ctx), latent_shape=(16, 2, 8, 8))
    eager = sample(experts, task, opts, **run)
    recorder = Recorder()
    with trace.use_tracer(recorder), applied(experts, ExecutionOptions(compile_mode="default")) as record:
        compiled = sample(experts, task, opts, **run)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    compile_stages = [(parents, facts["expert"]) for name, parents, facts in recorder.stages
                      if name == COMPILE_STAGE.name]
    # the first forward of each expert, inside the step it happens in (high: step 0, low: its first step)
    assert [p[-1] for p, _ in compile_stages] == ["Step_0_Inference", "Step_2_Inference"]
    assert [e for _, e in compile_stages] == [0, 1]
    (summary,) = [f for n, f in recorder.events if n == COMPILE_SUMMARY_EVENT]
    assert summary["num_regions"] == 2 * task.dit.num_layers and summary["num_compiles"] >= 1
    assert record.compiled and len(record.compile_seconds) == 2
    assert all(b._compiled_call_impl is None for m in experts for b in m.blocks)  # eager again
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in experts)


def test_an_interrupted_compiled_run_leaves_nothing_installed(eager_compile: None) -> None:
    experts, task = _experts()
    opts = SamplerOptions.from_config(task.sampler, steps=2)
    ctx = torch.randn(5, task.dit.text_dim)

    def interrupt(i: int, n: int, latent: torch.Tensor) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), applied(experts, ExecutionOptions(compile_mode="default", tf32=True)):
        sample(experts, task, opts, context=ctx, context_null=ctx, latent_shape=(16, 2, 8, 8), callback=interrupt)
    assert all(b._compiled_call_impl is None for m in experts for b in m.blocks)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in experts)
    assert torch.get_float32_matmul_precision() == "highest"


def test_bad_execution_options_are_refused() -> None:
    with pytest.raises(ValueError, match="compile must be one of"):
        ExecutionOptions(compile_mode="fast")
    with pytest.raises(TypeError, match="tf32 must be a bool"):
        ExecutionOptions(tf32="yes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# the nodes
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from wanbench.tiny_models import make_tiny_models

    root = tmp_path_factory.mktemp("tiny_models")
    made = make_tiny_models(root, seed=0, gguf=True)
    bridge = Bridge.for_models_root(root, tmp_path_factory.mktemp("tiny_out"))
    with use_bridge(bridge):
        (encoder,) = WanTextEncoderLoader().load("wanbench_tiny_umt5_xxl_fp16.safetensors", "float32", "cpu")
        (embeds,) = WanTextEncode().encode(encoder, "a fox in the snow", "")
        (vae,) = WanVAELoader().load("wanbench_tiny_wan2.2_vae.safetensors", "float32", "cpu")
    return types.SimpleNamespace(bridge=bridge, embeds=embeds, vae=vae, made=made)


def _sample(tiny: Any, model: Any) -> torch.Tensor:
    (latent,) = WanEmptyLatent().make(tiny.vae, 32, 32, 5)
    with use_bridge(tiny.bridge):
        (out,) = WanSampler().sample(model, tiny.embeds, latent, **SAMPLER_ARGS)["result"]
    return out["samples"]


def test_new_loader_inputs_are_optional_and_at_the_end() -> None:
    spec = WanModelLoader.INPUT_TYPES()
    assert list(spec["required"]) == ["model_high", "model_low", "dtype", "attention", "device"]
    assert list(spec["optional"]) == ["profiler", "weight_dtype", "compile", "tf32"]
    assert spec["optional"]["weight_dtype"][1]["default"] == "default"
    assert list(WanTextEncoderLoader.INPUT_TYPES()["optional"]) == ["profiler", "weight_dtype"]
    assert "fp8_e4m3fn_scaled_mm" not in WanTextEncoderLoader.INPUT_TYPES()["optional"]["weight_dtype"][0]


@pytest.mark.parametrize("weight_dtype", ["as_stored", "fp8_e4m3fn_scaled", "bfloat16"])
def test_loader_storage_keeps_weights_compact_and_samples(tiny: Any, weight_dtype: str) -> None:
    with use_bridge(tiny.bridge):
        (plain,) = WanModelLoader().load(TI2V_DIT, "none", "float32", "sdpa", "cpu")
        (compact,) = WanModelLoader().load(TI2V_DIT, "none", "float32", "sdpa", "cpu", weight_dtype=weight_dtype)
    assert compact.storage == weight_dtype and compact_weights_of(compact.experts[0]) is not None
    assert compact.resident_bytes()[0] < plain.resident_bytes()[0]
    reference, out = _sample(tiny, plain), _sample(tiny, compact)
    if weight_dtype == "as_stored":  # fp16 file, float32 compute: the same values decoded per block
        assert torch.equal(out, reference)
    else:
        assert torch.isfinite(out).all() and not torch.equal(out, reference)


def test_loader_reads_gguf_files_compact_by_default(tiny: Any) -> None:
    with use_bridge(tiny.bridge):
        (gguf,) = WanModelLoader().load("wanbench_tiny_ti2v_5B_Q8_0.gguf", "none", "float32", "sdpa", "cpu")
        (kquant,) = WanModelLoader().load("wanbench_tiny_ti2v_5B_d256_Q4_K_M.gguf", "none", "float32", "sdpa", "cpu")
    assert compact_weights_of(gguf.experts[0]).format_counts() == {"Q8_0": 20}
    assert set(compact_weights_of(kquant.experts[0]).format_counts()) == {"Q4_K", "Q6_K"}
    assert kquant.experts[0].config.dim == 256
    assert torch.isfinite(_sample(tiny, gguf)).all() and torch.isfinite(_sample(tiny, kquant)).all()


def test_loader_compile_and_tf32_reach_the_sampler(tiny: Any, eager_compile: None) -> None:
    with use_bridge(tiny.bridge):
        (plain,) = WanModelLoader().load(TI2V_DIT, "none", "float32", "sdpa", "cpu")
        (model,) = WanModelLoader().load(TI2V_DIT, "none", "float32", "sdpa", "cpu", compile="default", tf32=True)
    assert model.execution == ExecutionOptions(compile_mode="default", tf32=True)
    assert plain.execution == ExecutionOptions()  # saved workflows without the inputs: nothing changes
    recorder = Recorder()
    with trace.use_tracer(recorder):
        out = _sample(tiny, model)
    torch.testing.assert_close(out, _sample(tiny, plain), rtol=1e-4, atol=1e-5)
    assert [n for n, _, _ in recorder.stages].count(COMPILE_STAGE.name) == 1
    assert all(b._compiled_call_impl is None for b in model.experts[0].blocks)
    assert torch.get_float32_matmul_precision() == "highest"


def test_loader_refuses_bad_options_before_loading(tiny: Any) -> None:
    with use_bridge(tiny.bridge):
        with pytest.raises(ValueError, match="weight_dtype must be one of"):
            WanModelLoader().load(TI2V_DIT, "none", "float32", "sdpa", "cpu", weight_dtype="int4")
        with pytest.raises(ValueError, match="compile must be one of"):
            WanModelLoader().load(TI2V_DIT, "none", "float32", "sdpa", "cpu", compile="turbo")
        with pytest.raises(ValueError, match="weight_dtype must be one of"):
            WanTextEncoderLoader().load("wanbench_tiny_umt5_xxl_fp16.safetensors", "float32", "cpu",
                                        weight_dtype="fp8_e4m3fn_scaled_mm")


def test_tiny_gguf_files_are_the_fp16_weights_quantised(tiny: Any) -> None:
    from wanbench.wan_core.checkpoints.io import read_state_dict

    assert set(tiny.made.ggufs) == {"wanbench_tiny_ti2v_5B_Q8_0.gguf", "wanbench_tiny_ti2v_5B_d256_Q4_K_M.gguf",
                                    "wanbench_tiny_umt5_xxl_Q8_0.gguf"}
    folder = tiny.made.root / "diffusion_models"
    q8, fp16 = read_state_dict(folder / "wanbench_tiny_ti2v_5B_Q8_0.gguf"), read_state_dict(folder / TI2V_DIT)
    key = "blocks.1.ffn.0.weight"
    step = fp16[key].abs().max() / 127
    assert (q8[key] - fp16[key]).abs().max() <= step  # within a Q8_0 step of the fp16 file's weights


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _args(**given: Any) -> argparse.Namespace:
    base = dict(compile=None, tf32=False, weight_dtype=None, attention=None)
    return argparse.Namespace(**{**base, **given})


def test_cli_flags_set_every_model_loader() -> None:
    options = cli.model_options(_args(compile="default", tf32=True, weight_dtype="fp8_e4m3fn_scaled",
                                      attention="auto"))
    assert options == {"compile": "default", "tf32": True, "weight_dtype": "fp8_e4m3fn_scaled", "attention": "auto"}
    prompt = {"2": {"class_type": "WanBenchModelLoader", "inputs": {"dtype": "bfloat16"}},
              "3": {"class_type": "WanBenchSampler", "inputs": {}}}
    out = cli.apply_model_options(prompt, options)
    assert out["2"]["inputs"] == {"dtype": "bfloat16", **options} and out["3"]["inputs"] == {}
    assert cli.apply_model_options({"1": {"class_type": "X", "inputs": {}}}, {}) == {"1": {"class_type": "X",
                                                                                         "inputs": {}}}
    with pytest.raises(ValueError, match="Wan Model Loader.*does not have"):
        cli.apply_model_options({"1": {"class_type": "KSampler", "inputs": {}}}, {"compile": "default"})


def test_cli_parser_offers_the_flags() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["run", "x.api.json", "--compile", "max-autotune-no-cudagraphs", "--tf32",
                              "--weight-dtype", "as_stored", "--attention", "sdpa_cudnn"])
    assert cli.model_options(args) == {"compile": "max-autotune-no-cudagraphs", "weight_dtype": "as_stored",
                                       "attention": "sdpa_cudnn", "tf32": True}
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "x.api.json", "--compile", "fastest"])
    assert parser.parse_args(["make-tiny-models", "d", "--gguf"]).gguf


def test_cli_in_process_run_with_kernel_flags(tmp_path: Path, eager_compile: None) -> None:
    code = cli.main(["run", "tiny_ti2v_5B_t2v.api.json", "--out", str(tmp_path), "--make-tiny-models",
                     "--compile", "default", "--weight-dtype", "fp8_e4m3fn_scaled", "--attention", "auto"])
    assert code == 0
    (report,) = (tmp_path / "wanbench").glob("*_report_*.md")
    assert check_report(report.with_suffix(".json")) == []  # the Compile stage inside a step is consistent
    text = report.read_text()
    assert "DiT weights fp8_e4m3fn_scaled" in text and "attention auto" in text
    assert "compile yes (" in text and "**Attention kernel**" in text


def test_compile_with_loras_is_refused_before_sampling(tiny: Any) -> None:
    from wanbench.wan_core.runtime.execution import check_with_loras

    with use_bridge(tiny.bridge):
        (model,) = WanModelLoader().load(TI2V_DIT, "none", "float32", "sdpa", "cpu", compile="default")
    with_lora = model.with_lora(object())  # the sampler checks before it touches the LoRA
    assert with_lora.execution == model.execution and with_lora.storage == model.storage
    with pytest.raises(ValueError, match="cannot be combined with LoRAs.*Set compile to 'off'"):
        _sample(tiny, with_lora)
    check_with_loras(ExecutionOptions(), 2)  # no compile: LoRAs are fine
