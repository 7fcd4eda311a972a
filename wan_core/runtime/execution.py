"""Execution options applied only while sampling: TF32 for float32 matmuls and regional torch.compile.

The experts bundle that the nodes pass around is shared (ComfyUI caches it, several branches of a
graph may use it), so nothing here changes the modules for good: `applied(experts, options)` is a
context manager that turns the options on for one sampling run and undoes them on exit, errors
and interrupts included.

- TF32 (`tf32=True`): `torch.set_float32_matmul_precision("high")` for the run (cuBLAS then
  multiplies float32 matrices on TF32 tensor cores, ~10 mantissa bits), the previous precision
  restored after. It matters for float32 compute on CUDA (Ampere and newer); bf16/fp16 compute and
  CPU matmuls are unchanged (checked: a CPU float32 matmul gives the same bits).
- Compile (`compile_mode` other than "off"): `compile.apply_compile` on every expert's blocks
  (regional: one graph for all blocks). The first forward of each expert is recorded as the
  `Compile` stage (kind "init", a child of the step it happens in) with its wall time; Dynamo's
  compiles and recompiles are counted, and a summary event (`COMPILE_SUMMARY_EVENT`) closes the run.
  The compiled code stays in Dynamo's cache when the regions are removed, so a later run with the
  same shapes compiles nothing (its Compile stage is then one ordinary forward).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..compile import CompileConfig, CompiledRegions, apply_compile
from ..config import COMPILE_CHOICES, COMPILE_OFF, COMPILE_STAGE, COMPILE_SUMMARY_EVENT
from ..trace import event, stage

log = logging.getLogger(__name__)

TF32_PRECISION = "high"  # torch's float32 matmul precision that allows TF32


@dataclass(frozen=True, kw_only=True)
class ExecutionOptions:
    """How the experts run while sampling; the defaults change nothing."""

    tf32: bool = False
    compile_mode: str = COMPILE_OFF
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {COMPILE_CHOICES}; got {self.compile_mode!r}")
        if not isinstance(self.tf32, bool):
            raise TypeError(f"tf32 must be a bool; got {self.tf32!r}")

    @property
    def compiles(self) -> bool:
        return self.compile_mode != COMPILE_OFF


@dataclass
class ExecutionRecord:
    """What took effect in one run (facts for the profiler)."""

    tf32: bool
    float32_matmul_precision: str
    compiled: bool
    compile_seconds: list[float] = field(default_factory=list)
    num_compiles: int | None = None
    num_recompiles: int | None = None


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[str]:
    """TF32 for float32 matmuls inside the block (when `enabled`); yields the precision in effect."""
    before = torch.get_float32_matmul_precision()
    if enabled:
        torch.set_float32_matmul_precision(TF32_PRECISION)
    try:
        yield torch.get_float32_matmul_precision()
    finally:
        torch.set_float32_matmul_precision(before)


class _FirstForwardStage:
    """Records the first forward of a compiled expert as the `Compile` stage (forward hooks)."""

    def __init__(self, model: nn.Module, expert: int, record: ExecutionRecord, options: ExecutionOptions) -> None:
        self._scope: contextlib.ExitStack | None = None
        self._start = 0.0
        self._done = False
        self._record = record
        self._facts = dict(expert=expert, backend=options.compile_backend, mode=options.compile_mode)
        self._handles = [model.register_forward_pre_hook(self._begin),
                         model.register_forward_hook(self._end, always_call=True)]

    def _begin(self, module: nn.Module, args: object) -> None:
        if self._done or self._scope is not None:
            return
        self._scope = contextlib.ExitStack()
        self._scope.enter_context(stage(COMPILE_STAGE.name, kind=COMPILE_STAGE.kind, **self._facts))
        self._start = time.perf_counter()

    def _end(self, module: nn.Module, args: object, output: object) -> None:
        if self._scope is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._record.compile_seconds.append(time.perf_counter() - self._start)
        scope, self._scope, self._done = self._scope, None, True
        scope.close()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self._scope is not None:  # a forward that never returned (interrupted): close its stage
            self._scope.close()
            self._scope = None


@contextlib.contextmanager
def _compiled(experts: Sequence[nn.Module], options: ExecutionOptions,
              record: ExecutionRecord) -> Iterator[None]:
    if not options.compiles:
        yield
        return
    config = CompileConfig(backend=options.compile_backend,
                           mode=None if options.compile_mode == "default" else options.compile_mode)
    unique = list({id(m): m for m in experts}.values())
    handles: list[CompiledRegions] = []
    watchers: list[_FirstForwardStage] = []
    try:
        for index, model in enumerate(unique):
            handles.append(apply_compile(model, config))
            watchers.append(_FirstForwardStage(model, index, record, options))
        yield
    finally:
        for watcher in watchers:
            watcher.remove()
        if handles:
            stats = handles[0].stats()  # Dynamo's callback is process-wide: every handle saw the same
            record.num_compiles, record.num_recompiles = stats.num_compiles, stats.num_recompiles
            event(COMPILE_SUMMARY_EVENT, num_regions=sum(h.num_regions for h in handles),
                  compile_s=sum(record.compile_seconds), num_compiles=stats.num_compiles,
                  num_recompiles=stats.num_recompiles)
        for handle in handles:
            handle.remove()


def check_with_loras(options: ExecutionOptions, num_loras: int) -> None:
    """Refuse compile together with LoRA patches: the compiled graph would keep the patched weights
    after the patches are removed (`runtime/lora.py` refuses compiled blocks for the same reason)."""
    if options.compiles and num_loras:
        raise ValueError(f"compile {options.compile_mode!r} (Wan Model Loader) cannot be combined with LoRAs "
                         f"({num_loras} on this model): torch.compile would keep the patched weights in its graph. "
                         "Set compile to 'off' on the loader, or remove the Wan LoRA nodes")


@contextlib.contextmanager
def applied(experts: Sequence[nn.Module], options: ExecutionOptions) -> Iterator[ExecutionRecord]:
    """Turn `options` on for the experts inside the block; everything is undone on exit."""
    with tf32_matmuls(options.tf32) as precision:
        record = ExecutionRecord(tf32=options.tf32, float32_matmul_precision=precision, compiled=options.compiles)
        if options.tf32 and not torch.cuda.is_available():
            log.info("TF32 requested; there is no CUDA device, so float32 matmuls are unchanged")
        with _compiled(experts, options, record):
            yield record
