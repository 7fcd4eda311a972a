"""Parallel runs in several processes (gloo on the CPU, 127.0.0.1): every plan gives the
single-process latent, the CLI writes one report from rank 0, two launchers ("nodes") meeting
through a c10d rendezvous give the same video, ranks that disagree or die stop the run cleanly.

Slow (each test starts 2-4 Python processes that import torch): marked `slow`, never skipped.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from distributed_cases import CASES, disagreement_worker, equivalence_worker, experts_used
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from wanbench.cli import main
from wanbench.profiling import check_report, load_runs
from wanbench.wan_core.config import preset
from wanbench.wan_core.runtime.distributed import ParallelPlan
from wanbench.wan_core.runtime.volume import step_volume

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4  # float32: the same sums in other matmul shapes and orders
WORKFLOW = "tiny_ti2v_5B_t2v.api.json"
STEPS = ["--set", "WanBenchSampler.steps=2"]
RUN_TIMEOUT_S = 240


def _launch(nproc: int, worker, *args) -> dict[int, dict]:
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    return elastic_launch(config, worker)(*args)


def _expected_bytes(case_name: str, mode: str, world: int, sharded: bool) -> dict[str, int]:
    """What the analytic volume says one rank sends in the first (guided) step of a case."""
    case = next(c for c in CASES if c.name == case_name)
    plan = ParallelPlan(world_size=world, mode=mode, shard_weights=sharded)
    volume = step_volume(preset(case.task, tiny=True).dit, case.thw, cfg_degree=plan.cfg_degree,
                         ulysses_degree=plan.ulysses_degree, dtype_bytes=4)  # the tiny models run in float32
    return {"all_to_all": volume.all_to_all, "all_gather": volume.all_gather, "cfg_combine": volume.cfg_combine}


def _check_equivalence(results: dict[int, dict], plans: list[tuple[str, bool]]) -> None:
    expected_keys = {f"{c.name} {m}{' sharded' if s else ''}" for c in CASES for m, s in plans}
    for rank, found in results.items():
        assert set(found) == expected_keys
        for key, figures in found.items():
            case_name, mode = key.split(" ")[:2]
            if case_name.endswith("-lora") and key.endswith("sharded"):
                assert "cannot be combined with LoRAs" in figures["refused"], (rank, key)
                continue
            if figures["first_step_bytes"] is not None:  # the meter counts what the analytic volume says
                sent = {k: v for k, v in figures["first_step_bytes"].items() if k != "weight_gather"}
                assert sent == _expected_bytes(case_name, mode, len(results), key.endswith("sharded")), (rank, key)
            assert figures["diff"] <= TOLERANCE * max(1.0, figures["scale"]), (rank, key, figures)
            mode, sharded = key.split(" ")[1], key.endswith("sharded")
            if "cfg" in mode and "t2v" not in key.split(" ")[0]:
                assert "cfg_combine" in figures["kinds"], (rank, key)  # the halves met every CFG step
            if "ulysses" in mode:
                assert {"all_to_all", "all_gather"} <= set(figures["kinds"]), (rank, key)
            if sharded:
                assert "weight_gather" in figures["kinds"], (rank, key)
                assert figures["local_fraction"] < 0.75, (rank, key, figures)  # ~1/N of the weights here
            else:
                assert figures["local_fraction"] is None


def test_the_tiny_cases_use_both_experts_and_guidance_off() -> None:
    assert experts_used(CASES[0]) == ["high", "low"]  # T2V: both experts; low runs with guidance 1
    assert CASES[0].guide.low == 1.0 and experts_used(CASES[1]) == ["high", "low"]
    assert CASES[-1].lora and experts_used(CASES[-1]) == ["high", "low"]  # a LoRA on both experts


def test_two_ranks_cfg_ulysses_and_sharded_weights_match_one_process() -> None:
    plans = [("cfg", False), ("ulysses", False), ("none", True), ("cfg", True)]
    _check_equivalence(_launch(2, equivalence_worker, plans), plans)


def test_ranks_that_ask_for_different_plans_or_hold_different_values_stop_with_an_error() -> None:
    for rank, found in _launch(2, disagreement_worker).items():
        assert "disagree on the parallel plan (--parallel, --shard-weights): rank 0 has 'cfg/False', ranks [1] " \
               "have ['ulysses/False']" in found["plan"], rank
        assert "disagree on the model files: rank 0 has 'file-0', ranks [1] have ['file-1']" in found["value"], rank


def test_four_ranks_ulysses_cfg_ulysses_and_sharded_match_one_process() -> None:
    plans = [("ulysses", False), ("cfg+ulysses", False), ("cfg+ulysses", True)]
    _check_equivalence(_launch(4, equivalence_worker, plans), plans)


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    assert main(["make-tiny-models", str(root)]) == 0
    return root


@pytest.fixture(scope="module")
def single_run(models: Path, tmp_path_factory) -> Path:
    """The output folder of the workflow run in one process."""
    out = tmp_path_factory.mktemp("single")
    assert main(["run", WORKFLOW, "--out", str(out), "--models", str(models), *STEPS]) == 0
    return out


@pytest.fixture(scope="module")
def single_video(single_run: Path) -> Path:
    return next(single_run.rglob("*.mp4"))


def assert_same_video(got: Path, expected: Path) -> None:
    """The same frames as the single-process run, up to what float rounding does to an h264 file.

    A parallel run's latent equals the single-process one to float rounding (about 1e-5: the
    reductions run in another order), so the decoded frames agree to ~1e-5 and the 8-bit frames
    almost everywhere; h264 may still encode a pixel that rounded the other way differently, so
    the files are compared frame by frame, not byte by byte.
    """
    import av
    import numpy as np

    def frames(path: Path) -> np.ndarray:
        with av.open(str(path)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.int16)

    a, b = frames(got), frames(expected)
    assert a.shape == b.shape
    diff = np.abs(a - b)
    assert diff.mean() < 0.05 and diff.max() <= 8, (diff.mean(), diff.max())


def _wanbench(*args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wanbench", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_cfg_parallel_run_writes_one_report_from_rank_0(models: Path, single_run: Path, single_video: Path,
                                                            tmp_path: Path) -> None:
    done = _wanbench("run", WORKFLOW, "--out", str(tmp_path), "--models", str(models), *STEPS,
                     "--nproc", "2", "--parallel", "cfg")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(cfg)" in done.stdout
    videos, reports = list(tmp_path.rglob("*.mp4")), list(tmp_path.rglob("*.json"))
    assert len(videos) == 1 and len(reports) == 1  # rank 1 wrote nothing
    assert_same_video(videos[0], single_video)  # the same latent (to rounding) gives the same video
    assert check_report(reports[0]) == []
    runs = load_runs(reports[0])
    assert [(r.context.rank, r.context.world_size, r.context.parallel) for r in runs] == [
        (0, 2, "cfg 2"), (1, 2, "cfg 2")]
    assert runs[1].context.width == runs[0].context.width  # the workload facts rank 0 saw
    text = reports[0].with_suffix(".md").read_text(encoding="utf-8")
    assert "## Parallel run: tiny_ti2v_5B_t2v (cfg 2; 2 ranks)" in text and "cfg_combine(s)" in text
    assert {s.name for s in runs[1].stages} >= {"Step_0_Inference", "Step_1_Inference"}
    assert "T5_Encoding" not in {s.name for s in runs[1].stages}  # the text encoder ran on rank 0 only
    # each rank's observer sees the nodes that rank runs: rank 0's nodes are not "cached" on rank 1
    assert [r.status for r in runs] == ["completed", "completed"]
    assert "Model_Initialization" in {s.name for s in runs[1].stages}
    assert not [s.name for r in runs for s in r.stages if s.cached]
    single = load_runs(next(single_run.rglob("*.json")))[0]
    step = next(s for s in single.stages if s.name == "Step_0_Inference")
    for run in runs:  # each rank records the half of the step it computed
        assert next(s for s in run.stages if s.name == "Step_0_Inference").flops == pytest.approx(step.flops / 2)


def test_torchrun_runs_the_same_command_and_the_report_merges_for_scaling(
        models: Path, single_run: Path, single_video: Path, tmp_path: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*torchrun, "-m", "wanbench", "run", WORKFLOW, "--out", str(tmp_path / "parallel"),
                           "--models", str(models), *STEPS, "--parallel", "ulysses", "--shard-weights"],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    videos = list(tmp_path.rglob("*.mp4"))
    assert len(videos) == 1
    assert_same_video(videos[0], single_video)
    report = next(tmp_path.rglob("*.json"))
    assert [r.context.parallel for r in load_runs(report)] == ["ulysses 2, sharded weights"] * 2
    merged = tmp_path / "merged.md"
    assert main(["report", str(next(single_run.rglob("*.json"))), str(report), "-o", str(merged)]) == 0
    text = merged.read_text(encoding="utf-8")
    assert "## Parallel run: tiny_ti2v_5B_t2v (ulysses 2, sharded weights; 2 ranks)" in text
    assert "scaling efficiency" in text and "weight_gather(s)" in text and "all_to_all(s)" in text


def _two_nodes(models: Path, tmp_path: Path, steps: tuple[str, str]) -> list[subprocess.CompletedProcess]:
    endpoint, run_id = f"127.0.0.1:{_free_port()}", uuid.uuid4().hex[:8]
    procs = [subprocess.Popen([sys.executable, "-m", "wanbench", "run", WORKFLOW, "--out", str(tmp_path / f"node{i}"),
                               "--models", str(models), "--set", f"WanBenchSampler.steps={steps[i]}", "--nproc", "1",
                               "--nnodes", "2", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
                               "--parallel", "cfg", "--timeout", "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for i in range(2)]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return out


def test_two_nodes_with_a_c10d_rendezvous_give_the_same_video(models: Path, single_video: Path,
                                                              tmp_path: Path) -> None:
    done = _two_nodes(models, tmp_path, ("2", "2"))
    assert [d.returncode for d in done] == [0, 0], [d.stderr[-2000:] for d in done]
    videos = list(tmp_path.rglob("*.mp4"))
    assert len(videos) == 1  # written by rank 0's machine only
    assert_same_video(videos[0], single_video)
    assert sum("ran on another machine" in d.stdout for d in done) == 1


def test_nodes_started_with_different_workflows_refuse_to_run(models: Path, tmp_path: Path) -> None:
    done = _two_nodes(models, tmp_path, ("2", "3"))
    assert [d.returncode for d in done] == [2, 2]
    assert all("disagree on the workflow" in d.stderr for d in done), [d.stderr[-2000:] for d in done]
    assert not list(tmp_path.rglob("*.mp4")) and not list(tmp_path.rglob("*.json"))


@pytest.mark.parametrize(("sig", "says"), [(signal.SIGKILL, "died with signal SIGKILL"),
                                          (signal.SIGSTOP, "did not answer within the process-group timeout")])
def test_a_rank_that_dies_or_hangs_mid_run_fails_the_run_cleanly(sig: int, says: str, models: Path,
                                                                  tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "wanbench", "-v", "run", WORKFLOW, "--out", str(tmp_path),
                             "--models", str(models), "--set", "WanBenchSampler.steps=1000", "--nproc", "2",
                             "--parallel", "cfg", "--timeout", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines, pid = [], None
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for line in proc.stderr:  # wait until rank 1 is sampling
        lines.append(line)
        found = re.search(r"rank 1 of 2 joined as pid (\d+)", line)
        pid = int(found.group(1)) if found else pid
        if "rank 1 running node 8 (WanBenchSampler)" in line or time.monotonic() > deadline:
            break
    assert pid is not None, "".join(lines[-20:])
    time.sleep(0.3)  # into the loop (1000 steps take several seconds here)
    signalled_at = time.monotonic()
    os.kill(pid, sig)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # a stopped rank the launcher could not reap
    # no hang: the 10 s timeout, then the launcher's 30 s grace before it kills the ranks still there
    assert time.monotonic() - signalled_at < 90
    assert proc.returncode == 2
    assert says in stderr, stderr[-3000:]
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing written, not even in part
