"""Which nodes ComfyUI served from its cache, and what the observer remembers for them
(`nodes/observed_cache.py`, pure functions of a graph and the nodes that ran)."""

from __future__ import annotations

from wanbench.nodes import observed_cache
from wanbench.nodes import observed_stages as roles
from wanbench.nodes.observed_graph import NodeMemory, PromptGraph, Remembered, RememberedStage
from wanbench.nodes.observed_sampling import RunSpan
from wanbench.profiling import ProfileSession


class _Switch:  # a node with a lazy input: ComfyUI evaluates it only when the node asks for it
    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"a": ("LATENT", {}), "b": ("LATENT", {"lazy": True})}}


GRAPH = PromptGraph(
    {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.2_ti2v_5B_fp16.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat"}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0]}},
        "4": {"class_type": "Switch", "inputs": {"a": ["3", 0], "b": ["5", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0]}},
    },
    node_class={"Switch": _Switch}.get,
)


def test_needed_nodes_that_did_not_run_were_cached_lazy_inputs_are_not() -> None:
    # the decoder and the switch ran; the sampler, its loader and its encoder did not: cached
    assert observed_cache.cached_nodes(GRAPH, ran={"4", "6"}, seen_before=(), finished_only=()) == ["1", "2", "3"]
    # nodes ComfyUI had run or started before the observation opened are not cached; their inputs
    # that it did not list were
    assert observed_cache.cached_nodes(GRAPH, ran={"4", "6"}, seen_before={"1", "2", "3"}, finished_only=()) == []
    assert observed_cache.cached_nodes(GRAPH, ran={"4", "6"}, seen_before={"3"}, finished_only=()) == ["1", "2"]
    # a finish without a start is a node the cache served, and its inputs were not needed again
    assert observed_cache.cached_nodes(GRAPH, ran={"6"}, seen_before=(), finished_only={"4"}) == ["1", "2", "3", "4"]
    assert observed_cache.ancestors(GRAPH, "6") == ["4", "3", "1", "2"]  # "5" is lazy


def test_a_cached_node_is_recorded_with_its_remembered_stages_or_noted() -> None:
    memory = NodeMemory()
    memory.remember(
        "2", "CLIPTextEncode",
        Remembered(GRAPH.signature("2"), (RememberedStage("T5_Encoding", "encode", 0.4, {"node_id": "2"}),)),
    )
    with ProfileSession(case_name="cached", sample_interval_s=None) as session:
        steps, note = observed_cache.record_cached(session, memory, GRAPH, "2", {})
        assert (steps, note) == (set(), None)
        steps, note = observed_cache.record_cached(session, memory, GRAPH, "3", {})  # a sampler never seen
        assert steps == set() and note is not None and "sampler node 3 (KSampler)" in note
    (stage,) = [s for s in session.record.stages if s.cached]
    assert stage.name == "T5_Encoding" and stage.facts["measured_s"] == 0.4  # the time it took, not 0


def test_remembered_runs_come_back_only_for_unchanged_nodes_that_did_not_run() -> None:
    memory = NodeMemory()
    span = RunSpan(node_id="3", offset=0, num_steps=2, first_sigma=1.0, last_sigma=0.5)
    with ProfileSession(case_name="ran", sample_interval_s=None) as session:
        pass
    finished = [observed_cache.FinishedNode("3", "KSampler", roles.SAMPLER, span)]
    observed_cache.remember(memory, GRAPH, session.record, finished, {})
    assert observed_cache.cached_runs(GRAPH, memory, "6", ran={"6", "4"}) == [span]
    assert observed_cache.cached_runs(GRAPH, memory, "6", ran={"6", "4", "3"}) == []  # it ran: not cached
    changed = PromptGraph({**GRAPH.nodes, "3": {"class_type": "KSampler", "inputs": {"seed": 2}}})
    assert observed_cache.cached_runs(changed, memory, "3", ran=()) == []
