"""The pack's models in ComfyUI's memory manager, and the memory environment the core plans with.

A `Resident` is one of the pack's loaded models (the DiT experts, the text encoder, the VAE) with
the device it computes on. Models stay on that device between runs, and are moved off it when
memory is needed:

- Inside ComfyUI each resident is registered with `comfy.model_management` through a small adapter
  (`ComfyModelAdapter`, the part of a ModelPatcher that the manager's `LoadedModel` uses). So
  ComfyUI's `free_memory` (before any model of any pack loads), `unload_all_models` (`POST /free`)
  and its reports see the pack's models like its own, and moving ours off the device is its call:
  `detach` moves the model to the CPU (`release`). `load` (`load_models_gpu` with the working set
  the planner wants) makes room and moves the model on.
- Outside ComfyUI (the CLI, tests) the same list is kept here and `make_room` moves the least
  recently used residents off the device until enough is free.

The list holds its models weakly: a model dropped from ComfyUI's cache (`POST /free` with
`free_memory`, or a re-execution) is freed as usual and leaves the list with it.

`PackMemory` is the `MemoryEnvironment` the nodes hand to wan_core: ComfyUI's free-memory figure
and `free_memory` inside a server; the system's figures and this list's `make_room` outside.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..wan_core.errors import MemoryPlanError
from ..wan_core.runtime.planner import MemoryBudget, read_budget
from . import comfy_bridge as bridge

log = logging.getLogger(__name__)

OFFLOAD_DEVICE = torch.device("cpu")
_CLOCK = itertools.count()  # least recently used order of the residents


class Resident:
    """One loaded model of the pack: its modules, the device it computes on, and how it moves.

    `owner` (the object a node output carries: a `TextEncoder`, a `WanVAE`, one DiT expert) is
    held weakly; `modules(owner)` lists its modules and `move(owner, device)` moves it.
    """

    def __init__(self, owner: object, *, name: str, device: torch.device | str,
                 modules: Callable[[Any], Sequence[nn.Module]], move: Callable[[Any, torch.device], None],
                 may_run_on_cpu: bool = False) -> None:
        self._owner = weakref.ref(owner)
        self.name = name
        self.device = torch.device(device)
        self.may_run_on_cpu = may_run_on_cpu  # device "auto": when the GPU is short, run on the CPU
        self._modules = modules
        self._move = move
        self.last_used = next(_CLOCK)
        self.adapter = ComfyModelAdapter(self)

    @property
    def owner(self) -> Any:
        return self._owner()

    def modules(self) -> list[nn.Module]:
        owner = self.owner
        return [] if owner is None else list(self._modules(owner))

    def _tensors(self) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for module in self.modules():
            for t in [*module.parameters(), *module.buffers()]:
                seen.setdefault(id(t), t)
        return list(seen.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def bytes_on(self, device: torch.device) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors() if t.device.type == device.type)

    def load(self) -> None:
        """Move the model onto its compute device."""
        owner = self.owner
        if owner is not None:
            self._move(owner, self.device)
        self.last_used = next(_CLOCK)

    def release(self) -> int:
        """Move the model off its compute device (to the CPU); returns the bytes that left it."""
        owner = self.owner
        if owner is None or self.device.type == OFFLOAD_DEVICE.type:
            return 0
        moved = self.bytes_on(self.device)
        self._move(owner, OFFLOAD_DEVICE)
        if moved:
            log.info("moved %s off %s (%.2f GB) to free memory", self.name, self.device, moved / 1e9)
        return moved


class ComfyModelAdapter:
    """What `comfy.model_management.LoadedModel` uses of a ModelPatcher, for one `Resident`
    (checked against ComfyUI 0.3.75's `load_models_gpu`, `free_memory` and `unload_all_models`).

    ComfyUI keeps weak references to it; the resident (kept by the list while its model lives)
    holds it. `detach` (ComfyUI unloading the model) moves the model to the CPU; a partial unload
    frees nothing, so ComfyUI unloads it whole. `is_clone` is true for the same model, as a
    ModelPatcher's is, so that loading a listed model again replaces its entry instead of adding one.
    """

    parent = None

    def __init__(self, resident: Resident) -> None:
        self.resident = resident
        self.load_device = resident.device
        self.offload_device = OFFLOAD_DEVICE

    @property
    def model(self) -> Any:
        """The object whose lifetime is the model's (ComfyUI watches it with a weak reference)."""
        return self.resident.owner

    def model_size(self) -> int:
        return self.resident.nbytes()

    def loaded_size(self) -> int:
        return self.resident.bytes_on(self.load_device) if self.load_device.type != "cpu" else self.model_size()

    def current_loaded_device(self) -> torch.device:
        return self.load_device if self.loaded_size() else self.offload_device

    def model_dtype(self) -> torch.dtype:
        tensors = [p for m in self.resident.modules() for p in m.parameters()]
        return tensors[0].dtype if tensors else torch.float32

    def model_patches_to(self, device: object) -> None:
        return None  # the pack applies no ModelPatcher patches

    def model_patches_models(self) -> list[Any]:
        return []

    def is_clone(self, other: object) -> bool:
        """Same model (ComfyUI re-lists a loaded model through this: it pops the old entry first)."""
        return getattr(other, "model", None) is self.model

    def lowvram_patch_counter(self) -> int:
        return 0

    def partially_load(self, device: torch.device, extra_memory: float = 0, force_patch_weights: bool = False) -> int:
        before = self.loaded_size()
        self.resident.load()
        return self.loaded_size() - before

    def partially_unload(self, device: torch.device, memory_to_free: float = 0) -> int:
        return 0

    def detach(self, unpatch_all: bool = True) -> None:
        """ComfyUI unloading the model (`unpatch_all`): move it off the device. Without
        `unpatch_all` (ComfyUI re-listing a model it is about to load again) nothing moves."""
        if not unpatch_all:
            return
        freed = self.resident.release()
        log.info("ComfyUI unloaded %s (%.2f GB moved off %s)", self.resident.name, freed / 1e9, self.load_device)


_RESIDENTS: weakref.WeakKeyDictionary[object, Resident] = weakref.WeakKeyDictionary()
# A process-wide list, like ComfyUI's own list of loaded models, which it mirrors: keyed weakly by
# the model object, so it never keeps a model alive.


def track(owner: object, *, name: str, device: torch.device | str,
          modules: Callable[[Any], Sequence[nn.Module]], move: Callable[[Any, torch.device], None],
          may_run_on_cpu: bool = False) -> Resident:
    """The resident entry of `owner`, made on first use (list it with ComfyUI through
    `note_loaded` once it is on its device)."""
    resident = _RESIDENTS.get(owner)
    if resident is None:
        resident = Resident(owner, name=name, device=device, modules=modules, move=move,
                            may_run_on_cpu=may_run_on_cpu)
        _RESIDENTS[owner] = resident
    return resident


def track_module(module: nn.Module, *, name: str, device: torch.device | str) -> Resident:
    """`track` for a plain module that moves with `.to(device)` (a DiT expert, the VAE)."""
    return track(module, name=name, device=device, modules=_itself, move=_module_to)


def _itself(module: nn.Module) -> list[nn.Module]:
    return [module]


def _module_to(module: nn.Module, device: torch.device) -> None:
    module.to(device)


def resident_of(owner: object) -> Resident | None:
    return _RESIDENTS.get(owner)


def load(resident: Resident, *, working_bytes: int) -> None:
    """Put `resident` on its compute device: inside ComfyUI through its memory manager (which moves
    other models off first when `working_bytes` more are needed), else directly."""
    mm = bridge.model_management()
    if mm is not None:
        mm.load_models_gpu([resident.adapter], memory_required=working_bytes)
    else:
        resident.load()


def note_loaded(*residents: Resident) -> None:
    """Tell ComfyUI's memory manager that these models are on their devices now (after the core
    moved them). One call for all of them: ComfyUI never moves a model off to make room for another
    one of the same call."""
    for resident in residents:
        resident.last_used = next(_CLOCK)
    mm = bridge.model_management()
    placed = [r.adapter for r in residents if r.bytes_on(r.device)]
    if mm is not None and placed:
        mm.load_models_gpu(placed)


def bring_back(owner: object) -> None:
    """Before a model is used: if it was moved off its compute device to free memory, move it back
    (through ComfyUI's memory manager inside a server). Models the pack does not track stay put."""
    resident = _RESIDENTS.get(owner)
    if resident is not None and resident.bytes_on(resident.device) < resident.nbytes():
        load(resident, working_bytes=0)


def prepare_text_encoder(encoder: Any) -> dict[str, Any]:
    """Put the text encoder where it encodes, with a memory check; returns the estimate's facts.

    On its GPU when the weights and one encode fit there after ComfyUI (or this list) moved other
    models off; when they do not and the loader's device was "auto", on the CPU instead (logged, and
    the stage is recorded on the CPU); an explicit "cuda" that cannot fit is refused.
    """
    from ..wan_core.runtime.stage_plans import check_text_encode  # imports the model modules

    resident = _RESIDENTS.get(encoder)
    device = resident.device if resident is not None else encoder.device
    memory = PackMemory()
    try:
        estimate = check_text_encode(encoder.encoder, encoder.config, device=device, memory=memory, keep=[encoder])
    except MemoryPlanError as err:
        if resident is None or not resident.may_run_on_cpu or device.type == OFFLOAD_DEVICE.type:
            raise
        log.warning("the text encoder does not fit on %s (%s); it encodes on the CPU this time", device, err)
        estimate = check_text_encode(encoder.encoder, encoder.config, device=OFFLOAD_DEVICE, memory=memory,
                                     keep=[encoder])
        encoder.to(OFFLOAD_DEVICE)
        return estimate.facts()
    if resident is not None:
        load(resident, working_bytes=estimate.total - resident.nbytes())
    return estimate.facts()


class PackMemory:
    """The `MemoryEnvironment` of the nodes (see the module docstring)."""

    def budget(self, device: torch.device) -> MemoryBudget:
        device = torch.device(device)
        mm = bridge.model_management()
        if mm is None:
            return read_budget(device)
        return MemoryBudget(str(device), int(mm.get_free_memory(device)),
                            "ComfyUI's free memory (comfy.model_management.get_free_memory)")

    def make_room(self, device: torch.device, nbytes: int, *, keep: Sequence[object]) -> None:
        device = torch.device(device)
        mm = bridge.model_management()
        if mm is not None:
            kept = [m for m in mm.current_loaded_models
                    if isinstance(m.model, ComfyModelAdapter) and m.model.model in keep]
            mm.free_memory(nbytes, device, keep_loaded=kept)
            return
        kept_ids = {id(k) for k in keep}
        for resident in sorted(_RESIDENTS.values(), key=lambda r: r.last_used):  # least recently used first
            free = read_budget(device).free_bytes
            if free is not None and free >= nbytes:
                break
            if resident.device.type == device.type and id(resident.owner) not in kept_ids:
                resident.release()
        if device.type == "cuda":
            torch.cuda.empty_cache()
