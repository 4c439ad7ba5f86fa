"""Read finished segmentation runs from the store and lay them out like the paper's tables."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .grid import Run
from .store import read_json

METRICS = {"miou": "mIoU % (per image, paper)", "pixel_acc": "pixel accuracy %",
           "miou_dataset": "mIoU % (dataset level)"}


def collect(runs: str | Path, plan: list[Run] | None = None) -> pd.DataFrame:
    """One row per finished segmentation run (metrics in %), optionally only the runs of a plan."""
    runs = Path(runs)
    wanted = None if plan is None else {r.id for r in plan if r.stage == "segment"}
    rows = []
    for metrics_file in sorted((runs / "segment").glob("*/metrics.json")):
        run_id = metrics_file.parent.name
        if wanted is not None and run_id not in wanted:
            continue
        labels = read_json(metrics_file.parent / "params.json", {}).get("labels", {})
        m = read_json(metrics_file)
        rows.append({**labels, "id": run_id, "miou": 100 * m["miou_per_image"], "pixel_acc": 100 * m["pixel_acc"],
                     "miou_dataset": 100 * m["miou_dataset"]})
    cols = ["protocol", "pretrain_size", "intermediate", "finetune_size", "seed", "id", *METRICS]
    return pd.DataFrame(rows, columns=cols)


def arm_label(pretrain_size: int, intermediate: bool) -> str:
    """The paper's row names: 'none', '45000', '45000 + intermediate'."""
    if not pretrain_size:
        return "none"
    return f"{pretrain_size}" + (" + intermediate" if intermediate else "")


def summary(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean, std (over seeds, ddof 1; 0 for one seed) and n per (arm, fine-tune size)."""
    g = df.groupby(["pretrain_size", "intermediate", "finetune_size"])[metric]
    out = g.agg(mean="mean", std=lambda s: s.std(ddof=1) if len(s) > 1 else 0.0, n="count").reset_index()
    return out.sort_values(["intermediate", "pretrain_size", "finetune_size"])


def paper_table(df: pd.DataFrame, metric: str = "miou") -> pd.DataFrame:
    """Rows: pre-training size and arm (no pre-training first, the intermediate arm last);
    columns: fine-tune size; cells 'mean +- std'."""
    s = summary(df, metric)
    s["arm"] = [arm_label(p, i) for p, i in zip(s.pretrain_size, s.intermediate)]
    s["cell"] = [f"{m:.2f} +- {sd:.2f}" for m, sd in zip(s["mean"], s["std"])]
    order = list(dict.fromkeys(s.sort_values(["intermediate", "pretrain_size"])["arm"]))
    table = s.pivot(index="arm", columns="finetune_size", values="cell").reindex(order)
    table.columns.name, table.index.name = "fine-tune size", "pre-training"
    return table.fillna("")


def format_tables(df: pd.DataFrame) -> str:
    if df.empty:
        return "no finished segmentation runs yet"
    parts = []
    for protocol, sub in df.groupby("protocol"):
        n_seeds = sub.groupby(["pretrain_size", "intermediate", "finetune_size"]).size()
        for metric in ("miou", "pixel_acc", "miou_dataset"):
            parts.append(f"{METRICS[metric]}, protocol {protocol}, mean +- std over "
                         f"{n_seeds.min()}-{n_seeds.max()} seeds\n{paper_table(sub, metric).to_string()}")
    return "\n\n".join(parts)
