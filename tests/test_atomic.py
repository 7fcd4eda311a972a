"""`util.atomic`: the one writer every checkpoint, report, chart, video and download goes through."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from wanbench.util.atomic import (
    DiskFullError,
    atomic_group,
    atomic_output,
    atomic_write_text,
    claim_numbered,
    release_claim,
    temporary_name,
)


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
    assert output.atomic_group is atomic_group  # imported from util.atomic, not a copy


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


def test_a_full_disk_message_has_no_bare_errno(tmp_path: Path) -> None:
    with pytest.raises(DiskFullError) as info, atomic_output(tmp_path / "v.mp4"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not str(info.value).startswith("[Errno") and "free some space" in str(info.value)
    assert type(info.value).__module__ == "wanbench.errors"


# ------------------------------------------------------------------------------------------------
# Groups: files that appear together or not at all
# ------------------------------------------------------------------------------------------------
def test_a_group_appears_together(tmp_path: Path) -> None:
    targets = [tmp_path / "r.json", tmp_path / "r.md"]
    with atomic_group(targets) as temps:
        temps[0].write_text("{}", encoding="utf-8")
        assert not targets[0].exists()  # nothing visible before the whole group is written
        temps[1].write_text("# r", encoding="utf-8")
    assert sorted(tmp_path.iterdir()) == sorted(targets)
    assert targets[0].read_text(encoding="utf-8") == "{}" and targets[1].read_text(encoding="utf-8") == "# r"


def test_a_group_that_fails_half_way_leaves_nothing(tmp_path: Path) -> None:
    """A full disk while writing the Markdown: the JSON (already written) does not appear either."""
    targets = [tmp_path / "r.json", tmp_path / "r.md"]
    with pytest.raises(DiskFullError) as info, atomic_group(targets) as temps:
        temps[0].write_text('{"status": "completed"}', encoding="utf-8")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    assert "r.json" in str(info.value) and "r.md" in str(info.value) and "MiB free" in str(info.value)


def test_a_group_rename_failure_removes_what_was_renamed(tmp_path: Path, monkeypatch) -> None:
    targets = [tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"]
    real_replace = os.replace
    calls = []

    def replace(src, dst):  # the third rename fails
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(errno.EIO, "input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="input/output error"), atomic_group(targets) as temps:
        for tmp in temps:
            tmp.write_bytes(b"x")
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


def test_a_temp_deleted_in_the_block_leaves_its_target_out(tmp_path: Path) -> None:
    targets = [tmp_path / "r.json", tmp_path / "r.png"]
    with atomic_group(targets) as temps:
        temps[0].write_text("{}", encoding="utf-8")
        temps[1].unlink()  # e.g. the chart was skipped
    assert list(tmp_path.iterdir()) == [targets[0]]


# ------------------------------------------------------------------------------------------------
# Claimed names
# ------------------------------------------------------------------------------------------------
def _name(counter: int) -> str:
    return f"video_{counter:05}_.mp4"


def test_claims_never_hand_out_a_name_twice(tmp_path: Path) -> None:
    first = claim_numbered(tmp_path, _name, 1)
    second = claim_numbered(tmp_path, _name, 1)  # a second writer that listed the folder at the same time
    assert first == (1, tmp_path / _name(1)) and second == (2, tmp_path / _name(2))
    assert first[1].stat().st_size == 0  # a placeholder until the writer replaces it


def test_concurrent_processes_claim_different_names(tmp_path: Path) -> None:
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        claimed = pool.starmap(_claim_in_child, [(str(tmp_path), 1)] * 16)
    assert sorted(claimed) == list(range(1, 17))


def _claim_in_child(folder: str, first: int) -> int:
    return claim_numbered(folder, _name, first)[0]


def test_release_removes_only_an_unwritten_placeholder(tmp_path: Path) -> None:
    _, empty = claim_numbered(tmp_path, _name, 1)
    _, written = claim_numbered(tmp_path, _name, 1)
    with atomic_output(written) as tmp:
        tmp.write_bytes(b"video")
    release_claim(empty)
    release_claim(written)
    release_claim(tmp_path / "never_claimed.mp4")
    assert list(tmp_path.iterdir()) == [written] and written.read_bytes() == b"video"
