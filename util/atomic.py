"""The one atomic file writer of the pack: a file appears whole or not at all.

Every file the pack writes (checkpoints made by the tiny-model tool, videos, reports, charts,
downloads, workflow JSON) goes through `atomic_output`: the writer fills a temporary file in the
target's own folder, and only a writer that finished replaces the target with one `os.replace`.
A writer that raises (an interrupt included) leaves no file at the target and no temporary file.

The temporary name has a fixed, short length (`.wb-<12 hex>.tmp`) whatever the target is called,
so a target whose name is as long as the file system allows can still be written, and concurrent
writers of one target never share a temporary file. Files get the usual permissions (0o666 minus
the umask, as `open()` gives), so a server running as another user can read them.

Several files that belong together (a report's Markdown, JSON and chart) go through
`atomic_group`: every file is written under its temporary name first and only then are all renamed
into place, so they appear together or not at all; a failure removes every temporary file and every
target already renamed.

Numbered output names (`video_00003_.mp4`) are claimed with `claim_numbered`: the first free name is
created empty with `O_EXCL`, so two processes writing into one folder never pick the same name; the
writer then replaces the empty placeholder, and `release_claim` removes it when the writer failed.

A full disk is reported with the target's path and the free space left, not as a bare errno.

Standard library only: every layer (wan_core, profiling, nodes, the CLI) may import this module.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .public import PUBLIC_MODULE

__all__ = [
    "DiskFullError",
    "atomic_group",
    "atomic_output",
    "atomic_write_text",
    "claim_numbered",
    "release_claim",
    "temporary_name",
]

TEMP_PREFIX = ".wb-"
TEMP_SUFFIX = ".tmp"


class DiskFullError(OSError):
    """The file system ran out of space while a file was written (the target was left untouched)."""

    __module__ = PUBLIC_MODULE

    def __str__(self) -> str:
        return str(self.strerror)  # the whole message (path, free space, fix); no "[Errno 28]" prefix


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


@contextlib.contextmanager
def atomic_group(paths: Sequence[str | os.PathLike[str]]) -> Iterator[list[Path]]:
    """Yield one temporary path per target; when the block succeeds all of them replace their targets.

    The files appear together or not at all: a failure in the block removes every temporary file and
    leaves the targets as they were; a failure while renaming (rare: a full directory, a vanished
    folder) removes the targets renamed so far as well, so no subset of the group is left behind.
    A temporary file the block deletes leaves its target out of the group (a file it chose not to
    write, e.g. a chart that was skipped).
    """
    targets = [Path(p) for p in paths]
    if len(set(targets)) != len(targets):
        raise ValueError(f"atomic_group needs distinct targets; got {[str(t) for t in targets]}")
    temps: list[Path] = []
    done: list[Path] = []
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(temporary_name())
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            temps.append(tmp)
        yield list(temps)
        for tmp, target in zip(temps, targets, strict=True):
            if tmp.exists():
                os.replace(tmp, target)
                done.append(target)
    except OSError as err:
        for target in done:
            target.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC and not isinstance(err, DiskFullError):
            names = ", ".join(t.name for t in targets)
            raise _disk_full(targets[0], err, what=f"{names} in {targets[0].parent}") from err
        raise
    except BaseException:
        for target in done:
            target.unlink(missing_ok=True)
        raise
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def claim_numbered(
    folder: str | os.PathLike[str], name_for: Callable[[int], str], first: int, *, max_tries: int = 100_000
) -> tuple[int, Path]:
    """Claim the first free numbered name: `(counter, path)` with `path = folder / name_for(counter)`.

    Tries `first`, `first + 1`, ...; the name is created as an empty file with `O_EXCL`, which
    succeeds for exactly one process, so concurrent writers into one folder get different names.
    The claimed file is a placeholder: write the real file over it (`atomic_output`), or remove it
    with `release_claim` when the writer failed.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for counter in range(first, first + max_tries):
        path = root / name_for(counter)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise _disk_full(path, err) from err
            raise
        return counter, path
    raise FileExistsError(
        f"no free output name in {root} after {max_tries} tries from {name_for(first)!r}; "
        "use another filename_prefix or clean the folder"
    )


def release_claim(path: str | os.PathLike[str]) -> None:
    """Remove a placeholder made by `claim_numbered` if it is still the empty file it was created as."""
    placeholder = Path(path)
    try:
        if placeholder.stat().st_size == 0:
            placeholder.unlink()
    except FileNotFoundError:
        return


def _disk_full(target: Path, err: OSError, *, what: str | None = None) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(target.parent).free / 2**20:.1f} MiB free"
    except OSError as usage_err:
        free = f"free space unknown ({usage_err.strerror or usage_err})"
    return DiskFullError(errno.ENOSPC, f"no space left on the device while writing {what or target} ({free}); "
                         f"free some space or choose another output folder", str(target))
