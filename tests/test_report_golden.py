"""The golden report (scripted runs through the reference stage sequence), files, charts and merging."""

from __future__ import annotations

import builtins
import dataclasses
import json
from pathlib import Path

import pytest
from make_golden_report import (
    GOLDEN_DIR,
    golden_runs,
    golden_texts,
    run_cpu_tiny,
    run_t2v_l40s,
    run_ti2v_h100,
)
from wanbench.profiling import (
    check_markdown,
    check_report,
    draw_timeline,
    load_runs,
    merge_reports,
    render_markdown,
    report_document,
    run_from_dict,
    run_to_dict,
    write_report,
)


def test_golden_markdown_and_json_match() -> None:
    markdown, document = golden_texts()
    assert markdown == (GOLDEN_DIR / "report.md").read_text(encoding="utf-8"), (
        "report format changed: review, then run python tests/make_golden_report.py"
    )
    assert document == (GOLDEN_DIR / "report.json").read_text(encoding="utf-8")


def test_golden_report_passes_the_checker() -> None:
    assert check_report(GOLDEN_DIR / "report.json") == []


def test_golden_report_shape() -> None:
    md = (GOLDEN_DIR / "report.md").read_text(encoding="utf-8")
    for needle in (
        "## Hardware Group A: NVIDIA H100 80GB HBM3",
        "## Hardware Group B: NVIDIA L40S",
        "| Case | Res | Frames | Steps | Offload | Time(s) | s/step | Mem(GB) | SM(%) | Load | MFU(%) |",
        "| Case | Res | Frames | Steps | Offload | Time(s) | s/step | Mem(GB) | Busy(%) | Load | MFU(%) |",
        "| Stage | Time (s) | Peak Mem (GB) | SM Act (%) | CPU (%) | Sys Mem (GB) | Comp Load | TFLOP/s |",
        "| GPU Busy (%) |",
        "Step_2_Loading | 9.60",
        "&nbsp;&nbsp;└ DiT_Load",
        "| T5_Encoding (took 0.31 s when it last ran) | cached |",
        "high_noise_model: steps 0-1; low_noise_model: steps 2-5",
        "### Recommendations (ranked",
        "it does not fit by 21.90 GB",
        "| T5_Encoding (cpu) | 9.80 | n/a |",
        "GPU activity was not measured (no GPU",
    ):
        assert needle in md, needle
    # the L40S has no GPM: its group never calls NVML utilization "SM activity"
    l40s = md.split("## Case: 02_t2v_a14b_480p")[1].split("## Case:")[0]
    assert "SM activity" not in l40s and "SM Act" not in l40s
    cpu = md.split("## Case: 03_cpu_tiny")[1]
    assert "0.0 %" not in cpu.split("### Bottleneck")[0]  # nothing unmeasured shows as zero


def test_json_round_trip() -> None:
    for run in golden_runs():
        data = json.loads(json.dumps(run_to_dict(run)))
        assert run_from_dict(data) == run


def test_write_report_single_run_files(tmp_path: Path) -> None:
    run = run_ti2v_h100()
    files = write_report(run, tmp_path, basename="h100")
    assert set(files) == {"md", "json", "png"} and files.markdown == tmp_path / "h100.md"
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![timeline of 01_ti2v_5b_704p](h100.png)" in files["md"].read_text(encoding="utf-8")
    assert not list(tmp_path.glob("*.tmp"))
    assert check_report(files["json"]) == []
    assert load_runs(files["json"]) == [run]


def test_cpu_chart_shows_what_was_measured(tmp_path: Path) -> None:
    run = run_cpu_tiny()
    result = draw_timeline(run, tmp_path / "cpu.png")
    assert result.path is not None
    assert "CPU %" in result.series and "process RSS" in result.series
    assert not {"SM activity", "GPU busy", "CUDA allocated", "device used (NVML)"} & set(result.series)
    files = write_report(run, tmp_path, basename="cpu")
    assert "GPU series are unavailable" in files["md"].read_text(encoding="utf-8")


def test_chart_skipped_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    files = write_report(run_cpu_tiny(), tmp_path, basename="nochart")
    assert "png" not in files
    assert "Chart skipped: matplotlib is not installed" in files["md"].read_text(encoding="utf-8")


def test_merge_two_gpus(tmp_path: Path) -> None:
    h100, l40s = run_ti2v_h100(), run_t2v_l40s()
    a = write_report(h100, tmp_path / "a", basename="run", chart=False)["json"]
    b = write_report(l40s, tmp_path / "b", basename="run", chart=False)["json"]
    merged = merge_reports([b, a])
    assert merged == render_markdown([l40s, h100])
    assert merged.index("Hardware Group A: NVIDIA L40S") < merged.index("Hardware Group B: NVIDIA H100")
    assert merged.count("## Case:") == 2


def test_non_ascii_names_survive_as_utf8(tmp_path: Path) -> None:
    run = run_cpu_tiny()
    run = dataclasses.replace(run, context=dataclasses.replace(run.context, case_name="测试_Überblick"))
    files = write_report(run, tmp_path, basename="utf8", chart=False)
    raw = files["md"].read_bytes()
    assert "测试_Überblick".encode() in raw
    assert check_report(files["json"]) == []


def test_busy_only_report_never_says_sm_activity() -> None:
    run = run_t2v_l40s()
    md = render_markdown([run])
    assert "Busy(%)" in md and "GPU Busy (%)" in md
    assert check_markdown(md, report_document([run])) == []


def test_formatting_never_turns_unmeasured_or_tiny_into_zero() -> None:
    from wanbench.profiling.formatting import fmt_gb, fmt_load, fmt_pct, fmt_s, fmt_tflops

    assert {fmt_s(None), fmt_gb(None), fmt_pct(None), fmt_load(None), fmt_tflops(None)} == {"n/a"}
    assert fmt_s(3e-5) == "3.0e-05" and fmt_s(0.0042) == "0.0042" and fmt_s(12.345) == "12.35"
    assert fmt_s(0.0) == "0.00"  # a measured zero stays a number


def test_run_without_steps_reports_and_checks_clean(tmp_path: Path) -> None:
    from wanbench.profiling import FakeClock, FakeHost, ProfileSession
    from wanbench.profiling.memory import CpuDevice
    from wanbench.wan_core import trace

    clock = FakeClock()
    session = ProfileSession(
        case_name="decode_only",
        sample_interval_s=None,
        clock=clock,
        device_probe=CpuDevice(),
        host=FakeHost(),
    )
    with session:
        with trace.stage("VAE_Decoding", kind="decode"):
            clock.advance(2.0)
    files = write_report(session, tmp_path, basename="decode", chart=False)
    md = files.markdown.read_text(encoding="utf-8")
    assert "No denoising steps were recorded" in md and "| VAE_Decoding | 2.00 |" in md
    assert check_report(files.json) == []


def test_run_with_cached_sampler_counts_cached_steps(tmp_path: Path) -> None:
    from wanbench.profiling import FakeClock, FakeHost, ProfileSession, summarize_run
    from wanbench.profiling.memory import CpuDevice
    from wanbench.wan_core import trace

    clock = FakeClock()
    session = ProfileSession(
        case_name="rerun", sample_interval_s=None, clock=clock, device_probe=CpuDevice(), host=FakeHost()
    )
    with session:
        session.set_context(steps=2)
        for i in range(2):
            session.record_cached(f"Step_{i}_Loading", "step-loading", measured_s=0.01)
            session.record_cached(f"Step_{i}_Inference", "step-inference", measured_s=1.5)
        with trace.stage("VAE_Decoding", kind="decode"):
            clock.advance(2.0)
    summary = summarize_run(session.record)
    assert (summary.num_steps_recorded, summary.num_steps_cached, summary.s_per_step) == (0, 2, None)
    files = write_report(session, tmp_path, basename="rerun", chart=False)
    assert "| Case | Res |" in files.markdown.read_text(encoding="utf-8")
    assert "| 0 + 2 cached |" in files.markdown.read_text(encoding="utf-8")
    assert check_report(files.json) == []


def test_merge_same_gpu_with_sm_activity_and_gpu_busy(tmp_path: Path) -> None:
    """Two H100 runs, one with GPM SM activity and one with only NVML utilization (and another
    driver): two labelled groups instead of a ValueError; the differing versions are listed."""
    h100 = run_ti2v_h100()
    busy = dataclasses.replace(
        h100,
        run_id="other-machine",
        context=dataclasses.replace(h100.context, case_name="01b_busy_only"),
        system=dataclasses.replace(h100.system, activity_metric="gpu_busy", driver_version="535.1"),
    )
    a = write_report(h100, tmp_path / "a", basename="run", chart=False)["json"]
    b = write_report(busy, tmp_path / "b", basename="run", chart=False)["json"]
    merged = merge_reports([a, b])
    assert "## Hardware Group A: NVIDIA H100 80GB HBM3 (SM activity)" in merged
    assert "## Hardware Group B: NVIDIA H100 80GB HBM3 (GPU busy)" in merged
    group_b = merged.split("## Hardware Group B")[1].split("# Detailed")[0]
    assert "Busy(%)" in group_b and "SM(%)" not in group_b
    same_group = dataclasses.replace(busy, system=dataclasses.replace(h100.system, driver_version="535.1"))
    md = render_markdown([h100, same_group])
    assert "driver differs: 570.86.15 (01_ti2v_5b_704p), 535.1 (01b_busy_only)" in md


def test_merging_the_same_run_twice_keeps_it_once(tmp_path: Path) -> None:
    h100 = run_ti2v_h100()
    a = write_report(h100, tmp_path / "a", basename="run", chart=False)["json"]
    merged = merge_reports([a, a])
    assert merged.count("## Case:") == 1
    assert f"- Note: run {h100.run_id} of case '01_ti2v_5b_704p' was given 2 times; it is reported once" in merged


def test_chart_axes_bands_and_expert_switch(tmp_path: Path) -> None:
    """RSS that barely moves (0.43565 GB +- bytes) prints plain numbers from 0, not an offset
    like 1e-6+4.3565e-1; non-step stages are labelled; the expert switch is marked."""
    pytest.importorskip("matplotlib")
    from wanbench.profiling import draw_timeline

    run = run_t2v_l40s()
    samples = tuple(dataclasses.replace(s, rss_bytes=435_650_000 + i) for i, s in enumerate(run.samples))
    result = draw_timeline(dataclasses.replace(run, samples=samples), tmp_path / "t.png")
    assert result.path is not None and result.path.stat().st_size > 0
    assert result.y_offsets == ("", "") and result.y_bottoms == (0.0, 0.0)
    assert result.band_labels == ("Model_Initialization", "TI2V_Preprocess", "T5_Encoding", "VAE_Decoding")
    switch = next(e for e in run.events if e.name == "expert_switch")
    assert result.markers == (switch.t_s,)


def test_small_sizes_keep_their_digits() -> None:
    """A tiny model's few megabytes read as such, never as a bare 0.00 GB (which reads as nothing)."""
    from wanbench.profiling.formatting import fmt_gb

    assert fmt_gb(4_200_000) == "0.0042"
    assert fmt_gb(0) == "0.00"
    assert fmt_gb(25_280_000_000) == "25.28"
    assert fmt_gb(None) == "n/a"
