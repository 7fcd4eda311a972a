"""The live view: session listeners, the throttled `wanbench.live` messages, and that it stops with
the prompt (no message after the session closed, no thread left behind)."""

from __future__ import annotations

import logging
import sys
import threading
import time
import types

import pytest
from wanbench.nodes import NODE_CLASS_MAPPINGS
from wanbench.nodes.live_view import EVENT, LiveView
from wanbench.nodes.observer import InProcessPrompt, in_process_prompt
from wanbench.nodes.profiler_handle import maybe_profile
from wanbench.nodes.profiling import WanProfiler
from wanbench.profiling import FakeClock, FakeDevice, FakeHost, FakeNvml, ProfileSession
from wanbench.wan_core import trace


def _session(clock: FakeClock | None = None) -> ProfileSession:
    return ProfileSession(
        case_name="live",
        sample_interval_s=None,
        clock=clock or FakeClock(),
        gpu=FakeNvml(),
        device_probe=FakeDevice(),
        host=FakeHost(),
    )


def test_listeners_see_each_sample_with_the_running_stage() -> None:
    session = _session().open()
    seen = []
    remove = session.add_listener(seen.append)
    with session.activate(), trace.stage("T5_Encoding", kind="encode"):
        session.sample_now()
    remove()
    session.sample_now()  # after removal: not seen
    session.close()
    stages = [reading.stage for reading in seen]
    assert stages == [None, "T5_Encoding", "T5_Encoding"]  # stage start, inside, stage end
    assert all(reading.activity_metric == "sm_activity" for reading in seen)
    assert [reading.sample.t_s for reading in seen] == sorted(r.sample.t_s for r in seen)


def test_a_failing_listener_is_removed_and_the_run_goes_on(caplog) -> None:
    session = _session().open()
    calls = []

    def broken(reading) -> None:
        calls.append(reading)
        raise RuntimeError("the UI is gone")

    session.add_listener(broken)
    with caplog.at_level(logging.WARNING):
        session.sample_now()
        session.sample_now()
    record = session.close()
    assert len(calls) == 1 and record.status == "completed"
    assert "profiling listener" in caplog.text and "the UI is gone" in caplog.text


def test_the_live_view_sends_at_most_two_messages_a_second_and_says_done() -> None:
    clock = FakeClock(start=0.0)
    sent: list[tuple[str, dict]] = []
    session = _session(clock).open()
    view = LiveView.attach(session, "1", lambda event, data: sent.append((event, data)), clock=clock.now)
    assert view is not None and view.attached
    for _ in range(17):  # a sample every 0.125 s for 2 s
        session.sample_now()
        clock.advance(0.125)
    running = [data for event, data in sent if data["state"] == "running"]
    assert [data["t"] for data in running] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert {event for event, _ in sent} == {EVENT} and {data["node"] for _, data in sent} == {"1"}
    first = running[0]
    assert first["activity_label"] == "SM activity" and first["activity"] is not None
    assert first["cpu_pct"] is None or first["cpu_pct"] >= 0  # n/a until a second host reading
    assert first["rss_gb"] == pytest.approx(2.0, abs=0.01)
    view.detach()
    session.sample_now()
    session.close()
    assert sent[-1][1] == {"node": "1", "state": "done", "t": running[-1]["t"], "stage": None}
    assert len(sent) == 6 and not view.attached  # nothing after the end
    view.detach()  # idempotent
    assert len(sent) == 6


def test_no_live_view_outside_comfyui_or_without_a_node() -> None:
    session = _session().open()
    assert LiveView.attach(session, "1") is None  # no ComfyUI, no sender: nobody to show it to
    assert LiveView.attach(session, None, lambda *a: None) is None
    session.close()


def test_the_live_view_stops_with_the_prompt_and_leaves_no_thread(monkeypatch) -> None:
    """Inside a (stand-in) ComfyUI: the prompt's session streams to the UI from its own sampler
    thread, on the Wan Profiler node, and stops when the prompt ends; no thread and no message
    after. (The observer's other ways of ending a prompt: test_observer_glue.py.)"""
    sent: list[tuple[str, dict, object]] = []
    instance = types.SimpleNamespace(
        client_id="browser-tab",
        last_prompt_id="p1",
        send_sync=lambda event, data, sid=None: sent.append((event, data, sid)),
    )
    server = types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=instance))
    monkeypatch.setitem(sys.modules, "server", server)
    monkeypatch.setitem(sys.modules, "folder_paths", types.ModuleType("folder_paths"))
    before = set(threading.enumerate())
    prompt = {
        "1": {"class_type": "WanBenchProfiler", "inputs": {"case_name": "live", "sample_interval_ms": 10}},
        "5": {"class_type": "WanBenchTextEncode", "inputs": {}},
    }
    observed = InProcessPrompt(prompt_id="p1", nodes=prompt, node_classes=NODE_CLASS_MAPPINGS)
    with in_process_prompt(observed):
        (handle,) = WanProfiler().start("live", 10, unique_id="1")
        observed.node_started("5")
        with maybe_profile(handle, "5", [("T5_Encoding", "encode")]), trace.stage("T5_Encoding", kind="encode"):
            time.sleep(1.2)
        observed.node_finished("5")
        observed.ended(None)  # the prompt ended (here without a report): the session closes
    count = len(sent)
    time.sleep(0.3)
    assert len(sent) == count  # nothing after the prompt ended
    assert set(threading.enumerate()) <= before  # the sampler thread is gone
    live = [(data, sid) for event, data, sid in sent if event == EVENT]
    assert {sid for _, sid in live} == {"browser-tab"}  # to the client that queued the prompt
    assert {data["node"] for data, _ in live} == {"1"}  # shown on the Wan Profiler node
    running = [data for data, _ in live if data["state"] == "running"]
    assert 2 <= len(running) <= 4 and live[-1][0]["state"] == "done"  # about 1.2 s at 2 a second
    assert any(data["stage"] == "T5_Encoding" for data in running)
    assert all(data["cpu_pct"] is not None and data["rss_gb"] is not None for data in running[1:])
    gaps = [b["t"] - a["t"] for a, b in zip(running, running[1:], strict=False)]
    assert all(gap >= 0.45 for gap in gaps), gaps


def test_the_live_view_of_a_profiler_found_in_the_graph() -> None:
    """A report that opens the prompt (the profiler was served from ComfyUI's cache) still puts the
    live view on the one Wan Profiler node of the graph."""
    from wanbench.nodes.observed_graph import PromptGraph
    from wanbench.nodes.observer import _profiler_node

    one = {"1": {"class_type": "WanBenchProfiler"}, "2": {"class_type": "WanBenchReport"}}
    assert _profiler_node(PromptGraph(one)) == "1"
    assert _profiler_node(PromptGraph({**one, "3": {"class_type": "WanBenchProfiler"}})) is None
    assert _profiler_node(PromptGraph({"2": {"class_type": "WanBenchReport"}})) is None
