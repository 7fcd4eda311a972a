"""Real-size denoising with random weights: profiler reports, MFU, and the diffusers ratio.

For each case (the benchmark suite's cases, plus TI2V-5B at 1280x704x121 and T2V-A14B at
832x480x81 with both experts) this

1. builds the DiT expert(s) with random weights directly on the device in bf16 (meta device,
   `to_empty`, seeded in-place init: no checkpoint files needed) as `Model_Initialization`;
2. optionally compiles each block (`--compile`, recorded as the `Compile` stage);
3. runs the sampler for `min(steps, --max-steps)` steps inside a `ProfileSession` and writes the
   full profiler report (Markdown, JSON, timeline PNG: stages, SM activity, memory, MFU);
4. times one batched-CFG DiT forward of ours and of diffusers `WanTransformer3DModel` holding
   the same tensors, interleaved, for the side-by-side ratio.

Text encoding and VAE decode are not part of these runs (random embeddings stand in for the
prompt): the figures are the denoising loop's. `--tiny` runs the same code end to end on the CPU
with the tiny twins of the presets and the tiny suite.

Run: `python -m bench.bench_gpu [--cases ...] [--max-steps 4] [--compile]` or `--tiny`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from wanbench.profiling.checker import check_report
from wanbench.profiling.figures import summarize_run
from wanbench.profiling.gpus import lookup_gpu
from wanbench.profiling.output import write_report
from wanbench.profiling.session import ProfileSession
from wanbench.wan_core.compile import CompileConfig, apply_compile
from wanbench.wan_core.config import WanConfig, preset
from wanbench.wan_core.dit import WanDiT
from wanbench.wan_core.sampler import SamplerOptions, make_noise, sample
from wanbench.wan_core.trace import stage

from .bench_dit import build_wan_dit, diffusers_twin
from .bench_matmul import measure_matmul_ceiling
from .common import RESULTS_DIR, format_table, interleaved, load_average, summarize, write_result

log = logging.getLogger(__name__)

WORKFLOWS_DIR = Path(__file__).resolve().parents[1] / "workflows"
SUITE = WORKFLOWS_DIR / "suites" / "wan22_benchmark.json"
TINY_SUITE = WORKFLOWS_DIR / "suites" / "wan22_benchmark_tiny.json"
TASK_BY_WORKFLOW = (("ti2v_5B", "ti2v-5B"), ("i2v_A14B", "i2v-A14B"), ("t2v_A14B", "t2v-A14B"))
PROMPT_TOKENS, NEGATIVE_TOKENS = 120, 126


@dataclass(frozen=True, kw_only=True)
class GpuCase:
    """One denoising run: task preset, video size, the suite's step count and weight placement."""

    name: str
    task: str
    width: int
    height: int
    frames: int
    steps: int
    placement: str = "none"
    boundary: float | None = None  # None: the task preset's expert switch


EXTRA_CASES = (
    GpuCase(name="ti2v-5B_1280x704x121", task="ti2v-5B", width=1280, height=704, frames=121, steps=50),
    GpuCase(name="t2v-A14B_832x480x81", task="t2v-A14B", width=832, height=480, frames=81, steps=40),
)


def _task_of(workflow: str) -> str:
    for marker, task in TASK_BY_WORKFLOW:
        if marker in workflow:
            return task
    raise ValueError(f"cannot tell the task of workflow {workflow!r}; expected a name containing one of "
                     f"{[m for m, _ in TASK_BY_WORKFLOW]}")


def suite_cases(path: Path) -> list[GpuCase]:
    """The cases of a benchmark suite file, with size, frames, steps and placement resolved."""
    suite = json.loads(path.read_text(encoding="utf-8"))
    cases = []
    for entry in suite["cases"]:
        workflow_path = (path.parent / entry["workflow"]).resolve()
        nodes = json.loads(workflow_path.read_text(encoding="utf-8"))
        inputs: dict[str, Any] = {}
        for node in nodes.values():
            for key, value in node["inputs"].items():
                inputs[f"{node['class_type']}.{key}"] = value
        inputs.update(entry.get("overrides", {}))
        cases.append(GpuCase(name=entry["name"], task=_task_of(workflow_path.name),
                             width=int(inputs["WanBenchEmptyLatent.width"]),
                             height=int(inputs["WanBenchEmptyLatent.height"]),
                             frames=int(inputs["WanBenchEmptyLatent.length"]),
                             steps=int(inputs["WanBenchSampler.steps"]),
                             placement=str(inputs["WanBenchSampler.placement"])))
    return cases


def tiny_extra_cases() -> list[GpuCase]:
    """The extra cases at their tiny twins' default size."""
    out = []
    for case in EXTRA_CASES:
        task = preset(case.task, tiny=True)
        width, height = task.default_size
        out.append(replace(case, name=case.name.split("_")[0] + "-tiny", width=width, height=height,
                           frames=task.frame_num, steps=task.sampler.steps))
    return out


def random_contexts(task: WanConfig, *, device: torch.device | str, dtype: torch.dtype,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-ins for the prompt and negative prompt embeddings. Shapes: (S, text_dim) each."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dim = task.dit.text_dim
    ctx = torch.randn(PROMPT_TOKENS, dim, generator=gen) * 0.1
    ctx_null = torch.randn(NEGATIVE_TOKENS, dim, generator=gen) * 0.1
    return ctx.to(device, dtype), ctx_null.to(device, dtype)


def forward_comparison(model: WanDiT, task: WanConfig, case: GpuCase, ctx: torch.Tensor,
                       ctx_null: torch.Tensor, *, repeats: int, with_diffusers: bool) -> dict[str, Any]:
    """One batched-CFG forward (B = 2) of ours and of diffusers on the same tensors, interleaved.

    TI2V gets per-token timesteps (B, L) as both pipelines pass them; the A14B tasks one per sample.
    For i2v, diffusers takes the 36 channels concatenated, ours the 16 noise channels plus `y`.
    """
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    _, t_lat, h, w = task.latent_shape(case.width, case.height, case.frames)
    num_tokens = task.dit.num_tokens((t_lat, h, w))
    x_full = make_noise((2, task.dit.in_dim, t_lat, h, w), 1, device=device).to(dtype)
    x, y = x_full[:, : task.dit.out_dim], None  # i2v: noise channels, then mask + image latent as y
    if task.dit.model_type == "i2v":
        y = x_full[:, task.dit.out_dim:]
    t = torch.full((2, num_tokens) if task.dit.model_type == "ti2v" else (2,), 900.0, device=device)
    padded = torch.zeros(2, task.dit.text_len, task.dit.text_dim, device=device, dtype=dtype)
    padded[0, : ctx.shape[0]], padded[1, : ctx_null.shape[0]] = ctx, ctx_null

    def run_ours() -> torch.Tensor:
        with torch.inference_mode():
            return model(x, t, padded, y=y)

    fns: dict[str, Any] = {"ours": run_ours}
    if with_diffusers:
        twin = diffusers_twin(model)

        def run_diffusers() -> torch.Tensor:
            with torch.inference_mode():
                return twin(x_full, t, padded, return_dict=False)[0]

        fns["diffusers"] = run_diffusers
        diff = (run_ours().float() - run_diffusers().float()).abs().max().item()
    times = interleaved(fns, repeats=repeats, warmup=1)
    flops = task.dit.flops_forward(num_tokens, batch=2)
    stats = {name: summarize(ts) for name, ts in times.items()}
    out: dict[str, Any] = {"num_tokens": num_tokens, "flops": flops, "times_s": times, "stats": stats,
                           "tflops": {n: flops / s["median_s"] / 1e12 for n, s in stats.items()}}
    if with_diffusers:
        out["max_abs_diff"] = diff
        out["speedup_vs_diffusers"] = stats["diffusers"]["median_s"] / stats["ours"]["median_s"]
    return out


def tiny_label(name: str) -> str:
    """The report label of a suite case run with the tiny twins: never the real case's name alone
    (a 96x64 CPU run must not read as `01_Speed_Preview_480p`)."""
    return name if name.endswith("-tiny") else f"{name}-tiny"


def run_case(case: GpuCase, *, device: str, dtype: torch.dtype, tiny: bool, max_steps: int, repeats: int,
             compile_config: CompileConfig | None, with_diffusers: bool, out_dir: Path) -> dict[str, Any]:
    """Profile one case end to end; returns its figures and the paths of its report files."""
    task = preset(case.task, tiny=tiny)
    use_compile = compile_config is not None
    steps = min(case.steps, max_steps)
    placement = "none" if use_compile else case.placement
    opts = SamplerOptions.from_config(task.sampler, steps=steps, placement=placement, cfg_mode="batched",
                                      boundary=case.boundary)
    latent_shape = task.latent_shape(case.width, case.height, case.frames)
    label = tiny_label(case.name) if tiny else case.name
    session = ProfileSession(case_name=label, device=device)
    session.set_context(task=task.name, width=case.width, height=case.height, frames=case.frames, steps=steps,
                        placement=placement, dit_dtype=str(dtype).removeprefix("torch."),
                        attention_backend="sdpa",
                        compile=use_compile, cfg_mode="batched", solver=opts.solver, seed=opts.seed)
    compile_stats = []
    with session:
        with stage("Model_Initialization", kind="init", experts=task.num_experts):
            experts = [build_wan_dit(task.dit, device=device, dtype=dtype, seed=k)
                       for k in range(task.num_experts)]
        ctx, ctx_null = random_contexts(task, device=device, dtype=dtype)
        if use_compile:
            handles = [apply_compile(expert, compile_config) for expert in experts]
            t_lat, h, w = latent_shape[1:]
            x = make_noise((2, task.dit.in_dim, t_lat, h, w), 0, device=device).to(dtype)
            t = torch.full((2,), 999.0, device=device)
            for expert, handle in zip(experts, handles, strict=True):
                with torch.inference_mode():
                    handle.warm_up(lambda e=expert: e(x, t, [ctx, ctx_null]))
        plans = []

        def on_plan(plan: Any) -> None:  # placement "auto": record what the memory planner chose
            plans.append(plan)
            session.set_context(placement=plan.placement)

        sample(experts, task, opts, context=ctx, context_null=ctx_null, latent_shape=latent_shape,
               device=device, on_plan=on_plan)
        if use_compile:
            compile_stats = [h.stats().to_dict() for h in handles]
    record = session.record
    files = write_report(record, out_dir / label, basename="report")
    problems = check_report(files["json"])
    summary = summarize_run(record)
    step_times = [s.duration_s for s in record.stages if s.kind == "step-inference"]
    del experts[1:]  # the forward comparison uses the first expert; an offloading placement left it
    experts[0].to(device)  # on the CPU, and the other one would hold the device memory it needs
    forward = forward_comparison(experts[0], task, case, ctx, ctx_null, repeats=repeats,
                                 with_diffusers=with_diffusers)
    if use_compile:
        for h in handles:
            h.remove()
    del experts
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "case": asdict(case), "report_case": label, "task": task.name, "steps_run": steps, "steps_in_suite": case.steps,
        "placement": placement, "placement_chosen": plans[0].label if plans else None,
        "memory_estimate_bytes": plans[0].estimate.total if plans else None,
        "experts_run": sorted({s.expert for s in record.stages if s.kind == "step-inference" and s.expert}),
        "step_inference_s": step_times,
        "s_per_step": summary.s_per_step, "steady_median_s": summary.steady_median_s,
        "steps_tflops": summary.steps_tflops, "mfu_pct": summary.mfu_pct,
        "step_activity_pct": summary.step_activity_pct, "activity_metric": summary.activity_metric,
        "peak_allocated_bytes": summary.peak_allocated_bytes,
        "estimated_suite_denoise_s": None if summary.steady_median_s is None
        else summary.steady_median_s * case.steps,
        "compile": compile_stats, "forward": forward,
        "report_files": {k: str(v) for k, v in files.items()}, "report_problems": problems,
    }


def _row(r: dict[str, Any], peak: float | None, ceiling_tflops: float) -> tuple:
    fwd = r["forward"]
    ours_tf = fwd["tflops"]["ours"]
    return (r["case"]["name"], r["task"], f"{r['case']['width']}x{r['case']['height']}x{r['case']['frames']}",
            f"{r['steps_run']}/{r['steps_in_suite']}", r["placement"], r["steady_median_s"], r["mfu_pct"],
            r["step_activity_pct"], fwd["stats"]["ours"]["median_s"],
            fwd["stats"]["diffusers"]["median_s"] if "diffusers" in fwd["stats"] else None,
            fwd.get("speedup_vs_diffusers"), None if peak is None else 100 * ours_tf / peak,
            100 * ours_tf / ceiling_tflops)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny twins on the CPU (float32)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--cases", nargs="+", default=None, help="case names (default: all)")
    parser.add_argument("--max-steps", type=int, default=4, help="cap on the steps run per case")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the forward comparison")
    parser.add_argument("--compile", action="store_true", help="regional torch.compile (placement none)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (with --compile)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (with --compile)")
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers forward")
    parser.add_argument("--name", default=None, help="results file name (default bench_gpu[_tiny])")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: bench/results")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("bench_gpu needs a CUDA device for real-size runs; use --tiny to run the tiny "
                           "twins on the CPU")
    if args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1; got {args.max_steps}")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    name = args.name or ("bench_gpu_tiny" if args.tiny else "bench_gpu")
    results_dir = args.results_dir or RESULTS_DIR
    cases = suite_cases(TINY_SUITE if args.tiny else SUITE)
    cases += tiny_extra_cases() if args.tiny else list(EXTRA_CASES)
    if args.cases:
        known = {c.name: c for c in cases}
        unknown = sorted(set(args.cases) - set(known))
        if unknown:
            raise ValueError(f"unknown cases {unknown}; expected any of {sorted(known)}")
        cases = [known[n] for n in args.cases]
    compile_config = None
    if args.compile:
        compile_config = CompileConfig(backend=args.compile_backend, mode=args.compile_mode)
    dtype_name = str(dtype).removeprefix("torch.")
    ceiling = measure_matmul_ceiling(device=device, dtype=dtype_name,
                                     sizes=(256, 512) if args.tiny else (4096, 8192), repeats=3)
    peak = lookup_gpu(torch.cuda.get_device_name(0)) if device.startswith("cuda") else None
    peak_tflops = None if peak is None else peak.dense_bf16_tflops
    load_before = load_average()
    results = []
    for case in cases:
        log.info("case %s (%s %dx%dx%d)", case.name, case.task, case.width, case.height, case.frames)
        results.append(run_case(case, device=device, dtype=dtype, tiny=args.tiny, max_steps=args.max_steps,
                                repeats=args.repeats, compile_config=compile_config,
                                with_diffusers=not args.no_diffusers,
                                out_dir=results_dir / f"{name}_reports"))
    rows = [_row(r, peak_tflops, ceiling.best_gflops / 1e3) for r in results]
    table = format_table(["case", "task", "size", "steps", "placement", "s/step", "MFU %", "SM %",
                          "fwd ours s", "fwd diffusers s", "ratio", "fwd MFU %", "fwd % of matmul"], rows)
    print(table)  # noqa: T201 - benchmark scripts print their table
    payload = {"settings": {"device": device, "dtype": dtype_name, "tiny": args.tiny,
                            "max_steps": args.max_steps,
                            "repeats": args.repeats,
                            "compile": None if compile_config is None else asdict(compile_config),
                            "diffusers": not args.no_diffusers, "cases": [c.name for c in cases]},
               "load_average_1m": {"before": load_before, "after": load_average()},
               "datasheet_peak_tflops": peak_tflops, "matmul_ceiling": ceiling.to_dict(),
               "results": results, "table": table}
    path = write_result(name, payload, results_dir=results_dir)
    print(f"wrote {path}")  # noqa: T201
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
