"""Runtimes side by side: the comparison section from two runs, the output difference of two
videos, and a suite whose comparison runs in-process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from wanbench.cli import main
from wanbench.compare import compare_cases, video_difference
from wanbench.nodes.video import write_mp4
from wanbench.profiling import FakeClock, FakeDevice, FakeHost, ProfileSession, write_report
from wanbench.profiling.comparison import (
    Comparison,
    OutputDifference,
    job_differences,
    output_comparable,
    render_comparisons,
    speedup,
)
from wanbench.wan_core import trace


def _run(
    case: str,
    *,
    init: float,
    step: float,
    decode: float,
    frames: int = 9,
    seed: int = 1,
    solver: str = "euler",
    cached_init: bool = False,
):
    clock = FakeClock()
    session = ProfileSession(
        case_name=case, sample_interval_s=None, clock=clock, device_probe=FakeDevice(), host=FakeHost()
    )
    with session:
        session.set_context(task="t2v-A14B", width=64, height=48, frames=frames, steps=2, seed=seed, solver=solver)
        if cached_init:
            session.record_cached("Model_Initialization", "init", measured_s=init)
        else:
            with trace.stage("Model_Initialization", kind="init"):
                clock.advance(init)
        for i in range(2):
            with trace.stage(f"Step_{i}_Inference", kind="step-inference", expert="high", cfg_mode="batched"):
                clock.advance(step)
        with trace.stage("VAE_Decoding", kind="decode"):
            clock.advance(decode)
    return session.record


def test_section_puts_phases_side_by_side_with_the_speedup() -> None:
    native = _run("native", init=4.0, step=2.0, decode=1.0)
    pack = _run("pack", init=1.0, step=0.5, decode=1.0, cached_init=True)
    text = render_comparisons(
        [
            Comparison(
                title="T2V",
                baseline=native,
                candidate=pack,
                output=OutputDifference(psnr_db=41.234, max_abs=7, num_frames=9),
            )
        ]
    )
    assert "| Model initialization | 4.00 | cached | n/a |" in text  # served from a cache: no ratio
    assert "| Step inference | 4.00 | 1.00 | 4.00x |" in text
    assert "| VAE decoding | 1.00 | 1.00 | 1.00x |" in text
    assert "| s/step | 2.00 | 0.50 | 4.00x |" in text
    assert "PSNR 41.23 dB, max abs 7 of 255" in text and "Not the same job" not in text
    assert speedup(2.0, 0.0) is None and speedup(None, 1.0) is None


def test_different_jobs_and_outputs_that_cannot_be_compared_are_said_so() -> None:
    a = _run("a", init=1, step=1, decode=1)
    b = _run("b", init=1, step=1, decode=1, frames=17, seed=2, solver="unipc")
    assert job_differences(a, b) == ["frames 9 vs 17", "seed 1 vs 2", "solver euler vs unipc"]
    assert output_comparable(a, b) == "different seeds (1 vs 2): different noise"
    assert output_comparable(a, _run("c", init=1, step=1, decode=1, solver="euler/simple")) is None
    text = render_comparisons([Comparison(title="x", baseline=a, candidate=b, output_na_reason="different seeds")])
    assert "**Not the same job**: frames 9 vs 17; seed 1 vs 2; solver euler vs unipc" in text
    assert "- **Output difference**: n/a (different seeds)" in text


def _video(path: Path, frames: torch.Tensor) -> Path:
    return write_mp4(frames, path, fps=8)


def test_video_difference(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    frames = (torch.rand(5, 32, 48, 3, generator=g) * 255).to(torch.uint8)
    a = _video(tmp_path / "a.mp4", frames)
    same = video_difference(a, _video(tmp_path / "b.mp4", frames))
    assert math.isinf(same.psnr_db) and same.max_abs == 0 and same.num_frames == 5
    other = video_difference(a, _video(tmp_path / "c.mp4", 255 - frames))
    assert other.psnr_db < 10 and other.max_abs > 100
    with pytest.raises(ValueError, match="the outputs differ in shape"):
        video_difference(a, _video(tmp_path / "d.mp4", frames[:, :16]))


def test_frame_saver_and_lossless_frames(tmp_path: Path) -> None:
    from PIL import Image
    from wanbench.compare import FRAMES_FOLDER, add_frame_saver, frames_of

    prompt = {"8": {"class_type": "VAEDecode", "inputs": {}}, "9": {"class_type": "SaveVideo", "inputs": {}}}
    out = add_frame_saver(prompt, "native")
    saver = out["wanbench_compare_frames"]
    assert saver["class_type"] == "SaveImage" and saver["inputs"]["images"] == ["8", 0]
    assert (
        saver["inputs"]["filename_prefix"] == f"{FRAMES_FOLDER}/native/frame"
        and "wanbench_compare_frames" not in prompt
    )
    two = {**prompt, "10": {"class_type": "WanBenchVAEDecode", "inputs": {}}}
    assert add_frame_saver(two, "x") == two  # which decode is the output is not clear: nothing added
    files = {}
    for case, level in (("native", 100), ("pack", 103)):
        folder = tmp_path / FRAMES_FOLDER / case
        folder.mkdir(parents=True)
        paths = []
        for i in range(3):
            path = folder / f"frame_{i:05}_.png"
            Image.new("RGB", (8, 6), (level, level, level)).save(path)
            paths.append(str(path))
        files[case] = {"reports": [], "videos": [], "other": list(reversed(paths)) + [str(tmp_path / "x.png")]}
    assert [Path(p).name for p in frames_of(files["native"], "native")] == [f"frame_{i:05}_.png" for i in range(3)]
    from wanbench.compare import _output_difference

    diff = _output_difference({"baseline": "native", "candidate": "pack"}, files)
    assert diff.source == "frames" and diff.max_abs == 3 and diff.num_frames == 3
    assert diff.psnr_db == pytest.approx(10 * math.log10(255**2 / 9))


def test_compare_cases_reads_reports_and_videos(tmp_path: Path) -> None:
    frames = torch.zeros(3, 16, 16, 3, dtype=torch.uint8)
    files = {}
    for case in ("native", "pack"):
        report = write_report(_run(case, init=1, step=1, decode=1), tmp_path / case, basename=case)
        files[case] = {"reports": [str(report.json)], "videos": [str(_video(tmp_path / f"{case}.mp4", frames))]}
    spec = {"title": "t", "baseline": "native", "candidate": "pack"}
    made = compare_cases(spec, files)
    assert isinstance(made, Comparison) and made.output is not None and math.isinf(made.output.psnr_db)
    assert (
        compare_cases(spec, {"native": files["native"]})
        == "t: case pack wrote no report (it failed or has no Wan Benchmark Report)"
    )


def test_suite_with_a_comparison_runs_in_process(tmp_path: Path) -> None:
    from wanbench.cli import WORKFLOWS_DIR
    from wanbench.tiny_models import make_tiny_models

    models = make_tiny_models(tmp_path / "models", seed=0, overwrite=False).root
    workflow = str(WORKFLOWS_DIR / "tiny_t2v_A14B.api.json")
    suite = {
        "name": "pair",
        "cases": [
            {
                "name": "batched",
                "workflow": workflow,
                "overrides": {"WanBenchProfiler.case_name": "batched", "WanBenchSampler.steps": 2},
            },
            {
                "name": "two_passes",
                "workflow": workflow,
                "overrides": {
                    "WanBenchProfiler.case_name": "two_passes",
                    "WanBenchSampler.steps": 2,
                    "WanBenchSampler.batched_cfg": False,
                },
            },
        ],
        "comparisons": [{"title": "batched vs two passes", "baseline": "two_passes", "candidate": "batched"}],
    }
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(suite), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["suite", str(path), "--out", str(out), "--models", str(models)]) == 0
    text = (out / "pair_report.md").read_text(encoding="utf-8")
    section = text[text.index("## Runtimes side by side") :]
    assert "### batched vs two passes" in section and "| Step inference |" in section
    assert "CFG sequential vs batched" in section
    # same noise and solver: the output difference is measured (batched CFG = two passes, up to float noise)
    line = next(ln for ln in section.splitlines() if ln.startswith("- **Output difference**"))
    assert "frames of the saved videos" in line and ("identical" in line or "PSNR" in line)
