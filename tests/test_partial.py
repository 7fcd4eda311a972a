"""Partial denoising: denoise < 1, start/end steps, leftover noise, exact continuation of a split run.

The start latent and the ComfyUI conventions (x = sigma * noise + (1 - sigma) * z; a leftover latent
stored as x / (1 - sigma)) are recomputed here with this file's own arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from wanbench.wan_core.config import SOLVERS, T2V_A14B, TI2V_5B, GuideScale
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.latents import denormalize_latent, normalize_latent
from wanbench.wan_core.partial import Continuation, sample_latent, start_latent
from wanbench.wan_core.sampler import SamplerOptions, make_noise, sample
from wanbench.wan_core.schedulers import make_schedule

T2V = T2V_A14B.tiny()
SHAPE = (16, 2, 4, 4)


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def experts() -> list[WanDiT]:
    torch.manual_seed(0)
    return [WanDiT(T2V.dit).eval().requires_grad_(False), WanDiT(T2V.dit).eval().requires_grad_(False)]


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(5, T2V.dit.text_dim, generator=g), torch.randn(3, T2V.dit.text_dim, generator=g),
            torch.randn(1, *SHAPE, generator=g) * 2.0)


def _opts(solver: str = "euler", steps: int = 6, **kw) -> SamplerOptions:
    return SamplerOptions(solver=solver, steps=steps, shift=5.0, guide_scale=GuideScale(high=3.0, low=2.0),
                          boundary=0.875, seed=7, **kw)


def _run(experts, opts, samples, **kw):
    ctx, null, _ = _inputs()
    return sample_latent(experts, T2V, opts, context=ctx, context_null=null, samples=samples, **kw)


@pytest.mark.parametrize("solver", SOLVERS)
def test_end_step_then_start_step_equals_one_run(experts, solver: str) -> None:
    _, _, samples = _inputs()
    whole = _run(experts, _opts(solver), samples)
    first = _run(experts, _opts(solver, end_step=3), samples)
    assert isinstance(first.continuation, Continuation) and first.sigma_end > 0
    second = _run(experts, _opts(solver, start_step=3), first.samples, add_noise=False,
                  continuation=first.continuation)
    assert second.continuation is None and second.sigma_end == 0.0
    assert torch.equal(second.samples, whole.samples)


def test_three_way_split_equals_one_run(experts) -> None:
    _, _, samples = _inputs()
    whole = _run(experts, _opts("unipc", steps=7), samples)
    a = _run(experts, _opts("unipc", steps=7, end_step=2), samples)
    b = _run(experts, _opts("unipc", steps=7, start_step=2, end_step=5), a.samples, add_noise=False,
             continuation=a.continuation)
    c = _run(experts, _opts("unipc", steps=7, start_step=5), b.samples, add_noise=False, continuation=b.continuation)
    assert torch.equal(c.samples, whole.samples)


def test_leftover_latent_uses_comfyui_convention_and_continues_from_its_values(experts) -> None:
    """Without the exact continuation (e.g. the LATENT went through another node), the values
    x / (1 - sigma) are continued: Euler then equals one run to float rounding."""
    ctx, null, samples = _inputs()
    opts = _opts("euler", end_step=3)
    first = _run(experts, opts, samples)
    sigma = make_schedule("euler", 6, 5.0).sigmas[3]
    x3 = sample(experts, T2V, opts, context=ctx, context_null=null, latent_shape=SHAPE)
    assert torch.allclose(first.samples, denormalize_latent(x3 / (1 - sigma), T2V.vae)[None], rtol=0, atol=1e-6)
    copied = first.samples.clone()  # another tensor: the continuation does not apply
    second = _run(experts, _opts("euler", start_step=3), copied, add_noise=False, continuation=first.continuation)
    whole = _run(experts, _opts("euler"), samples)
    err = (second.samples - whole.samples).abs().max().item()
    assert 0 <= err <= 1e-4 * whole.samples.abs().max().item()


def test_denoise_starts_from_the_input_at_comfyui_noise_level(experts) -> None:
    ctx, null, samples = _inputs()
    opts = _opts("euler", steps=4, denoise=0.5)
    sigmas = opts.schedule().sigmas
    assert sigmas.tolist() == make_schedule("euler", 8, 5.0).sigmas[-5:].tolist()
    z = normalize_latent(samples[0], T2V.vae)
    noise = make_noise(SHAPE, 7)
    start = start_latent(opts, z, noise, add_noise=True)
    s0 = float(sigmas[0])
    assert torch.allclose(start, s0 * noise + (1 - s0) * z, atol=1e-6)
    got = _run(experts, opts, samples)
    want = sample(experts, T2V, opts, context=ctx, context_null=null, noise=start)
    assert torch.equal(got.samples, denormalize_latent(want, T2V.vae)[None])
    other = _run(experts, opts, samples * 0.5)
    assert not torch.allclose(other.samples, got.samples), "the input latent's values are used"


def test_full_run_ignores_the_input_values(experts) -> None:
    _, _, samples = _inputs()
    a = _run(experts, _opts("unipc", steps=3), samples)
    b = _run(experts, _opts("unipc", steps=3), torch.zeros_like(samples))
    assert torch.equal(a.samples, b.samples)


def test_start_step_with_add_noise_and_without(experts) -> None:
    _, _, samples = _inputs()
    opts = _opts("euler", start_step=2)
    z = normalize_latent(samples[0], T2V.vae)
    s = float(opts.schedule().sigmas[2])
    without = start_latent(opts, z, make_noise(SHAPE, 7), add_noise=False)
    assert torch.allclose(without, (1 - s) * z, atol=1e-6)
    a = _run(experts, opts, samples, add_noise=True)
    b = _run(experts, opts, samples, add_noise=False)
    assert not torch.allclose(a.samples, b.samples)


def test_mismatched_continuation_falls_back_to_the_values(experts, caplog) -> None:
    _, _, samples = _inputs()
    first = _run(experts, _opts("unipc", end_step=3), samples)
    with caplog.at_level("INFO", logger="wanbench.wan_core.partial"):
        second = _run(experts, _opts("euler", start_step=3), first.samples, add_noise=False,
                      continuation=first.continuation)
    assert "not used" in caplog.text and "solver or its schedule differ" in caplog.text
    assert torch.isfinite(second.samples).all()


def test_window_and_schedule_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="start_step must be an integer in"):
        _opts(start_step=6)
    with pytest.raises(ValueError, match=r"end_step must be an integer in \(start_step, steps\]"):
        _opts(start_step=3, end_step=3)
    with pytest.raises(ValueError, match="denoise must lie in"):
        _opts(denoise=0.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        _opts(steps=3, timesteps=(900, 950, 100))


def test_sample_refuses_a_window_without_its_start_latent(experts) -> None:
    ctx, null, _ = _inputs()
    with pytest.raises(ValueError, match="starting latent"):
        sample(experts, T2V, _opts(start_step=2), context=ctx, context_null=null, latent_shape=SHAPE)


def test_ti2v_split_keeps_the_first_frame_pinned() -> None:
    tiny = TI2V_5B.tiny()
    torch.manual_seed(2)
    model = WanDiT(tiny.dit).eval()
    shape = (48, 2, 2, 2)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(48, 1, 2, 2, generator=g)
    ctx, null = torch.randn(4, tiny.dit.text_dim, generator=g), torch.randn(4, tiny.dit.text_dim, generator=g)
    opts = dict(solver="unipc", steps=5, shift=5.0, guide_scale=3.0, seed=3)
    kw = dict(context=ctx, context_null=null, ti2v_z=z)
    raw = torch.zeros(1, *shape)
    whole = sample_latent([model], tiny, SamplerOptions(**opts), samples=raw, **kw)
    first = sample_latent([model], tiny, SamplerOptions(**opts, end_step=2), samples=raw, **kw)
    second = sample_latent([model], tiny, SamplerOptions(**opts, start_step=2), samples=first.samples,
                           add_noise=False, continuation=first.continuation, **kw)
    assert torch.equal(second.samples, whole.samples)
    assert torch.allclose(normalize_latent(whole.samples[0], tiny.vae)[:, :1], z, atol=1e-5)
