"""The one atomic file writer of the pack: a file appears whole or not at all.

Every file the pack writes (checkpoints made by the tiny-model tool, videos, reports, charts,
downloads, workflow JSON) goes through `atomic_output`: the writer fills a temporary file in the
target's own folder, and only a writer that finished replaces the target with one `os.replace`.
A writer that raises (an interrupt included) leaves no file at the target and no temporary file.

The temporary name has a fixed, short length (`.wb-<12 hex>.tmp`) whatever the target is called,
so a target whose name is as long as the file system allows can still be written, and concurrent
writers of one target never share a temporary file. Files get the usual permissions (0o666 minus
the umask, as `open()` gives), so a server running as another user can read them.

A full disk is reported with the target's path and the free space left, not as a bare errno.

Standard library only: every layer (wan_core, profiling, nodes, the CLI) may import this module.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["DiskFullError", "atomic_output", "atomic_write_text", "temporary_name"]

TEMP_PREFIX = ".wb-"
TEMP_SUFFIX = ".tmp"


class DiskFullError(OSError):
    """The file system ran out of space while a file was written (the target was left untouched)."""


def temporary_name() -> str:
    """A fresh temporary file name of fixed length (19 characters)."""
    return f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new, empty temporary path beside `path`; on success it replaces `path`.

    The folder of `path` is created when missing. The writer may write to the yielded path, or
    replace or truncate it. On error the temporary file is removed and `path` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(temporary_name())
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        os.replace(tmp, target)
    except OSError as err:
        if err.errno == errno.ENOSPC and not isinstance(err, DiskFullError):
            raise _disk_full(target, err) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `path` through `atomic_output`; returns the path."""
    target = Path(path)
    with atomic_output(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target


def _disk_full(target: Path, err: OSError) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(target.parent).free / 2**20:.1f} MiB free"
    except OSError as usage_err:
        free = f"free space unknown ({usage_err.strerror or usage_err})"
    return DiskFullError(errno.ENOSPC, f"no space left on the device while writing {target} ({free}); "
                         f"free some space or choose another output folder", str(target))
