"""`wanbench demo`: tiny models + the tiny TI2V workflow on CPU, end to end, into one folder."""

from __future__ import annotations

import sys
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
    chart = reports[0].with_suffix(".png")
    assert chart.is_file() and chart.read_bytes().startswith(b"\x89PNG")  # matplotlib is in the test extra
    assert f"chart: {chart}" in stdout
    assert str(videos[0]) in stdout and "benchmark report" in stdout
    with av.open(str(videos[0])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9
    assert check_report(reports[0]) == []
    assert not list(out.rglob("*.tmp"))  # every output was written atomically


def test_demo_without_matplotlib_says_the_chart_was_skipped(tmp_path: Path, capsys, monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "wanbench_out"
    assert main(["demo", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert not list(out.rglob("*.png"))
    assert ".png" not in stdout
    assert "chart: skipped (matplotlib is not installed); pip install matplotlib" in stdout
