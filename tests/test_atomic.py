"""`util.atomic`: the one writer every checkpoint, report, chart, video and download goes through."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from wanbench.util.atomic import DiskFullError, atomic_output, atomic_write_text, temporary_name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_error_inside_leaves_neither_target_nor_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    with pytest.raises(RuntimeError, match="writer failed"), atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and tmp.exists()
        tmp.write_bytes(b"half written")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []


def test_an_error_keeps_the_previous_file_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "video.mp4"
    target.write_bytes(b"finished before")
    with pytest.raises(KeyboardInterrupt), atomic_output(target) as tmp:
        tmp.write_bytes(b"new, unfinished")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == b"finished before"


def test_success_leaves_only_the_target_with_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"{}")
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == b"{}"
    # what open() gives (0o666 minus the umask), not mkstemp's owner-only 0o600
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()
    old = os.umask(0o022)
    try:
        assert stat.S_IMODE(atomic_write_text(tmp_path / "b.md", "x").stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_a_writer_that_replaces_the_temp_path_works(tmp_path: Path) -> None:
    target = tmp_path / "chart.png"
    with atomic_output(target) as tmp:
        tmp.unlink()  # e.g. a library that creates its own file at the given path
        tmp.write_bytes(b"png")
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == b"png"


def test_temp_names_are_unique_per_write(tmp_path: Path) -> None:
    target = tmp_path / "same.txt"
    with atomic_output(target) as a, atomic_output(target) as b:
        assert a != b and a.name.endswith(".tmp") and a.name.startswith(".wb-")
        a.write_text("first", encoding="utf-8")
        b.write_text("second", encoding="utf-8")
    assert list(tmp_path.iterdir()) == [target] and target.read_text(encoding="utf-8") == "first"


def test_atomic_write_text_writes_utf8_and_returns_the_path(tmp_path: Path) -> None:
    path = atomic_write_text(str(tmp_path / "note.md"), "Ä 3×3\n")
    assert path == tmp_path / "note.md" and path.read_bytes() == "Ä 3×3\n".encode()
    assert list(tmp_path.iterdir()) == [path]


def test_there_is_one_helper() -> None:
    from wanbench.nodes import comfy_bridge
    from wanbench.profiling import output
    from wanbench.wan_core.checkpoints import io

    for module in (comfy_bridge, output, io):
        assert not any(hasattr(module, name) for name in ("atomic_target", "write_text_atomic", "_atomic_write_text"))
    assert output.atomic_write_text is atomic_write_text  # imported from util.atomic, not a copy


def test_a_target_name_as_long_as_the_file_system_allows_is_written(tmp_path: Path) -> None:
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    target = tmp_path / ("n" * (limit - 4) + ".mp4")
    with atomic_output(target) as tmp:
        assert len(tmp.name) == len(temporary_name()) < limit
        tmp.write_bytes(b"video")
    assert target.read_bytes() == b"video"


def test_a_full_disk_names_the_path_and_the_free_space(tmp_path: Path) -> None:
    target = tmp_path / "out" / "report.md"
    with pytest.raises(DiskFullError) as info, atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    message = str(info.value)
    assert str(target) in message and "MiB free" in message and info.value.errno == errno.ENOSPC
    assert list(target.parent.iterdir()) == []  # no half-written file, no temporary file


def test_the_folder_is_created(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c.txt"
    assert atomic_write_text(target, "x").read_text(encoding="utf-8") == "x"
