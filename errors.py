"""Every error type of the pack, under the one stable name ComfyUI shows: `wanbench.errors.<Name>`.

The classes live next to the code that raises them; each sets `__module__` to this module's name
(see `util/public.py`), and this module re-exports them so that the name resolves. `ServerError`
is looked up on first use: the server client needs the websocket-client package, which the nodes
inside ComfyUI do not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .runner import WorkflowError
from .suites import SuiteError
from .util.atomic import DiskFullError
from .util.deps import MissingDependencyError
from .wan_core.errors import (
    BackendUnavailableError,
    CheckpointError,
    DistributedError,
    MemoryPlanError,
    SamplingInterrupted,
    WanError,
)

if TYPE_CHECKING:
    from .client import ServerError

__all__ = [
    "BackendUnavailableError",
    "CheckpointError",
    "DiskFullError",
    "DistributedError",
    "MemoryPlanError",
    "MissingDependencyError",
    "SamplingInterrupted",
    "ServerError",
    "SuiteError",
    "WanError",
    "WorkflowError",
]


def __getattr__(name: str) -> Any:
    if name == "ServerError":
        from .client import ServerError

        return ServerError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
