"""The consistency checker fails on each kind of contradiction the reference reports contain."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
from make_golden_report import GOLDEN_DIR
from wanbench.profiling import check_markdown, check_report


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads((GOLDEN_DIR / "report.json").read_text(encoding="utf-8"))


def _run(doc: dict[str, Any], case_prefix: str) -> dict[str, Any]:
    return next(r for r in doc["runs"] if r["context"]["case_name"].startswith(case_prefix))


def _finding(run: dict[str, Any], rule: str) -> dict[str, Any]:
    return next(f for f in run["analysis"]["findings"] if f["rule"] == rule)


def _set_total(run: dict[str, Any]) -> None:
    run["total"]["end_s"] += 50.0  # 50 s outside every stage that the session never recorded


def _overlap(run: dict[str, Any]) -> None:
    step = next(s for s in run["stages"] if s["name"] == "Step_1_Inference")
    step["end_s"] += 3.0  # runs into Step_2_Loading/Inference


def _outside_over_a_stage(run: dict[str, Any]) -> None:
    run["outside"][0]["start_s"] -= 5.0


def _low_util_claim(run: dict[str, Any]) -> None:
    run["analysis"]["findings"].append(
        {
            "rule": "largest_phase",
            "figures": {},
            "gain_s": None,
            "text": "Low overall GPU utilization (0.0%), suggesting CPU bottlenecks.",
        }
    )


def _wrong_verdict(run: dict[str, Any]) -> None:
    f = _finding(run, "activity_high")
    f["rule"] = "activity_low"


def _other_gpu(run: dict[str, Any]) -> None:
    _finding(run, "memory")["figures"]["gpu_name"] = "NVIDIA L40S"


def _over_capacity(run: dict[str, Any]) -> None:
    run["total"]["memory"]["reserved_peak"] = 82_600_000_000


def _activity_on_cpu(run: dict[str, Any]) -> None:
    run["stages"][0]["activity_mean_pct"] = 0.0
    run["stages"][0]["activity_max_pct"] = 0.0


def _unmeasured_summary(run: dict[str, Any]) -> None:
    run["summary"]["step_activity_pct"] = 0.0
    run["summary"]["load"] = 0.0


def _more_steps_planned(run: dict[str, Any]) -> None:
    run["context"]["steps"] = 10


def _step_count_shown(run: dict[str, Any]) -> None:
    run["summary"]["num_steps_recorded"] = 30


def _unknown_stage(run: dict[str, Any]) -> None:
    run["stages"][1]["name"] = "Unknown"


def _stage_past_total(run: dict[str, Any]) -> None:
    run["stages"][-1]["end_s"] = run["total"]["end_s"] + 5.0


def _zero_s_per_step(run: dict[str, Any]) -> None:
    run["summary"]["s_per_step"] = 0.0


CASES: list[tuple[str, str, Callable[[dict[str, Any]], None], str]] = [
    ("stage sum", "01", _set_total, "do not add up"),
    ("overlapping stages", "01", _overlap, "stages overlap"),
    ("outside interval over a stage", "02", _outside_over_a_stage, "is not outside the stages"),
    ("low utilization next to 97 %", "01", _low_util_claim, "claims low utilization"),
    ("verdict does not fit the figure", "01", _wrong_verdict, "does not fit"),
    ("memory verdict about another GPU", "01", _other_gpu, "memory verdict about 'NVIDIA L40S'"),
    ("peak above the GPU's capacity", "02", _over_capacity, "exceeds the 47.70 GB"),
    ("activity on a CPU run", "03", _activity_on_cpu, "no GPU activity was measured"),
    ("unmeasured summary shown as 0", "03", _unmeasured_summary, "unmeasured value shown as the number 0.0"),
    ("planned steps differ", "01", _more_steps_planned, "say 10 steps but 5 steps were recorded"),
    ("shown step count differs", "01", _step_count_shown, "shows 30 steps but 5 were recorded"),
    ("stage named Unknown", "02", _unknown_stage, "no real name"),
    ("stage outside the total", "02", _stage_past_total, "outside Total_Execution"),
    ("s/step 0.00 next to real steps", "02", _zero_s_per_step, "s_per_step: 0.0 disagrees with the records"),
]


@pytest.mark.parametrize(("what", "case", "breaker", "message"), CASES, ids=[c[0] for c in CASES])
def test_checker_fails_on_broken_records(
    golden: dict[str, Any], what: str, case: str, breaker: Callable[[dict[str, Any]], None], message: str
) -> None:
    doc = copy.deepcopy(golden)
    breaker(_run(doc, case))
    problems = check_report(doc)
    assert any(message in p for p in problems), (what, problems)


def test_checker_passes_the_untouched_golden(golden: dict[str, Any]) -> None:
    assert check_report(copy.deepcopy(golden)) == []


def test_checker_rejects_other_schema(golden: dict[str, Any]) -> None:
    doc = copy.deepcopy(golden)
    doc["schema"] = "wanbench.report/0"
    assert "expected 'wanbench.report/1'" in check_report(doc)[0]


def test_markdown_encoding_and_labels(golden: dict[str, Any]) -> None:
    assert any("mojibake" in p for p in check_markdown("ðŸš€ Wan2.2 Performance Analysis Report"))
    assert any("Unknown" in p for p in check_markdown("| Unknown | 0.00 |\n"))
    busy_only = {"runs": [_run(golden, "02")]}
    assert any("labelled as SM activity" in p for p in check_markdown("| SM Act (%) |", busy_only))
    assert check_markdown((GOLDEN_DIR / "report.md").read_text(encoding="utf-8"), golden) == []


def test_checker_reads_files_and_the_markdown_beside_them(tmp_path: Any, golden: dict[str, Any]) -> None:
    (tmp_path / "r.json").write_text(json.dumps(golden, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "r.md").write_text("Ã¼ber report", encoding="utf-8")
    assert any("mojibake" in p for p in check_report(tmp_path / "r.json"))
    (tmp_path / "bad.json").write_bytes(b'{"schema": "\xff"}')
    assert "not UTF-8" in check_report(tmp_path / "bad.json")[0]


def test_50_s_outside_stages_fails_even_with_a_consistent_summary() -> None:
    """The rule itself: a record whose stages leave 50 s uncovered (not recorded as outside
    time) fails, although its summary and Markdown were rendered from it."""
    import dataclasses

    from make_golden_report import run_ti2v_h100
    from wanbench.profiling import render_markdown, report_document

    run = run_ti2v_h100()
    broken = dataclasses.replace(run, total=dataclasses.replace(run.total, end_s=run.total.end_s + 50.0))
    doc = report_document([broken])
    problems = check_report(doc)
    assert any("50.050 s of the" in p and "do not add up" in p for p in problems), problems
    assert "checked to within" not in render_markdown([broken])


def test_recorded_outside_time_is_shown_and_never_called_within_margin() -> None:
    """A pipeline with real uncovered time (50 s between stages) passes, because the session
    recorded it, and the Markdown shows it as its own figure instead of claiming coverage."""
    from wanbench.profiling import FakeClock, FakeHost, ProfileSession, render_markdown, report_document
    from wanbench.profiling.memory import CpuDevice
    from wanbench.wan_core import trace

    clock = FakeClock()
    session = ProfileSession(
        case_name="gap", sample_interval_s=None, clock=clock, device_probe=CpuDevice(), host=FakeHost()
    )
    session.open()
    with session.activate(), trace.stage("T5_Encoding", kind="encode"):
        clock.advance(1.0)
    clock.advance(50.0)  # e.g. an unprofiled node saving a video
    with session.activate(), trace.stage("VAE_Decoding", kind="decode"):
        clock.advance(2.0)
    run = session.close()
    assert [(o.after, o.before, o.in_node, o.duration_s) for o in run.outside] == [
        ("T5_Encoding", "VAE_Decoding", False, 50.0)
    ]
    doc = report_document([run])
    assert doc["runs"][0]["summary"]["outside_within_margin"] is False
    assert check_report(doc) == []
    md = render_markdown([run])
    assert "**50.00 s (94.3 %) lies outside every stage**" in md
    assert "50.00 s at 1.00-51.00 s, after T5_Encoding, before VAE_Decoding: no node was being measured" in md
    assert "is within the" not in md and "checked to within" not in md
    assert check_markdown(md, doc) == []
    lie = md.replace("**50.00 s (94.3 %) lies outside every stage**", "all time is inside the stages")
    assert any("differs from what the records render" in p for p in check_markdown(lie, doc))


def test_markdown_number_where_the_records_have_none_fails(golden: dict[str, Any]) -> None:
    md = (GOLDEN_DIR / "report.md").read_text(encoding="utf-8")
    row = next(ln for ln in md.splitlines() if ln.startswith("| 03_cpu_tiny |"))
    edited = md.replace(row, row.replace("| n/a | n/a | n/a | n/a |", "| 0.00 | 0.0 | 0 | 0.0 |"))
    problems = check_markdown(edited, golden)
    assert any("unmeasured value printed as the number '0.00'" in p for p in problems), problems
    row = "| 01_ti2v_5b_704p | 1280*704 | 121 | 5 | No (none) |"
    changed = md.replace(f"{row} 61.61 |", f"{row} 51.61 |")
    assert any("'51.61' differs from the records ('61.61')" in p for p in check_markdown(changed, golden))


def test_merged_report_with_a_mislabelled_busy_group_fails(golden: dict[str, Any]) -> None:
    """H100 (SM activity) and L40S (GPU busy) in one report: each group is checked on its own."""
    md = (GOLDEN_DIR / "report.md").read_text(encoding="utf-8")
    start = md.index("## Hardware Group B: NVIDIA L40S")
    end = md.index("## Hardware Group C")
    wrong = md[:start] + md[start:end].replace("| Busy(%) |", "| SM(%) |") + md[end:]
    problems = check_markdown(wrong, golden)
    assert any("group 'NVIDIA L40S' measured GPU busy" in p for p in problems), problems
    assert check_markdown(md, golden) == []
