"""Worker functions for the multi-process tests (imported by the processes the launcher spawns).

Every rank builds the same tiny seeded models and inputs, samples once as a single process (the
reference) and once per parallel plan, and returns the largest difference per plan. Nothing here
asserts: the test process compares what the ranks return.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from wanbench.wan_core.checkpoints.lora import LoraFile, LoraPair, LoraTerms
from wanbench.wan_core.config import COMM_KINDS, COMMUNICATION_EVENT, GuideScale, preset
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.errors import DistributedError
from wanbench.wan_core.runtime.distributed import agree, init_from_environment, use_parallel
from wanbench.wan_core.runtime.lora import ExpertLora
from wanbench.wan_core.runtime.sharding import is_sharded
from wanbench.wan_core.sampler import SamplerOptions, make_noise, sample, select_expert
from wanbench.wan_core.schedulers import make_scheduler
from wanbench.wan_core.trace import use_tracer


@dataclass(frozen=True)
class Case:
    """One tiny sampling run: task, latent (T, h, w), guidance per expert, with or without an image."""

    name: str
    task: str
    thw: tuple[int, int, int]
    guide: GuideScale
    image: bool = False
    lora: bool = False  # a LoRA on two weights of each expert (strengths 1.0 high, 0.5 low)
    steps: int = 2
    shift: float = 1.0  # with 2 steps: t = 999 (high-noise expert) then 499 (low-noise expert)


# Token counts 18, 3, 15 and 18. 2-way splits: 18 divides, 3 and 15 pad one row (masked as keys).
# 4-way splits: every case pads; with 3 tokens the fourth rank holds only padding.
CASES = (
    Case(name="t2v-A14B", task="t2v-A14B", thw=(2, 6, 6), guide=GuideScale(high=4.0, low=1.0)),
    Case(name="i2v-A14B", task="i2v-A14B", thw=(1, 2, 6), guide=GuideScale.same(3.5)),
    Case(name="ti2v-5B-text", task="ti2v-5B", thw=(3, 2, 10), guide=GuideScale.same(5.0)),
    Case(name="ti2v-5B-image", task="ti2v-5B", thw=(3, 4, 6), guide=GuideScale.same(5.0), image=True),
    Case(name="t2v-A14B-lora", task="t2v-A14B", thw=(2, 6, 6), guide=GuideScale(high=4.0, low=3.0), lora=True),
)
LORA_TARGETS = ("blocks.0.self_attn.q.weight", "blocks.1.ffn.0.weight")


def tiny_lora(experts: list[torch.nn.Module], seed: int) -> ExpertLora:
    """A seeded rank-2 LoRA on `LORA_TARGETS` (the same on every rank)."""
    generator = torch.Generator().manual_seed(seed)
    params = dict(experts[0].named_parameters())
    targets = {}
    for name in LORA_TARGETS:
        out_dim, in_dim = params[name].shape
        up, down = torch.randn(out_dim, 2, generator=generator), torch.randn(2, in_dim, generator=generator)
        pair = LoraPair(up=up, down=down, scale=0.05)
        targets[name] = LoraTerms(pairs=(pair,))
    file = LoraFile(name="tiny.safetensors", layout="test", kinds=("lora_up/lora_down",), targets=targets,
                    num_keys=2 * len(targets), num_matched=2 * len(targets), unmatched=(), num_image_keys=0,
                    dtype="float32")
    return ExpertLora(lora=file, strengths=(1.0, 0.5)[: len(experts)])


def experts_used(case: Case) -> list[str]:
    """The expert of each step (the tests check that both A14B experts run)."""
    task = preset(case.task, tiny=True)
    scheduler = make_scheduler("unipc", case.steps, case.shift)
    return [select_expert(int(t), task.sampler.boundary) for t in scheduler.timesteps]


class CommCounter:
    """A tracer that counts the communication events of each kind (stages are not measured)."""

    def __init__(self) -> None:
        self.kinds: dict[str, int] = {}
        self.first_step_bytes: dict[str, int] | None = None

    def stage(self, name: str, kind: str, facts: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def event(self, name: str, facts: dict[str, Any]) -> None:
        if name == COMMUNICATION_EVENT:
            if self.first_step_bytes is None:
                self.first_step_bytes = {k: int(facts.get(f"{k}_bytes", 0)) for k in COMM_KINDS}
            for kind in COMM_KINDS:
                if facts.get(f"{kind}_bytes"):
                    self.kinds[kind] = self.kinds.get(kind, 0) + 1


def run_case(case: Case, *, seed: int = 0) -> tuple[torch.Tensor, list[torch.nn.Module]]:
    """Sample `case` from freshly built models (the same on every rank for a seed); the latent and
    the experts."""
    task = preset(case.task, tiny=True)
    cfg = task.dit
    torch.manual_seed(seed)
    experts = [WanDiT(cfg).eval() for _ in range(task.num_experts)]
    generator = torch.Generator().manual_seed(seed + 1)
    context = torch.randn(7, cfg.text_dim, generator=generator)
    context_null = torch.randn(5, cfg.text_dim, generator=generator)
    shape = (cfg.out_dim, *case.thw)
    i2v_y = torch.randn(cfg.in_dim - cfg.out_dim, *case.thw, generator=generator) if cfg.model_type == "i2v" else None
    ti2v_z = torch.randn(cfg.out_dim, 1, *case.thw[1:], generator=generator) if case.image else None
    opts = SamplerOptions.from_config(task.sampler, steps=case.steps, shift=case.shift, guide_scale=case.guide,
                                      seed=seed)
    loras = [tiny_lora(experts, seed + 2)] if case.lora else []
    out = sample(experts, task, opts, context=context, context_null=context_null,
                 noise=make_noise(shape, seed), i2v_y=i2v_y, ti2v_z=ti2v_z, loras=loras)
    return out, experts


def _local_fraction(experts: list[torch.nn.Module]) -> float | None:
    """The share of the weights this rank holds (None when the experts are not sharded)."""
    if not all(is_sharded(m) for m in experts):
        return None
    local = sum(p.to_local().numel() for m in experts for p in m.parameters())
    return local / sum(p.numel() for m in experts for p in m.parameters())


def equivalence_worker(plans: list[tuple[str, bool]]) -> dict[str, dict[str, Any]]:
    """Per case and plan (mode, sharded weights), on this rank: max |parallel - single-process|, the
    kinds of communication recorded, and the share of the weights held here when sharded."""
    torch.set_num_threads(1)
    found: dict[str, dict[str, Any]] = {}
    runtimes = {plan: init_from_environment(plan[0], shard_weights=plan[1], timeout_s=120) for plan in plans}
    for case in CASES:
        reference, _ = run_case(case)
        for (mode, shard), runtime in runtimes.items():
            counter = CommCounter()
            if case.lora and shard:  # refused before anything runs
                try:
                    with use_parallel(runtime):
                        run_case(case)
                except ValueError as err:
                    found[f"{case.name} {mode} sharded"] = {"refused": str(err)}
                continue
            with use_parallel(runtime), use_tracer(counter):
                out, experts = run_case(case)
            found[f"{case.name} {mode}{' sharded' if shard else ''}"] = {
                "diff": float((out - reference).abs().max()), "scale": float(reference.abs().max()),
                "kinds": sorted(counter.kinds), "local_fraction": _local_fraction(experts),
                "first_step_bytes": counter.first_step_bytes}
    return found


def disagreement_worker() -> dict[str, str]:
    """Ranks that ask for different plans, then hold different values: the errors each rank gets."""
    import os

    rank = int(os.environ["RANK"])
    found: dict[str, str] = {}
    try:
        init_from_environment("cfg" if rank == 0 else "ulysses", timeout_s=60)
    except DistributedError as err:
        found["plan"] = str(err)
    runtime = init_from_environment("cfg", timeout_s=60)
    try:
        agree(runtime, "model files", f"file-{rank}")
    except DistributedError as err:
        found["value"] = str(err)
    return found
