"""The VAE convolutions that skip known-zero work compute what the official ones compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from wanbench.wan_core.config import WAN21_VAE, WAN22_VAE
from wanbench.wan_core.vae import WanVAE
from wanbench.wan_core.vae_blocks import Resample, streaming
from wanbench.wan_core.vae_conv import (
    CausalConv3d,
    PhaseKernels,
    downsample2x_conv,
    phase_kernels,
    upsample2x_conv,
)


def _official_causal(conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
    """The official causal conv: 2 * pt zero frames in front, the full kernel."""
    padded = F.pad(x, (0, 0, 0, 0, conv.front_padding, 0))
    return F.conv3d(padded, conv.weight, conv.bias, conv.stride, conv.padding)


@pytest.mark.parametrize("num_frames", [1, 2, 3, 5])
def test_first_chunk_kernel_slice_equals_the_zero_padded_conv(num_frames: int) -> None:
    torch.manual_seed(0)
    conv = CausalConv3d(6, 5, 3, padding=1)
    x = torch.randn(2, 6, num_frames, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), _official_causal(conv, x), rtol=1e-5, atol=1e-5)


def test_first_chunk_kernel_slice_does_a_third_of_the_work() -> None:
    conv = CausalConv3d(8, 8, 3, padding=1).to("meta")
    counts = {}
    for frames in (1, 2, 3):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            conv(torch.empty(1, 8, frames, 6, 6, device="meta"))
        counts[frames] = counter.get_total_flops()
    per_tap_and_frame = 2 * 8 * 8 * 9 * 36
    assert counts[1] == per_tap_and_frame  # 1 frame: the last tap only (the official conv runs 3)
    assert counts[2] == 2 * 2 * per_tap_and_frame  # 2 frames: the last 2 taps (one zero frame left)
    assert counts[3] == 3 * 3 * per_tap_and_frame  # 3 frames: the full kernel, zero taps included


@pytest.mark.parametrize("chunks", [(1, 2, 1, 3), (2, 1, 4), (1, 1, 1, 1, 1)])
def test_streamed_chunks_equal_the_whole_sequence(chunks: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    conv = CausalConv3d(4, 3, 3, padding=1)
    x = torch.randn(1, 4, sum(chunks), 5, 5)
    with torch.no_grad():
        whole = _official_causal(conv, x)
        parts, start = [], 0
        with streaming(conv):
            conv(x[:, :, :0])  # a zero-frame call leaves the stream at its start
            assert conv.cache.history is None
            for n in chunks:
                parts.append(conv(x[:, :, start : start + n]))
                start += n
        assert conv.cache.history is None and not conv.cache.active
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=1e-5, atol=1e-5)


def test_kept_frames_never_alias_the_callers_tensor() -> None:
    # the cache may keep a view of a tensor the conv made (padding, concatenation), never of x
    torch.manual_seed(2)
    conv = CausalConv3d(3, 3, 3, padding=1)
    pointwise = CausalConv3d(3, 3, 1)
    x = torch.randn(1, 3, 2, 4, 4)
    with torch.no_grad(), streaming(conv), streaming(pointwise):
        conv(x)  # 2 frames at the start: the kept frames are the two frames of x
        pointwise(x)
        kept = conv.cache.history.clone()
        x.mul_(0)  # the caller reuses its tensor
        torch.testing.assert_close(conv.cache.history, kept)
        assert pointwise.cache.num_frames == 0


def _official_upsample(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    b, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, h, w)
    y = conv(F.interpolate(frames, scale_factor=2.0, mode="nearest"))
    return y.reshape(b, t, -1, 2 * h, 2 * w).transpose(1, 2)


@pytest.mark.parametrize("shape", [(1, 6, 1, 4, 4), (2, 5, 3, 5, 7), (1, 4, 2, 1, 3)])
def test_upsample_as_four_phase_convs_equals_nearest_then_conv(shape: tuple[int, ...]) -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(shape[1], 7, 3, padding=1)
    x = torch.randn(*shape)
    with torch.no_grad():
        got = upsample2x_conv(x, conv, PhaseKernels())
        torch.testing.assert_close(got, _official_upsample(x, conv), rtol=1e-5, atol=1e-5)


def test_upsample_phase_convs_in_bfloat16_err_like_the_official_path() -> None:
    torch.manual_seed(4)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(1, 16, 2, 6, 6)
    with torch.no_grad():
        exact = _official_upsample(x, conv)
        half_conv = nn.Conv2d(16, 16, 3, padding=1).to(torch.bfloat16)
        half_conv.load_state_dict(conv.state_dict())
        ours = upsample2x_conv(x.bfloat16(), half_conv, PhaseKernels()).float()
        official = _official_upsample(x.bfloat16(), half_conv).float()
    ours_err = (ours - exact).norm() / exact.norm()
    official_err = (official - exact).norm() / exact.norm()
    assert ours_err < 2 * official_err + 1e-3


def test_upsample_does_four_ninths_of_the_multiply_adds() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1, device="meta")
    x = torch.empty(1, 8, 1, 16, 16, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        upsample2x_conv(x, conv, PhaseKernels())
    official = 2 * 8 * 8 * 9 * 32 * 32
    # four 2x2 convs, each over (H + 1) x (W + 1) positions (one row and column are dropped)
    assert counter.get_total_flops() == 4 * 2 * 8 * 8 * 4 * 17 * 17
    assert counter.get_total_flops() < 0.51 * official


def test_phase_kernels_are_kept_for_a_stream_and_follow_the_weight() -> None:
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    kernels = PhaseKernels()
    assert kernels.get(conv.weight) is not kernels.get(conv.weight)  # outside a stream: not kept
    kernels.start()
    first = kernels.get(conv.weight)
    assert kernels.get(conv.weight) is first
    with torch.no_grad():
        conv.weight.mul_(2.0)  # changed in place: the kept kernels are stale
    torch.testing.assert_close(kernels.get(conv.weight), phase_kernels(conv.weight))
    conv.weight = nn.Parameter(torch.randn(3, 3, 3, 3))  # replaced
    torch.testing.assert_close(kernels.get(conv.weight), phase_kernels(conv.weight))
    kernels.stop()
    assert kernels._kernels is None


def test_phase_kernels_of_inference_weights() -> None:
    with torch.inference_mode():  # ComfyUI runs nodes (and may load models) in inference mode
        conv = nn.Conv2d(3, 3, 3, padding=1)
        x = torch.randn(1, 3, 2, 4, 4)
        kernels = PhaseKernels()
        kernels.start()
        first = upsample2x_conv(x, conv, kernels)
        assert kernels.get(conv.weight) is kernels.get(conv.weight)
        torch.testing.assert_close(first, _official_upsample(x, conv), rtol=1e-5, atol=1e-5)


def test_decode_frees_the_phase_kernels() -> None:
    torch.manual_seed(6)
    model = WanVAE(WAN21_VAE.tiny())
    model.decode(torch.randn(1, 16, 2, 2, 2))
    kept = [m.kernels for m in model.modules() if isinstance(m, Resample) and m.kernels is not None]
    assert kept and all(k._kernels is None and not k.active for k in kept)


@pytest.mark.parametrize("shape", [(1, 4, 2, 6, 8), (2, 3, 1, 5, 7)])
def test_downsample_without_reshapes_equals_the_official_frames(shape: tuple[int, ...]) -> None:
    torch.manual_seed(7)
    conv = nn.Conv2d(shape[1], shape[1], 3, stride=2)
    x = torch.randn(*shape)
    b, c, t, h, w = shape
    with torch.no_grad():
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        expected = conv(F.pad(frames, (0, 1, 0, 1)))
        expected = expected.reshape(b, t, c, *expected.shape[-2:]).transpose(1, 2)
        torch.testing.assert_close(downsample2x_conv(x, conv), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [WAN21_VAE.tiny(), WAN22_VAE.tiny()], ids=["wan2.1", "wan2.2"])
def test_decode_executes_less_than_the_reference_count(config) -> None:
    from wanbench.wan_core.flops import vae_flops

    model = WanVAE(config, device="meta")
    latent = torch.empty(1, config.z_dim, 3, 4, 4, device="meta")
    with FlopCounterMode(display=False) as counter:
        model.decode(latent)
    executed, reference = counter.get_total_flops(), vae_flops(config, "decode", tuple(latent.shape))
    assert 0.5 * reference < executed < 0.95 * reference


@pytest.mark.parametrize(("channels", "channels_last"), [(8, True), (160, False)])
def test_cpu_layout_choice_by_input_channels(channels: int, channels_last: bool) -> None:
    from wanbench.wan_core.vae_conv import conv3d

    torch.manual_seed(8)
    x = torch.randn(1, channels, 3, 16, 16)  # 1 x 16 x 16 = 256 output positions: im2col
    weight = torch.randn(4, channels, 3, 3, 3) * 0.1
    big = torch.randn(1, channels, 4, 16, 16)  # 2 x 16 x 16 = 512 positions: oneDNN
    with torch.no_grad():
        for inp in (x, big):
            got = conv3d(inp, weight, None, padding=(0, 1, 1))
            torch.testing.assert_close(got, F.conv3d(inp, weight, None, padding=(0, 1, 1)), rtol=1e-4, atol=1e-4)
        small_out = conv3d(x, weight, None, padding=(0, 1, 1))
        big_out = conv3d(big, weight, None, padding=(0, 1, 1))
    assert small_out.is_contiguous()
    assert big_out.is_contiguous(memory_format=torch.channels_last_3d) == channels_last


def test_kept_frames_hold_no_more_than_twice_their_size() -> None:
    # a view of the concatenated input is kept only when it pins at most twice the kept frames
    conv = CausalConv3d(2, 2, 3, padding=1)
    x = torch.randn(1, 2, 6, 4, 4)
    frame_bytes = 2 * 4 * 4 * x.element_size()
    with torch.no_grad(), streaming(conv):
        conv(x[:, :, :1])
        conv(x[:, :, 1:2])  # history 2 + 1 frame: the kept view pins 3 frames
        assert conv.cache.history.untyped_storage().nbytes() == 3 * frame_bytes
        conv(x[:, :, 2:6])  # history 2 + 4 frames: the 2 kept frames are copied out of the 6
        assert conv.cache.history.untyped_storage().nbytes() == 2 * frame_bytes
