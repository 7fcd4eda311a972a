"""The real ComfyUI frontend in headless Chromium: every shipped UI workflow loads with no missing
node types, and the API graph the frontend makes of it (``app.graphToPrompt()``) is its shipped
API twin. A run queued by the page fills the report node (summary table, full report, chart at full
size), the profiler's live view and the sampler's settings; the page logs no error, warning or
deprecation notice of the pack from its start-up to the end of the run.

``WANBENCH_FRONTEND_ROOT`` runs the same tests against another frontend build (see server.py).
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from wanbench.client import http_json
from wanbench.nodes import NODE_CLASS_MAPPINGS

from .cdp import CdpPage, Chromium, find_chromium
from .comfy_api import API_DIR, load_api, load_template, ui_workflows_with_twins
from .server import ComfyServer

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

SCRIPT = (Path(__file__).parent / "graph_to_prompt.js").read_text(encoding="utf-8")
# Pack nodes with a model-file widget (their MODEL_FOLDERS name the ComfyUI folder of each).
MODEL_FILE_LOADERS = frozenset(name for name, cls in NODE_CLASS_MAPPINGS.items() if getattr(cls, "MODEL_FOLDERS", None))
APP_READY = "!!(window.app && window.app.graph && window.LiteGraph && window.app.extensionManager)"
# What the pack must never make the page log: anything logged from its script (errors, warnings,
# deprecation notices: the call stack names the script), errors naming it, the internal-module
# notice of scripts/widgets.js, the deprecated widget.inputEl, unregistered message types. Warnings
# the frontend logs about itself (its legacy menu, ...) are not the pack's.
PACK_PROBLEM = re.compile(
    r"wanbench|scripts/widgets\.js|inputEl|Unknown message type|Unhandled message", re.IGNORECASE
)
TINY_TEMPLATE = "Tiny models on CPU, TI2V-5B text to video.json"
TINY_API = "tiny_ti2v_5B_t2v.api.json"
HOSTILE_CASE = "| x | <img src=x onerror=window.__wbPwned=1> <script>window.__wbPwned=1</script> $a$"


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    executable = find_chromium()
    if executable is None:
        pytest.skip(
            "chromium is not on PATH: install Debian's `chromium` package (.ci/run does so as root) "
            "to run the browser tests"
        )
    browser = Chromium(executable, tmp_path_factory.mktemp("chromium") / "profile")
    browser.start()
    try:
        yield browser
    finally:
        browser.stop()


@pytest.fixture(scope="module")
def page(chromium: Chromium, comfy_server: ComfyServer) -> Iterator[CdpPage]:
    tab = chromium.open_page(comfy_server.url + "/")
    try:
        tab.wait_for(APP_READY, timeout_s=180, what="the ComfyUI frontend did not finish loading")
        time.sleep(1.0)  # let the extensions finish their set-up
        tab.startup_end = tab.mark()  # type: ignore[attr-defined]
        yield tab
    finally:
        tab.close()


def convert(page: CdpPage, workflow: dict[str, Any]) -> dict[str, Any]:
    return page.evaluate(f"({SCRIPT.strip()})({json.dumps(workflow)})")


def without_meta(prompt: dict[str, Any]) -> dict[str, Any]:
    return {
        node_id: {"class_type": node["class_type"], "inputs": node["inputs"]}
        for node_id, node in prompt.items()
    }


def differences(got: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    found = []
    for node_id in sorted(set(got) | set(expected), key=lambda k: (len(k), k)):
        if node_id not in got:
            found.append(
                f"node {node_id} ({expected[node_id]['class_type']}) missing from the frontend's graph"
            )
        elif node_id not in expected:
            found.append(f"node {node_id} ({got[node_id]['class_type']}) not in the API twin")
        elif got[node_id] != expected[node_id]:
            found.append(
                f"node {node_id}: frontend {json.dumps(got[node_id], sort_keys=True)} != "
                f"twin {json.dumps(expected[node_id], sort_keys=True)}"
            )
    return found


def test_frontend_registers_every_pack_node(page: CdpPage) -> None:
    registered = page.evaluate("Object.keys(window.LiteGraph.registered_node_types)")
    missing = sorted(set(NODE_CLASS_MAPPINGS) - set(registered))
    assert not missing, f"node types unknown to the frontend: {missing}"


def test_missing_node_type_is_reported(page: CdpPage) -> None:
    """Negative control: the missing-type check does see a node type the server does not have."""
    ui_name, _ = ui_workflows_with_twins()[0]
    workflow = load_template(ui_name)
    broken = copy.deepcopy(workflow)
    broken["nodes"][0]["type"] = "WanBenchNoSuchNode"
    result = convert(page, broken)
    assert result["missing"] == ["WanBenchNoSuchNode"]
    assert "WanBenchNoSuchNode" in result["unresolved"]


def test_changed_widget_shows_as_a_difference(page: CdpPage) -> None:
    """Negative control: a widget value changed in the UI workflow no longer matches the twin."""
    ui_name, api_name = ui_workflows_with_twins()[0]
    workflow = load_template(ui_name)
    sampler = next(node for node in workflow["nodes"] if node["type"] == "WanBenchSampler")
    sampler["widgets_values"][0] += 1  # the seed
    result = convert(page, workflow)
    expected = without_meta(load_api(api_name))
    found = differences(without_meta(result["output"]), expected)
    assert len(found) == 1 and found[0].startswith(f"node {sampler['id']}:"), found


@pytest.mark.parametrize(("ui_name", "api_name"), ui_workflows_with_twins())
def test_ui_workflow_converts_to_its_api_twin(page: CdpPage, ui_name: str, api_name: str) -> None:
    workflow = load_template(ui_name)
    twin_path = API_DIR / api_name
    assert twin_path.is_file(), f"{ui_name} has no API twin {api_name}"
    result = convert(page, workflow)
    assert result["declared"], f"{ui_name} declares no nodes"
    assert result["missing"] == [], result
    if ui_name.startswith("Tiny "):
        assert result["unresolved"] == [], result
    else:
        # The server has only the tiny models: current frontends (1.4x) flag the loaders of the
        # real-size workflows, whose file names are not in its lists; nothing else may be flagged.
        assert set(result["unresolved"]) <= MODEL_FILE_LOADERS, result["unresolved"]
    expected = without_meta(json.loads(twin_path.read_text(encoding="utf-8")))
    found = differences(without_meta(result["output"]), expected)
    assert not found, "\n".join(found)



# ------------------------------------------------------------------------------------------------
# The pack's own UI
# ------------------------------------------------------------------------------------------------
def pack_console_problems(messages: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [
        (level, text)
        for level, text in messages
        if level in ("warning", "error", "exception") and PACK_PROBLEM.search(text)
    ]


def test_the_page_starts_without_console_problems(page: CdpPage) -> None:
    """From the first script of the page to the end of its set-up (the negative controls above log
    errors about a made-up node type later on, so only the start-up is looked at here)."""
    assert page.evaluate("!!document.getElementById('wanbench-style')"), "the pack's extension did not set up"
    messages = page.console_messages(until=page.startup_end)  # type: ignore[attr-defined]
    assert messages, "no console message was recorded at all: is recording on?"
    assert pack_console_problems(messages) == [], "\n".join(f"{level}: {text}" for level, text in messages)


def _cells(page: CdpPage) -> dict[str, str]:
    return page.evaluate(
        "Object.fromEntries([...document.querySelectorAll('[data-wanbench=\"summary-table\"] td')]"
        ".map(td => [td.dataset.key, td.textContent]))"
    )


@pytest.fixture(scope="module")
def finished_run(page: CdpPage, comfy_server: ComfyServer) -> dict[str, Any]:
    """The tiny TI2V template loaded in the page and its API twin queued for the page's client, with
    a case name made of Markdown and HTML; returns once the report node shows its summary."""
    start = page.mark()
    page.evaluate(f"window.app.loadGraphData({json.dumps(load_template(TINY_TEMPLATE))})")
    prompt = load_api(TINY_API)
    prompt["1"]["inputs"]["case_name"] = HOSTILE_CASE
    prompt["8"]["inputs"]["seed"] = 7001
    client_id = page.evaluate("window.comfyAPI.api.api.clientId")
    assert client_id, "the page has no websocket client id"
    status, answer = http_json("POST", comfy_server.url + "/prompt", {"prompt": prompt, "client_id": client_id})
    assert status == 200 and not answer.get("node_errors"), answer
    page.wait_for(
        "!!document.querySelector('[data-wanbench=\"summary-table\"]')",
        timeout_s=600,
        what="the report node never showed its summary",
    )
    return {"prompt": prompt, "prompt_id": answer["prompt_id"], "console_from": start}


def test_the_report_node_shows_the_summary_as_text(page: CdpPage, finished_run: dict[str, Any]) -> None:
    cells = _cells(page)
    assert cells["case"] == HOSTILE_CASE  # shown as written: no table cells, no HTML
    assert cells["task"] == "ti2v-5B" and cells["status"] == "completed" and cells["steps"] == "4"
    assert float(cells["total_s"]) > 0 and float(cells["s_per_step"]) > 0
    assert cells["activity"].startswith("n/a (") and cells["mfu"] == "n/a"  # CPU: not measured, never 0
    assert cells["peak_memory"].endswith("GB (process RSS; no GPU)") and cells["top_finding"] != "n/a"
    assert page.evaluate("window.__wbPwned === undefined")
    assert page.evaluate("!document.querySelector('.wanbench-panel script, .wanbench-panel img[src=\"x\"]')")


def test_the_full_report_and_the_chart_are_one_click_away(page: CdpPage, finished_run: dict[str, Any]) -> None:
    page.evaluate("document.querySelector('[data-wanbench=\"open-report\"]').click()")
    page.wait_for(
        "!!document.querySelector('[data-wanbench=\"overlay\"] h1')", timeout_s=30, what="no full report"
    )
    text = page.evaluate("document.querySelector('[data-wanbench=\"overlay\"]').innerText")
    assert "Wan2.2 Benchmark Report" in text and "Stage Breakdown" in text and HOSTILE_CASE in text
    tables = page.evaluate("document.querySelectorAll('[data-wanbench=\"overlay\"] table').length")
    assert tables >= 2  # the summary and the stage breakdown at least
    assert page.evaluate("window.__wbPwned === undefined")
    page.evaluate("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape'}))")
    assert page.evaluate("document.querySelectorAll('[data-wanbench=\"overlay\"]').length") == 0

    page.evaluate("document.querySelector('.wanbench-panel img.wanbench-chart').click()")
    page.wait_for(
        "(() => { const i = document.querySelector('img.wanbench-full'); return !!i && i.complete "
        "&& i.naturalWidth > 0; })()",
        timeout_s=30,
        what="the chart did not open at full size",
    )
    width = page.evaluate("document.querySelector('img.wanbench-full').naturalWidth")
    thumb = page.evaluate("document.querySelector('img.wanbench-chart').clientWidth")
    assert width == 1300 and width > thumb  # the PNG at its own size (13 x 6 in at 100 dpi)
    page.evaluate("document.querySelector('img.wanbench-full').click()")


def test_the_profiler_shows_the_run_live_and_stops_with_it(page: CdpPage, finished_run: dict[str, Any]) -> None:
    received = page.evaluate("window.app.graph.getNodeById(1).wanbenchLive.received")
    assert received and received[-1] == "done", received
    times = [t for t in received if t != "done"]
    assert len(times) >= 2, received
    assert all(b - a >= 0.45 for a, b in zip(times, times[1:], strict=False)), f"more than 2 messages a second: {times}"
    assert page.evaluate("document.querySelector('[data-wanbench=\"wanbench_live\"]').dataset.state") == "done"
    assert page.evaluate("document.querySelector('[data-wanbench=\"live-stage\"]').textContent").startswith(
        "Finished after"
    )
    time.sleep(1.5)
    assert page.evaluate("window.app.graph.getNodeById(1).wanbenchLive.received.length") == len(received)


def test_the_sampler_shows_the_settings_that_ran(page: CdpPage, finished_run: dict[str, Any]) -> None:
    text = page.evaluate("document.querySelector('[data-wanbench=\"sampler-settings\"]').textContent")
    steps = finished_run["prompt"]["8"]["inputs"]["steps"]
    assert text.startswith(f"Ran with ti2v-5B: {steps} steps · shift 5") and "guidance 5" in text, text


def test_the_run_logged_no_console_problems(page: CdpPage, finished_run: dict[str, Any]) -> None:
    """Loading the template, the run's messages (progress, wanbench.live, wanbench.report, executed)
    and the clicks on the report node: nothing logged about the pack."""
    messages = page.console_messages(since=finished_run["console_from"])
    assert pack_console_problems(messages) == [], "\n".join(f"{level}: {text}" for level, text in messages)
