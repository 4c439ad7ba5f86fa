"""Where a finished study's wall time went, per stage: the training epochs (train_log.jsonl) against the
wall time of the kernels that ran them (provenance.json: one wall time per group, shared by its members).
What is not training - kernel start, imports, data loading, evaluation, papermill writing the notebook - is
the overhead, given per run (the issue's target: at most 2 s per demo segmentation run on a CPU).

    python benchmarks/run_overhead.py --runs runs [--json]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [r for s in ("pretrain", "intermediate", "segment") if (r := stage_overhead(Path(args.runs), s))]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    cols = list(rows[0]) if rows else []
    print("  ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]!s:>18}" for c in cols))


if __name__ == "__main__":
    main()
