"""The collectives of a parallel step, each timed: what a rank spends communicating.

Every collective the parallel runtime issues during sampling goes through this module, so that
one `CommMeter` per rank adds up, per kind (`config.COMM_KINDS`), the seconds and bytes of the
current denoising step. The sampler wrapper (`distributed.parallel_sampling`) takes the totals
after every step and records them as the `communication` event inside `Step_<i>_Inference`.

Timing: on CUDA a pair of CUDA events on the current stream around each collective (the time the
compute stream waited for it, peers included), read once per step with one synchronisation; on
the CPU (gloo) the wall time of the blocking call. Either way the figure includes the time spent
waiting for the slowest rank to arrive, which is what the step lost to communication.

A collective that fails (a peer died, the connection closed, the process-group timeout expired)
raises `DistributedError` naming the collective, the ranks and the timeout, instead of torch's
transport message alone.

Shapes: all_to_all_dim0 x (P, ...) -> (P, ...); all_gather_rows x (B, L_local, ...) -> P tensors.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import COMM_KINDS
from ..errors import DistributedError

__all__ = ["CommMeter", "CommTotals", "all_gather_rows", "all_to_all_dim0", "collective_failed"]


@dataclass(frozen=True)
class CommTotals:
    """Communication of one step on one rank: seconds and bytes sent per kind, and the call count."""

    seconds: dict[str, float] = field(default_factory=dict)
    bytes_sent: dict[str, int] = field(default_factory=dict)
    calls: int = 0

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())


class CommMeter:
    """Adds up the collectives of the current step, per kind; `take()` returns and resets them."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._uses_events = self.device.type == "cuda"
        self._intervals: list[tuple[str, object, object]] = []
        self._bytes: dict[str, int] = {}
        self._calls = 0

    def mark(self) -> object:
        """A point in time: a recorded CUDA event on the current stream, or `perf_counter()`."""
        if self._uses_events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, kind: str, start: object, end: object, nbytes: int) -> None:
        """Count one collective of `kind` between two marks that sent `nbytes` from this rank."""
        if kind not in COMM_KINDS:
            raise ValueError(f"unknown communication kind {kind!r}; expected one of {COMM_KINDS}")
        self._intervals.append((kind, start, end))
        self._bytes[kind] = self._bytes.get(kind, 0) + int(nbytes)
        self._calls += 1

    @contextlib.contextmanager
    def timed(self, kind: str, nbytes: int) -> Iterator[None]:
        start = self.mark()
        yield
        self.add(kind, start, self.mark(), nbytes)

    def take(self) -> CommTotals:
        """The totals since the last `take()` (one device synchronisation on CUDA), then reset."""
        seconds = dict.fromkeys(self._bytes, 0.0)
        if self._uses_events and self._intervals:
            torch.cuda.current_stream().synchronize()
        for kind, start, end in self._intervals:
            if self._uses_events:
                seconds[kind] += start.elapsed_time(end) / 1000.0  # type: ignore[attr-defined]
            else:
                seconds[kind] += float(end) - float(start)  # type: ignore[arg-type]
        totals = CommTotals(seconds=seconds, bytes_sent=dict(self._bytes), calls=self._calls)
        self._intervals, self._bytes, self._calls = [], {}, 0
        return totals


def collective_failed(what: str, group: dist.ProcessGroup | None, err: BaseException) -> DistributedError:
    """The error a rank raises when a collective with the others fails (to be raised `from err`)."""
    rank = dist.get_rank() if dist.is_initialized() else "?"
    ranks = dist.get_process_group_ranks(group) if group is not None and dist.is_initialized() else "all"
    return DistributedError(
        f"rank {rank}: {what} with ranks {ranks} failed ({type(err).__name__}: {err}). Another rank "
        "died, was stopped or did not answer within the process-group timeout (wanbench run --timeout); "
        "this rank stops too and writes nothing. Look for the first failing rank in the launcher's log")


def all_to_all_dim0(x: torch.Tensor, group: dist.ProcessGroup, meter: CommMeter, *, kind: str) -> torch.Tensor:
    """Chunk p of dim 0 goes to rank p of `group`; chunk p of the result came from rank p.

    Shapes: x (P, ...) with P the group size -> (P, ...), same dtype and device.
    """
    send = x.contiguous()
    out = torch.empty_like(send)
    size = dist.get_world_size(group)
    nbytes = send.numel() * send.element_size() * (size - 1) // size  # the chunk kept here is not sent
    try:
        with meter.timed(kind, nbytes):
            dist.all_to_all_single(out, send, group=group)
    except RuntimeError as err:
        raise collective_failed(f"all-to-all ({kind})", group, err) from err
    return out


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup, meter: CommMeter, *, kind: str) -> list[torch.Tensor]:
    """Every rank's `x`, in group-rank order.

    Shapes: x (...) -> list of P tensors shaped like x.
    """
    send = x.contiguous()
    size = dist.get_world_size(group)
    out = [torch.empty_like(send) for _ in range(size)]
    try:
        with meter.timed(kind, send.numel() * send.element_size() * (size - 1)):  # to each other rank
            dist.all_gather(out, send, group=group)
    except RuntimeError as err:
        raise collective_failed(f"all-gather ({kind})", group, err) from err
    return out
