"""Parallel runs, the parts that need no second process: plans and their errors, the token shard of
Ulysses, which nodes each rank runs, the report of the ranks (scripted with a fake clock), the CLI's
argument checks. The multi-process runs are in test_distributed_multiproc.py."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from wanbench.cli import WORKFLOWS_DIR, main
from wanbench.launch import LaunchOptions
from wanbench.nodes import NODE_CLASS_MAPPINGS
from wanbench.profiling import FakeClock, ProfileSession, check_report, render_markdown, report_document
from wanbench.profiling.ranks import check_parallel, label_ranks, step_communication
from wanbench.profiling.records import RunRecord
from wanbench.rank_runner import observed_view, rank_schedule
from wanbench.runner import load_api_workflow, validate_workflow
from wanbench.wan_core import trace
from wanbench.wan_core.config import (
    COMMUNICATION_EVENT,
    I2V_A14B,
    PARALLEL_PLAN_EVENT,
    T2V_A14B,
    TI2V_5B,
)
from wanbench.wan_core.dit import FULL_SEQUENCE, WanDiT
from wanbench.wan_core.errors import DistributedError
from wanbench.wan_core.rope import RopeCache
from wanbench.wan_core.runtime.comm import CommMeter
from wanbench.wan_core.runtime.distributed import (
    ParallelPlan,
    ParallelRuntime,
    gather_to_root,
    init_from_environment,
    parallel_sampling,
    to_cpu,
    weights_fingerprint,
)
from wanbench.wan_core.runtime.ulysses import UlyssesShard


# ------------------------------------------------------------------------------------------------
# plans
# ------------------------------------------------------------------------------------------------
def test_plan_degrees_and_rank_layout() -> None:
    plan = ParallelPlan(world_size=8, mode="cfg+ulysses", shard_weights=True)
    assert (plan.cfg_degree, plan.ulysses_degree) == (2, 4)
    assert plan.describe() == "cfg 2 x ulysses 4, sharded weights"
    assert ParallelPlan(world_size=2, mode="cfg").describe() == "cfg 2"
    assert ParallelPlan(world_size=4, mode="none", shard_weights=True).describe() == "replicated steps, sharded weights"


def test_valid_world_sizes_of_the_real_models() -> None:
    ulysses, both = ParallelPlan(world_size=2, mode="ulysses"), ParallelPlan(world_size=4, mode="cfg+ulysses")
    assert TI2V_5B.dit.num_heads == 24 and T2V_A14B.dit.num_heads == I2V_A14B.dit.num_heads == 40
    assert ulysses.valid_world_sizes(24) == [2, 3, 4, 6, 8, 12, 24]
    assert ulysses.valid_world_sizes(40) == [2, 4, 5, 8, 10, 20, 40]
    assert both.valid_world_sizes(24, limit=16) == [4, 6, 8, 12, 16]


@pytest.mark.parametrize(("world", "mode", "heads", "valid"), [
    (16, "ulysses", 24, "[2, 3, 4, 6, 8, 12, 24]"),
    (6, "ulysses", 40, "[2, 4, 5, 8, 10, 20, 40]"),
    (6, "cfg+ulysses", 40, "[4, 8, 10, 16, 20, 40]"),
])
def test_a_split_that_does_not_divide_the_heads_is_refused_with_the_valid_sizes(world, mode, heads, valid) -> None:
    with pytest.raises(ValueError, match=f"has {heads} heads .*--nproc one of {re.escape(valid)}"):
        ParallelPlan(world_size=world, mode=mode).check_heads(heads)


@pytest.mark.parametrize(("world", "mode", "shard", "message"), [
    (3, "cfg", False, "exactly 2 ranks"),
    (2, "cfg+ulysses", False, "even number of ranks >= 4"),
    (5, "cfg+ulysses", False, "even number of ranks >= 4"),
    (2, "none", False, "would all compute the same step"),
    (1, "ulysses", False, "at least 2 ranks"),
    (2, "tensor", False, "parallel mode must be one of"),
])
def test_bad_plans_say_what_to_use(world, mode, shard, message) -> None:
    with pytest.raises(ValueError, match=message):
        ParallelPlan(world_size=world, mode=mode, shard_weights=shard)


def _runtime(plan: ParallelPlan, rank: int = 0) -> ParallelRuntime:
    """A runtime with no process group: enough for what is checked before any collective."""
    return ParallelRuntime(plan=plan, rank=rank, device=torch.device("cpu"), backend="gloo", timeout_s=60.0,
                           run_group="test", cfg_group=None, ulysses_group=None, control_group=None,
                           meter=CommMeter(torch.device("cpu")))


def test_sampling_refuses_a_model_whose_heads_do_not_divide_before_anything_runs() -> None:
    model = WanDiT(TI2V_5B.dit.tiny())  # 4 heads
    with pytest.raises(ValueError, match=r"expert 0 has 4 heads .*one of \[2, 4\]"):
        with parallel_sampling(_runtime(ParallelPlan(world_size=3, mode="ulysses")), [model], placement="none",
                               single=lambda *a: None):
            pass
    assert model.sequence_layout.shard(10) is FULL_SEQUENCE  # nothing was applied


def test_sharded_weights_refuse_offloading_placements() -> None:
    model = WanDiT(TI2V_5B.dit.tiny())
    plan = ParallelPlan(world_size=2, mode="ulysses", shard_weights=True)
    with pytest.raises(ValueError, match="placement 'blocks' .* Set the sampler's placement to 'none'"):
        with parallel_sampling(_runtime(plan), [model], placement="blocks", single=lambda *a: None):
            pass


def test_joining_without_a_launcher_says_how_to_start(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedError, match="--nproc N"):
        init_from_environment("ulysses")


def test_weights_fingerprint_tells_different_model_files_apart() -> None:
    torch.manual_seed(0)
    a = WanDiT(TI2V_5B.dit.tiny())
    torch.manual_seed(0)
    b = WanDiT(TI2V_5B.dit.tiny())
    torch.manual_seed(1)
    c = WanDiT(TI2V_5B.dit.tiny())
    assert weights_fingerprint([a]) == weights_fingerprint([b]) != weights_fingerprint([c])


def test_outside_a_parallel_run_gather_returns_the_value_itself() -> None:
    assert gather_to_root({"a": 1}) == [{"a": 1}]


def test_to_cpu_reaches_tensors_inside_containers_and_dataclasses() -> None:
    @dataclasses.dataclass(frozen=True)
    class Holder:
        x: torch.Tensor
        items: list

    value = {"h": Holder(torch.ones(2), [torch.zeros(1), 3]), "t": (torch.ones(1),)}
    out = to_cpu(value)
    assert isinstance(out["h"], Holder) and torch.equal(out["h"].x, torch.ones(2)) and out["h"].items[1] == 3
    assert isinstance(out["t"], tuple)


# ------------------------------------------------------------------------------------------------
# the Ulysses token shard (its rows; the all-to-all runs in the multi-process tests)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("num_tokens", "degree"), [(12, 4), (18, 4), (5, 2), (3, 4)])
def test_token_shards_cover_the_sequence_once_padding_the_end(num_tokens: int, degree: int) -> None:
    x = torch.arange(num_tokens, dtype=torch.float32).view(1, num_tokens, 1).expand(2, -1, 3)  # (B, L, C)
    table = RopeCache(16).tables((num_tokens, 1, 1), torch.device("cpu"))
    shards = [UlyssesShard(num_tokens, degree=degree, index=i, group=None, meter=None) for i in range(degree)]
    rows = torch.cat([s.local(x) for s in shards], dim=1)
    padded = shards[0].rows * degree
    assert rows.shape == (2, padded, 3) and padded - num_tokens < degree
    assert torch.equal(rows[:, :num_tokens], x) and not rows[:, num_tokens:].any()  # zero padding at the end
    ropes = [s.local_rope(table) for s in shards]
    assert torch.equal(torch.cat([r.pairs for r in ropes]), table.pairs)  # each token keeps its own angle
    one_row = torch.ones(2, 1, 3)
    assert all(s.local(one_row) is one_row for s in shards)  # a table for every token passes unchanged


def test_the_default_layout_keeps_every_token() -> None:
    model = WanDiT(TI2V_5B.dit.tiny())
    shard = model.sequence_layout.shard(7)
    x = torch.randn(1, 7, 4)
    assert shard.local(x) is x and shard.gather(x) is x


# ------------------------------------------------------------------------------------------------
# which nodes each rank runs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny_ti2v_5B_t2v", "tiny_ti2v_5B_i2v", "tiny_t2v_A14B", "tiny_i2v_A14B"])
def test_other_ranks_run_the_profiler_model_loader_sampler_and_report(name: str) -> None:
    prompt = load_api_workflow(WORKFLOWS_DIR / f"{name}.api.json")
    schedule = rank_schedule(prompt)
    kinds = {prompt[n]["class_type"] for n in schedule.every_rank}
    assert kinds == {"WanBenchProfiler", "WanBenchModelLoader", "WanBenchSampler", "WanBenchReport"}
    sampler = next(n for n in prompt if prompt[n]["class_type"] == "WanBenchSampler")
    sent = {prompt[src]["class_type"] for src, _ in schedule.sent[sampler]}
    latent = "WanBenchImageToVideo" if name in ("tiny_ti2v_5B_i2v", "tiny_i2v_A14B") else "WanBenchEmptyLatent"
    assert sent == {"WanBenchTextEncode", latent}  # the text embeddings and the latent come from rank 0
    profiler = next(n for n in prompt if prompt[n]["class_type"] == "WanBenchProfiler")
    report = next(n for n in prompt if prompt[n]["class_type"] == "WanBenchReport")
    assert profiler not in schedule.sent and report not in schedule.sent  # no wires: nothing to send


def test_a_workflow_that_wires_the_profiler_is_scheduled_the_same_way() -> None:
    """Saved workflows from before the wire-free profiler: the profiler wired into every stage node
    and the report, the saved video's path into the report (which rank 0 then sends)."""
    prompt = load_api_workflow(WORKFLOWS_DIR / "tiny_ti2v_5B_t2v.api.json")
    profiler = next(n for n in prompt if prompt[n]["class_type"] == "WanBenchProfiler")
    save = next(n for n in prompt if prompt[n]["class_type"] == "WanBenchSaveVideo")
    report = next(n for n in prompt if prompt[n]["class_type"] == "WanBenchReport")
    for node in prompt.values():
        if "profiler" in NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES().get("optional", {}):
            node["inputs"]["profiler"] = [profiler, 0]
    prompt[report]["inputs"]["video_path"] = [save, 0]
    validate_workflow(prompt)
    schedule = rank_schedule(prompt)
    kinds = {prompt[n]["class_type"] for n in schedule.every_rank}
    assert kinds == {"WanBenchProfiler", "WanBenchModelLoader", "WanBenchSampler", "WanBenchReport"}
    assert {prompt[src]["class_type"] for src, _ in schedule.sent[report]} == {"WanBenchSaveVideo"}


def test_another_rank_observes_only_the_nodes_it_runs() -> None:
    prompt = load_api_workflow(WORKFLOWS_DIR / "tiny_i2v_A14B.api.json")
    schedule = rank_schedule(prompt)
    assert observed_view(prompt, schedule, is_root=True) is prompt  # rank 0 runs (and observes) everything
    view = observed_view(prompt, schedule, is_root=False)
    assert set(view) == set(schedule.every_rank)
    sampler = next(n for n in view if view[n]["class_type"] == "WanBenchSampler")
    links = {name: v for name, v in view[sampler]["inputs"].items() if isinstance(v, list)}
    assert set(links) == {"model"} and links["model"][0] in view  # embeddings and latent come from rank 0
    assert view[sampler]["inputs"]["steps"] == prompt[sampler]["inputs"]["steps"]
    assert "text_embeds" in prompt[sampler]["inputs"]  # the workflow itself is not changed


# ------------------------------------------------------------------------------------------------
# the report of a parallel run (scripted: fake clock, two ranks)
# ------------------------------------------------------------------------------------------------
STEP_S = ((1.0, 0.30), (0.8, 0.20))  # per step: rank 0 inference seconds, its communication seconds


def _rank_run(rank: int, *, world: int = 2, step_s=STEP_S, comm_extra: float = 0.0) -> RunRecord:
    clock = FakeClock()
    session = ProfileSession(case_name="par", sample_interval_s=None, clock=clock).open()
    with session.activate():
        if rank == 0:
            session.set_context(task="ti2v-5B", width=1280, height=704, frames=121, steps=len(step_s))
        with trace.stage("Model_Initialization", kind="init"):
            clock.advance(2.0 + rank)
        if rank == 0:
            with trace.stage("T5_Encoding", kind="encode"):
                clock.advance(1.0)
        trace.event(PARALLEL_PLAN_EVENT, rank=rank, world_size=world, plan="cfg 2", run_group="g1", mode="cfg")
        for i, (seconds, comm) in enumerate(step_s):
            with trace.stage(f"Step_{i}_Loading", kind="step-loading", step=i, expert="model"):
                clock.advance(0.01)
            with trace.stage(f"Step_{i}_Inference", kind="step-inference", step=i, expert="model"):
                clock.advance(seconds + 0.1 * rank)
                trace.event(COMMUNICATION_EVENT, seconds=comm + comm_extra, bytes=2_000_000, calls=1,
                            cfg_combine_s=comm + comm_extra, cfg_combine_bytes=2_000_000)
    return session.close()


def _single_run() -> RunRecord:
    clock = FakeClock()
    session = ProfileSession(case_name="one", sample_interval_s=None, clock=clock).open()
    with session.activate():
        session.set_context(task="ti2v-5B", width=1280, height=704, frames=121, steps=2)
        for i in range(2):
            with trace.stage(f"Step_{i}_Loading", kind="step-loading", step=i):
                clock.advance(0.01)
            with trace.stage(f"Step_{i}_Inference", kind="step-inference", step=i):
                clock.advance(2.0)
    return session.close()


def test_ranks_are_labelled_and_share_rank_0s_workload_facts() -> None:
    runs = label_ranks([_rank_run(0), _rank_run(1)])
    assert [r.context.case_name for r in runs] == ["par [rank 0/2]", "par [rank 1/2]"]
    assert [(r.context.rank, r.context.world_size, r.context.parallel, r.context.run_group) for r in runs] == [
        (0, 2, "cfg 2", "g1"), (1, 2, "cfg 2", "g1")]
    assert runs[1].context.width == 1280 and runs[1].context.task == "ti2v-5B"
    assert label_ranks(runs) == runs  # labelling twice changes nothing


def test_communication_is_attributed_to_its_step() -> None:
    comm = step_communication(_rank_run(0))
    assert {i: round(c.seconds, 6) for i, c in comm.items()} == {0: 0.3, 1: 0.2}
    assert comm[0].by_kind == {"cfg_combine": pytest.approx(0.3)} and comm[0].bytes_sent == 2_000_000


def test_parallel_section_shows_critical_path_communication_per_gpu_and_scaling() -> None:
    runs = label_ranks([_rank_run(0), _rank_run(1), _single_run()])
    text = render_markdown(runs)
    section = text[text.index("## Parallel run: par (cfg 2; 2 ranks)"):]
    assert "| Model_Initialization | 1 | 3.00 | 0 | 2.00 | 33.3 |" in section  # rank 1 was slower there
    assert "| T5_Encoding | 0 | 1.00 | 0 | 1.00 | rank 0 only |" in section
    # step 0: rank 1 is the slowest (1.1 s) and spent 0.3 s communicating: compute 0.8 s, 27.3 %
    assert "| 0 | model | 1 | 1.10 | 0.80 | 0.30 | 27.3 | 0.30 | 2.00 |" in section
    # steps: (1.11 + 0.91) s on 2 ranks vs (2.01 + 2.01) s on one: speed-up 1.99x, efficiency 99.5 %
    assert "speed-up 1.99x, scaling efficiency 99.5 % (speed-up / 2)" in section
    assert check_report(report_document(runs)) == []


def test_checker_flags_a_missing_rank_and_communication_longer_than_its_step() -> None:
    assert check_parallel(label_ranks([_rank_run(0), _rank_run(1)])) == []
    missing = check_parallel(label_ranks([_rank_run(0, world=3), _rank_run(1, world=3)]))
    assert any("holds ranks [0, 1] of a world of 3" in p for p in missing)
    too_long = check_parallel(label_ranks([_rank_run(0), _rank_run(1, comm_extra=5.0)]))
    assert any("rank 1 step 0 communicated" in p for p in too_long)
    steps = check_parallel(label_ranks([_rank_run(0), _rank_run(1, step_s=STEP_S[:1])]))
    assert any("ranks ran different steps" in p for p in steps)


def test_report_json_round_trips_the_rank_facts(tmp_path: Path) -> None:
    from wanbench.profiling import load_runs, write_report

    written = write_report([_rank_run(0), _rank_run(1)], tmp_path, basename="par", chart=False)
    runs = load_runs(written.json)
    assert [r.context.rank for r in runs] == [0, 1] and check_report(written.json) == []
    assert json.loads(written.json.read_text())["runs"][1]["context"]["parallel"] == "cfg 2"


PROFILED_ONLY = {
    "1": {"class_type": "WanBenchProfiler", "inputs": {"case_name": "par", "sample_interval_ms": 20}},
    "2": {"class_type": "WanBenchReport", "inputs": {"filename_prefix": "wanbench/report"}},
}


def test_the_report_node_of_another_rank_sends_its_record_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    import wanbench.wan_core.runtime.distributed as distributed
    from wanbench.nodes.context import Bridge
    from wanbench.runner import run_workflow

    sent: list[RunRecord] = []
    monkeypatch.setattr(distributed, "gather_to_root", lambda record: sent.append(record))  # not rank 0: None
    result = run_workflow(PROFILED_ONLY, Bridge(output_dir=tmp_path))
    assert result.outputs["2"] == ("", "") and result.ui["2"] == {}
    assert [r.context.case_name for r in sent] == ["par"] and sent[0].status == "completed"
    assert list(tmp_path.rglob("*.json")) == [] and list(tmp_path.rglob("*.md")) == []


def test_the_report_node_of_rank_0_writes_every_rank_s_record(tmp_path: Path, monkeypatch) -> None:
    import wanbench.wan_core.runtime.distributed as distributed
    from wanbench.nodes.context import Bridge
    from wanbench.profiling import load_runs
    from wanbench.runner import run_workflow

    monkeypatch.setattr(distributed, "gather_to_root", lambda record: [record, _rank_run(1)])
    result = run_workflow(PROFILED_ONLY, Bridge(output_dir=tmp_path))
    runs = load_runs(result.outputs["2"][1])
    assert [r.context.case_name for r in runs] == ["par", "par [rank 1/2]"]
    assert "par [rank 1/2]" in result.outputs["2"][0]  # the summary is the merged report


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def test_parallel_options_need_several_processes(tmp_path: Path, caplog) -> None:
    assert main(["run", "tiny_ti2v_5B_t2v.api.json", "--out", str(tmp_path), "--parallel", "cfg"]) == 2
    assert "add --nproc N" in caplog.text


def test_parallel_runs_cannot_go_to_a_server(tmp_path: Path, caplog) -> None:
    assert main(["run", "tiny_ti2v_5B_t2v.api.json", "--out", str(tmp_path), "--nproc", "2",
                 "--server", "http://127.0.0.1:1"]) == 2
    assert "cannot be combined with --server" in caplog.text


def test_several_machines_need_an_endpoint_and_a_run_id() -> None:
    with pytest.raises(ValueError, match="--rdzv-endpoint HOST:PORT .* --rdzv-id"):
        LaunchOptions(nproc=1, nnodes=2)


@pytest.mark.parametrize(("args", "message"), [
    (["--nproc", "0"], "--nproc and --nnodes must be >= 1"),
    (["--nproc", "3", "--parallel", "cfg"], "exactly 2 ranks"),
    (["--nproc", "2", "--parallel", "none"], "would all compute the same step"),
    (["--nproc", "2", "--timeout", "0"], "--timeout must be > 0"),
])
def test_bad_parallel_options_fail_before_any_process_starts(args, message, tmp_path: Path, caplog) -> None:
    assert main(["run", "tiny_ti2v_5B_t2v.api.json", "--out", str(tmp_path), "--models", str(tmp_path), *args]) == 2
    assert message in caplog.text
