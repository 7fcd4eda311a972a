"""Known GPUs: dense bf16/fp16 tensor-core peak, for MFU and the FLOP time floor.

Peaks are the vendors' datasheet figures for dense (not 2:4 sparse) bf16/fp16 matmuls with fp32
accumulation, in TFLOP/s. A GPU that is not in the table has no peak: MFU and the floor then
read `n/a` in the report (never a guess).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    """One GPU model as the report knows it."""

    key: str  # short display name, e.g. "H100 SXM"
    match: tuple[str, ...]  # all of these words (lower case) must occur in the device name
    dense_bf16_tflops: float
    memory_gb: float  # nominal memory (decimal GB) of the usual variant
    gpm: bool  # NVML GPU performance metrics (true SM activity) available (Hopper and newer)


# Order does not matter: `lookup_gpu` picks the most specific matching entry.
KNOWN_GPUS: tuple[GpuSpec, ...] = (
    GpuSpec(key="H200 NVL", match=("h200", "nvl"), dense_bf16_tflops=835.5, memory_gb=141, gpm=True),
    GpuSpec(key="H200", match=("h200",), dense_bf16_tflops=989.4, memory_gb=141, gpm=True),
    GpuSpec(key="GH200", match=("gh200",), dense_bf16_tflops=989.4, memory_gb=96, gpm=True),
    GpuSpec(key="H100 NVL", match=("h100", "nvl"), dense_bf16_tflops=835.5, memory_gb=94, gpm=True),
    GpuSpec(key="H100 PCIe", match=("h100", "pcie"), dense_bf16_tflops=756.5, memory_gb=80, gpm=True),
    GpuSpec(key="H100 SXM", match=("h100",), dense_bf16_tflops=989.4, memory_gb=80, gpm=True),
    GpuSpec(key="B200", match=("b200",), dense_bf16_tflops=2250.0, memory_gb=180, gpm=True),
    GpuSpec(
        key="RTX PRO 6000 Blackwell",
        match=("rtx pro 6000", "blackwell"),
        dense_bf16_tflops=503.8,
        memory_gb=96,
        gpm=True,
    ),
    GpuSpec(key="A100", match=("a100",), dense_bf16_tflops=312.0, memory_gb=80, gpm=False),
    GpuSpec(key="L40S", match=("l40s",), dense_bf16_tflops=362.05, memory_gb=48, gpm=False),
    GpuSpec(key="L40", match=("l40",), dense_bf16_tflops=181.05, memory_gb=48, gpm=False),
    GpuSpec(key="L4", match=("nvidia l4",), dense_bf16_tflops=121.0, memory_gb=24, gpm=False),
    GpuSpec(key="RTX 4090", match=("rtx 4090",), dense_bf16_tflops=165.2, memory_gb=24, gpm=False),
    GpuSpec(key="RTX A6000", match=("rtx a6000",), dense_bf16_tflops=154.8, memory_gb=48, gpm=False),
)


def _matches(spec: GpuSpec, name: str) -> bool:
    """Every match part occurs in `name` as whole words ("h200" is not found in "gh200")."""
    return all(re.search(rf"(?<![a-z0-9]){re.escape(part)}(?![a-z0-9])", name) for part in spec.match)


def lookup_gpu(device_name: str | None) -> GpuSpec | None:
    """The table entry for an NVML/torch device name ("NVIDIA H100 80GB HBM3"), or None if unknown.

    Parts match whole words, and among the entries that match, the most specific one (the most
    matched characters) wins, so "NVIDIA GH200 480GB" is a GH200 and "H100 NVL" is not an H100 SXM
    whatever the table order.
    """
    if not device_name:
        return None
    name = device_name.lower()
    found = [spec for spec in KNOWN_GPUS if _matches(spec, name)]
    if not found:
        return None
    return max(found, key=lambda spec: sum(len(part) for part in spec.match))
