"""Parallel workflow runs: start the ranks with PyTorch's elastic launcher, and what each rank does.

    wanbench run WORKFLOW --nproc N [--parallel cfg|ulysses|cfg+ulysses] [--shard-weights]
                 [--nnodes M --rdzv-endpoint HOST:PORT --rdzv-id ID] [--timeout S]
    torchrun --nproc-per-node N -m wanbench run WORKFLOW [--parallel ...] [--shard-weights]

`launch_run` starts N ranks on this machine through `torch.distributed.launcher.api.elastic_launch`
(the machinery behind torchrun) with a c10d rendezvous: on one machine at a free local port, across
M machines at `--rdzv-endpoint` (every machine runs the same command with the same endpoint and
id). A rank that fails or dies fails the run: the launcher stops the other ranks of its machine,
the ranks of other machines see their collectives fail (or time out after `--timeout` seconds),
nothing is restarted, and `launch_run` raises `DistributedError` naming the first failing rank.

`run_rank` is one rank: join the process group (`wan_core.runtime.distributed`), run the workflow
with `rank_runner.run_workflow_on_rank`, leave. Under torchrun the CLI calls it directly. Rank 0
returns the files it wrote; the other ranks write nothing and return no files.

Shapes: none.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .wan_core.config import ULYSSES_PARALLEL
from .wan_core.errors import DistributedError
from .wan_core.runtime.distributed import ParallelPlan, init_from_environment, launched_by_torchrun, shutdown

log = logging.getLogger(__name__)

__all__ = ["LaunchOptions", "RankJob", "launch_run", "launched_by_torchrun", "run_rank"]

DEFAULT_PARALLEL = ULYSSES_PARALLEL  # what --nproc N > 1 does without --parallel (as the official --ulysses_size)
LOCAL_ENDPOINT = "127.0.0.1:0"  # one machine: the rendezvous picks a free port


@dataclass(frozen=True)
class RankJob:
    """What every rank runs (picklable: it is sent to the spawned processes). `prompt` is the API
    workflow with the command line's overrides applied."""

    workflow_name: str
    prompt: dict[str, Any]
    out_dir: Path
    models: Path
    parallel: str = DEFAULT_PARALLEL
    shard_weights: bool = False
    timeout_s: float = 600.0
    verbose: bool = False

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout must be > 0 seconds (e.g. 600); got {self.timeout_s}")


@dataclass(frozen=True)
class LaunchOptions:
    """How the ranks are started: per machine, how many machines, where they meet."""

    nproc: int
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    start_method: str = "spawn"
    local_addr: str | None = None  # this machine's address as the others reach it (default: its host name)

    def __post_init__(self) -> None:
        if self.nproc < 1 or self.nnodes < 1:
            raise ValueError(f"--nproc and --nnodes must be >= 1; got {self.nproc} and {self.nnodes}")
        if self.nnodes > 1 and not (self.rdzv_endpoint and self.rdzv_id):
            raise ValueError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (a port on the first machine "
                             "that every machine can reach) and --rdzv-id (the same run name on every machine)")


def run_rank(job: RankJob) -> dict[str, list[str]]:
    """One rank of a parallel run; returns the files written (rank 0) or no files (other ranks)."""
    from .nodes.context import Bridge
    from .rank_runner import run_workflow_on_rank
    from .runner import output_files

    _rank_logging(job.verbose)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # the launcher stops ranks with SIGTERM: unwind cleanly
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))
    runtime = init_from_environment(job.parallel, shard_weights=job.shard_weights, timeout_s=job.timeout_s)
    try:
        result = run_workflow_on_rank(job.prompt, Bridge.for_models_root(job.models, job.out_dir), runtime)
        return output_files(result) if runtime.is_root else {"videos": [], "reports": []}
    finally:
        shutdown(runtime)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (the launcher stopping the ranks after a failure) as an exception, so that every
    `finally` runs: a file being written is removed, never left half-written."""
    raise SystemExit(f"rank {os.environ.get('RANK', '?')} stopped by the launcher (another rank failed)")


def _rank_logging(verbose: bool) -> None:
    rank = os.environ.get("RANK", "?")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format=f"rank {rank} %(levelname)s %(name)s: %(message)s", force=True)


def launch_run(job: RankJob, options: LaunchOptions) -> dict[str, list[str]] | None:
    """Start the ranks of this machine and wait for them; the files rank 0 wrote, or None when rank 0
    ran on another machine (its launcher lists them). The plan is checked against the world size
    before anything starts; OMP_NUM_THREADS, when unset, becomes this machine's cores / nproc."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    ParallelPlan(world_size=options.nproc * options.nnodes, mode=job.parallel, shard_weights=job.shard_weights)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // options.nproc)))
    config = LaunchConfig(
        min_nodes=options.nnodes, max_nodes=options.nnodes, nproc_per_node=options.nproc,
        run_id=options.rdzv_id or uuid.uuid4().hex, rdzv_backend="c10d",
        rdzv_endpoint=options.rdzv_endpoint or LOCAL_ENDPOINT, rdzv_configs={"join_timeout": job.timeout_s},
        max_restarts=0, monitor_interval=0.1, start_method=options.start_method, local_addr=options.local_addr,
    )
    if not job.verbose:  # the one-line error below says it all; -v keeps the launcher's own traceback log
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(config, run_rank)(job)
    except ChildFailedError as err:
        raise DistributedError(_failure_message(err)) from err
    return results.get(0)


def _failure_message(err: Any) -> str:
    """One paragraph for the user from the launcher's ChildFailedError: which rank failed first, how."""
    rank, failure = err.get_first_failure()
    how = (f"died with signal {failure.signal_name()}" if failure.exitcode < 0
           else f"exited with code {failure.exitcode}")
    detail = failure.message if isinstance(failure.message, str) else (failure.message or {}).get("message", "")
    detail = str(detail).strip().splitlines()[-1] if str(detail).strip() else ""
    others = sorted(r for r in err.failures if r != rank)
    return (f"rank {rank} (pid {failure.pid}, local rank {failure.local_rank} on {socket.gethostname()}) {how}"
            + (f": {detail}" if detail else "")
            + (f"; ranks {others} failed after it" if others else "")
            + ". The other ranks were stopped and the run failed: no report was written, and no file is "
            "left half-written (outputs are written whole by rank 0 or not at all)")
