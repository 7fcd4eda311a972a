"""The VAE's convolutions: the causal 3-D convolution with its cache, and the 2x upsampling conv.

Both compute exactly what the official Wan VAE computes (same sums, up to float rounding) while
skipping work whose result is known:

- **First-chunk kernel slice.** A causal conv pads 2 * pt zero frames in front of a stream. When
  a call starts the stream with fewer real frames than the kernel has taps (the first chunk of a
  frame-by-frame decode or encode holds one frame), every output window still overlaps the zeros,
  and the taps that meet them add nothing. `CausalConv3d` then convolves with the last taps of
  the kernel only: one tap for one frame, i.e. a third of the multiply-adds of the 3-tap
  kernel (less work, not a faster kernel). Longer first chunks run the full kernel.
- **Nearest 2x upsampling + 3x3 conv as four 2x2 convs.** After nearest-neighbour upsampling,
  every 3x3 window covers only 2x2 distinct source pixels, so each of the four output phases
  (even/odd row x even/odd column) is a 2x2 conv of the source image with merged taps: 4
  multiply-adds per output instead of 9 (less work), and the 4x larger upsampled image is never
  built (`upsample2x_conv`).
- **No needless copies.** The kept frames of a causal cache are a view of the conv's own padded or
  concatenated input (no clone) when that input is a tensor the conv made itself and the view
  keeps at most twice the kept frames alive.

On the CPU in float32 the convolution kernel is chosen per call (`conv3d`): see its docstring.

Shapes: all 5-D tensors are (B, C, T, H, W); T may be 0 inside a stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# CPU kernel choice of `conv3d`: oneDNN from this many output positions per sample on.
ONEDNN_MIN_OUTPUT_POSITIONS = 512
# CPU oneDNN convolutions with at most this many input channels run channels-last (measured below).
CHANNELS_LAST_MAX_IN_CHANNELS = 128
HALF_DTYPES = (torch.float16, torch.bfloat16)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
           stride: tuple[int, int, int] = (1, 1, 1), padding: tuple[int, int, int] = (0, 0, 0)) -> torch.Tensor:
    """`F.conv3d` (groups 1, dilation 1), with the kernel and memory layout chosen per call.

    CPU, float32, inference: PyTorch's own choice (by input size) is several times off for the
    VAE's per-chunk shapes. oneDNN re-lays out the whole weight on every call (about 3.5 ns per
    weight, 100 ms for a 1024-channel 3x3x3 conv), which only pays off when there are enough
    output positions, while the reference im2col kernel is slow when there are many (measured:
    3.5x slower than oneDNN on a (1, 96, 6, 32, 32) chunk, 2.5x faster on (1, 1024, 3, 8, 8)). So
    oneDNN runs from `ONEDNN_MIN_OUTPUT_POSITIONS` output positions (frames x height x width) on,
    im2col below. oneDNN convolutions with few input channels (<= `CHANNELS_LAST_MAX_IN_CHANNELS`:
    the Wan2.1 decoder's full-resolution stage) run channels-last, which spares oneDNN the
    re-layout of input and output (measured 13 % faster at 96 channels, equal at 192, 15 % slower
    at 256, on the 2-core AVX2 build machine); their outputs stay channels-last for the next layer.

    CUDA, float16/bfloat16: channels-last (NDHWC), the layout of cuDNN's tensor-core kernels;
    activations then stay channels-last from layer to layer (not measured yet: no GPU was
    available). Elsewhere this is `F.conv3d`. Same weights, same sums: results agree to rounding.

    Shapes: x (B, Ci, T, H, W), weight (Co, Ci, kt, kh, kw) -> (B, Co, T', H', W').
    """
    if x.device.type == "cuda" and x.dtype in HALF_DTYPES:
        cl = torch.channels_last_3d
        return F.conv3d(x.contiguous(memory_format=cl), weight.contiguous(memory_format=cl), bias, stride, padding)
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or torch.is_grad_enabled()):
        return F.conv3d(x, weight, bias, stride, padding)
    kt, kh, kw = weight.shape[2:]
    _, _, t, h, w = x.shape
    positions = (((t - kt) // stride[0] + 1) * ((h + 2 * padding[1] - kh) // stride[1] + 1)
                 * ((w + 2 * padding[2] - kw) // stride[2] + 1))
    if positions >= ONEDNN_MIN_OUTPUT_POSITIONS and torch.backends.mkldnn.is_available():
        layout = (torch.channels_last_3d if x.shape[1] <= CHANNELS_LAST_MAX_IN_CHANNELS
                  else torch.contiguous_format)
        return torch.ops.aten.mkldnn_convolution(x.contiguous(memory_format=layout),
                                                 weight.contiguous(memory_format=layout), bias, padding, stride,
                                                 (1, 1, 1), 1)
    return torch.ops.aten.slow_conv3d(x.contiguous(), weight.contiguous(), (kt, kh, kw), bias, stride, padding)


class CausalCache:
    """The not-yet-consumed input frames of one `CausalConv3d` between chunks of a stream.

    Outside a stream (`active` False) every call is a whole sequence: the conv pads zeros in front
    and keeps nothing. Inside a stream, `history` None means "at the start" (zeros precede the
    next frames); afterwards it holds the tail of the (padded) input that later output frames
    still need, and the next call prepends it.
    """

    def __init__(self) -> None:
        self.active = False
        self.history: torch.Tensor | None = None

    def start(self) -> None:
        """Begin a new stream: forget any history and keep tails from now on."""
        self.active = True
        self.history = None

    def stop(self) -> None:
        """End the stream and free the kept frames."""
        self.active = False
        self.history = None

    @property
    def num_frames(self) -> int:
        return 0 if self.history is None else self.history.shape[2]


class CausalConv3d(nn.Conv3d):
    """A 3-D convolution that pads time only in front (2 * pt zero frames), never behind.

    Spatial zero padding (ph, pw) is symmetric and done by the convolution itself. In a stream the
    front padding is replaced by the kept frames of the previous chunk (see `CausalCache`), so
    chunked and whole-sequence calls give the same frames. A call that starts a stream (or a whole
    sequence) with fewer frames than the kernel has taps uses the first-chunk kernel slice (module
    docstring).

    Shapes: x (B, Ci, T, H, W) -> (B, Co, T_out, H, W); T_out = number of complete kernel windows
    over (history or zero padding) + x. T may be 0 (nothing comes out).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        *,
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        kt, kh, kw = _triple(kernel_size)
        pt, ph, pw = _triple(padding)
        super().__init__(in_channels, out_channels, (kt, kh, kw), stride=_triple(stride), padding=(0, ph, pw))
        self.front_padding = 2 * pt
        self.cache = CausalCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see class docstring
        history = self.cache.history
        if history is None:
            return self._start(x)
        if history.shape[2]:
            return self._run(torch.cat([history, x], dim=2), self.weight, owned=True)
        return self._run(x, self.weight, owned=False)

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        """A call with only zero frames before `x` (a whole sequence, or the first of a stream)."""
        num_frames, pad, kt = x.shape[2], self.front_padding, self.kernel_size[0]
        if num_frames == 0:
            return self._empty_output(x)  # nothing consumed: the stream is still at its start
        if self.stride[0] == 1 and pad == kt - 1 and num_frames < kt:
            # First-chunk kernel slice: output j sees kt - 1 - j zero frames, so the first
            # kt - num_frames taps only ever multiply zeros and are skipped (with their frames).
            if self.cache.active:  # the padded input's last `pad` frames, zeros included
                self.cache.history = _pad_front(x, pad - num_frames) if pad > num_frames else x.clone()
            return conv3d(_pad_front(x, num_frames - 1), self.weight[:, :, kt - num_frames:], self.bias,
                          stride=self.stride, padding=self.padding)
        if pad:
            return self._run(_pad_front(x, pad), self.weight, owned=True)
        return self._run(x, self.weight, owned=False)

    def _run(self, x: torch.Tensor, weight: torch.Tensor, *, owned: bool) -> torch.Tensor:
        """Convolve the full input (history or padding included) and keep its unconsumed tail.

        `owned`: `x` was made here (padding or concatenation), so the tail may be a view of it
        when that keeps at most twice the tail's frames alive (a 3-frame input keeping 2); a
        smaller tail of a longer input is copied, so that memory stays bounded by the kept frames
        (2 frames at full resolution, not the 6 of a 4-frame chunk). The caller's own tensor is
        always copied (the caller may change it).
        """
        kt, st = self.kernel_size[0], self.stride[0]
        num_out = (x.shape[2] - kt) // st + 1 if x.shape[2] >= kt else 0
        if self.cache.active:
            tail = x[:, :, st * num_out :]
            self.cache.history = tail if owned and 2 * tail.shape[2] >= x.shape[2] else tail.clone()
        if num_out == 0:
            return self._empty_output(x)
        return conv3d(x, weight, self.bias, stride=self.stride, padding=self.padding)

    def _empty_output(self, x: torch.Tensor) -> torch.Tensor:
        b, _, _, h, w = x.shape
        h_out = (h + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1
        w_out = (w + 2 * self.padding[2] - self.kernel_size[2]) // self.stride[2] + 1
        return x.new_zeros(b, self.out_channels, 0, h_out, w_out)


def _pad_front(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """`num_frames` zero frames in front of x (x itself when 0)."""
    return F.pad(x, (0, 0, 0, 0, num_frames, 0)) if num_frames else x


def _triple(value: int | tuple[int, ...]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return value, value, value
    if len(value) != 3:
        raise ValueError(f"expected an int or 3 values (t, h, w); got {value!r}")
    return int(value[0]), int(value[1]), int(value[2])


# ------------------------------------------------------------------------------- 2x upsampling
class PhaseKernels:
    """The four 2x2 phase kernels of an upsampling conv, kept for the length of one stream.

    Building them reads the 3x3 weight and writes 16/9 of it; a stream (one decode) builds them
    once, not once per chunk. Outside a stream they are built per call and not kept. The kept
    kernels are tied to the weight tensor they came from (its storage and version counter), so a
    weight that is replaced, or changed in place during the stream, is never served stale kernels
    (an inference tensor, made under `torch.inference_mode`, has no version counter and cannot be
    changed in place outside it: it is tied to its storage only).
    """

    def __init__(self) -> None:
        self.active = False
        self._key: tuple[int, int | None, torch.device, torch.dtype] | None = None
        self._kernels: torch.Tensor | None = None

    def start(self) -> None:
        self.active, self._key, self._kernels = True, None, None

    def stop(self) -> None:
        self.active, self._key, self._kernels = False, None, None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        """(4, Co, Ci, 1, 2, 2) kernels for phases (0, 0), (0, 1), (1, 0), (1, 1) of `weight`."""
        version = None if weight.is_inference() else weight._version
        key = (weight.data_ptr(), version, weight.device, weight.dtype)
        if self._kernels is not None and self._key == key:
            return self._kernels
        kernels = phase_kernels(weight)
        if self.active:
            self._key, self._kernels = key, kernels
        return kernels


def _merge_taps(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Along `dim` (3 taps): phase 0 sees source offsets (-1, 0) with taps (w0, w1 + w2); phase 1
    sees offsets (0, +1) with taps (w0 + w1, w2)."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """Merge a 3x3 conv weight into the four 2x2 kernels that act on the un-upsampled image.

    The taps are summed in float32 and rounded to the weight's dtype once (a half-precision
    weight thus gains one rounding per merged tap, within its own precision).
    Shapes: weight (Co, Ci, 3, 3) -> (4, Co, Ci, 1, 2, 2), phases in (row, column) order.
    """
    rows = _merge_taps(weight.float(), 2)  # each (Co, Ci, 2, 3)
    merged = torch.stack([cols for r in rows for cols in _merge_taps(r, 3)]).unsqueeze(3)
    return merged.to(weight.dtype)


def upsample2x_conv(x: torch.Tensor, conv: nn.Conv2d, kernels: PhaseKernels) -> torch.Tensor:
    """`conv(nearest_upsample_2x(frame))` for every frame, computed as four 2x2 phase convs.

    Exactly the official upsampling (nearest x2, then a 3x3 conv with zero padding 1) up to float
    rounding, with 4 instead of 9 multiply-adds per output and no upsampled copy of the input:
    phase (a, b) of the output, pixels (2y + a, 2x + b), is a 2x2 conv over source rows
    (y - 1 + a, y + a) and columns (x - 1 + b, x + b). Each phase conv runs with padding 1 and
    yields (H + 1) x (W + 1) positions, of which phase (a, b) keeps rows a..a+H and columns b..b+W.

    Shapes: x (B, Ci, T, H, W) -> (B, Co, T, 2H, 2W).
    """
    b, _, t, h, w = x.shape
    phases = kernels.get(conv.weight)
    out = x.new_empty(b, conv.out_channels, t, h, 2, w, 2)  # (B, Co, T, H, 2, W, 2)
    for index, kernel in enumerate(phases):
        a, c = divmod(index, 2)
        y = conv3d(x, kernel, conv.bias, padding=(0, 1, 1))  # (B, Co, T, H + 1, W + 1)
        out[:, :, :, :, a, :, c] = y[:, :, :, a : a + h, c : c + w]
    return out.view(b, conv.out_channels, t, 2 * h, 2 * w)


def downsample2x_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The official downsampling of every frame: zero-pad right and bottom by 1, 3x3 conv, stride 2.

    Run as a (1, 3, 3) conv over the 5-D tensor, so the frames need no reshaping to a batch of
    images and back (two copies fewer; same sums).

    Shapes: x (B, C, T, H, W) -> (B, Co, T, H/2, W/2).
    """
    padded = F.pad(x, (0, 1, 0, 1))
    return conv3d(padded, conv.weight.unsqueeze(2), conv.bias, stride=(1, *conv.stride))
