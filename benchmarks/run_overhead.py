"""Where a finished study's wall time went, per stage: the training epochs (train_log.jsonl) against the
wall time of the kernels that ran them (provenance.json: one wall time per group, shared by its members).
What is not training - kernel start, imports, data loading, evaluation, papermill writing the notebook - is
the overhead, given per run.

With --workers and a bench result (`study bench --device cpu --json > rates.json`, run in the same session),
also the run phase against the bare step: from the first group's start to the last one's end (provenance),
the seconds its image-steps would take at the bench's single-run rate of their stage, over the workers'
seconds (workers x the run phase). 1.0 would be every worker training at the bare-step rate all the time;
kernel starts, evaluation, checkpoints and workers idle while runs wait for their parents all count against it.
Two bare-step rates where the bench has both: `single` (one copy, the other cores idle) and `single-busy` (a
copy per core at once, as the study's workers run: they share the caches and the memory bandwidth).

    python benchmarks/run_overhead.py --runs runs [--json] [--rates before.json [after.json] --workers 2]

A shared machine's speed drifts (on the 2-core development machine two benches 20 minutes apart differed by 8%):
give a bench from before and one from after the run; their rates are averaged, and the drift is printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _training_seconds(run: Path) -> float:
    log = run / "train_log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return sum(json.loads(ln).get("seconds", 0.0) for ln in lines if ln.strip())


def _kernel(run: Path) -> str:
    group = run / "group.json"
    return json.loads(group.read_text())["group"] if group.exists() else run.name  # a group of one


def stage_overhead(runs: Path, stage: str) -> dict | None:
    """Runs, kernels, kernel wall seconds, training seconds and the overhead per run of one stage."""
    done = [d for d in sorted((runs / stage).glob("*")) if (d / "metrics.json").exists()]
    done = [d for d in done if (d / "provenance.json").exists()]
    if not done:
        return None
    walls: dict[str, float] = {}
    for d in done:  # members of a group share the group's wall time: count it once
        walls[_kernel(d)] = json.loads((d / "provenance.json").read_text())["wall_seconds"]
    wall, train = sum(walls.values()), sum(_training_seconds(d) for d in done)
    return {
        "stage": stage,
        "runs": len(done),
        "kernels": len(walls),
        "kernel_wall_s": round(wall, 1),
        "training_s": round(train, 1),
        "overhead_per_run_s": round((wall - train) / len(done), 2),
    }


def _run(folder: Path):
    from studylib.study.grid import Run

    p = json.loads((folder / "params.json").read_text())
    return Run(p["stage"], p["parameters"], labels=p.get("labels", {}))


def run_phase(runs: Path, rates: dict, workers: int) -> dict:
    """The run phase's wall seconds, the image-steps it trained, the seconds they take at the bench's bare-step
    rates per stage (intermediate runs at the segmentation rate: the same encoder step with a smaller head), and
    that ideal over workers x the wall seconds: against `single` (bare_step_share) and, where the bench has it,
    `single-busy` (busy_step_share)."""
    from studylib.study.grid import image_steps

    started, ended, steps = [], [], {}
    for stage in ("pretrain", "intermediate", "segment"):
        for d in sorted((runs / stage).glob("*")):
            if not (d / "provenance.json").exists() or not (d / "metrics.json").exists():
                continue
            prov = json.loads((d / "provenance.json").read_text())
            started.append(prov["started"])
            ended.append(prov["ended"])
            steps[stage] = steps.get(stage, 0) + image_steps(_run(d))
    wall = max(ended) - min(started)
    out = {"workers": workers, "run_phase_s": round(wall, 1), "image_steps": sum(steps.values())}
    for what, key in (("single", "bare_step"), ("single-busy", "busy_step")):
        ideal = _ideal_seconds(steps, rates, what)
        if ideal is not None:
            out[f"{key}_ideal_s"] = round(ideal, 1)
            out[f"{key}_share"] = round(ideal / (workers * wall), 3)
    out["bench_threads"] = rates.get("threads")
    return out


def _ideal_seconds(steps: dict, rates: dict, what: str) -> float | None:
    """Seconds the image-steps per stage take at the bench's `what` rate (None: the bench has no such entry)."""
    rate = {e["stage"]: e["images_per_s"] for e in rates["entries"] if e["what"] == what}
    if not rate:
        return None
    rate.setdefault("intermediate", rate["segment"])
    return sum(n / rate[stage] for stage, n in steps.items())


def mean_rates(results: list[dict]) -> dict:
    """One bench result whose single and single-busy rates are the mean of `results`' (those every result has),
    with `drift`: the largest relative spread of one of them across the results."""
    rates = [{(e["stage"], e["what"]): e["images_per_s"] for e in r["entries"] if e["what"] in USED} for r in results]
    shared = [k for k in rates[0] if all(k in r for r in rates)]
    entries = [{"stage": k[0], "what": k[1], "images_per_s": sum(r[k] for r in rates) / len(rates)} for k in shared]
    drift = max((max(r[k] for r in rates) / min(r[k] for r in rates) - 1 for k in shared), default=0.0)
    return {"threads": results[0].get("threads"), "entries": entries, "benches": len(results), "drift": drift}


USED = ("single", "single-busy")  # the bench entries a run phase is compared with


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--rates", nargs="+", help="`study bench --json` results of this machine, from before and after the run"
    )
    ap.add_argument("--workers", type=int, default=2, help="the study's workers (with --rates)")
    args = ap.parse_args()
    rows = [r for s in ("pretrain", "intermediate", "segment") if (r := stage_overhead(Path(args.runs), s))]
    rates = mean_rates([json.loads(Path(f).read_text()) for f in args.rates]) if args.rates else None
    phase = run_phase(Path(args.runs), rates, args.workers) if rates else None
    if phase:
        phase.update(benches=rates["benches"], bench_drift=round(rates["drift"], 3))
    if args.json:
        print(json.dumps({"stages": rows, "run_phase": phase} if phase else rows, indent=1))
        return
    cols = list(rows[0]) if rows else []
    print("  ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]!s:>18}" for c in cols))
    if phase:
        print(
            f"run phase: {phase['run_phase_s']} s on {phase['workers']} workers, {phase['image_steps']:,} image-steps "
            f"= {phase['bare_step_ideal_s']} s at the bench's bare-step rates ({phase['bench_threads']} thread(s)): "
            f"{phase['bare_step_share']:.1%} of the bare-step rate per worker"
        )
        if phase["benches"] > 1:
            print(
                f"  (rates: the mean of {phase['benches']} benches; one rate moved by up to {phase['bench_drift']:.1%} "
                "between them)"
            )
        if "busy_step_share" in phase:
            print(
                f"  with every core busy (single-busy): {phase['busy_step_ideal_s']} s, "
                f"{phase['busy_step_share']:.1%} of the bare-step rate per busy core"
            )


if __name__ == "__main__":
    main()
