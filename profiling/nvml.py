"""Device telemetry from NVML, behind a small interface with a fake for tests.

This is the only module that imports `pynvml` (package `nvidia-ml-py`), and only when a monitor
is opened. On Hopper and newer GPUs the monitor reads NVML GPU performance metrics (GPM): SM
activity (share of SMs busy) and SM occupancy. Elsewhere it reads NVML utilization, the share of
time any kernel was running, reported as "GPU busy" and never as SM activity. Without NVML or a
GPU, `open_gpu_monitor` says why and the report shows `n/a`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from .records import ACTIVITY_BUSY, ACTIVITY_SM

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class GpuReading:
    """One NVML reading; activity covers the time since the previous activity reading (None in a
    memory-only reading)."""

    activity_pct: float | None
    occupancy_pct: float | None
    used_bytes: int | None


class GpuMonitor(Protocol):
    """What the session needs from NVML."""

    name: str
    memory_total_bytes: int | None
    driver_version: str | None
    cuda_driver_version: str | None
    activity_metric: str  # ACTIVITY_SM or ACTIVITY_BUSY

    def read(self, *, activity: bool = True) -> GpuReading:
        """Device memory used, and with `activity` the activity since the previous activity read
        (a memory-only read leaves the activity interval running: GPM samples stay far apart)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class MonitorResult:
    """A monitor, or the reason there is none (shown in the report)."""

    monitor: GpuMonitor | None
    reason: str | None


class FakeNvml:
    """Scripted NVML for tests: `set(...)` the values the next readings return."""

    def __init__(
        self,
        *,
        name: str = "NVIDIA H100 80GB HBM3",
        memory_total_bytes: int = 85_520_809_984,
        activity_metric: str = ACTIVITY_SM,
        driver_version: str = "570.86.15",
        cuda_driver_version: str = "12.8",
    ) -> None:
        if activity_metric not in (ACTIVITY_SM, ACTIVITY_BUSY):
            raise ValueError(
                f"activity_metric must be {ACTIVITY_SM!r} or {ACTIVITY_BUSY!r}; got {activity_metric!r}"
            )
        self.name = name
        self.memory_total_bytes = memory_total_bytes
        self.driver_version = driver_version
        self.cuda_driver_version = cuda_driver_version
        self.activity_metric = activity_metric
        self.activity_pct: float = 0.0
        self.occupancy_pct: float | None = 0.0 if activity_metric == ACTIVITY_SM else None
        self.used_bytes: int = 0
        self.num_reads = 0
        self.num_activity_reads = 0
        self.closed = False
        self._error: Exception | None = None
        self._error_on = "any"

    def fail(self, error: Exception | None, *, on: str = "any") -> None:
        """Make later reads raise `error` (None: read normally again), as a failing driver would.

        `on`: "any" read, only "activity" reads (the sampler thread's) or only "memory" reads
        (the stage boundaries').
        """
        if on not in ("any", "activity", "memory"):
            raise ValueError(f"on must be 'any', 'activity' or 'memory'; got {on!r}")
        self._error, self._error_on = error, on

    def set(
        self,
        *,
        activity_pct: float | None = None,
        occupancy_pct: float | None = None,
        used_bytes: int | None = None,
    ) -> None:
        if activity_pct is not None:
            self.activity_pct = activity_pct
        if occupancy_pct is not None:
            if self.activity_metric != ACTIVITY_SM:
                raise ValueError("SM occupancy exists only with GPM (activity_metric='sm_activity')")
            self.occupancy_pct = occupancy_pct
        if used_bytes is not None:
            self.used_bytes = used_bytes

    def read(self, *, activity: bool = True) -> GpuReading:
        self.num_reads += 1
        if self._error is not None and self._error_on in ("any", "activity" if activity else "memory"):
            raise self._error
        if not activity:
            return GpuReading(activity_pct=None, occupancy_pct=None, used_bytes=self.used_bytes)
        self.num_activity_reads += 1
        return GpuReading(
            activity_pct=self.activity_pct, occupancy_pct=self.occupancy_pct, used_bytes=self.used_bytes
        )

    def close(self) -> None:
        self.closed = True


class PynvmlMonitor:
    """The real monitor (one device). Use `open_gpu_monitor` to create it."""

    def __init__(self, pynvml: Any, handle: Any, *, use_gpm: bool) -> None:
        self._nvml = pynvml
        self._handle = handle
        self._lock = threading.Lock()
        name = pynvml.nvmlDeviceGetName(handle)
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self.memory_total_bytes = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        driver = pynvml.nvmlSystemGetDriverVersion()
        self.driver_version = driver.decode() if isinstance(driver, bytes) else str(driver)
        cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())
        self.cuda_driver_version = f"{cuda // 1000}.{(cuda % 1000) // 10}"
        self.activity_metric = ACTIVITY_SM if use_gpm else ACTIVITY_BUSY
        self._gpm_samples: list[Any] = []
        if use_gpm:
            self._gpm_samples = [pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()]
            pynvml.nvmlGpmSampleGet(handle, self._gpm_samples[0])

    def _read_gpm(self) -> tuple[float | None, float | None]:
        nvml = self._nvml
        previous, current = self._gpm_samples
        nvml.nvmlGpmSampleGet(self._handle, current)
        request = nvml.c_nvmlGpmMetricsGet_t()
        request.version = nvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = 2
        request.sample1 = previous
        request.sample2 = current
        request.metrics[0].metricId = nvml.NVML_GPM_METRIC_SM_UTIL
        request.metrics[1].metricId = nvml.NVML_GPM_METRIC_SM_OCCUPANCY
        nvml.nvmlGpmMetricsGet(request)
        self._gpm_samples = [current, previous]
        values = []
        for metric in request.metrics[:2]:  # a metric NVML could not compute stays unmeasured
            ok = metric.nvmlReturn == nvml.NVML_SUCCESS
            values.append(float(metric.value) if ok else None)
        return values[0], values[1]

    def read(self, *, activity: bool = True) -> GpuReading:
        with self._lock:
            used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            if not activity:
                return GpuReading(activity_pct=None, occupancy_pct=None, used_bytes=used)
            if self._gpm_samples:
                activity, occupancy = self._read_gpm()
                return GpuReading(activity_pct=activity, occupancy_pct=occupancy, used_bytes=used)
            busy = float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            return GpuReading(activity_pct=busy, occupancy_pct=None, used_bytes=used)

    def close(self) -> None:
        with self._lock:
            for sample in self._gpm_samples:
                self._nvml.nvmlGpmSampleFree(sample)
            self._gpm_samples = []
            self._nvml.nvmlShutdown()


def open_gpu_monitor(*, index: int = 0, uuid: str | None = None) -> MonitorResult:
    """Open NVML for one device: by UUID ("GPU-...", as torch reports it) when given, else NVML index.

    The UUID is what ties a torch device to its NVML device when CUDA_VISIBLE_DEVICES renumbers them.

    Returns the monitor, or None with the reason (no pynvml, no driver, no such device).
    """
    try:
        import pynvml
    except ImportError:
        return MonitorResult(
            monitor=None, reason="nvidia-ml-py (pynvml) is not installed: pip install nvidia-ml-py"
        )
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        return MonitorResult(monitor=None, reason=f"NVML could not start ({err}); no NVIDIA driver?")
    try:
        if uuid is not None:
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid.encode())
        else:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        use_gpm = _gpm_supported(pynvml, handle)
        monitor = PynvmlMonitor(pynvml, handle, use_gpm=use_gpm)
    except pynvml.NVMLError as err:
        pynvml.nvmlShutdown()
        where = f"UUID {uuid}" if uuid is not None else f"index {index}"
        return MonitorResult(monitor=None, reason=f"NVML has no usable device at {where} ({err})")
    if not use_gpm:
        logger.info("NVML GPM is not supported on %s; using NVML utilization ('GPU busy')", monitor.name)
    return MonitorResult(monitor=monitor, reason=None)


def _gpm_supported(pynvml: Any, handle: Any) -> bool:
    if not hasattr(pynvml, "nvmlGpmQueryDeviceSupport"):
        return False
    try:
        return bool(pynvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice)
    except pynvml.NVMLError as err:
        logger.info("NVML GPM query failed (%s); using NVML utilization ('GPU busy')", err)
        return False
