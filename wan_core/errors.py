"""Errors raised by wan_core. Messages say what was found, what was expected and how to fix it."""

from __future__ import annotations


class WanError(Exception):
    """Base class of the pack's own errors."""


class CheckpointError(WanError, ValueError):
    """A model file is missing, corrupt, truncated, of the wrong kind or has wrong shapes."""


class BackendUnavailableError(WanError, ImportError):
    """An optional fast path (attention backend, compile, NVML, ...) was asked for but is not usable."""


class SamplingInterrupted(WanError):
    """Raised by a progress callback to stop a run between steps; leaves no half state behind."""




class MemoryPlanError(WanError, ValueError):
    """A job would not fit in the memory that is free: raised before anything large is allocated,
    with the estimate, what is free, and the options that would fit."""


class DistributedError(WanError, RuntimeError):
    """A parallel run cannot go on: a rank died, stopped answering or runs something else."""
