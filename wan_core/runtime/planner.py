"""The memory planner: what a stage will hold on its device, against what is free, before anything
large is allocated.

An `Estimate` is a list of named parts in bytes (weights resident on the device, the working set
of one call, latents) plus a safety margin of `MARGIN_FRACTION` (20 %) of the estimate and
`MARGIN_BYTES` (512 MiB): what the estimate does not model part by part (allocator rounding and
fragmentation, library workspaces such as cuBLAS, cuDNN, oneDNN and MKL packing, CUDA context
growth, the Python objects of the run). On the CPU, measured peaks of the traced calls lie 6-18 %
above their estimates (tests/test_memory_planner.py, docs/memory.md). A
`MemoryBudget` is what is free on the device: CUDA free memory plus the caching allocator's
reserved-but-unused bytes (`torch.cuda.mem_get_info`, `memory_reserved - memory_allocated`), or the
host's `MemAvailable` (/proc/meminfo) for the CPU; plus the bytes of the job's own weights that are
already on the device (the plan reuses or moves them).

Decisions (pure functions of estimates and budgets):

- `plan_placement`: placement `auto` takes the first option that fits of `none` (every expert on
  the device), `model` (one expert at a time; two-expert tasks) and `blocks` with as many resident
  blocks as fit (two streamed blocks on the device at a time). An explicit placement is checked
  and refused when it cannot fit, with the options that would. A CPU compute device has one option
  (the weights are where the compute is).
- `plan_tiling`: VAE tiling `auto` takes whole frames when they fit, else the largest tiles that
  fit; an explicit choice is checked.
- `check_fits`: any other single estimate (loading weights, encoding text, a latent).

A refusal raises `MemoryPlanError` naming the estimate (with its parts), what is free and where
that figure comes from, the margin, and the options that would fit (or none). When the free memory
cannot be read, nothing is refused and the plan says it was not checked.

`MemoryEnvironment` is how an application frees memory for a plan: ComfyUI's memory manager
inside a server (nodes/), or `SystemMemory` (read the free figures; empty the CUDA cache).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from ..errors import MemoryPlanError

if TYPE_CHECKING:  # the estimates import the model modules; the planner itself stays light
    from .estimates import WeightBytes

log = logging.getLogger(__name__)

GB = 10**9
MARGIN_FRACTION = 0.20
MARGIN_BYTES = 512 * 2**20
MEMINFO = Path("/proc/meminfo")
STREAMED_BLOCKS_ON_DEVICE = 2  # `blocks` placement: the running block and the prefetched next one
PLACEMENT_ORDER = ("none", "model", "blocks")


def gb(nbytes: int | None) -> str:
    return "unknown" if nbytes is None else f"{nbytes / GB:.2f} GB"


# --------------------------------------------------------------------------------------------
# Budgets and estimates
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryBudget:
    """Free memory of one device: `free_bytes` (None when it cannot be read) and where it comes from."""

    device: str
    free_bytes: int | None
    source: str

    def plus(self, nbytes: int, what: str) -> MemoryBudget:
        """The budget with `nbytes` the plan may reuse (the job's own weights already there)."""
        if self.free_bytes is None or nbytes <= 0:
            return self
        return replace(self, free_bytes=self.free_bytes + nbytes, source=f"{self.source} + {gb(nbytes)} {what}")

    def describe(self) -> str:
        return f"{gb(self.free_bytes)} free on {self.device} ({self.source})"


def read_budget(device: torch.device | str) -> MemoryBudget:
    """What is free on `device` now: CUDA free + reusable cached bytes, or the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return MemoryBudget(str(device), int(free + cached),
                            "torch.cuda.mem_get_info + the allocator's reserved-but-unused bytes")
    if device.type == "cpu":
        available = host_available_bytes()
        if available is None:
            return MemoryBudget("cpu", None, f"{MEMINFO} has no MemAvailable (not Linux?)")
        return MemoryBudget("cpu", available, "MemAvailable in /proc/meminfo")
    return MemoryBudget(str(device), None, f"no free-memory figure for {device.type} devices")


def host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (memory that can be allocated without swapping), or None."""
    try:
        for line in MEMINFO.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class Estimate:
    """What one stage holds at its peak on `device`, part by part (bytes)."""

    what: str
    device: str
    parts: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts)

    @property
    def margin(self) -> int:
        return int(MARGIN_FRACTION * self.total) + MARGIN_BYTES

    @property
    def needed(self) -> int:
        return self.total + self.margin

    def fits(self, budget: MemoryBudget) -> bool:
        """True when the estimate with its margin fits the budget (also when the budget is unknown)."""
        return budget.free_bytes is None or self.needed <= budget.free_bytes

    def describe(self) -> str:
        parts = " + ".join(f"{name} {gb(n)}" for name, n in self.parts if n > 0)
        return f"{gb(self.total)} ({parts}) + margin {gb(self.margin)}"

    def facts(self) -> dict[str, int | str]:
        """Trace facts: the figure the report shows beside the measured peak."""
        return {"memory_estimate_bytes": self.total, "memory_estimate_device": self.device}


def check_fits(estimate: Estimate, budget: MemoryBudget, *, fix: str) -> None:
    """Raise `MemoryPlanError` when `estimate` does not fit `budget`; `fix` says what to change."""
    if not estimate.fits(budget):
        raise MemoryPlanError(refusal(estimate, budget, [], fix=fix))


def refusal(estimate: Estimate, budget: MemoryBudget, options: Sequence[tuple[str, Estimate]], *,
            fix: str) -> str:
    """The message of a refusal: the estimate, what is free, and what would fit."""
    text = (f"{estimate.what} needs {gb(estimate.needed)} on {estimate.device}: {estimate.describe()}; "
            f"{budget.describe()}. Nothing was allocated.")
    fitting, groups = [], set()
    for label, e in options:  # the first fitting option of each kind (they come best first)
        group = re.split(r" with |: ", label)[0]
        if e.fits(budget) and group not in groups:
            groups.add(group)
            fitting.append(f"{label} (needs {gb(e.needed)})")
    if fitting:
        return f"{text} Options that fit: {'; '.join(fitting)}."
    if options:
        return f"{text} None of the other options fits either ({len(options)} checked); {fix}."
    return f"{text} To fix: {fix}."


# --------------------------------------------------------------------------------------------
# Sampling: placement
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlacementPlan:
    """The placement a sampling run uses, its estimate on the compute device, and why."""

    placement: str
    num_resident_blocks: int
    estimate: Estimate
    budget: MemoryBudget
    requested: str
    options: tuple[tuple[str, Estimate], ...]

    @property
    def label(self) -> str:
        return placement_label(self.placement, self.num_resident_blocks)

    def facts(self) -> dict[str, int | str | bool]:
        """The decision as trace facts (event `memory_plan`)."""
        return {"what": "DiT sampling", "placement_requested": self.requested, "placement": self.placement,
                "resident_blocks": self.num_resident_blocks, "device": self.estimate.device,
                "estimate_bytes": self.estimate.total, "margin_bytes": self.estimate.margin,
                "free_bytes": self.budget.free_bytes, "checked": self.budget.free_bytes is not None,
                "free_source": self.budget.source}


def placement_label(placement: str, num_resident_blocks: int) -> str:
    if placement == "blocks":
        return f"placement 'blocks' with {num_resident_blocks} resident blocks"
    return f"placement {placement!r}"


def placement_estimates(experts: Sequence[WeightBytes], *, working: Sequence[tuple[str, int]],
                        device: str, what: str) -> list[tuple[str, int, Estimate]]:
    """Every placement with its estimate on the compute device: (placement, resident blocks, estimate).

    `experts` are the distinct expert modules' weights; `working` the parts that do not depend on
    the placement (the forward's working set, the sampler's latents).
    """
    dequant = [("fp8 block dequantised", max((e.dequant_block_bytes for e in experts), default=0))]
    out = [("none", 0, Estimate(what, device, (("weights, every expert", sum(e.total for e in experts)),
                                               *dequant, *working)))]
    if len(experts) > 1:
        out.append(("model", 0, Estimate(what, device, (("weights, one expert", max(e.total for e in experts)),
                                                         *dequant, *working))))
    num_layers = max((len(e.blocks) for e in experts), default=0)
    for n in range(num_layers - 1, -1, -1):  # every block resident is `none` (one expert) or `model`
        resident = max(e.other + sum(e.blocks[:n]) for e in experts)
        streamed = min(STREAMED_BLOCKS_ON_DEVICE, num_layers - n) * max(e.largest_block for e in experts)
        out.append(("blocks", n, Estimate(what, device, (("weights, resident part", resident),
                                                          ("streamed blocks", streamed), *dequant, *working))))
    return out


def plan_placement(experts: Sequence[WeightBytes], *, working: Sequence[tuple[str, int]], device: str,
                   requested: str, num_resident_blocks: int, budget: MemoryBudget,
                   alternatives: Callable[[], Sequence[tuple[str, Estimate]]] = tuple, fix: str,
                   what: str) -> PlacementPlan:
    """The placement to use (see the module docstring); raises `MemoryPlanError` when nothing fits.

    `alternatives()` gives other ways out to list in a refusal (e.g. the two CFG passes one after
    the other); it is called only when refusing.
    """
    if torch.device(device).type != "cuda":
        est = Estimate(what, device, (("weights (in host memory)", sum(e.total for e in experts)), *working))
        chosen = "none" if requested == "auto" else requested
        if not est.fits(budget):
            raise MemoryPlanError(refusal(est, budget, list(alternatives()), fix=fix))
        return PlacementPlan(chosen, num_resident_blocks, est, budget, requested, ())
    options = placement_estimates(experts, working=working, device=device, what=what)
    labelled = tuple((placement_label(p, n), e) for p, n, e in options)
    if requested == "auto":
        for placement, n, est in options:
            if est.fits(budget):
                return PlacementPlan(placement, n, est, budget, requested, labelled)
        best = options[-1][2]  # blocks with no resident block: the least the device can hold
        raise MemoryPlanError(refusal(best, budget, list(alternatives()), fix=fix))
    wanted = [(p, n, e) for p, n, e in options
              if p == requested and (p != "blocks" or n == min(num_resident_blocks, _num_layers(experts)))]
    if not wanted:
        raise ValueError(f"placement must be one of ('auto', {', '.join(map(repr, PLACEMENT_ORDER))}); "
                         f"got {requested!r} (a single-model task has no 'model' placement of its own: "
                         "use 'none' or 'blocks')")
    placement, n, est = wanted[0]
    if not est.fits(budget):
        raise MemoryPlanError(refusal(est, budget, [*labelled, *alternatives()], fix=fix))
    return PlacementPlan(placement, n, est, budget, requested, labelled)


def _num_layers(experts: Sequence[WeightBytes]) -> int:
    return max((len(e.blocks) for e in experts), default=0)


# --------------------------------------------------------------------------------------------
# Decode: tiling
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TilingPlan:
    """The VAE tiling a decode uses (`None`: whole frames) and its estimate."""

    tiling: object
    estimate: Estimate
    budget: MemoryBudget
    requested: str

    def facts(self) -> dict[str, int | str | bool]:
        described = "none" if self.tiling is None else getattr(self.tiling, "describe", lambda: str(self.tiling))()
        return {"what": "VAE decode", "tiling_requested": self.requested, "tiling": described,
                "device": self.estimate.device, "estimate_bytes": self.estimate.total,
                "margin_bytes": self.estimate.margin, "free_bytes": self.budget.free_bytes,
                "checked": self.budget.free_bytes is not None, "free_source": self.budget.source}


def plan_tiling(candidates: Sequence[tuple[str, object, Callable[[], Estimate]]], *, requested: str,
                budget: MemoryBudget, fix: str) -> TilingPlan:
    """`candidates`: (label, tiling, estimate thunk), whole frames first, then tiles from large to
    small (estimates are made only as far as needed). `requested` "auto" takes the first that
    fits; anything else is the first candidate, checked, with the others listed in a refusal."""
    if requested == "auto":
        est = None
        for _, tiling, thunk in candidates:
            est = thunk()
            if est.fits(budget):
                return TilingPlan(tiling, est, budget, requested)
        assert est is not None, "no tiling candidate"
        raise MemoryPlanError(refusal(est, budget, [], fix=fix))
    _, tiling, thunk = candidates[0]
    est = thunk()
    if not est.fits(budget):
        others = [(label, make()) for label, _, make in candidates[1:]]
        raise MemoryPlanError(refusal(est, budget, others, fix=fix))
    return TilingPlan(tiling, est, budget, requested)


# --------------------------------------------------------------------------------------------
# The application's side
# --------------------------------------------------------------------------------------------
class MemoryEnvironment(Protocol):
    """How the application running the pack reports and frees memory."""

    def budget(self, device: torch.device) -> MemoryBudget:
        """What is free on `device` now."""
        ...

    def make_room(self, device: torch.device, nbytes: int, *, keep: Sequence[object]) -> None:
        """Free memory on `device` until `nbytes` are free, if the application can (other models
        move off the device); the objects in `keep` (the job's own models) stay."""
        ...


class SystemMemory:
    """No application around: read the free figures; making room only empties the CUDA cache."""

    def budget(self, device: torch.device) -> MemoryBudget:
        return read_budget(device)

    def make_room(self, device: torch.device, nbytes: int, *, keep: Sequence[object]) -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


class UncheckedMemory:
    """No free-memory figure, with the reason (a plan made with it checks nothing and says why)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def budget(self, device: torch.device) -> MemoryBudget:
        return MemoryBudget(str(torch.device(device)), None, self.reason)

    def make_room(self, device: torch.device, nbytes: int, *, keep: Sequence[object]) -> None:
        return None


class FixedMemory:
    """A given free figure per device type (tests, and planning for another machine)."""

    def __init__(self, free_bytes: dict[str, int | None]) -> None:
        self.free_bytes = dict(free_bytes)
        self.requests: list[tuple[str, int]] = []

    def budget(self, device: torch.device) -> MemoryBudget:
        device = torch.device(device)
        return MemoryBudget(str(device), self.free_bytes.get(device.type), "given")

    def make_room(self, device: torch.device, nbytes: int, *, keep: Sequence[object]) -> None:
        self.requests.append((str(device), nbytes))


def bytes_on_device(modules: Sequence[torch.nn.Module], device: torch.device) -> int:
    """Bytes of the modules' parameters and buffers that are on `device` now (each tensor once)."""
    device = torch.device(device)
    seen: set[int] = set()
    total = 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) in seen or t.device.type != device.type:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def budget_with_room(memory: MemoryEnvironment, device: torch.device | str, *, wanted: int, own_bytes: int,
                     keep: Sequence[object], what: str) -> MemoryBudget:
    """The budget of a plan whose best option needs `wanted` bytes on `device`.

    On a CUDA device, when less than that is free, the application is asked first to make room
    (ComfyUI moves other models off the GPU, as it does before loading one of its own), so that the
    plan can take the fastest option. Host memory is not freed this way (models the application
    keeps cached stay in host memory). `own_bytes`: the job's weights already on the device, which
    the plan reuses and the budget counts as available.
    """
    device = torch.device(device)
    budget = memory.budget(device)
    free = budget.free_bytes
    if device.type == "cuda" and free is not None and wanted - own_bytes > free:
        memory.make_room(device, wanted - own_bytes, keep=keep)
        budget = memory.budget(device)
    return budget.plus(own_bytes, f"of {what} already there")
