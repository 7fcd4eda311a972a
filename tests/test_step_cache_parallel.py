"""Step caching in a parallel run (two processes, gloo on the CPU): every rank makes the same
decisions (they depend on the timesteps only), so a reused step has no collectives on any rank and
the CFG-parallel and Ulysses latents equal the single-process cached latent."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import pytest
import torch
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from wanbench.wan_core.config import COMMUNICATION_EVENT, preset
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.runtime.distributed import init_from_environment, use_parallel
from wanbench.wan_core.runtime.step_cache import StepCacheSettings
from wanbench.wan_core.sampler import SamplerOptions, make_noise, sample
from wanbench.wan_core.trace import use_tracer

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4  # float32: the same sums in other matmul shapes and orders (as the parallel tests)
STEPS = 5
CACHE = StepCacheSettings(mode="teacache", threshold=1e9, warmup_steps=1, max_skip=1)


class _Recorder:
    """Each step's cache decision and the steps that communicated."""

    def __init__(self) -> None:
        self.decisions: list[str] = []
        self.communicated = 0

    def stage(self, name: str, kind: str, facts: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
        if kind == "step-inference":
            self.decisions.append(str(facts.get("step_cache")))
        return contextlib.nullcontext()

    def event(self, name: str, facts: dict[str, Any]) -> None:
        if name == COMMUNICATION_EVENT:
            self.communicated += 1


def _run(step_cache: StepCacheSettings | None) -> torch.Tensor:
    task = preset("ti2v-5B", tiny=True)
    cfg = task.dit
    torch.manual_seed(0)
    model = WanDiT(cfg).eval()
    generator = torch.Generator().manual_seed(1)
    context, context_null = torch.randn(7, cfg.text_dim, generator=generator), torch.randn(5, cfg.text_dim,
                                                                                          generator=generator)
    opts = SamplerOptions.from_config(task.sampler, steps=STEPS, seed=0)
    shape = (cfg.out_dim, 3, 2, 10)
    return sample([model], task, opts, context=context, context_null=context_null, noise=make_noise(shape, 0),
                  step_cache=step_cache)


def cached_worker(mode: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    runtime = init_from_environment(mode, timeout_s=120)
    reference = _run(CACHE)
    recorder = _Recorder()
    with use_parallel(runtime), use_tracer(recorder):
        parallel = _run(CACHE)
    return {"diff": float((parallel - reference).abs().max()), "scale": float(reference.abs().max()),
            "decisions": recorder.decisions, "communicated": recorder.communicated}


@pytest.mark.parametrize("mode", ["cfg", "ulysses"])
def test_ranks_decide_alike_and_match_the_single_process_cached_run(mode: str) -> None:
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    results = elastic_launch(config, cached_worker)(mode)
    decisions = {tuple(r["decisions"]) for r in results.values()}
    # warm-up, then one reused step at most between computed ones, the last step computed
    assert decisions == {("computed", "reused", "computed", "reused", "computed")}
    for rank, found in results.items():
        assert found["diff"] <= TOLERANCE * max(1.0, found["scale"]), (rank, found)
        assert found["communicated"] == 3, (rank, found)  # only the 3 computed steps communicated
