"""LoRA patches on built DiT experts: applied for the duration of a run, removed after it.

The base weights are never modified. `LoraPatches(experts, loras)` (a context manager; the sampler
opens it around the denoising loop) registers, on each module that owns patched parameters, a
forward pre-hook that computes

    W' = W + sum_i strength_i * (scale_i * up_i @ down_i + diff_i)

and swaps it into `param.data`, and a forward post-hook (`always_call`, so it also runs when the
forward raises) that puts the original tensor back. Leaving the context removes every hook.
Precision: the sum of all updates is formed in float32 (the strength times alpha/rank goes on the
small `up` factor) and added to W in float32 arithmetic with a single rounding to W's dtype, also
for several LoRAs on one weight. Traffic per weight and forward: the float32 delta written and read
once, W read and W' written once (12 bytes per bf16 weight), the part of the patch that grows with
the model (docs/performance.md). So:

* taking a LoRA off, or changing its strength in a later run, gives the exact base weights back
  (the original tensors are restored, never recomputed), and nothing is ever applied twice;
* no copy of the model is made: at any time one module's patched weights exist next to the base
  ones (one transformer block, or the embedding/head module);
* the cost per forward is one `(out, rank) @ (rank, in)` product per patched matrix (about
  rank / tokens of the block's matmul work) and one pass over the block's weights.

Owners: transformer block `blocks.N` for its parameters (modulation included), `patch_embedding`,
`text_embedding` and `head` for theirs, the model itself for `time_embedding` and `time_projection`
(read directly by `WanDiT.embed_time`). Every LoRA on one parameter is summed into one update, so
the order of chained LoRAs changes nothing beyond float rounding. A strength of 0 skips the LoRA
for that expert (bit-identical to no LoRA).

Order of the per-block weight transforms (pre-hooks in this order, post-hooks in reverse):
1. placement (`placement.BlockSwap`, prepended pre-hook): the block's tensors are brought to the
   compute device;
2. storage (`runtime/compact.py`, registered at load): compact weights (fp8, GGUF blocks, bf16) are
   decoded to the compute dtype;
3. LoRA (this module, registered last, post-hook prepended): the delta is added to the
   decoded weight; fp8/GGUF values are never re-quantised, so the delta is applied at full precision.
Post-hooks: LoRA restores the decoded tensor, storage puts the stored data back, placement
releases the device copy. Weights that run as fp8 matmuls (`runtime/fp8_matmul.py`) cannot take a
patch: such a model is refused with the storage to use instead.

Device: LoRA tensors stay on the CPU in the file's dtype. When the compute device differs, each
expert's factors are copied there on first use and kept for the run (`keep_on_device=True`; the
other expert's copies are dropped when it stops being used), or copied per forward and dropped
(`keep_on_device=False`, what the sampler uses with `blocks` placement).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoints.io import PathLike
from ..checkpoints.lora import LoraFile, LoraTerms, read_lora
from .compact import logical_shapes
from .fp8_matmul import weight_patch_problem

log = logging.getLogger(__name__)

__all__ = ["ExpertLora", "LoraPatches", "load_expert_lora"]

# Children of WanDiT called as modules in its forward, so that their own hooks see every use.
OWNER_CHILDREN = ("patch_embedding", "text_embedding", "head")


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class ExpertLora:
    """One LoRA file on a task's experts: its patches and one strength per expert (high, low), or
    one for a single-model task."""

    lora: LoraFile
    strengths: tuple[float, ...]

    def describe(self, expert_names: Sequence[str]) -> str:
        """'file.safetensors (high 1, low 0; comfy: lora_up/lora_down; 1200 of 1200 keys)'."""
        strengths = ", ".join(f"{n} {s:g}" for n, s in zip(expert_names, self.strengths, strict=True))
        return self.lora.summary(prefix=f"{strengths}; ")


def load_expert_lora(path: PathLike, experts: Sequence[nn.Module], strengths: Sequence[float]) -> ExpertLora:
    """Read a LoRA file, check it against the experts' parameters, pair it with one strength per expert."""
    if len(strengths) != len(experts):
        raise ValueError(f"give one strength per expert ({len(experts)}); got {list(strengths)}")
    for s in strengths:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or s != s or abs(s) == float("inf"):
            raise ValueError(f"LoRA strengths must be finite numbers; got {list(strengths)}")
    lora = read_lora(path, logical_shapes(experts[0]))  # compact (fp8, GGUF) weights by their real shape
    log.info("LoRA %s", lora.summary())
    if lora.unmatched:
        log.warning("LoRA %s: %d keys match no parameter of this model and are not applied, e.g. %s",
                    lora.name, len(lora.unmatched), ", ".join(lora.unmatched[:5]))
    return ExpertLora(lora=lora, strengths=tuple(float(s) for s in strengths))


@dataclass(eq=False)
class _Patched:
    """One patched parameter: its updates and, while its owner runs, the base tensor it replaced."""

    param: nn.Parameter
    terms: list[tuple[float, LoraTerms]]
    saved: torch.Tensor | None = None


class LoraPatches:
    """The LoRAs of a run applied by forward hooks (see the module docstring); a context manager."""

    def __init__(self, experts: Sequence[nn.Module], loras: Sequence[ExpertLora], *,
                 keep_on_device: bool = True) -> None:
        self.experts = list(experts)
        self.loras = list(loras)
        self.keep_on_device = keep_on_device
        for item in self.loras:
            if len(item.strengths) != len(self.experts):
                raise ValueError(f"LoRA {item.lora.name} has {len(item.strengths)} strengths for "
                                 f"{len(self.experts)} experts")
        self._check_shared_experts()
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._entries: list[_Patched] = []
        self._cache: dict[int, dict[int, torch.Tensor]] = {}  # expert -> id(CPU tensor) -> float32 device copy

    def __enter__(self) -> LoraPatches:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def num_patched(self) -> int:
        return len(self._entries)

    def _check_shared_experts(self) -> None:
        """The same module serving both experts can carry one set of strengths only."""
        for a in range(len(self.experts)):
            for b in range(a + 1, len(self.experts)):
                if self.experts[a] is self.experts[b]:
                    for item in self.loras:
                        if item.strengths[a] != item.strengths[b]:
                            raise ValueError(f"experts {a} and {b} are the same model, so LoRA {item.lora.name} "
                                             f"cannot have different strengths on them ({item.strengths})")

    def open(self) -> None:
        try:
            self._open()
        except BaseException:
            self.close()  # no hook of a half-done open stays behind
            raise

    def _open(self) -> None:
        done: set[int] = set()
        for index, model in enumerate(self.experts):
            if id(model) in done:
                continue
            done.add(id(model))
            by_owner = self._entries_by_owner(model, index)
            problem = weight_patch_problem(model) if by_owner else None
            if problem is not None:
                raise ValueError(f"LoRA cannot be applied to expert {index}: {problem}")
            for owner, entries in by_owner.values():
                _refuse_compiled(owner)
                self._entries.extend(entries)
                pre, post = self._hooks_for(entries, index)
                self._hooks.append(owner.register_forward_pre_hook(pre))
                self._hooks.append(owner.register_forward_hook(post, prepend=True, always_call=True))
            if by_owner and self.keep_on_device:
                self._hooks.append(model.register_forward_pre_hook(self._activate_hook(index)))

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for entry in self._entries:
            if entry.saved is not None:
                entry.param.data, entry.saved = entry.saved, None
        self._entries.clear()
        self._cache.clear()

    def _entries_by_owner(self, model: nn.Module, index: int) -> dict[int, tuple[nn.Module, list[_Patched]]]:
        params = dict(model.named_parameters())
        by_param: dict[str, _Patched] = {}
        for item in self.loras:
            strength = item.strengths[index]
            if strength == 0.0:
                continue
            for name, terms in item.lora.targets.items():
                if name not in params:
                    raise ValueError(f"LoRA {item.lora.name} patches {name!r}, which expert {index} does not have")
                by_param.setdefault(name, _Patched(param=params[name], terms=[])).terms.append((strength, terms))
        by_owner: dict[int, tuple[nn.Module, list[_Patched]]] = {}
        for name, entry in by_param.items():
            owner = _owner(model, name)
            by_owner.setdefault(id(owner), (owner, []))[1].append(entry)
        return by_owner

    def _activate_hook(self, index: int):
        """Model pre-hook: this expert runs, so device copies of the other experts' factors can go."""
        def hook(module: nn.Module, args: object) -> None:
            for other in list(self._cache):
                if other != index and self.experts[other] is not self.experts[index]:
                    del self._cache[other]
        return hook

    def _hooks_for(self, entries: list[_Patched], index: int):
        def patch(module: nn.Module, args: object) -> None:
            bases = [e.saved if e.saved is not None else e.param.data for e in entries]
            values = [self._patched(e, base, index) for e, base in zip(entries, bases, strict=True)]
            for e, base, value in zip(entries, bases, values, strict=True):  # swapped only once all are ready
                e.saved, e.param.data = base, value

        def restore(module: nn.Module, args: object, output: object) -> None:
            for e in entries:
                if e.saved is not None:
                    e.param.data, e.saved = e.saved, None

        return patch, restore

    def _patched(self, entry: _Patched, base: torch.Tensor, index: int) -> torch.Tensor:
        """`base` plus the float32 sum of every update of `entry`, rounded once to base's dtype."""
        delta: torch.Tensor | None = None  # (out, in) float32
        for strength, terms in entry.terms:
            for pair in terms.pairs:
                up = self._fetch(pair.up, base.device, index).flatten(1)  # (out, r)
                down = self._fetch(pair.down, base.device, index).flatten(1)  # (r, in)
                alpha = strength * pair.scale
                if delta is None:
                    delta = torch.mm(up * alpha, down)  # the scale goes on the small factor
                else:
                    delta.addmm_(up, down, alpha=alpha)
            for diff in terms.diffs:
                d = self._fetch(diff, base.device, index).reshape(base.shape[0], -1)
                delta = d * strength if delta is None else delta.add_(d, alpha=strength)
        assert delta is not None, "a patched parameter always has an update"
        # computed in float32 (type promotion), written once in base's dtype
        return torch.add(base, delta.view(base.shape), out=torch.empty_like(base))

    def _fetch(self, tensor: torch.Tensor, device: torch.device, index: int) -> torch.Tensor:
        """`tensor` as float32 on `device` (cached per expert when it has to move and `keep_on_device`)."""
        if tensor.device == device or not self.keep_on_device:
            return tensor.to(device=device, dtype=torch.float32)
        cache = self._cache.setdefault(index, {})
        copy = cache.get(id(tensor))
        if copy is None or copy.device != device:
            copy = cache[id(tensor)] = tensor.to(device=device, dtype=torch.float32)
        return copy


def _refuse_compiled(module: nn.Module) -> None:
    """`nn.Module.compile` traces a module's hooks into its graph, and the graph outlives the hooks:
    after the patches are removed it would keep computing with them. Refused until supported."""
    if getattr(module, "_compiled_call_impl", None) is not None:
        raise ValueError(f"LoRA patches cannot be applied to a compiled {type(module).__name__} (torch.compile "
                         "keeps the patched weights in its graph after the LoRA is removed); run the LoRA "
                         "without compile, or remove the compiled regions first (CompiledRegions.remove())")


def _owner(model: nn.Module, name: str) -> nn.Module:
    """The module whose forward hooks cover every use of parameter `name` (see OWNER_CHILDREN)."""
    if name.startswith("blocks."):
        return model.blocks[int(name.split(".")[1])]
    for child in OWNER_CHILDREN:
        if name.startswith(child + "."):
            return getattr(model, child)
    return model
