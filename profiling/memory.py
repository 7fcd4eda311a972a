"""Memory and CPU probes: the CUDA caching allocator (per device) and the host process.

Each probe has a real implementation and a fake one for tests. A probe returns None for what it
cannot measure (no CUDA, no /proc); the report then shows `n/a`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


@dataclass(frozen=True, kw_only=True)
class AllocatorSnapshot:
    """CUDA caching allocator figures in bytes; peaks since the last `reset_peak`."""

    allocated: int
    reserved: int
    peak_allocated: int
    peak_reserved: int


class DeviceProbe(Protocol):
    """The compute device as the session sees it."""

    device: str  # "cuda:0" or "cpu"

    def synchronize(self) -> None: ...

    def snapshot(self) -> AllocatorSnapshot | None: ...

    def reset_peak(self) -> None: ...


class CpuDevice:
    """No accelerator: nothing to synchronise, no allocator figures."""

    device = "cpu"

    def synchronize(self) -> None:
        return None

    def snapshot(self) -> AllocatorSnapshot | None:
        return None

    def reset_peak(self) -> None:
        return None


class CudaDevice:
    """One CUDA device through `torch.cuda`."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CudaDevice needs a cuda device; got {device}")
        self._device = torch.device(
            "cuda", device.index if device.index is not None else torch.cuda.current_device()
        )
        self.device = str(self._device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self._device)

    def snapshot(self) -> AllocatorSnapshot:
        d = self._device
        return AllocatorSnapshot(
            allocated=torch.cuda.memory_allocated(d),
            reserved=torch.cuda.memory_reserved(d),
            peak_allocated=torch.cuda.max_memory_allocated(d),
            peak_reserved=torch.cuda.max_memory_reserved(d),
        )

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self._device)

    @property
    def torch_device(self) -> torch.device:
        return self._device


class FakeDevice:
    """A scripted CUDA device: tests set allocated/reserved; peaks follow like the real allocator."""

    def __init__(self, device: str = "cuda:0") -> None:
        self.device = device
        self.allocated = 0
        self.reserved = 0
        self._peak_allocated = 0
        self._peak_reserved = 0
        self.num_syncs = 0

    def set(self, *, allocated: int | None = None, reserved: int | None = None) -> None:
        """Set current usage; the peaks rise to it."""
        if allocated is not None:
            self.allocated = allocated
        if reserved is not None:
            self.reserved = reserved
        self.reserved = max(self.reserved, self.allocated)
        self._peak_allocated = max(self._peak_allocated, self.allocated)
        self._peak_reserved = max(self._peak_reserved, self.reserved)

    def spike(self, *, allocated: int) -> None:
        """A transient peak (activations) that is freed again before the stage ends."""
        current = self.allocated
        self.set(allocated=allocated)
        self.allocated = current

    def synchronize(self) -> None:
        self.num_syncs += 1

    def snapshot(self) -> AllocatorSnapshot:
        return AllocatorSnapshot(
            allocated=self.allocated,
            reserved=self.reserved,
            peak_allocated=self._peak_allocated,
            peak_reserved=self._peak_reserved,
        )

    def reset_peak(self) -> None:
        self._peak_allocated = self.allocated
        self._peak_reserved = self.reserved


@dataclass(frozen=True, kw_only=True)
class HostReading:
    cpu_time_s: float | None  # process user+system CPU seconds
    rss_bytes: int | None


class HostProbe(Protocol):
    def read(self) -> HostReading: ...


class ProcessProbe:
    """This process: CPU time from `time.process_time()`, resident memory from /proc/self/statm (Linux)."""

    _STATM = Path("/proc/self/statm")

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None
        self.rss_unavailable_reason = (
            None if self._STATM.exists() else "/proc/self/statm is missing (not Linux)"
        )
        self._fd: int | None = None

    def read(self) -> HostReading:
        rss = None
        if self.rss_unavailable_reason is None and self._page is not None:
            if self._fd is None:
                self._fd = os.open(self._STATM, os.O_RDONLY)
            rss = int(os.pread(self._fd, 128, 0).split()[1]) * self._page  # one read, no text decoding
        return HostReading(cpu_time_s=time.process_time(), rss_bytes=rss)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


class FakeHost:
    """Scripted host figures for tests."""

    def __init__(self) -> None:
        self.cpu_time_s = 0.0
        self.rss_bytes = 2_000_000_000

    def set(self, *, cpu_time_s: float | None = None, rss_bytes: int | None = None) -> None:
        if cpu_time_s is not None:
            self.cpu_time_s = cpu_time_s
        if rss_bytes is not None:
            self.rss_bytes = rss_bytes

    def read(self) -> HostReading:
        return HostReading(cpu_time_s=self.cpu_time_s, rss_bytes=self.rss_bytes)

