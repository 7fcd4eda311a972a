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
    run["summary"]["outside_s"] = 0.0
    run["summary"]["total_s"] = run["summary"]["stage_sum_s"] * 1.5


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
