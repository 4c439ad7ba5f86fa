"""The `study` command: info, data synth, plan, run, results."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def cmd_info(args) -> int:
    from studylib.core.model import layer_summary

    print(layer_summary(args.model))
    return 0


def cmd_data_synth(args) -> int:
    from studylib.data.sources import synth_spec
    from studylib.data.synth import write_synthetic

    spec = synth_spec(
        {
            k: v
            for k, v in vars(args).items()
            if k in ("seed", "pets", "unlabeled", "intel_train_per_class", "intel_test_per_class") and v is not None
        }
    )
    for name, path in write_synthetic(args.root, spec, progress=True).items():
        print(f"{name}: {path}")
    return 0


def cmd_data_check(args) -> int:
    import json

    from studylib.data.check import check

    print(json.dumps(check(args.kind, args.root), indent=2))
    return 0


def cmd_data_get(args) -> int:
    from studylib.data import download

    if args.kind == "pets":
        print(download.get_pets(args.root))
    else:
        if not (args.url and args.sha256):
            print("study: error: intel needs --url (a mirror of the Kaggle archive) and --sha256", file=sys.stderr)
            return 2
        print(download.get_archive(args.url, args.root, args.sha256))
    return 0


def checked_plan(params: str):
    """(config, plan) of a parameter file, the plan checked against the data that is there (every size and
    folder, all problems at once) before anything else happens."""
    from studylib.study import checks, config, grid

    cfg = config.load(params)
    plan = grid.plan(cfg)
    checks.ensure(cfg, plan)
    return cfg, plan


def cmd_plan(args) -> int:
    from studylib.study import grid, store

    cfg, plan = checked_plan(args.params)
    if args.power:
        return print_power(cfg, plan, args)
    states = store.states(plan, args.runs)
    for r in plan:
        print(f"{states[r.id]:7s} {r.describe()}")
    for stage in grid.STAGES:
        runs = [r for r in plan if r.stage == stage]
        todo = [r for r in runs if states[r.id] != "done"]
        steps = sum(grid.image_steps(r) for r in todo)
        print(f"{stage}: {len(runs)} runs ({len(todo)} to do), {steps:,} image-steps to do")
    if args.estimate:
        print_estimate(cfg, [r for r in plan if states[r.id] != "done"], args.runs)
    return 0


def print_power(cfg, plan: list, args) -> int:
    """Per part of every finding: the minimal detectable effect at 80% power with the study's seeds, the power
    at the measured (or given, or the paper's) effect and the seeds that effect needs."""
    import json

    from studylib.analysis.power import format_power, power_table
    from studylib.analysis.tables import collect

    rows = power_table(cfg, collect(args.runs, plan), effect=args.effect)
    print(json.dumps([r.to_dict() for r in rows], indent=1) if args.json else format_power(rows))
    return 0


def print_estimate(cfg, todo: list, runs: str) -> None:
    """The predicted wall time of the runs to do, from this device's stored bench rates (measured and stored
    first when there are none)."""
    from studylib.study import bench, config, estimate
    from studylib.study import rates as stored

    rates = stored.load_rates(runs, cfg.device)
    if rates is None:
        print(f"\nno bench rates of this device in {runs}/bench: measuring them first (a few minutes)")
        rates = bench.bench(cfg.device, cache=Path(runs).resolve() / "cache")
        print(f"rates: {stored.save_rates(runs, rates)}")
    kind = rates["device_type"]
    memory = estimate.memory_of(kind) if kind == config.device_type(cfg.device) else None  # this machine's
    df = estimate.estimate(todo, rates, cfg.engine, cfg.workers, cfg.executor, memory)
    print(f"\nestimated wall time of the runs to do ({estimate.count(cfg.workers, 'worker')}):")
    print(estimate.format_estimate(df, rates, todo))
    groups = estimate.fitted_schedule(todo, cfg.engine, kind, cfg.workers, cfg.executor, memory)
    table = estimate.memory_table(groups, cfg.engine.fused(kind), memory)
    print(f"\nmemory per group on the {'GPU' if kind == 'cuda' else 'CPU'} (device: images once + each member):")
    print(estimate.format_memory(table, memory, kind))


def cmd_bench(args) -> int:
    import json

    from studylib.study import bench, rates

    cache = Path(args.runs).resolve() / "cache" if args.runs else None
    result = bench.bench(args.device, smoke=args.smoke, model=args.model, cache=cache)
    print(json.dumps(result, indent=2) if args.json else bench.table(result))
    if args.runs:  # the path goes to stderr under --json, so stdout stays one JSON document
        print(f"rates: {rates.save_rates(args.runs, result)}", file=sys.stderr if args.json else sys.stdout)
    elif result.get("precision_auto"):
        print("precision auto reads these verdicts from a run store: add --runs RUNS to keep them", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    from studylib.study import grid

    cfg, plan = checked_plan(args.params)
    if args.until_decided:
        return _run_until_decided(args, cfg)
    per_stage = ", ".join(f"{sum(r.stage == s for r in plan)} {s}" for s in grid.STAGES)
    print(f"{cfg.name}: {len(plan)} stage runs ({per_stage}) into {args.runs}/")
    return _after_runs(args, cfg, plan, _execute(args, cfg, plan), args.params)


def _execute(args, cfg, plan):
    """Run the plan's unfinished runs as the file and the command line say -> the runner's Summary."""
    from studylib.study import config, runner

    cache = str(Path(cfg.data.cache).resolve()) if cfg.data.cache else ""
    summary = runner.execute(
        plan,
        args.runs,
        device=args.device or cfg.device,
        cache=cache,
        workers=args.workers or cfg.workers,
        executor=args.executor or cfg.executor,
        cluster=cfg.cluster,
        timeouts=config.to_dict(cfg.timeouts),
        engine=config.to_dict(cfg.engine),
    )
    print(summary.line())
    return summary


def _run_until_decided(args, cfg) -> int:
    """Rounds of seeds with a group-sequential look after each (studylib.study.rounds)."""
    from studylib.analysis.power import design_keys
    from studylib.analysis.sequential import boundary_text, decide
    from studylib.analysis.tables import collect
    from studylib.study import grid, rounds

    max_seeds = args.max_seeds or max(16, len(cfg.grid.seeds))
    print(
        f"{cfg.name}: until decided, {len(cfg.grid.seeds)} seeds then {args.round_seeds} per round, at most "
        f"{max_seeds}{f', budget {args.budget / 60:.1f} min' if args.budget else ''}; boundary: "
        f"{boundary_text(max_seeds)}"
    )
    state = {}

    def run_round(round_cfg):
        state["plan"] = grid.plan(round_cfg)
        print(f"round of {len(round_cfg.grid.seeds)} seeds: {len(state['plan'])} stage runs")
        return _execute(args, round_cfg, state["plan"])

    def look(round_cfg, looks):  # every part's verdict after the looks so far, from the runs in the store
        return decide(collect(args.runs, grid.plan(round_cfg)), looks, max_seeds, keys=design_keys(round_cfg.grid))

    outcome = rounds.until_decided(cfg, run_round, look, max_seeds, args.round_seeds, args.budget)
    if outcome.decision is not None:
        print("\n" + outcome.decision.report())
        print(f"looks and verdicts: {rounds.write_report(args.runs, cfg.name, outcome)}")
    if outcome.reason == "budget" and outcome.decision is None:
        print("study: error: the budget ended before the first look", file=sys.stderr)
        return 1
    n = outcome.n or len(cfg.grid.seeds)
    if outcome.decision is not None and len(outcome.decision.looks) > 1:
        print(
            f"\nnote: the findings below test each part at the fixed 95% level, as if {n} seeds had been planned; "
            f"after {len(outcome.decision.looks)} looks only the sequential verdicts above keep the 2.5% error rate"
        )
    params = rounds.write_params(args.params, cfg, n, args.runs)
    print(f"the study's parameters with its {n} seeds: {params}")
    round_cfg = rounds.with_seeds(cfg, n)
    return _after_runs(args, round_cfg, grid.plan(round_cfg), outcome.summary, str(params))


def _after_runs(args, cfg, plan, summary, params: str) -> int:
    """What a finished `study run` prints and writes: the tables, the findings, the results notebook, and the
    next step that fits what happened."""
    again = _run_again(args)
    if summary.interrupted or summary.not_started:
        print(_interrupted_line(summary, again), file=sys.stderr)
        return 130
    if not summary.finished and (summary.failed or summary.blocked):
        print(
            f"study: error: no run finished ({len(summary.failed)} failed, {len(summary.blocked)} skipped because a "
            f"parent failed): fix what each failed run's error.json says, then resume with `{again}`",
            file=sys.stderr,
        )
        return _list_failed(summary, args.runs)
    from studylib.analysis.claims import claims_summary
    from studylib.analysis.render import format_tables
    from studylib.analysis.tables import collect
    from studylib.analysis.vocabulary import select

    df = collect(args.runs, plan)
    print()
    print(format_tables(df))
    if len(df):
        print("\nthe paper's findings on these runs (mIoU; `study results` has every number):")
        print(claims_summary(select(df), "miou").to_string(index=False))
    if not args.no_notebook:
        from studylib.study.execution import NotebookTimeout

        try:
            out = write_results_notebook(args.runs, params, cfg.name, cfg.timeouts.cell)
            print(f"\nresults notebook: {out}")
        except NotebookTimeout as e:
            print(
                f"study: error: the results notebook did not finish: {e} The runs are finished and kept; "
                f"`study results {params}` prints the same tables.",
                file=sys.stderr,
            )
            return 1
    if not summary.ok:
        print(f"next: fix the failed runs (each one's error.json), then `{again}`: finished runs are kept")
        return _list_failed(summary, args.runs)
    print(
        f"next: `study geometry {params}` measures the encoders' patch tokens, then "
        f"`study report {params}` writes {Path(args.runs) / f'report-{cfg.name}.html'} "
        "(make study does both)"
    )
    return 0


def _run_again(args) -> str:
    """The `study run` command that resumes this one (finished runs are kept)."""
    extra = [f"--{k} {v}" for k in ("device", "workers", "executor") if (v := getattr(args, k, None))]
    return " ".join(["study run", args.params, "--runs", args.runs, *extra])


def _interrupted_line(summary, again: str) -> str:
    stopped, runs = summary.stopped, len(summary.interrupted)
    parts = [f"{stopped} group{'s' * (stopped != 1)} stopped ({runs} run{'s' * (runs != 1)})"]
    if summary.not_started:
        parts.append(f"{summary.not_started} run{'s' * (summary.not_started != 1)} not started")
    parts.append(f"{summary.finished} finished runs kept")
    return f"study: interrupted: {', '.join(parts)}; resume with `{again}`"


def _list_failed(summary, runs: str) -> int:
    for rid in summary.failed:
        print(f"failed: {rid} (see {runs}/*/{rid}/error.json)", file=sys.stderr)
    return 1


def write_results_notebook(runs: str, params: str, name: str, cell_timeout: float = 600) -> Path:
    """Execute the results notebook into the run store, in batch: static figures, no widgets (nothing
    would show them, and widget messages are what hung batch runs under ipykernel 7)."""
    from studylib.study.execution import run_notebook
    from studylib.study.runner import NOTEBOOK_DIR

    out = Path(runs) / f"results-{name}.ipynb"
    run_notebook(
        NOTEBOOK_DIR / "results.ipynb",
        out,
        {"runs_dir": str(Path(runs).resolve()), "params_file": str(Path(params).resolve()), "interactive": False},
        cell_timeout=cell_timeout,
    )
    return out


def cmd_results(args) -> int:
    if args.paper:
        from studylib.analysis.render import render_paper

        print(render_paper(args.format), end="" if args.format == "text" else "\n")
        return 0
    from studylib.analysis.render import render
    from studylib.analysis.tables import collect
    from studylib.study import config, grid

    plan = grid.plan(config.load(args.params)) if args.params else None
    print(render(collect(args.runs, plan), args.format))
    return 0


def cmd_geometry(args) -> int:
    from studylib.analysis import encoders
    from studylib.analysis.geometry import GeometrySettings
    from studylib.study import config, grid

    cfg = config.load(args.params)
    # the study's protocol decides how the geometry is measured (paper: as the authors' diagnostics)
    settings = GeometrySettings.for_study(cfg, **({"layers": args.layers} if args.layers else {}))
    print(
        f"{cfg.name}: geometry under protocol {settings.protocol} "
        f"(reports: {encoders.geometry_file(settings.protocol)}; settings recorded in each)"
    )
    encoders.compute(args.runs, grid.plan(cfg), n_images=args.images, device=args.device, settings=settings)
    return 0


def cmd_report(args) -> int:
    from studylib.study import config, grid
    from studylib.views import report

    cfg = config.load(args.params)
    out = Path(args.out or Path(args.runs) / f"report-{cfg.name}.html")
    print(f"report: {report.write(args.runs, grid.plan(cfg), out, f'{cfg.name}: ViNy self-supervised learning study')}")
    return 0


def _duration(text: str) -> float:
    """'30m', '2h', '90s' or a number of seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        return float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: write e.g. 30m, 2h or 90s") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="study", description="The ViNy self-supervised learning study.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="layer summary and exact parameter count of a model")
    s.add_argument("model", nargs="?", default="viny")
    s.set_defaults(fn=cmd_info)

    d = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    s = d.add_parser("synth", help="write the synthetic datasets in the real layouts")
    s.add_argument("root")
    for flag in ("seed", "pets", "unlabeled", "intel-train-per-class", "intel-test-per-class"):
        s.add_argument(f"--{flag}", type=int)
    s.set_defaults(fn=cmd_data_synth)
    s = d.add_parser("check", help="counts, classes, trimap values, sizes, modes and unreadable files, as JSON")
    s.add_argument("kind", choices=["pets", "intel", "images"])
    s.add_argument("root")
    s.set_defaults(fn=cmd_data_check)
    s = d.add_parser("get", help="download a dataset (pets through torchvision; intel from a mirror URL)")
    s.add_argument("kind", choices=["pets", "intel"])
    s.add_argument("root")
    s.add_argument("--url", help="intel: URL of a zip/tar of the Kaggle archive")
    s.add_argument("--sha256", help="intel: the archive's SHA-256")
    s.set_defaults(fn=cmd_data_get)

    for name, fn, text in (
        ("plan", cmd_plan, "list the runs of a study and their state"),
        ("run", cmd_run, "run every unfinished stage run of a study"),
    ):
        s = sub.add_parser(name, help=text)
        s.add_argument("params", help="parameter file, e.g. params/demo.yaml")
        s.add_argument("--runs", default="runs", help="run store (default: runs/)")
        if name == "plan":
            s.add_argument(
                "--estimate",
                action="store_true",
                help="predicted wall time per stage from this device's bench rates in RUNS/bench "
                "(`study bench` runs first when there are none)",
            )
            s.add_argument(
                "--power",
                action="store_true",
                help="per part of every finding: the smallest effect the study's seeds detect with 80%% power, the "
                "power at the measured (else --effect, else the paper's) effect and the seeds it needs",
            )
            s.add_argument("--effect", type=float, help="with --power: the effect to size for, in each part's unit")
            s.add_argument("--json", action="store_true", help="with --power: a JSON list of objects")
        if name == "run":
            s.add_argument("--device", choices=["auto", "cpu", "cuda"])
            s.add_argument("--workers", type=int, help="stage runs at once (default: the file's `workers`)")
            s.add_argument(
                "--executor",
                choices=["local", "slurm", "submitit-local"],
                help="where runs execute (default: the file's `executor`)",
            )
            s.add_argument("--no-notebook", action="store_true", help="skip the executed results notebook")
            s.add_argument(
                "--until-decided",
                action="store_true",
                help="add seeds in rounds until every part of every finding is decided (a group-sequential "
                "boundary keeps each part's false-'supported' rate at 2.5%%), --max-seeds is reached or --budget ends",
            )
            s.add_argument("--budget", type=_duration, default=0.0, help="with --until-decided: e.g. 30m, 2h, 90s")
            s.add_argument("--max-seeds", type=int, help="with --until-decided: the most seeds (default 16)")
            s.add_argument("--round-seeds", type=int, default=2, help="with --until-decided: seeds added per round")
        s.set_defaults(fn=fn)

    s = sub.add_parser(
        "bench", help="training images/s of the authors' loop, a single run and fused groups on this device"
    )
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--model", help="default: viny on a GPU, viny-tiny on a CPU (and with --smoke)")
    s.add_argument("--smoke", action="store_true", help="the tiny model and a few steps: a check, not a measurement")
    s.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    s.add_argument("--runs", help="store the rates in this run store (RUNS/bench/<device>.json)")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser(
        "geometry",
        help="patch-token geometry of every encoder of a study, into the run store, measured as the "
        "study's protocol says (paper: as the authors' diagnostics, into geometry-paper.json)",
    )
    s.add_argument("params")
    s.add_argument("--runs", default="runs")
    s.add_argument(
        "--images",
        type=int,
        help="images to measure on (default: the protocol's: clean 256 of the study's test split, "
        "paper 2048 Pets trainval images)",
    )
    s.add_argument(
        "--layers",
        choices=["all", "output"],
        help="every block and the output, or the final tokens only (default: the protocol's: clean all, paper output)",
    )
    s.add_argument("--device", default="cpu")
    s.set_defaults(fn=cmd_geometry)

    s = sub.add_parser("report", help="one self-contained HTML report (results, geometry, gallery)")
    s.add_argument("params")
    s.add_argument("--runs", default="runs")
    s.add_argument("--out", help="default: <runs>/report-<name>.html")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("results", help="the paper's tables from the finished runs")
    s.add_argument("params", nargs="?", help="only the runs of this parameter file")
    s.add_argument("--runs", default="runs")
    s.add_argument("--format", choices=["text", "markdown", "csv", "json"], default="text")
    s.add_argument(
        "--paper",
        action="store_true",
        help="the paper's findings tested on the paper's own table, every part with its numbers "
        "(needs no runs; params and --runs are ignored)",
    )
    s.set_defaults(fn=cmd_results)
    return p


def main(argv: list[str] | None = None) -> int:
    from studylib.data.readers import DataError
    from studylib.study.config import ParamError
    from studylib.study.store import StoreError

    args = parser().parse_args(argv)
    try:
        rc = args.fn(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return rc
    except (ParamError, DataError, StoreError, FileNotFoundError, FileExistsError) as e:
        for line in str(e).splitlines():  # a plan's problems come all at once, one per line
            print(f"study: error: {line}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `study plan ... | head`: the reader went away; stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the unflushed rest goes nowhere at exit
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the closed pipe
    except KeyboardInterrupt:  # Ctrl-C outside the runs (the runner handles its own)
        print("study: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
