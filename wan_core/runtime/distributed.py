"""Parallel runs on torch.distributed: the plan, the process groups, and sampling under a plan.

A parallel run is N processes (ranks) started by PyTorch's elastic launcher (`wanbench run
--nproc N`, or `torchrun`), each running the same workflow. Rank 0 runs the text encoder and the
VAE and writes every output; all ranks run the denoising loop together:

* `cfg`          2 ranks: rank 0 computes the conditional pass, rank 1 the unconditional one; the
                 two predictions meet once per step (`cfg_parallel.py`).
* `ulysses`      k ranks: the video tokens are split k ways; around self-attention an all-to-all
                 trades tokens for heads and back (`ulysses.py`). k must divide the head count.
* `cfg+ulysses`  2 x k ranks: rank r computes CFG half r // k on token shard r % k.
* `--shard-weights` (with any of the above, or alone): every transformer block's weights are
                 split across all ranks with FSDP2 and gathered block by block (`sharding.py`).

`ParallelPlan` is the checked description (pure data). `init_from_environment` joins the process
group the launcher prepared (NCCL on CUDA, gloo on the CPU, with a timeout) and builds the
`ParallelRuntime` of this rank: plan, rank, device, subgroups, a gloo group for control
messages, and the `CommMeter`. `use_parallel(runtime)` makes it active for a block of code;
`wan_core.sampler.sample` then runs under `parallel_sampling`, which applies the plan to the
experts for the duration of the run (sharding first, then placement, then the Ulysses layout) and
wraps the guided prediction. Outside a parallel run nothing here is touched.

Control messages (`broadcast_object`, `gather_to_root`, `agree`) carry Python objects (tensors
moved to the CPU first) on the gloo group, so they also work when the compute backend is NCCL.

Shapes: none here (see ulysses.py and cfg_parallel.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import (
    CFG_OFF,
    CFG_PARALLEL,
    CFG_ULYSSES_PARALLEL,
    COMMUNICATION_EVENT,
    NO_PARALLEL,
    PARALLEL_MODES,
    PARALLEL_PLAN_EVENT,
    ULYSSES_PARALLEL,
)
from ..errors import DistributedError
from ..trace import event
from .cfg_parallel import GuidedPrediction, cfg_parallel_prediction
from .comm import CommMeter, collective_failed
from .sharding import is_sharded, shard_experts
from .ulysses import ulysses_layout

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TIMEOUT_S", "Denoiser", "ParallelPlan", "ParallelRuntime", "active_parallel",
           "broadcast_object", "gather_to_root", "init_from_environment", "parallel_sampling", "use_parallel"]

DEFAULT_TIMEOUT_S = 600.0  # a collective waits this long for the other ranks before the run fails
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True, kw_only=True)
class ParallelPlan:
    """How `world_size` ranks share a denoising step (checked on construction).

    Rank r sits at CFG half `r // ulysses_degree` and token shard `r % ulysses_degree`.
    """

    world_size: int
    mode: str = NO_PARALLEL
    shard_weights: bool = False

    def __post_init__(self) -> None:
        if self.mode not in PARALLEL_MODES:
            raise ValueError(f"parallel mode must be one of {PARALLEL_MODES}; got {self.mode!r}")
        n = self.world_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"world size must be an integer >= 1; got {n!r}")
        if self.mode == NO_PARALLEL and n > 1 and not self.shard_weights:
            raise ValueError(f"{n} ranks with parallel mode 'none' would all compute the same step; choose "
                             f"--parallel {ULYSSES_PARALLEL} (or {CFG_PARALLEL} with 2 ranks, "
                             f"{CFG_ULYSSES_PARALLEL} with 2k), or --shard-weights")
        if self.mode == CFG_PARALLEL and n != 2:
            raise ValueError(f"--parallel {CFG_PARALLEL} runs on exactly 2 ranks (cond and uncond); got {n}. "
                             f"For 2k ranks use --parallel {CFG_ULYSSES_PARALLEL}")
        if self.mode == CFG_ULYSSES_PARALLEL and (n % 2 or n < 4):
            raise ValueError(f"--parallel {CFG_ULYSSES_PARALLEL} needs an even number of ranks >= 4 "
                             f"(2 CFG halves x k token shards); got {n}. With 2 ranks use --parallel {CFG_PARALLEL}")
        if self.mode == ULYSSES_PARALLEL and n < 2:
            raise ValueError(f"--parallel {ULYSSES_PARALLEL} needs at least 2 ranks; got {n}")

    @property
    def cfg_degree(self) -> int:
        return 2 if self.mode in (CFG_PARALLEL, CFG_ULYSSES_PARALLEL) else 1

    @property
    def ulysses_degree(self) -> int:
        return self.world_size // self.cfg_degree if self.mode in (ULYSSES_PARALLEL, CFG_ULYSSES_PARALLEL) else 1

    def valid_world_sizes(self, num_heads: int, *, limit: int = 64) -> list[int]:
        """World sizes up to `limit` that this mode accepts for a model with `num_heads` heads."""
        degrees = [k for k in range(1, num_heads + 1) if num_heads % k == 0]
        if self.mode == ULYSSES_PARALLEL:
            return [k for k in degrees if 2 <= k <= limit]
        if self.mode == CFG_ULYSSES_PARALLEL:
            return [2 * k for k in degrees if 2 <= k and 2 * k <= limit]
        return [self.world_size]

    def check_heads(self, num_heads: int, what: str = "the model") -> None:
        """Refuse a token split that does not divide the attention heads, listing the sizes that do."""
        degree = self.ulysses_degree
        if num_heads % degree:
            raise ValueError(
                f"--parallel {self.mode} on {self.world_size} ranks splits the attention heads {degree} ways, "
                f"but {what} has {num_heads} heads ({num_heads} % {degree} != 0); run it with --nproc one of "
                f"{self.valid_world_sizes(num_heads)}")

    def describe(self) -> str:
        """E.g. 'cfg 2 x ulysses 2, sharded weights' (how the report labels the run)."""
        parts = [f"cfg {self.cfg_degree}"] if self.cfg_degree > 1 else []
        parts += [f"ulysses {self.ulysses_degree}"] if self.ulysses_degree > 1 else []
        text = " x ".join(parts) or "replicated steps"
        return text + (", sharded weights" if self.shard_weights else "")


@dataclass(frozen=True, kw_only=True)
class ParallelRuntime:
    """One rank's view of a parallel run (built by `init_from_environment`)."""

    plan: ParallelPlan
    rank: int
    device: torch.device
    backend: str
    timeout_s: float
    run_group: str  # the same id on every rank of the run
    cfg_group: dist.ProcessGroup | None  # the 2 ranks that hold the same token shard
    ulysses_group: dist.ProcessGroup | None  # the k ranks that hold the same CFG half
    control_group: dist.ProcessGroup  # gloo, for Python objects
    meter: CommMeter

    @property
    def world_size(self) -> int:
        return self.plan.world_size

    @property
    def cfg_index(self) -> int:
        """0: this rank computes the conditional pass; 1: the unconditional one."""
        return self.rank // self.plan.ulysses_degree

    @property
    def ulysses_index(self) -> int:
        return self.rank % self.plan.ulysses_degree

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def facts(self) -> dict[str, Any]:
        """What the profile records about this rank (the `parallel_plan` event)."""
        return {"rank": self.rank, "world_size": self.world_size, "mode": self.plan.mode,
                "cfg_degree": self.plan.cfg_degree, "ulysses_degree": self.plan.ulysses_degree,
                "shard_weights": self.plan.shard_weights, "plan": self.plan.describe(),
                "backend": self.backend, "device": str(self.device), "run_group": self.run_group}


# --------------------------------------------------------------------------------------------
# joining the run
# --------------------------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    """Whether this process was started by an elastic launcher (its rank variables are set)."""
    return all(name in os.environ for name in LAUNCHER_ENV)


def init_from_environment(mode: str, *, shard_weights: bool = False,
                          timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelRuntime:
    """Join the process group the launcher prepared and build this rank's runtime.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (set by `wanbench run --nproc`
    and by torchrun). Uses NCCL and `cuda:LOCAL_RANK` when CUDA is available, else gloo on the CPU.
    Every rank must ask for the same plan: a rank that asks for another one fails the run.
    """
    missing = [name for name in LAUNCHER_ENV if name not in os.environ]
    if missing:
        raise DistributedError(f"this process was not started by a launcher ({', '.join(missing)} unset); "
                               "start parallel runs with `wanbench run WORKFLOW --nproc N` or `torchrun "
                               "--nproc-per-node N -m wanbench run WORKFLOW`")
    if not timeout_s > 0:
        raise ValueError(f"timeout must be > 0 seconds (e.g. {DEFAULT_TIMEOUT_S:g}); got {timeout_s}")
    plan = ParallelPlan(world_size=int(os.environ["WORLD_SIZE"]), mode=mode, shard_weights=shard_weights)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    _agree(control, plan.world_size, "parallel plan (--parallel, --shard-weights)",
           f"{plan.mode}/{plan.shard_weights}")  # before the subgroups, which depend on it
    cfg_group, ulysses_group = _subgroups(plan, rank, timeout)
    run_group = _broadcast_value(uuid.uuid4().hex[:12], control)
    runtime = ParallelRuntime(plan=plan, rank=rank, device=device, backend=backend, timeout_s=timeout_s,
                              run_group=run_group, cfg_group=cfg_group, ulysses_group=ulysses_group,
                              control_group=control, meter=CommMeter(device))
    log.info("rank %d of %d joined as pid %d (%s, %s on %s)", rank, plan.world_size, os.getpid(), plan.describe(),
             backend, device)
    return runtime


def _subgroups(plan: ParallelPlan, rank: int,
               timeout: timedelta) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """(this rank's CFG pair, this rank's token-shard group); every rank creates every group."""
    k = plan.ulysses_degree
    cfg_group = ulysses_group = None
    if plan.cfg_degree > 1:
        for shard in range(k):
            group = dist.new_group([shard, k + shard], timeout=timeout)
            if rank % k == shard:
                cfg_group = group
    if k > 1:
        for half in range(plan.cfg_degree):
            group = dist.new_group(list(range(half * k, (half + 1) * k)), timeout=timeout)
            if rank // k == half:
                ulysses_group = group
    return cfg_group, ulysses_group


def shutdown(runtime: ParallelRuntime) -> None:
    """Leave the process group (after the last collective of the run)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    log.debug("rank %d left the process group", runtime.rank)


_ACTIVE: contextvars.ContextVar[ParallelRuntime | None] = contextvars.ContextVar("wanbench_parallel", default=None)


def active_parallel() -> ParallelRuntime | None:
    """The parallel runtime of this rank inside `use_parallel`, else None (a single-process run)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def use_parallel(runtime: ParallelRuntime | None) -> Iterator[None]:
    token = _ACTIVE.set(runtime)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# --------------------------------------------------------------------------------------------
# control messages (Python objects over the gloo group)
# --------------------------------------------------------------------------------------------
def to_cpu(value: Any) -> Any:
    """`value` with every tensor inside (lists, tuples, dicts, dataclasses) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: to_cpu(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value


def _broadcast_value(value: Any, group: dist.ProcessGroup) -> Any:
    box = [to_cpu(value) if dist.get_rank() == 0 else None]
    try:
        dist.broadcast_object_list(box, src=0, group=group)
    except RuntimeError as err:
        raise collective_failed("broadcast from rank 0", group, err) from err
    return box[0]


def broadcast_object(runtime: ParallelRuntime, value: Any) -> Any:
    """Rank 0's `value` on every rank (tensors arrive on the CPU); other ranks pass None."""
    return _broadcast_value(value, runtime.control_group)


def gather_to_root(value: Any) -> list[Any] | None:
    """Every rank's `value` on rank 0, in rank order; None on the other ranks.

    Outside a parallel run: `[value]`, so callers treat both cases alike.
    """
    runtime = active_parallel()
    if runtime is None:
        return [value]
    box: list[Any] | None = [None] * runtime.world_size if runtime.is_root else None
    try:
        dist.gather_object(to_cpu(value), box, dst=0, group=runtime.control_group)
    except RuntimeError as err:
        raise collective_failed("gathering results on rank 0", runtime.control_group, err) from err
    return box


def agree(runtime: ParallelRuntime, what: str, value: str) -> None:
    """Fail the run, naming the ranks, unless every rank holds the same `value` for `what`."""
    _agree(runtime.control_group, runtime.world_size, what, value)


def _agree(group: dist.ProcessGroup, world_size: int, what: str, value: str) -> None:
    values: list[Any] = [None] * world_size
    try:
        dist.all_gather_object(values, value, group=group)
    except RuntimeError as err:
        raise collective_failed(f"comparing the {what}", group, err) from err
    differing = [r for r, v in enumerate(values) if v != values[0]]
    if differing:
        raise DistributedError(f"the ranks of this run disagree on the {what}: rank 0 has {values[0]!r}, "
                               f"ranks {differing} have {[values[r] for r in differing]}. Start every node "
                               "of the run with the same workflow, models and parallel options")


# --------------------------------------------------------------------------------------------
# sampling under a plan
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Denoiser:
    """The guided prediction a sampling run uses, and the share of a step's FLOPs this process
    computes (what its `Step_<i>_Inference` stage records): with guidance, and without (the
    conditional pass alone, which every rank of a CFG pair runs)."""

    predict: GuidedPrediction
    flops_share: float = 1.0
    unguided_flops_share: float = 1.0

    def share(self, cfg_mode: str) -> float:
        return self.unguided_flops_share if cfg_mode == CFG_OFF else self.flops_share


@contextlib.contextmanager
def parallel_sampling(runtime: ParallelRuntime, experts: Sequence[nn.Module], *, placement: str,
                      single: GuidedPrediction, has_loras: bool = False) -> Iterator[Denoiser]:
    """Apply the plan to `experts` for one sampling run; yields the denoiser to use.

    Enter it before the placement: sharded weights come first (FSDP2 moves each rank's shards to
    its device, so placement `none` then moves nothing big); the Ulysses layout is set on every
    expert and removed on exit (errors included). `single` is the sampler's own
    guided prediction; CFG-parallel wraps it. After every call the step's communication is
    recorded as a `communication` event.
    """
    plan = runtime.plan
    for k, expert in enumerate(experts):
        plan.check_heads(expert.config.num_heads, what=f"expert {k}")
    if plan.shard_weights and placement != "none":
        raise ValueError(f"--shard-weights keeps each rank's share of the weights on its GPU; placement "
                         f"{placement!r} moves whole experts or blocks between CPU and GPU and cannot be "
                         "combined with it. Set the sampler's placement to 'none'")
    if plan.shard_weights and has_loras:
        raise ValueError("--shard-weights cannot be combined with LoRAs (the LoRA patches change whole weights, "
                         "FSDP holds 1/N of each); drop --shard-weights, or the Wan LoRA node (--parallel cfg and "
                         "ulysses work with LoRAs)")
    agree(runtime, "DiT weights (the model files)", weights_fingerprint(experts))
    if plan.shard_weights:
        shard_experts(experts, world_size=runtime.world_size, device=runtime.device, meter=runtime.meter)
    event(PARALLEL_PLAN_EVENT, **runtime.facts())
    guided = single
    if plan.cfg_degree > 1:
        guided = cfg_parallel_prediction(single, group=runtime.cfg_group, index=runtime.cfg_index,
                                         meter=runtime.meter)
    with ulysses_layout(experts, group=runtime.ulysses_group, degree=plan.ulysses_degree,
                        index=runtime.ulysses_index, meter=runtime.meter):
        runtime.meter.take()  # nothing before the first step counts toward it
        yield Denoiser(_metered(guided, runtime.meter), flops_share=1.0 / (plan.cfg_degree * plan.ulysses_degree),
                       unguided_flops_share=1.0 / plan.ulysses_degree)


def weights_fingerprint(experts: Sequence[nn.Module]) -> str:
    """A short hash of the first values of every weight of the experts (the same files give the same
    hash on every rank; sharded weights are fingerprinted by their shapes only)."""
    digest = hashlib.sha256()
    for model in experts:
        for name, param in model.named_parameters():
            digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
            if not is_sharded(model):
                digest.update(param.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _metered(guided: GuidedPrediction, meter: CommMeter) -> GuidedPrediction:
    """`guided`, followed by a `communication` event with what the call spent communicating."""

    def call(*args: Any, **kwargs: Any) -> torch.Tensor:
        pred = guided(*args, **kwargs)
        totals = meter.take()
        facts: dict[str, Any] = {"seconds": totals.total_s, "bytes": totals.total_bytes, "calls": totals.calls}
        facts.update({f"{kind}_s": s for kind, s in totals.seconds.items()})
        facts.update({f"{kind}_bytes": b for kind, b in totals.bytes_sent.items()})
        event(COMMUNICATION_EVENT, **facts)
        return pred

    return call

