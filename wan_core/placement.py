"""Where the DiT weights live during sampling, applied to built models from outside.

Policies (`make_placement(experts, kind, device=...)`):

* `none`   every expert is moved to the compute device when the first one is activated (inside
           the first step's loading stage) and stays there.
* `model`  only the expert in use is on the device; the other waits on the CPU and the two are
           swapped at the boundary (the official behaviour with `init_on_cpu`, spec section 7).
           On exit every expert is back on the CPU.
* `blocks` the active expert keeps its embeddings, head and its first `num_resident_blocks`
           transformer blocks on the device; every other block lives on the CPU (pinned when the
           device is CUDA) and is copied in by a forward pre-hook right before it runs and dropped
           by a forward post-hook right after. On CUDA the copy of the next streamed block is issued
           on a side stream while the current block computes (prefetch), so transfers overlap
           compute; before a prefetch the CPU waits until the device has finished the block
           before, so at most two streamed blocks are on the device. The inactive expert is
           entirely on the CPU. Streamed blocks stay in pinned host memory after `close()`.

Numbers do not depend on the policy: the same tensors are used, only their location changes. No
model code knows about placement; everything here is `.to()`, `.data` swaps and module hooks, and
`close()` (also on errors and interrupts, through the context manager) removes every hook.

Weight dtypes (`config.WEIGHT_DTYPES`: float32 / bfloat16 / float16) are chosen when loading
(`checkpoints.dit.load_dit(..., dtype=)`) or with `cast_weights`. Compact storage (fp8, GGUF,
bf16 decoded per block: `runtime/compact.py`) composes with every placement: between forwards the
parameters hold the stored tensors, so `blocks` streams the compact bytes, and its pre-hook is
prepended so that the bytes are on the device before the storage hook decodes them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from .config import AUTO_PLACEMENT, PLACEMENTS, WEIGHT_DTYPES

log = logging.getLogger(__name__)

__all__ = ["Placement", "make_placement", "cast_weights"]

OFFLOAD_DEVICE = torch.device("cpu")


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating-point parameters and buffers of `model` in place; returns it."""
    if dtype not in WEIGHT_DTYPES.values():
        raise ValueError(f"dtype must be one of {list(WEIGHT_DTYPES.values())}; got {dtype}")
    return model.to(dtype=dtype)


class Placement:
    """Base policy (`none`): all experts on the device. Use as a context manager around a run."""

    kind = "none"

    def __init__(self, experts: Sequence[nn.Module], *, device: torch.device | str) -> None:
        self.experts = list(experts)
        self.device = torch.device(device)
        self.active: int | None = None
        self._open = False

    def __enter__(self) -> Placement:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self._open = True

    def activate(self, index: int) -> nn.Module:
        """Make expert `index` ready to run on the device and return it."""
        if not self._open:
            raise RuntimeError("placement used before open(); use it as a context manager")
        if self.active is None and self.kind == "none":
            for model in _unique(self.experts):  # no-op for experts already there
                model.to(self.device)
        self.active = index
        return self.experts[index]

    def close(self) -> None:
        self._open = False
        self.active = None


class ModelSwap(Placement):
    """`model`: the expert not in use waits on the CPU; swapped when the active expert changes."""

    kind = "model"

    def open(self) -> None:
        for model in _unique(self.experts):
            model.to(OFFLOAD_DEVICE)
        self._open = True

    def activate(self, index: int) -> nn.Module:
        if index != self.active:
            wanted = self.experts[index]
            for model in _unique(self.experts):
                if model is not wanted:
                    model.to(OFFLOAD_DEVICE)
            wanted.to(self.device)
        return super().activate(index)

    def close(self) -> None:
        for model in _unique(self.experts):
            model.to(OFFLOAD_DEVICE)
        super().close()


class _StreamedBlock:
    """The CPU copy of one streamed block and its device copy while it runs."""

    def __init__(self, block: nn.Module, pin: bool) -> None:
        self.block = block
        self.tensors = [*block.parameters(), *block.buffers()]
        self.stored = []
        for t in self.tensors:
            cpu = t.data.to(OFFLOAD_DEVICE)
            # pinned copies stay the parameters' storage after close(), so a later run re-uses them
            self.stored.append(cpu.pin_memory() if pin and not cpu.is_pinned() else cpu)
            t.data = self.stored[-1]
        self.staged: list[torch.Tensor] | None = None
        self.ready: torch.cuda.Event | None = None
        self.done: torch.cuda.Event | None = None  # recorded after the device copy was released


class BlockSwap(Placement):
    """`blocks`: N resident blocks, the others streamed per forward with prefetch on a side stream."""

    kind = "blocks"

    def __init__(self, experts: Sequence[nn.Module], *, device: torch.device | str,
                 num_resident_blocks: int) -> None:
        super().__init__(experts, device=device)
        for k, model in enumerate(self.experts):
            if not isinstance(getattr(model, "blocks", None), nn.ModuleList):
                raise TypeError(f"'blocks' placement needs a model with a `blocks` ModuleList (WanDiT); "
                                f"expert {k} is {type(model).__name__}")
        self.num_resident_blocks = num_resident_blocks
        self._streamed: dict[int, list[_StreamedBlock]] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._cuda = self.device.type == "cuda"
        self._side: torch.cuda.Stream | None = None
        self._last_run: _StreamedBlock | None = None
        self.bytes_streamed = 0

    def open(self) -> None:
        if self._cuda:
            self._side = torch.cuda.Stream(device=self.device)
        for model in _unique(self.experts):
            model.to(OFFLOAD_DEVICE)
            chain = [_StreamedBlock(b, pin=self._cuda) for b in model.blocks[self.num_resident_blocks:]]
            self._streamed[id(model)] = chain
            for pos, entry in enumerate(chain):
                nxt = chain[(pos + 1) % len(chain)]
                # prepended: the weights must be on the device before any other pre-hook (storage) sees them
                pre_hook = self._pre_hook(entry, nxt)
                self._hooks.append(entry.block.register_forward_pre_hook(pre_hook, prepend=True))
                self._hooks.append(entry.block.register_forward_hook(self._post_hook(entry), always_call=True))
        self._open = True

    def activate(self, index: int) -> nn.Module:
        if index != self.active:
            wanted = self.experts[index]
            for model in _unique(self.experts):
                if model is not wanted:
                    for entry in self._streamed[id(model)]:
                        entry.staged, entry.ready = None, None  # drop a prefetched block
                    self._move_resident(model, OFFLOAD_DEVICE)
            self._move_resident(wanted, self.device)
        return super().activate(index)

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if self._side is not None:
            self._side.synchronize()
        for model in _unique(self.experts):
            for entry in self._streamed.get(id(model), []):
                entry.staged, entry.ready, entry.done = None, None, None
                for t, cpu in zip(entry.tensors, entry.stored, strict=False):
                    t.data = cpu
            model.to(OFFLOAD_DEVICE)
        self._streamed.clear()
        self._last_run = None
        super().close()

    def _move_resident(self, model: nn.Module, device: torch.device) -> None:
        """Move everything but the streamed blocks (they move per forward)."""
        for name, child in model.named_children():
            if name != "blocks":
                child.to(device)
        for block in model.blocks[: self.num_resident_blocks]:
            block.to(device)
        for t in [*model.parameters(recurse=False), *model.buffers(recurse=False)]:
            t.data = t.data.to(device)

    def _stage(self, entry: _StreamedBlock) -> None:
        """Start copying a block to the device (on the side stream when on CUDA)."""
        if entry.staged is not None:
            return
        if self._side is None:
            entry.staged = [cpu.to(self.device) for cpu in entry.stored]
        else:
            with torch.cuda.stream(self._side):
                entry.staged = [cpu.to(self.device, non_blocking=True) for cpu in entry.stored]
                entry.ready = torch.cuda.Event()
                entry.ready.record(self._side)
        self.bytes_streamed += sum(t.numel() * t.element_size() for t in entry.stored)

    def _pre_hook(self, entry: _StreamedBlock, nxt: _StreamedBlock):
        def hook(module: nn.Module, args: object) -> None:
            self._stage(entry)
            if entry.ready is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(entry.ready)
                for t in entry.staged:
                    t.record_stream(current)  # keep the memory alive until this stream is done
            for t, dev in zip(entry.tensors, entry.staged, strict=False):
                t.data = dev
            if nxt is not entry:
                # The previous block's device copy is freed only once the device has run it (the
                # CPU may be ahead); wait for that before prefetching, so at most two streamed blocks
                # (this one and the next) are ever on the device.
                last = self._last_run
                if last is not None and last.done is not None:
                    last.done.synchronize()
                    last.done = None
                self._stage(nxt)
        return hook

    def _post_hook(self, entry: _StreamedBlock):
        def hook(module: nn.Module, args: object, output: object) -> None:
            for t, cpu in zip(entry.tensors, entry.stored, strict=False):
                t.data = cpu
            entry.staged, entry.ready = None, None
            if self._cuda:
                entry.done = torch.cuda.Event()
                entry.done.record(torch.cuda.current_stream(self.device))
            self._last_run = entry
        return hook


def make_placement(experts: Sequence[nn.Module], kind: str, *, device: torch.device | str,
                   num_resident_blocks: int = 0) -> Placement:
    """The placement policy `kind` ('none' | 'model' | 'blocks') for these experts."""
    if kind == "none":
        return Placement(experts, device=device)
    if kind == "model":
        return ModelSwap(experts, device=device)
    if kind == "blocks":
        if num_resident_blocks < 0:
            raise ValueError(f"num_resident_blocks must be >= 0; got {num_resident_blocks}")
        return BlockSwap(experts, device=device, num_resident_blocks=num_resident_blocks)
    kinds = tuple(p for p in PLACEMENTS if p != AUTO_PLACEMENT)
    raise ValueError(f"placement must be one of {kinds} here ({AUTO_PLACEMENT!r} is resolved by the memory "
                     f"planner before a placement is made); got {kind!r}")


def _unique(models: Sequence[nn.Module]) -> list[nn.Module]:
    """The distinct modules (the same model may be passed for both experts)."""
    seen: dict[int, nn.Module] = {}
    for m in models:
        seen.setdefault(id(m), m)
    return list(seen.values())
