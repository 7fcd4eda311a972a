"""`wanbench demo`: tiny models + the tiny TI2V workflow on CPU, end to end, into one folder."""

from __future__ import annotations

from pathlib import Path

import av
from wanbench.cli import main
from wanbench.profiling import check_report


def test_demo_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "wanbench_out"
    assert main(["demo", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    videos = sorted(out.rglob("*.mp4"))
    reports = sorted(out.rglob("*_.json"))
    assert len(videos) == 1 and len(reports) == 1
    assert reports[0].with_suffix(".md").is_file()
    assert str(videos[0]) in stdout and "benchmark report" in stdout
    with av.open(str(videos[0])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9
    assert check_report(reports[0]) == []
