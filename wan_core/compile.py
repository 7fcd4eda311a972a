"""Regional `torch.compile`, applied to a built model from outside.

Each repeated block (`model.blocks[i]` for `WanDiT`) is compiled in place with
`nn.Module.compile`, so state-dict keys do not change and the model code knows nothing about it.
All blocks share one code object, so Dynamo compiles the block graph once and reuses it for every
block of the same shape: compile time scales with one block, not with the depth.

Compilation happens lazily on the first forward. `CompiledRegions.warm_up(fn)` runs that first
call inside the trace stage `Compile` (kind "init"), so a profiler files the compile time as its
own stage and the step statistics that follow are steady-state. Every Dynamo compilation while the
regions are installed is counted; a compile whose id has an attempt index > 0 (`"0/1"`) is a
recompile (a guard failed: new shapes, dtypes, grad mode, ...). Recompiles after the warm-up are
reported separately because they land inside timed steps.

Counting uses Dynamo's process-wide compile-start callback: any other `torch.compile` in the same
process while regions are installed is counted too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from .config import COMPILE_STAGE, RECOMPILE_EVENT
from .trace import event, stage

log = logging.getLogger(__name__)

T = TypeVar("T")

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True, kw_only=True)
class CompileConfig:
    """How the regions are compiled (the arguments of `torch.compile`) and which regions.

    `region` names the `nn.ModuleList` attribute of the model whose entries are compiled one by one.
    """

    backend: str = "inductor"
    mode: str | None = None
    dynamic: bool | None = None
    fullgraph: bool = False
    region: str = "blocks"

    def __post_init__(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}; got {self.mode!r}")
        if not self.region.isidentifier():
            raise ValueError(f"region must be an attribute name such as 'blocks'; got {self.region!r}")


@dataclass(frozen=True, kw_only=True)
class CompileStats:
    """What the compiler did. `compile_time_s` is None until `warm_up` ran (never a made-up 0)."""

    num_regions: int
    compile_time_s: float | None
    num_compiles: int
    num_recompiles: int
    recompiles_after_warmup: int
    compile_ids: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {"num_regions": self.num_regions, "compile_time_s": self.compile_time_s,
                "num_compiles": self.num_compiles, "num_recompiles": self.num_recompiles,
                "recompiles_after_warmup": self.recompiles_after_warmup,
                "compile_ids": list(self.compile_ids)}


def _callback_handler() -> Any:
    """Dynamo's compile-callback registry (imported on use: importing Dynamo is slow)."""
    from torch._dynamo.callback import callback_handler

    return callback_handler


def _is_recompile(compile_id: str) -> bool:
    """'0/0' is the first compile of frame 0; '0/3' its third recompile (prefixes like '!1/' allowed)."""
    attempt = compile_id.rsplit("/", 1)[-1]
    return attempt.isdigit() and int(attempt) > 0


class CompiledRegions:
    """Handle returned by `apply_compile`: warm-up, statistics and `remove()` to go back to eager."""

    def __init__(self, model: nn.Module, regions: list[nn.Module], config: CompileConfig) -> None:
        self.model = model
        self.config = config
        self._regions = regions
        self._lock = threading.Lock()
        self._compile_ids: list[str] = []
        self._warmup_compiles: int | None = None
        self._compile_time_s: float | None = None
        self._installed = True
        _callback_handler().register_start_callback(self._on_compile_start)

    def _on_compile_start(self, args: object) -> None:
        compile_id = str(getattr(args, "compile_id", ""))
        with self._lock:
            self._compile_ids.append(compile_id)
            after_warmup = self._warmup_compiles is not None
        if after_warmup and _is_recompile(compile_id):
            log.warning("torch.compile recompiled a region after warm-up (compile id %s); "
                        "timed steps include this compile", compile_id)
            event(RECOMPILE_EVENT, compile_id=compile_id)

    @property
    def num_regions(self) -> int:
        return len(self._regions)

    def warm_up(self, fn: Callable[[], T]) -> T:
        """Run `fn` (the first forward) as the `Compile` stage, time it and return its result."""
        if not self._installed:
            raise RuntimeError("these compiled regions were removed; call apply_compile again")
        with stage(COMPILE_STAGE.name, kind=COMPILE_STAGE.kind, backend=self.config.backend, mode=self.config.mode,
                   num_regions=self.num_regions):
            t0 = time.perf_counter()
            result = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
        with self._lock:
            self._compile_time_s = elapsed if self._compile_time_s is None else self._compile_time_s + elapsed
            self._warmup_compiles = len(self._compile_ids)
        log.info("compiled %d regions (%s) in %.2f s", self.num_regions, self.config.backend, elapsed)
        return result

    def stats(self) -> CompileStats:
        with self._lock:
            ids = tuple(self._compile_ids)
            warm = self._warmup_compiles
            compile_time = self._compile_time_s
        after = [] if warm is None else [c for c in ids[warm:] if _is_recompile(c)]
        return CompileStats(num_regions=self.num_regions, compile_time_s=compile_time, num_compiles=len(ids),
                            num_recompiles=sum(_is_recompile(c) for c in ids),
                            recompiles_after_warmup=len(after), compile_ids=ids)

    def remove(self) -> None:
        """Return every region to eager execution and stop counting compiles."""
        if not self._installed:
            return
        for region in self._regions:
            # nn.Module.compile stores the compiled call here; None restores the eager call.
            region._compiled_call_impl = None
        _callback_handler().remove_start_callback(self._on_compile_start)
        self._installed = False


def apply_compile(model: nn.Module, config: CompileConfig | None = None) -> CompiledRegions:
    """Compile each entry of `getattr(model, config.region)` in place; returns the handle.

    The model's forward, parameters and state-dict keys are unchanged; the first forward after this
    call compiles (run it through `handle.warm_up(...)` to record it as the `Compile` stage).
    """
    config = config or CompileConfig()
    container = getattr(model, config.region, None)
    if not isinstance(container, nn.ModuleList) or len(container) == 0:
        raise ValueError(f"apply_compile needs model.{config.region} to be a non-empty nn.ModuleList; "
                         f"got {type(container).__name__} on {type(model).__name__}. "
                         "Pass CompileConfig(region=...) naming the list of repeated blocks.")
    regions = list(container)
    for region in regions:
        region.compile(backend=config.backend, mode=config.mode, dynamic=config.dynamic,
                       fullgraph=config.fullgraph)
    log.info("regional torch.compile: %d x %s (backend %s, mode %s)", len(regions),
             type(regions[0]).__name__, config.backend, config.mode)
    return CompiledRegions(model, regions, config)
