"""System facts: which device a session measures, how NVML finds it, and what the machine is.

Everything here is read when a session opens or closes, never at import: the device probe for a
requested device, the NVML monitor for a CUDA device (matched by UUID), and the `SystemInfo` of
the run (GPU name and memory, driver, CUDA and torch versions, the activity metric or why there
is none, CPU model, logical core count, host memory).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .memory import CpuDevice, CudaDevice, DeviceProbe
from .nvml import GpuMonitor, MonitorResult, open_gpu_monitor
from .records import SystemInfo

logger = logging.getLogger(__name__)


def default_device(device: str | torch.device | None) -> DeviceProbe:
    """The probe for `device`; None means CUDA when available, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"profiling device {dev} requested but CUDA is not available; use device='cpu'")
        return CudaDevice(dev)
    if dev.type == "cpu":
        return CpuDevice()
    raise ValueError(f"profiling supports 'cuda' and 'cpu' devices; got {dev}")


def monitor_for(device: DeviceProbe) -> MonitorResult:
    """The NVML monitor of the measured device, or the reason there is none."""
    if isinstance(device, CudaDevice):
        return open_gpu_monitor(**nvml_target(device))
    reason = (
        "no GPU: the run is on the CPU" if device.device == "cpu" else f"no NVML monitor was given for {device.device}"
    )
    return MonitorResult(monitor=None, reason=reason)


def nvml_target(device: CudaDevice) -> dict[str, Any]:
    """How NVML finds the torch device: its UUID when torch reports one, else its index."""
    props = torch.cuda.get_device_properties(device.torch_device)
    uuid = getattr(props, "uuid", None)
    if uuid is None:
        logger.info(
            "torch reports no device UUID; NVML uses index %s (wrong if CUDA_VISIBLE_DEVICES "
            "renumbers devices)",
            device.torch_device.index,
        )
        return {"index": device.torch_device.index or 0}
    text = str(uuid)
    return {"uuid": text if text.startswith("GPU-") else f"GPU-{text}"}


def system_info(device: DeviceProbe, gpu: GpuMonitor | None, gpu_reason: str | None, *,
                cores: int | None = None) -> SystemInfo:
    """What the run ran on: NVML's figures first, torch's device properties where NVML has none.

    `cores`: the logical core count the session judged CPU % against (default: this machine's)."""
    name = gpu.name if gpu is not None else None
    total = gpu.memory_total_bytes if gpu is not None else None
    if isinstance(device, CudaDevice):
        props = torch.cuda.get_device_properties(device.torch_device)
        name = name or props.name
        total = total or props.total_memory
    return SystemInfo(
        device=device.device,
        gpu_name=name,
        gpu_memory_bytes=total,
        driver_version=None if gpu is None else gpu.driver_version,
        cuda_version=torch.version.cuda
        if isinstance(device, CudaDevice)
        else (None if gpu is None else gpu.cuda_driver_version),
        torch_version=torch.__version__,
        activity_metric=None if gpu is None else gpu.activity_metric,
        activity_unavailable_reason=gpu_reason if gpu is None else None,
        cpu_name=cpu_name(),
        host_memory_bytes=host_memory_bytes(),
        cpu_logical_cores=cores if cores is not None else logical_cores(),
    )


def cpu_name() -> str | None:
    """The CPU model from /proc/cpuinfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def logical_cores() -> int | None:
    """The machine's logical CPU count (`os.cpu_count()`): process CPU % is at most 100 x this."""
    return os.cpu_count()


def host_memory_bytes() -> int | None:
    """Physical memory of the machine, or None where it cannot be read."""
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    return None
