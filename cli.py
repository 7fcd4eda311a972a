"""`wanbench` command line: tiny models, workflow runs (in-process or on a ComfyUI server), suites,
reports and the demo.

    wanbench make-tiny-models DIR
    wanbench run WORKFLOW.api.json [--server URL] [--out DIR] [--models DIR] [--set Node.input=VALUE ...]
                 [--compile MODE] [--tf32] [--weight-dtype STORAGE] [--attention BACKEND]
                 [--nproc N [--parallel cfg|ulysses|cfg+ulysses] [--shard-weights] [--timeout S]
                  [--nnodes M --rdzv-endpoint HOST:PORT --rdzv-id ID [--local-addr ADDR]]]
    wanbench suite SUITE.json [--server URL] --out DIR [--models DIR] [the same model options]
                                                                 (case lists and ladders)
    wanbench report RUN.json ... -o report.md
    wanbench check-report RUN.json
    wanbench demo [--out DIR]

Human output goes to stdout; diagnostics go through logging (stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("wanbench")

PACKAGE_DIR = Path(__file__).resolve().parent
WORKFLOWS_DIR = PACKAGE_DIR / "workflows"
API_WORKFLOWS_DIR = WORKFLOWS_DIR / "api"  # the API twins (ComfyUI's templates are in example_workflows/)
SUITES_DIR = WORKFLOWS_DIR / "suites"
DEMO_WORKFLOW = "tiny_ti2v_5B_t2v.api.json"
DEFAULT_OUT = Path("wanbench_out")


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _find_workflow(name: str) -> Path:
    """A workflow path as given, or a shipped API workflow / suite by file name."""
    for candidate in (Path(name), API_WORKFLOWS_DIR / name, SUITES_DIR / name):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.name for p in API_WORKFLOWS_DIR.glob("*.api.json")) + sorted(
        p.name for p in SUITES_DIR.glob("*.json")
    )
    raise FileNotFoundError(
        f"workflow {name!r} not found as a path nor among the shipped ones ({', '.join(shipped)}); "
        "give a path or one of those names"
    )


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects Node.input=VALUE (e.g. WanBenchSampler.steps=4); got {item!r}")
        try:
            overrides[key] = json.loads(raw)
        except ValueError:
            overrides[key] = raw
    return overrides


# ------------------------------------------------------------------------------------------------
# One workflow
# ------------------------------------------------------------------------------------------------
MODEL_LOADER = "WanBenchModelLoader"


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Wan Model Loader inputs that --compile, --tf32, --weight-dtype and --attention set."""
    options = {"compile": args.compile, "weight_dtype": args.weight_dtype, "attention": args.attention}
    options = {name: value for name, value in options.items() if value is not None}
    if args.tf32:
        options["tf32"] = True
    return options


def apply_model_options(prompt: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Set `options` on every Wan Model Loader of an API prompt (inputs a saved prompt may lack:
    they are optional inputs of the node); an error when the prompt has no such loader."""
    if not options:
        return prompt
    loaders = [node for node in prompt.values() if node.get("class_type") == MODEL_LOADER]
    if not loaders:
        raise ValueError(f"{sorted(options)} set inputs of the Wan Model Loader ({MODEL_LOADER}), which this "
                         "workflow does not have; use --set Node.input=VALUE for other nodes")
    for node in loaders:
        node.setdefault("inputs", {}).update(options)
    return prompt


def run_one(
    workflow: Path,
    *,
    out_dir: Path,
    models: Path | None,
    server: str | None,
    overrides: dict[str, Any],
    frames_case: str | None = None,
    loader_options: dict[str, Any] | None = None,
) -> dict[str, list[str]]:
    """Run one API workflow; returns the files written by kind (`run_results.FILE_KINDS`).

    `frames_case`: on a server, also save the decoded frames as PNG for a suite comparison."""
    from .nodes import NODE_DISPLAY_NAME_MAPPINGS
    from .run_results import FILE_KINDS, FILE_LABELS, node_title
    from .runner import apply_overrides, load_api_workflow, output_files, run_workflow

    prompt = apply_model_options(apply_overrides(load_api_workflow(workflow), overrides), loader_options or {})
    if frames_case is not None and server:
        from .compare import add_frame_saver

        prompt = add_frame_saver(prompt, frames_case)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def title(node: Any) -> str:
        class_type = (prompt.get(str(node)) or {}).get("class_type")
        return node_title(prompt, str(node), NODE_DISPLAY_NAME_MAPPINGS.get(class_type, class_type))

    if server:
        from .client import run_on_server

        def progress(node: Any, value: Any, maximum: Any) -> None:
            _say(f"  {title(node)} (node {node}): {value}/{maximum}")

        files = run_on_server(prompt, server, out_dir, on_progress=progress).files
    else:
        from .nodes.context import Bridge

        def starting(node_id: str, name: str, position: int, count: int) -> None:
            _say(f"  [{position}/{count}] {name} (node {node_id})")

        bridge = Bridge.for_models_root(models if models is not None else out_dir / "models", out_dir)
        files = output_files(run_workflow(prompt, bridge, on_node=starting), out_dir)
    _say(f"{workflow.name}: done in {time.perf_counter() - started:.1f} s")
    for kind in FILE_KINDS:
        for path in files.get(kind, []):
            _say(f"  {FILE_LABELS[kind]}: {path}")
    return files


def _prepare_models(args: argparse.Namespace) -> Path:
    """The models folder of an in-process run; with --make-tiny-models, filled with the tiny models."""
    models = Path(args.models) if args.models else Path(args.out) / "models"
    if args.make_tiny_models:
        from .tiny_models import make_tiny_models

        make_tiny_models(models, seed=0, overwrite=False)
    return models


def cmd_run(args: argparse.Namespace) -> int:
    from .launch import launched_by_torchrun
    from .util.atomic import atomic_write_text

    if args.nproc < 1 or args.nnodes < 1:
        raise ValueError(f"--nproc and --nnodes must be >= 1; got {args.nproc} and {args.nnodes}")
    if launched_by_torchrun() or args.nproc > 1 or args.nnodes > 1:
        if args.files_json:
            raise ValueError("--files-json lists the files of a single-process run; drop it with --nproc/torchrun")
        return _run_parallel(args)
    if args.parallel is not None or args.shard_weights:
        raise ValueError(
            "--parallel and --shard-weights split a run across processes; add --nproc N (N >= 2), "
            "or start the command with torchrun"
        )
    files = run_one(
        _find_workflow(args.workflow),
        out_dir=Path(args.out),
        models=None if args.server else _prepare_models(args),
        server=args.server,
        overrides=_parse_set(args.set),
        loader_options=model_options(args),
    )
    if args.files_json:
        atomic_write_text(Path(args.files_json), json.dumps(files, indent=1) + "\n")
    return 0


def _run_parallel(args: argparse.Namespace) -> int:
    """`run` on several ranks: started here with the elastic launcher, or as one rank under torchrun."""
    from .launch import DEFAULT_PARALLEL, LaunchOptions, RankJob, launch_run, launched_by_torchrun, run_rank
    from .runner import apply_overrides, load_api_workflow

    if args.server:
        raise ValueError("--nproc runs the workflow in this machine's processes; it cannot be combined with --server")
    if launched_by_torchrun() and args.make_tiny_models:
        raise ValueError("--make-tiny-models under torchrun would have every rank write the same files; make "
                         "them first with `wanbench make-tiny-models DIR` and pass --models DIR")
    workflow = _find_workflow(args.workflow).resolve()
    prompt = apply_model_options(apply_overrides(load_api_workflow(workflow), _parse_set(args.set)),
                                 model_options(args))
    job = RankJob(
        workflow_name=workflow.name,
        prompt=prompt,
        out_dir=Path(args.out).resolve(),
        models=_prepare_models(args).resolve(),
        parallel=args.parallel or DEFAULT_PARALLEL,
        shard_weights=args.shard_weights,
        timeout_s=args.timeout,
        verbose=args.verbose,
    )
    started = time.perf_counter()
    if launched_by_torchrun():
        if args.nproc > 1 or args.nnodes > 1:
            raise ValueError("this process is already one rank started by torchrun; drop --nproc and --nnodes")
        files = run_rank(job)
    else:
        options = LaunchOptions(
            nproc=args.nproc,
            nnodes=args.nnodes,
            rdzv_endpoint=args.rdzv_endpoint,
            rdzv_id=args.rdzv_id,
            local_addr=args.local_addr,
        )
        files = launch_run(job, options)
        if files is None:
            _say(f"{workflow.name}: this machine's ranks finished; rank 0 ran on another machine and "
                 "wrote the outputs there")
            return 0
    if files["videos"] or files["reports"]:
        _say(f"{workflow.name}: done in {time.perf_counter() - started:.1f} s ({job.parallel}"
             f"{', sharded weights' if job.shard_weights else ''})")
    from .run_results import FILE_KINDS, FILE_LABELS

    for kind in FILE_KINDS:
        for path in files.get(kind, []):
            _say(f"  {FILE_LABELS[kind]}: {path}")
    return 0


# ------------------------------------------------------------------------------------------------
# Suites
# ------------------------------------------------------------------------------------------------
def load_suite(path: Path) -> dict[str, Any]:
    """A suite file, checked: a case list {'name', 'cases': [{'name', 'workflow', 'overrides'}],
    'comparisons' (optional): [{'title', 'baseline', 'candidate'}] naming two cases that run the same
    job}, or a ladder (`suites.py`)."""
    from .compare import check_comparisons
    from .suites import is_ladder, load_suite_file

    suite = load_suite_file(path)
    if not is_ladder(suite):
        suite["comparisons"] = check_comparisons(suite, str(path))
    return suite


def cmd_suite(args: argparse.Namespace) -> int:
    from .suites import is_ladder
    from .util.atomic import atomic_write_text

    path = _find_workflow(args.suite)
    suite = load_suite(path)
    out_dir = Path(args.out)
    models = None if args.server else _prepare_models(args)
    if is_ladder(suite):
        if model_options(args):
            raise ValueError(f"{sorted(model_options(args))} would override every row of the ladder {path.name}; "
                             "a ladder sets them per row: put them in its baseline or rows settings instead")
        return _run_ladder_suite(path, suite, out_dir, models, args.server)
    reports: list[str] = []
    failed: list[tuple[str, str]] = []
    case_files: dict[str, dict[str, list[str]]] = {}
    compared = {name for spec in suite["comparisons"] for name in (spec["baseline"], spec["candidate"])}
    for case in suite["cases"]:
        _say(f"== case {case['name']}")
        try:
            files = run_one(
                (path.parent / case["workflow"]).resolve(),
                out_dir=out_dir / case["name"],
                models=models,
                server=args.server,
                overrides=dict(case.get("overrides", {})),
                frames_case=case["name"] if case["name"] in compared else None,
                loader_options=model_options(args),
            )
            if not files["reports"]:
                raise RuntimeError("the case wrote no report JSON (is Wan Benchmark Report in the workflow?)")
            reports += files["reports"]
            case_files[case["name"]] = files
        except Exception as err:  # noqa: BLE001 - deliberate: whatever one case raises (a server
            # error, a bad override, a bug in a node) must not stop the other cases; the full
            # traceback is logged and the case is listed as failed in the combined report.
            log.error("case %s failed: %s", case["name"], describe_error(err), exc_info=err)
            failed.append((case["name"], describe_error(err)))
    if reports or failed:
        combined = out_dir / f"{suite.get('name', 'suite')}_report.md"
        out_dir.mkdir(parents=True, exist_ok=True)
        text = combined_report(reports, failed)
        if suite["comparisons"]:
            text = text.rstrip("\n") + "\n\n" + comparison_section(suite["comparisons"], case_files)
        atomic_write_text(combined, text)
        _say(f"combined report: {combined}")
    for name, why in failed:
        _say(f"FAILED {name}: {why}")
    _say(f"{len(suite['cases']) - len(failed)}/{len(suite['cases'])} cases passed")
    return 1 if failed else 0


def comparison_section(specs: Sequence[dict[str, str]], case_files: dict[str, dict[str, list[str]]]) -> str:
    """The suite's side-by-side section; a pair whose case failed is listed with the reason."""
    from .compare import compare_cases
    from .profiling.comparison import render_comparisons

    made, missing = [], []
    for spec in specs:
        try:
            result = compare_cases(spec, case_files)
        except (ValueError, OSError) as err:  # an unreadable report or video: say so, keep the rest
            result = f"{spec['title']}: {type(err).__name__}: {err}"
        if isinstance(result, str):
            missing.append(result)
        else:
            made.append(result)
    text = render_comparisons(made) if made else "## Runtimes side by side\n\n"
    if missing:
        text = text.rstrip("\n") + "\n\n" + "\n".join(f"- Not compared: {m}" for m in missing) + "\n"
    return text


def _run_ladder_suite(path: Path, suite: dict[str, Any], out_dir: Path, models: Path | None,
                      server: str | None) -> int:
    """A ladder suite: every row (fresh process or cleared server caches), then the comparison."""
    from .ladders import run_ladder
    from .suites import parse_ladder

    ladder = parse_ladder(suite, path)
    json_path, failed = run_ladder(ladder, out_dir=out_dir, models=models, server=server, say=_say)
    _say(f"ladder: {json_path.with_suffix('.md')} (and {json_path.name})")
    _say(f"{len(ladder.rows) - failed}/{len(ladder.rows)} rows ran or were skipped with a reason")
    return 1 if failed else 0


def combined_report(reports: Sequence[str], failed: Sequence[tuple[str, str]]) -> str:
    """The suite's Markdown: the merged runs, then a section listing every failed case and why."""
    from .profiling import merge_reports
    from .profiling.formatting import markdown_text

    text = merge_reports(reports) if reports else "# Benchmark report\n\nNo case finished.\n"
    if failed:
        lines = ["", "## Failed cases", "", "| case | status | error |", "| --- | --- | --- |"]
        lines += [f"| {markdown_text(name)} | FAILED | {markdown_text(why)} |" for name, why in failed]
        text = text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"
    return text


# ------------------------------------------------------------------------------------------------
# Reports, tiny models, demo
# ------------------------------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from .profiling import merge_reports
    from .util.atomic import atomic_write_text

    text = merge_reports([Path(p) for p in args.runs])
    if args.output:
        atomic_write_text(Path(args.output), text)
        _say(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_check_report(args: argparse.Namespace) -> int:
    from .profiling import check_report

    worst = 0
    for path in args.runs:
        problems = check_report(Path(path))
        for problem in problems:
            _say(f"{path}: {problem}")
        _say(f"{path}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        worst = max(worst, 1 if problems else 0)
    return worst


def cmd_make_tiny_models(args: argparse.Namespace) -> int:
    from .tiny_models import make_tiny_models

    made = make_tiny_models(Path(args.dir), seed=args.seed, gguf=args.gguf)
    for path in made.all_files():
        _say(str(path))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .tiny_models import make_tiny_models

    out_dir = Path(args.out)
    started = time.perf_counter()
    models = make_tiny_models(out_dir / "models", seed=0, overwrite=False)
    _say(f"tiny models in {models.root}")
    files = run_one(
        API_WORKFLOWS_DIR / DEMO_WORKFLOW, out_dir=out_dir, models=models.root, server=None, overrides={}
    )
    _say(f"demo finished in {time.perf_counter() - started:.1f} s; outputs are in {out_dir.resolve()}")
    for markdown in files["markdown"]:
        _say(f"open {markdown} for the benchmark report")
    if files["reports"] and not files["charts"]:
        _say(
            "chart: skipped (matplotlib is not installed); "
            "pip install matplotlib (or the pack's [chart] extra) and run the demo again"
        )
    return 0


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """--models and --make-tiny-models (in-process runs), and the Wan Model Loader options, shared by
    `run` and `suite`."""
    from .wan_core.attention import BACKEND_CHOICES
    from .wan_core.config import COMPILE_CHOICES, WEIGHT_STORAGES

    p.add_argument("--models", help="models folder for in-process runs (default OUT/models)")
    p.add_argument(
        "--make-tiny-models",
        action="store_true",
        help="first write the tiny models into the models folder (kept when present)",
    )
    p.add_argument("--compile", choices=COMPILE_CHOICES, help="regional torch.compile of the DiT blocks (mode)")
    p.add_argument("--tf32", action="store_true", help="TF32 tensor cores for float32 matmuls while sampling")
    p.add_argument("--weight-dtype", choices=WEIGHT_STORAGES, help="how the DiT block matrices are kept")
    p.add_argument("--attention", choices=BACKEND_CHOICES, help="attention backend ('auto' measures)")


def _add_parallel_options(p: argparse.ArgumentParser) -> None:
    """--nproc and the options of parallel runs (docs/distributed.md)."""
    from .wan_core.config import PARALLEL_MODES

    g = p.add_argument_group("parallel runs (torch.distributed; docs/distributed.md)")
    g.add_argument("--nproc", type=int, default=1, help="ranks on this machine (1: today's single-process run)")
    g.add_argument(
        "--parallel",
        choices=PARALLEL_MODES,
        help="how the ranks share a step: cfg (2 ranks), ulysses (token split; the default), cfg+ulysses (2k)",
    )
    g.add_argument(
        "--shard-weights", action="store_true", help="split every block's weights across the ranks (FSDP2)"
    )
    g.add_argument("--nnodes", type=int, default=1, help="machines taking part (each runs the same command)")
    g.add_argument("--rdzv-endpoint", help="HOST:PORT where the machines meet (c10d rendezvous); with --nnodes > 1")
    g.add_argument("--rdzv-id", help="the same run name on every machine; with --nnodes > 1")
    g.add_argument("--local-addr", help="this machine's address as the other machines reach it (default: host name)")
    g.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds a rank waits for the others before the run fails (default 600)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanbench", description="Wan2.2 runs and benchmark reports.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of every node")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "make-tiny-models", help="write tiny random-weight checkpoints in ComfyUI's file layouts"
    )
    p.add_argument("dir", help="models folder to fill (diffusion_models/, text_encoders/, vae/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gguf", action="store_true",
                   help="also write tiny GGUF files (Q8_0 TI2V DiT and UMT5, Q4_K_M DiT; needs `pip install gguf`)")
    p.set_defaults(func=cmd_make_tiny_models)

    p = sub.add_parser("run", help="run an API-format workflow (in-process, or on a server with --server)")
    p.add_argument("workflow")
    p.add_argument("--server", help="ComfyUI URL, e.g. http://127.0.0.1:8188")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="where outputs go (and are fetched to)")
    _add_model_options(p)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NODE.INPUT=VALUE",
        help="override an input, by node type or id (repeatable)",
    )
    p.add_argument("--files-json", help="also write the paths of the files the run wrote to this JSON file")
    _add_parallel_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "suite", help="run every case of a benchmark suite (or every row of a ladder), then one combined report"
    )
    p.add_argument("suite")
    p.add_argument("--server")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    _add_model_options(p)
    p.set_defaults(func=cmd_suite)

    p = sub.add_parser("report", help="merge run JSON files into one Markdown report")
    p.add_argument("runs", nargs="+")
    p.add_argument("-o", "--output")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("check-report", help="check report JSON files for inconsistencies")
    p.add_argument("runs", nargs="+")
    p.set_defaults(func=cmd_check_report)

    p = sub.add_parser("demo", help="tiny models + the tiny TI2V workflow on CPU; writes ./wanbench_out/")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .runner import NODE_ERRORS

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except NODE_ERRORS as err:
        log.error("%s", describe_error(err), exc_info=args.verbose)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a short message and the shell convention 128 + SIGINT, no traceback
        log.error("interrupted: the run stopped before its end (its files are written whole or not at all)",
                  exc_info=args.verbose)
        return 130


def describe_error(err: BaseException) -> str:
    """For the user: the node that raised (when a workflow node did), the type and the message; a
    refused workflow lists each problem on its own line (node title, input, message)."""
    from .runner import describe_error as describe

    return describe(err)


if __name__ == "__main__":
    sys.exit(main())
