"""The observer's ComfyUI side against stand-in ComfyUI modules: a prompt executed the way ComfyUI
executes it (one asyncio loop per prompt, a progress registry per prompt, an async report task),
with no wires between the profiler nodes and the rest; the report dropped, a failing prompt, and
nothing left behind (no open observation, no sampler thread, no handler) after any of them."""

from __future__ import annotations

import asyncio
import contextvars
import json
import sys
import threading
import time
import types
from dataclasses import dataclass

import pytest
from wanbench.nodes import observer
from wanbench.nodes.context import Bridge, use_bridge
from wanbench.nodes.profiling import WanBenchmarkReport, WanProfiler
from wanbench.profiling import check_report

_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("executing", default=None)


@dataclass
class _Ctx:
    prompt_id: str
    node_id: str


class _Handler:  # ComfyUI's ProgressHandler base, as far as the observer uses it
    def __init__(self, name: str) -> None:
        self.name, self.enabled = name, True

    def set_registry(self, registry) -> None:
        self.registry = registry

    def reset(self) -> None:
        pass


class _DynPrompt:
    def __init__(self, prompt: dict) -> None:
        self.prompt = prompt

    def get_original_prompt(self) -> dict:
        return self.prompt

    def has_node(self, node_id: str) -> bool:
        return node_id in self.prompt

    def get_node(self, node_id: str) -> dict:
        return self.prompt[node_id]


class _Registry:
    def __init__(self, prompt_id: str, prompt: dict) -> None:
        self.prompt_id, self.dynprompt, self.nodes, self.handlers = prompt_id, _DynPrompt(prompt), {}, {}

    def register_handler(self, handler) -> None:
        self.handlers[handler.name] = handler

    def unregister_handler(self, name: str) -> None:
        self.handlers.pop(name).reset()

    def reset_handlers(self) -> None:
        for handler in list(self.handlers.values()):
            handler.reset()

    def start(self, node_id: str) -> None:
        self.nodes[node_id] = {"state": types.SimpleNamespace(value="running")}
        for h in list(self.handlers.values()):
            h.start_handler(node_id, None, self.prompt_id)

    def finish(self, node_id: str) -> None:
        self.nodes[node_id] = {"state": types.SimpleNamespace(value="finished")}
        for h in list(self.handlers.values()):
            h.finish_handler(node_id, None, self.prompt_id)


class _Comfy:
    """The stand-in `comfy_execution.progress` / `.utils` modules and one server's prompt loop."""

    def __init__(self) -> None:
        self.registry: _Registry | None = None
        self.progress = types.ModuleType("comfy_execution.progress")
        self.progress.ProgressHandler = _Handler
        self.progress.get_progress_state = lambda: self.registry
        self.progress.add_progress_handler = self._add
        self.utils = types.ModuleType("comfy_execution.utils")
        self.utils.get_executing_context = _CONTEXT.get

    def _add(self, handler) -> None:
        handler.set_registry(self.registry)
        self.registry.register_handler(handler)

    def run(self, prompt_id: str, prompt: dict, order: list[str], *, fail_at: str | None = None) -> None:
        """Execute `order` as ComfyUI does: sync nodes inline, the report as a task, asyncio.run per prompt."""
        if self.registry is not None:
            self.registry.reset_handlers()  # reset_progress_state: the old registry's handlers are reset
        self.registry = _Registry(prompt_id, prompt)
        asyncio.run(self._execute(prompt_id, prompt, order, fail_at))

    async def _execute(self, prompt_id: str, prompt: dict, order: list[str], fail_at: str | None) -> None:
        pending = []
        for node_id in order:
            token = _CONTEXT.set(_Ctx(prompt_id, node_id))
            try:
                self.registry.start(node_id)
                kind = prompt[node_id]["class_type"]
                if kind == "WanBenchProfiler":
                    WanProfiler().start(**prompt[node_id]["inputs"])
                elif kind == "WanBenchReport":
                    task = asyncio.create_task(WanBenchmarkReport().report("reports/run", unique_id=node_id))
                    await asyncio.sleep(0)
                    pending.append((node_id, task))
                    continue
                elif node_id == fail_at:
                    return  # the node raised: ComfyUI stops, start without finish
                else:
                    time.sleep(0.03)
                self.registry.finish(node_id)
            finally:
                _CONTEXT.reset(token)
        for node_id, task in pending:
            await task
            self.registry.finish(node_id)


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    fake = _Comfy()
    monkeypatch.setitem(sys.modules, "comfy_execution.progress", fake.progress)
    monkeypatch.setitem(sys.modules, "comfy_execution.utils", fake.utils)
    monkeypatch.setitem(sys.modules, "comfy_execution", types.ModuleType("comfy_execution"))
    with use_bridge(Bridge(output_dir=tmp_path)):
        yield fake
    assert observer.open_prompt_ids() == []
    assert not _sampler_threads()


def _sampler_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "wanbench-profiler-sampler" and t.is_alive()]


PROMPT = {
    "1": {"class_type": "VAELoader", "inputs": {"vae_name": "v.safetensors"}},
    "2": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 48, "length": 9}},
    "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0]}},
    "4": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["3", 0]}},
    "8": {"class_type": "WanBenchProfiler", "inputs": {"case_name": "glue", "sample_interval_ms": 20}},
    "9": {"class_type": "WanBenchReport", "inputs": {"filename_prefix": "reports/run"}},
}


def _reports(tmp_path) -> list:
    return sorted((tmp_path / "reports").glob("*.json"))


def test_report_waits_for_the_prompt_and_writes_it(comfy, tmp_path) -> None:
    # ComfyUI starts output nodes without needed inputs first: the report before the loaders.
    comfy.run("p1", PROMPT, ["9", "8", "1", "2", "3", "4"])
    (path,) = _reports(tmp_path)
    assert check_report(path) == []
    (run,) = json.loads(path.read_text(encoding="utf-8"))["runs"]
    top = [s["name"] for s in run["stages"] if s["parent"] is None]
    assert top == ["Model_Initialization", "TI2V_Preprocess", "VAE_Decoding", "SaveAnimatedWEBP"]
    assert run["status"] == "completed" and run["context"]["case_name"] == "glue"
    assert comfy.registry.handlers == {}  # the report took the handler out of the registry


def test_second_prompt_served_from_the_cache(comfy, tmp_path) -> None:
    comfy.run("p1", PROMPT, ["9", "8", "1", "2", "3", "4"])
    comfy.run("p2", PROMPT, ["9", "3", "4"])  # the profiler, loader and latent are cached now
    second = json.loads(_reports(tmp_path)[-1].read_text(encoding="utf-8"))["runs"][0]
    cached = {s["name"]: s["facts"].get("measured_s") for s in second["stages"] if s["cached"]}
    assert set(cached) == {"VAE_Initialization", "TI2V_Preprocess"} and all(v > 0 for v in cached.values())


def test_dropped_report_still_closes_the_session_when_the_prompt_ends(comfy, tmp_path) -> None:
    """ComfyUI drops a report node with an invalid input; the profiler ran: its session must close
    with the prompt (no sampler thread until the next prompt)."""
    prompt = {k: v for k, v in PROMPT.items() if k != "9"}
    comfy.run("p1", prompt, ["8", "1", "2", "3", "4"])
    assert observer.open_prompt_ids() == [] and not _sampler_threads()
    assert _reports(tmp_path) == []


def test_failed_prompt_writes_a_failed_report(comfy, tmp_path) -> None:
    comfy.run("p1", PROMPT, ["9", "8", "1", "2", "3", "4"], fail_at="3")
    (path,) = _reports(tmp_path)
    (run,) = json.loads(path.read_text(encoding="utf-8"))["runs"]
    assert run["status"] == "failed: PromptStopped"
    assert any("3 (VAEDecode)" in n for n in run["notes"])
    assert check_report(path) == []


def test_report_without_a_profiler_says_what_to_add(comfy) -> None:
    prompt = {k: v for k, v in PROMPT.items() if k != "8"}
    with pytest.raises(ValueError, match="found no Wan Profiler in this workflow; add a Wan Profiler node"):
        comfy.run("p1", prompt, ["9", "1"])


def test_two_report_nodes_write_the_same_run(comfy, tmp_path) -> None:
    prompt = {**PROMPT, "10": {"class_type": "WanBenchReport", "inputs": {"filename_prefix": "reports/run"}}}
    comfy.run("p1", prompt, ["9", "10", "8", "1", "2", "3", "4"])
    first, second = _reports(tmp_path)
    runs = [json.loads(p.read_text(encoding="utf-8"))["runs"][0] for p in (first, second)]
    assert runs[0]["run_id"] == runs[1]["run_id"] and check_report(second) == []


@pytest.mark.parametrize("ending", ["report", "report dropped", "prompt failed"])
def test_the_live_view_stops_with_the_prompt_however_it_ends(comfy, monkeypatch, ending) -> None:
    """The Wan Profiler's live view ends with the observation on each of the observer's ways of
    closing it: the report, the watcher at the end of a prompt whose report was dropped, and a
    failed prompt (the report writes what ran). A "done" message comes last, nothing after it."""
    from wanbench.nodes import comfy_bridge

    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(comfy_bridge, "inside_comfyui", lambda: True)
    monkeypatch.setattr(comfy_bridge, "send_ui_message", lambda event, data: sent.append((event, data)))
    prompt = {k: v for k, v in PROMPT.items() if not (ending == "report dropped" and k == "9")}
    order = [n for n in ["9", "8", "1", "2", "3", "4"] if n in prompt]
    comfy.run("p1", prompt, order, fail_at="3" if ending == "prompt failed" else None)
    live = [data for event, data in sent if event == "wanbench.live"]
    assert live and {data["node"] for data in live} == {"8"}  # the Wan Profiler node of the graph
    assert live[-1]["state"] == "done" and [d["state"] for d in live].count("done") == 1
    count = len(sent)
    time.sleep(0.1)
    assert len(sent) == count


def test_an_in_process_prompt_does_not_reuse_a_servers_observation_of_the_same_id(comfy) -> None:
    """A prompt ComfyUI ran stays known (closed) until the next one opens; an in-process prompt
    that happens to carry the same id in the same process gets an observation of its own."""
    from wanbench.nodes.observer import InProcessPrompt, in_process_prompt, observe_current_prompt

    comfy.run("p1", PROMPT, ["9", "8", "1", "2", "3", "4"])
    served = observer.observation_for("p1")
    assert served is None  # closed by its report
    prompt = {"8": {"class_type": "WanBenchProfiler", "inputs": {"case_name": "in_process", "sample_interval_ms": 20}}}
    observed = InProcessPrompt(prompt_id="p1", nodes=prompt, node_classes={})
    with in_process_prompt(observed):
        observation = observe_current_prompt()
        assert not observation.closed and observation.session.case_name == "in_process"
        observed.ended(None)
    assert observation.closed and observer.open_prompt_ids() == []
