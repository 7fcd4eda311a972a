"""What a careless user or an attacker tried, and what the pack does about each (CPU, in-process).

Concurrent runs into one folder, a report write that fails half-way, user text with Markdown and
HTML in it, file-name prefixes at the edges of what file systems allow, a full disk, a prompt of
invisible characters, `.sft` model files, error type names and a missing runtime package.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from wanbench.nodes.context import Bridge, use_bridge
from wanbench.nodes.profiling import WanBenchmarkReport, WanProfiler
from wanbench.nodes.text import WanTextEncode
from wanbench.nodes.video import WanSaveVideo
from wanbench.profiling import ProfileSession, render_markdown, write_report
from wanbench.util.atomic import DiskFullError
from wanbench.wan_core import trace

HOSTILE = "| x | <script>alert(1)</script> *bold* [link](http://e.vil) `code` $a$ _i_"


def _frames() -> torch.Tensor:
    return torch.rand(5, 32, 32, 3, generator=torch.Generator().manual_seed(0))


def _session(case: str = "case") -> ProfileSession:
    with ProfileSession(case_name=case, sample_interval_s=None) as session, trace.stage("T5_Encoding", kind="encode"):
        pass
    return session


# ------------------------------------------------------------------------------------------------
# Two runs writing into one --out
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_cli_runs_into_one_folder_keep_both_results(tmp_path: Path) -> None:
    """Two `wanbench run` processes at the same time, same --out: both succeed and neither
    overwrites the other's video or report (names are claimed with O_EXCL)."""
    from wanbench.tiny_models import make_tiny_models

    models = make_tiny_models(tmp_path / "models", seed=0).root
    out = tmp_path / "out"
    command = [sys.executable, "-m", "wanbench", "run", "tiny_ti2v_5B_t2v.api.json", "--out", str(out)]
    runs = [
        subprocess.Popen(
            [*command, "--models", str(models), "--set", f"WanBenchSampler.seed={seed}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    results = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], results
    videos = sorted(p.name for p in (out / "wanbench").glob("*.mp4"))
    reports = sorted((out / "wanbench").glob("*_report_*.json"))
    assert videos == ["tiny_ti2v_5B_t2v_00001_.mp4", "tiny_ti2v_5B_t2v_00002_.mp4"]
    assert [p.name for p in reports] == ["tiny_ti2v_5B_t2v_report_00001_.json", "tiny_ti2v_5B_t2v_report_00002_.json"]
    seeds = sorted(json.loads(p.read_text(encoding="utf-8"))["runs"][0]["context"]["seed"] for p in reports)
    assert seeds == [1, 2]  # each report is its own run
    for stdout, _ in results:  # each process names the files it wrote
        assert sum(name in stdout for name in videos) == 1


# ------------------------------------------------------------------------------------------------
# A report write that fails half-way
# ------------------------------------------------------------------------------------------------
def _fail_second_write(monkeypatch) -> None:
    real = pathlib.Path.write_text
    writes = []

    def write_text(self, *args, **kwargs):
        writes.append(self)
        if len(writes) == 2:  # the JSON went through; the Markdown hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


def test_a_report_that_fails_half_way_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    session = _session()
    _fail_second_write(monkeypatch)
    with pytest.raises(DiskFullError) as info:
        write_report(session, tmp_path, basename="r", chart=False)
    assert list(tmp_path.iterdir()) == []  # no JSON saying "completed" without its report
    message = str(info.value)
    assert "r.json" in message and "r.md" in message and "MiB free" in message and "[Errno" not in message


def test_the_report_node_leaves_nothing_when_its_write_fails(tmp_path: Path, monkeypatch) -> None:
    import asyncio

    from wanbench.nodes import NODE_CLASS_MAPPINGS
    from wanbench.nodes.observer import InProcessPrompt, in_process_prompt, open_prompt_ids
    from wanbench.nodes.profiler_handle import maybe_profile

    prompt = {
        "1": {"class_type": "WanBenchProfiler", "inputs": {"case_name": "disk_full", "sample_interval_ms": 50}},
        "5": {"class_type": "WanBenchTextEncode", "inputs": {}},
    }
    observed = InProcessPrompt(prompt_id="disk-full", nodes=prompt, node_classes=NODE_CLASS_MAPPINGS)
    with use_bridge(Bridge(output_dir=tmp_path)), in_process_prompt(observed):
        (handle,) = WanProfiler().start("disk_full", 50)
        with maybe_profile(handle, "5", [("T5_Encoding", "encode")]), trace.stage("T5_Encoding", kind="encode"):
            pass
        _fail_second_write(monkeypatch)
        with pytest.raises(DiskFullError, match="no space left on the device"):
            asyncio.run(WanBenchmarkReport().report("wanbench/report", profiler=handle))
        observed.ended(None)
    assert list((tmp_path / "wanbench").iterdir()) == []  # the claimed name was given back too
    assert open_prompt_ids() == []


def test_a_full_disk_while_saving_a_video_names_the_path_and_free_space(tmp_path: Path, monkeypatch) -> None:
    import av

    real_open = av.open

    def full_disk(path, *args, **kwargs):
        if kwargs.get("mode") == "w":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(av, "open", full_disk)
    with use_bridge(Bridge(output_dir=tmp_path)), pytest.raises(DiskFullError) as info:
        WanSaveVideo().save(_frames(), 16, "wanbench/clip", "mp4 (h264)", 19)
    message = str(info.value)
    assert str(tmp_path / "wanbench" / "clip_00001_.mp4") in message and "MiB free" in message
    assert not message.startswith("[Errno") and type(info.value).__module__ == "wanbench.errors"
    assert list((tmp_path / "wanbench").iterdir()) == []  # no empty placeholder, no temporary file


# ------------------------------------------------------------------------------------------------
# User text in the report, the UI and the chart
# ------------------------------------------------------------------------------------------------
def test_user_text_is_escaped_in_the_markdown() -> None:
    session = _session(HOSTILE)
    markdown = render_markdown([session.record])
    assert "<script>" not in markdown and "&lt;script&gt;alert(1)&lt;/script&gt;" in markdown
    assert "[link](" not in markdown and "\\*bold\\*" in markdown and "\\`code\\`" in markdown
    summary_row = next(line for line in markdown.splitlines() if line.startswith("| ") and "script" in line)
    unescaped_pipes = summary_row.replace("\\|", "").count("|")
    assert unescaped_pipes == 12  # the 11 columns of the summary table, no cell added by the case name
    assert f"## Case: {HOSTILE}" not in markdown


def test_user_text_is_plain_in_the_chart_title(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from wanbench.profiling.chart import draw_timeline, plain_text

    assert plain_text("cost $5 and $\\frac{") == "cost \\$5 and \\$\\frac{"
    session = _session("a $\\frac{$ b\nsecond line")  # unbalanced maths would make matplotlib raise
    result = draw_timeline(session.record, tmp_path / "chart.png")
    assert result.path is not None and (tmp_path / "chart.png").stat().st_size > 0


def test_the_summary_cards_are_plain_text() -> None:
    from wanbench.profiling import summary_cards

    (card,) = summary_cards([_session(HOSTILE).record])
    assert card["case"] == HOSTILE  # the UI inserts it as text (textContent), so it stays as typed
    assert set(card) == {"case", "task", "size", "steps", "status", "total_s", "s_per_step", "peak_memory",
                         "activity", "mfu", "top_finding"}


# ------------------------------------------------------------------------------------------------
# filename_prefix at the edges
# ------------------------------------------------------------------------------------------------
def test_a_long_prefix_that_file_systems_allow_is_written(tmp_path: Path) -> None:
    prefix = "p" * 235  # + "_00001_.mp4" = 246 characters, under the 255 a file name may have
    with use_bridge(Bridge(output_dir=tmp_path)):
        out = WanSaveVideo().save(_frames(), 16, prefix, "mp4 (h264)", 19)
    assert Path(out["result"][0]).name == prefix + "_00001_.mp4"
    assert [p.name for p in tmp_path.iterdir()] == [prefix + "_00001_.mp4"]


def test_a_colon_is_a_valid_name_on_linux(tmp_path: Path) -> None:
    if os.name == "nt":
        pytest.skip("Windows forbids ':' in file names; the prefix check refuses it there")
    with use_bridge(Bridge(output_dir=tmp_path)):
        out = WanSaveVideo().save(_frames(), 16, "wanbench/a:b", "mp4 (h264)", 19)
    assert Path(out["result"][0]) == tmp_path / "wanbench" / "a:b_00001_.mp4"


@pytest.mark.parametrize(
    ("prefix", "needle"),
    [
        ("wanbench/a\x00b", "filename_prefix contains a NUL byte (\\x00) at position 10"),
        ("wanbench/a\nb", "filename_prefix contains the control character '\\n'"),
        ("../up", "must be a relative path inside the output folder"),
        ("/abs/x", "must be a relative path inside the output folder"),
        ("é" * 130, "is 260 bytes (UTF-8)"),
    ],
)
def test_a_bad_prefix_is_refused_naming_the_input(tmp_path: Path, prefix: str, needle: str) -> None:
    with use_bridge(Bridge(output_dir=tmp_path)), pytest.raises(ValueError) as info:
        WanSaveVideo().save(_frames(), 16, prefix, "mp4 (h264)", 19)
    assert needle in str(info.value)
    assert not any(tmp_path.rglob("*.mp4"))


# ------------------------------------------------------------------------------------------------
# Prompts, model files, error names, a missing package
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["\u200b\u200b\u200b", "\ufeff\u2060 \u200d", "\u3164\u3164", " \t\n"])
def test_a_prompt_of_invisible_characters_is_refused(prompt: str) -> None:
    assert WanTextEncode.VALIDATE_INPUTS(prompt=prompt) is not True
    with pytest.raises(ValueError, match="prompt (is empty|holds only invisible characters)"):
        WanTextEncode().encode(None, prompt, "")  # refused before the encoder is touched


def test_visible_text_with_zero_width_characters_is_a_prompt() -> None:
    assert WanTextEncode.VALIDATE_INPUTS(prompt="a\u200bfox") is True
    assert WanTextEncode.VALIDATE_INPUTS(prompt="狐狸在雪中奔跑") is True


def test_sft_files_load_like_safetensors(tmp_path: Path) -> None:
    """ComfyUI lists `.sft` files in the model dropdowns and reads them as safetensors."""
    from wanbench.nodes.encoder_loaders import WanVAELoader
    from wanbench.nodes.loaders import WanModelLoader
    from wanbench.tiny_models import make_tiny_models

    root = make_tiny_models(tmp_path / "models", seed=0).root
    dits = root / "diffusion_models"
    shutil.copy(dits / "wanbench_tiny_ti2v_5B_fp16.safetensors", dits / "ti2v.sft")
    shutil.copy(root / "vae" / "wanbench_tiny_wan2.2_vae.safetensors", root / "vae" / "vae.SFT")
    with use_bridge(Bridge.for_models_root(root, tmp_path / "out")):
        (model,) = WanModelLoader().load("ti2v.sft", "none", "float32", "sdpa", "cpu")
        (vae,) = WanVAELoader().load("vae.SFT", "float32", "cpu")
    assert model.task.name == "ti2v-5B" and vae.config.variant == "wan2.2"


def test_error_types_have_a_short_stable_name() -> None:
    """ComfyUI shows `type.__module__ + "." + type.__qualname__`; inside a server the pack's modules
    are named after its folder, so every error type names the module `wanbench.errors` instead."""
    import wanbench.errors as errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert cls.__module__ == "wanbench.errors" and issubclass(cls, Exception), name
        assert f"{cls.__module__}.{cls.__qualname__}" == f"wanbench.errors.{name}"


def test_a_missing_package_names_itself_and_the_install_line(monkeypatch) -> None:
    from wanbench.util.deps import MissingDependencyError
    from wanbench.wan_core.tokenizer import clean_text

    monkeypatch.setitem(sys.modules, "ftfy", None)  # `import ftfy` now raises ImportError
    with pytest.raises(MissingDependencyError) as info:
        clean_text("a fox")
    message = str(info.value)
    assert "'ftfy'" in message and f"{sys.executable} -m pip install 'ftfy>=6.1'" in message
    assert "requirements.txt" in message and isinstance(info.value, ImportError)
