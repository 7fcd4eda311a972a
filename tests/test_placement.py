"""Weight placement: every policy gives the same numbers; hooks come and go; dtype options."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import golden_dir, manifest_fixtures
from safetensors.torch import load_file
from test_sampler import dit_config, load_pipeline, weight_files
from wanbench.wan_core.checkpoints.dit import load_dit, save_dit
from wanbench.wan_core.checkpoints.io import COMFY_DIT_PREFIX
from wanbench.wan_core.config import preset, weight_dtype
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.placement import BlockSwap, cast_weights, make_placement
from wanbench.wan_core.runtime.compact import fp8_scaled_weights, store_fp8, store_fp8_from_state_dict
from wanbench.wan_core.sampler import sample

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models run fastest on one thread, and do not stall when other processes share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _t2v_fixture() -> dict:
    fixtures = manifest_fixtures(kind_prefix="pipeline")
    fixture = next((f for f in fixtures if f["name"] == "pipeline_t2v_tiny"), None)
    if fixture is None:
        pytest.skip("pipeline_t2v_tiny fixture not available")
    return fixture


def _run(experts, io, opts, *, device="cpu"):  # noqa: ANN001, ANN202
    task = preset("t2v-A14B", tiny=True)
    return sample(experts, task, opts, context=io["context"], context_null=io["context_null"],
                  noise=io["noise"], device=device)


PLACEMENT_CASES = [("model", 0), ("blocks", 0), ("blocks", 1), ("blocks", 2)]


@pytest.mark.parametrize(("kind", "resident"), PLACEMENT_CASES, ids=lambda v: str(v))
def test_placements_give_identical_results_on_cpu(kind: str, resident: int) -> None:
    experts, io, opts = load_pipeline(_t2v_fixture())
    opts = dataclasses.replace(opts, steps=5)  # crosses the expert switch (step 4 at shift 12 / 6 steps)
    reference = _run(experts, io, opts)
    placed = _run(experts, io, dataclasses.replace(opts, placement=kind, num_resident_blocks=resident))
    assert torch.equal(reference, placed)
    for model in experts:
        assert all(not b._forward_pre_hooks and not b._forward_hooks for b in model.blocks)
        assert all(p.device.type == "cpu" for p in model.parameters())


def test_block_swap_streams_every_non_resident_block_once_per_forward() -> None:
    task = preset("t2v-A14B", tiny=True)
    torch.manual_seed(0)
    model = WanDiT(task.dit).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, t = torch.randn(1, 16, 1, 4, 4), torch.tensor([500])
    ctx = [torch.randn(3, task.dit.text_dim)]
    with torch.no_grad():
        expected = model(x, t, ctx)
        with make_placement([model], "blocks", device="cpu", num_resident_blocks=1) as placement:
            assert isinstance(placement, BlockSwap)
            active = placement.activate(0)
            got = [active(x, t, ctx) for _ in range(3)]
            streamed_block = sum(p.numel() * p.element_size() for p in model.blocks[1].parameters())
            assert placement.bytes_streamed == 3 * streamed_block
            assert len(model.blocks[1]._forward_pre_hooks) == 1 and not model.blocks[0]._forward_pre_hooks
    for out in got:
        assert torch.equal(out, expected)
    assert not model.blocks[1]._forward_pre_hooks and not model.blocks[1]._forward_hooks
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_placement_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="placement must be one of"):
        make_placement([], "disk", device="cpu")
    with pytest.raises(ValueError, match="num_resident_blocks"):
        make_placement([], "blocks", device="cpu", num_resident_blocks=-1)
    with pytest.raises(TypeError, match="`blocks` ModuleList"):
        make_placement([torch.nn.Linear(2, 2)], "blocks", device="cpu")
    with pytest.raises(RuntimeError, match="before open"):
        make_placement([torch.nn.Linear(2, 2)], "none", device="cpu").activate(0)
    with pytest.raises(ValueError, match="weight dtype"):
        weight_dtype("fp64")


def test_bf16_weights_stay_close_to_fp32() -> None:
    fixture = _t2v_fixture()
    experts, io, opts = load_pipeline(fixture)
    opts = dataclasses.replace(opts, steps=2)
    reference = _run(experts, io, opts)
    low = [cast_weights(m, weight_dtype("bf16")) for m in experts]
    assert all(p.dtype == torch.bfloat16 for m in low for p in m.parameters())
    got = _run(low, io, opts)
    rel = ((got - reference).abs().max() / reference.abs().max()).item()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0).item()
    assert rel < 2e-2 and cos > 0.999, (rel, cos)


def test_fp16_weights_stay_close_to_fp32() -> None:
    fixture = _t2v_fixture()
    experts, io, opts = load_pipeline(fixture)
    opts = dataclasses.replace(opts, steps=2)
    reference = _run(experts, io, opts)
    low = [cast_weights(m, weight_dtype("fp16")) for m in experts]
    assert all(p.dtype == torch.float16 for m in low for p in m.parameters())
    got = _run(low, io, opts)
    assert bool(torch.isfinite(got).all())
    rel = ((got - reference).abs().max() / reference.abs().max()).item()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0).item()
    assert rel < 5e-3 and cos > 0.9999, (rel, cos)  # fp16 keeps 3 more mantissa bits than bf16


def _fresh_experts(fixture: dict) -> list[WanDiT]:
    experts = []
    for file in weight_files(fixture):
        model = WanDiT(dit_config(fixture["config"]["model_config"]))
        model.load_state_dict(load_file(golden_dir() / file))
        experts.append(model.eval())
    return experts


@gpu
@needs_cuda
@pytest.mark.parametrize(("kind", "resident"), PLACEMENT_CASES, ids=lambda v: str(v))
def test_placements_identical_on_cuda(kind: str, resident: int) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    fixture = _t2v_fixture()
    experts, io, opts = load_pipeline(fixture)
    opts = dataclasses.replace(opts, steps=5)
    reference = _run(experts, io, opts, device="cuda")
    placed_opts = dataclasses.replace(opts, placement=kind, num_resident_blocks=resident)
    placed = _run(_fresh_experts(fixture), io, placed_opts, device="cuda")
    assert placed.device.type == "cuda"
    assert torch.equal(reference, placed)


@gpu
@needs_cuda
def test_model_swap_keeps_the_idle_expert_on_cpu() -> None:
    experts = _fresh_experts(_t2v_fixture())
    with make_placement(experts, "model", device="cuda") as placement:
        placement.activate(0)
        assert next(experts[0].parameters()).is_cuda and not next(experts[1].parameters()).is_cuda
        placement.activate(1)
        assert not next(experts[0].parameters()).is_cuda and next(experts[1].parameters()).is_cuda
    assert not any(p.is_cuda for m in experts for p in m.parameters())


@gpu
@needs_cuda
def test_block_swap_keeps_streamed_blocks_off_the_device_between_forwards() -> None:
    experts = _fresh_experts(_t2v_fixture())
    with make_placement(experts, "blocks", device="cuda", num_resident_blocks=1) as placement:
        model = placement.activate(0)
        assert next(model.blocks[0].parameters()).is_cuda
        assert not next(model.blocks[1].parameters()).is_cuda
        assert next(model.blocks[1].parameters()).is_pinned()
        assert next(model.head.parameters()).is_cuda and not next(experts[1].parameters()).is_cuda


def test_fp8_storage_close_to_fp32_and_placement_independent() -> None:
    fixture = _t2v_fixture()
    experts, io, opts = load_pipeline(fixture)
    opts = dataclasses.replace(opts, steps=5)
    reference = _run(experts, io, opts)
    handles = [store_fp8(m) for m in experts]
    weight = experts[0].blocks[0].self_attn.q.weight
    assert weight.dtype == torch.float8_e4m3fn and handles[0].bytes_fp8 > 0
    stored = _run(experts, io, opts)
    streamed = _run(experts, io, dataclasses.replace(opts, placement="blocks", num_resident_blocks=1))
    assert torch.equal(stored, streamed)
    assert weight.dtype == torch.float8_e4m3fn
    rel = ((stored - reference).abs().max() / reference.abs().max()).item()
    cos = torch.nn.functional.cosine_similarity(stored.flatten(), reference.flatten(), dim=0).item()
    assert rel < 5e-2 and cos > 0.998, (rel, cos)
    for handle in handles:
        handle.remove()
    assert weight.dtype == torch.float32
    assert all(not b._forward_pre_hooks and not b._forward_hooks for m in experts for b in m.blocks)


def _tiny_dit_and_inputs(seed: int = 0) -> tuple[WanDiT, tuple]:
    task = preset("t2v-A14B", tiny=True)
    torch.manual_seed(seed)
    model = WanDiT(task.dit).eval()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = (torch.randn(1, 16, 1, 4, 4, generator=g), torch.tensor([500]),
              [torch.randn(3, task.dit.text_dim, generator=g)])
    return model, inputs


def _raise_inside(module: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    def boom(*_: object) -> None:
        raise RuntimeError("simulated failure inside a block")
    return module.register_forward_pre_hook(boom)


@pytest.mark.parametrize("placement", ["none", "blocks"])
def test_fp8_storage_survives_an_exception_inside_a_block(placement: str) -> None:
    """A forward that raises mid-block leaves no weight dequantised, so the next forward is exact."""
    model, inputs = _tiny_dit_and_inputs()
    handle = store_fp8(model)
    weight = model.blocks[0].self_attn.q.weight
    fp8_bits = weight.data.view(torch.uint8).clone()
    with torch.no_grad(), make_placement([model], placement, device="cpu") as policy:
        active = policy.activate(0)
        reference = active(*inputs)
        for failing in (model.blocks[0].ffn[2], model.blocks[1].norm3):  # the first and a later block
            boom = _raise_inside(failing)
            with pytest.raises(RuntimeError, match="simulated failure"):
                active(*inputs)
            boom.remove()
            assert weight.dtype == torch.float8_e4m3fn
            assert torch.equal(weight.data.view(torch.uint8), fp8_bits)
            assert torch.equal(active(*inputs), reference)
    handle.remove()
    assert weight.dtype == torch.float32


def _fp8_file(tmp_path: Path) -> tuple[Path, WanDiT, tuple]:
    model, inputs = _tiny_dit_and_inputs(seed=3)
    path = save_dit(model, tmp_path / "tiny_fp8_scaled.safetensors", layout="comfy_prefixed",
                    dtype=torch.float16, fp8_scaled=True)
    return path, model, inputs


def test_fp8_storage_from_an_fp8_scaled_file(tmp_path: Path) -> None:
    """The fp8 tensors of the file are kept bit for bit and the forward equals the dequantised load."""
    path, _, inputs = _fp8_file(tmp_path)
    raw = load_file(str(path))
    dequantised = load_dit(path)  # what the loader gives: fp8 * scale in float32
    with torch.no_grad():
        reference = dequantised(*inputs)
    model = load_dit(path)
    quantised = fp8_scaled_weights(raw)
    assert set(quantised) == {k for k, v in dequantised.state_dict().items()
                              if k.startswith("blocks.") and v.dim() == 2 and k.endswith(".weight")}
    handle = store_fp8_from_state_dict(model, raw)
    assert handle.bytes_fp8 == sum(q.numel() for q, _ in quantised.values())
    for name, param in model.named_parameters():
        if name in quantised:
            stored = raw[COMFY_DIT_PREFIX + name]
            assert param.dtype == torch.float8_e4m3fn
            assert torch.equal(param.data.view(torch.uint8), stored.view(torch.uint8)), name
        else:
            assert param.dtype == torch.float32, name
    with torch.no_grad():
        got = model(*inputs)
        streamed = None
        with make_placement([model], "blocks", device="cpu", num_resident_blocks=1) as policy:
            streamed = policy.activate(0)(*inputs)
    assert torch.equal(got, reference) and torch.equal(streamed, reference)
    handle.remove()
    for name, value in dequantised.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_fp8_from_state_dict_rejects_what_does_not_fit(tmp_path: Path) -> None:
    path, model, _ = _fp8_file(tmp_path)
    with pytest.raises(ValueError, match="no fp8 block weights"):
        store_fp8_from_state_dict(model, model.state_dict())
    raw = load_file(str(path))
    key = COMFY_DIT_PREFIX + "blocks.0.self_attn.q.weight"
    raw[key] = raw[key][:, :-1]
    with pytest.raises(ValueError, match="blocks.0.self_attn.q.weight"):
        store_fp8_from_state_dict(load_dit(path), raw)


@gpu
@needs_cuda
def test_block_swap_peak_memory_is_resident_plus_two_blocks() -> None:
    """With `blocks`, the CUDA peak stays below the resident part + 2 streamed blocks + activations."""
    torch.backends.cuda.matmul.allow_tf32 = False
    task = preset("t2v-A14B", tiny=True)
    config = dataclasses.replace(task.dit, dim=512, ffn_dim=2048, num_heads=8, num_layers=8)
    torch.manual_seed(0)
    model = WanDiT(config).eval()
    block_bytes = max(sum(t.numel() * t.element_size() for t in [*b.parameters(), *b.buffers()])
                      for b in model.blocks)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 16, 2, 8, 8, generator=g).cuda(), torch.tensor([500]).cuda()
    ctx = [torch.randn(8, config.text_dim, generator=g).cuda()]
    with torch.no_grad():
        model.cuda()  # activations of one forward, all weights resident
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        reference = model(x, t, ctx)
        torch.cuda.synchronize()
        activations = torch.cuda.max_memory_allocated() - start
        model.cpu()
        del reference
        with make_placement([model], "blocks", device="cuda", num_resident_blocks=2) as policy:
            active = policy.activate(0)
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated()  # inputs + embeddings, head, 2 resident blocks
            torch.cuda.reset_peak_memory_stats()
            for _ in range(2):
                out = active(x, t, ctx)
                del out
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
    slack = 2 * 2**20  # allocator rounding of many small tensors
    assert peak <= resident + 2 * block_bytes + activations + slack, (
        f"peak {peak} > resident {resident} + 2 blocks {2 * block_bytes} + activations {activations}")
    assert peak > resident + block_bytes  # a streamed block really was on the device
