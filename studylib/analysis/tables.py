"""The study's tables: finished segmentation runs (`collect`, from the run store) laid out like the
paper's tables (`summary`, `paper_table`), the differences the paper's findings rest on (`gain_table`,
`intermediate_table`, `diff_pivot`) and this study next to the paper (`paper_comparison`,
`comparison_display`). Names of things: `studylib.analysis.vocabulary`; intervals:
`studylib.analysis.stats`; the paper's numbers: `studylib.analysis.reference`.
"""

from __future__ import annotations

import pandas as pd

from studylib.analysis.reference import PAPER_METRICS, paper_frame, paper_json
from studylib.analysis.stats import cells, contrast, fmt_interval
from studylib.analysis.vocabulary import KEY, METRICS, arm_label, arm_rank
from studylib.study.store import collect  # noqa: F401  (the store reads runs; tables lay them out)

# ---------------------------------------------------------------------------------------------- tables


def summary(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean, std (over seeds, ddof 1; 0 for one seed) and n per (arm, fine-tune size); intermediate holds
    the arm's name. Rows: arms in ARMS order, then pre-training size, then fine-tune size."""
    found = cells(df, metric)
    rows = [
        (*key, found[key].mean, found[key].std, found[key].n)
        for key in sorted(found, key=lambda k: (arm_rank(k[1]), k[0], k[2]))
    ]
    return pd.DataFrame(rows, columns=[*KEY, "mean", "std", "n"])


def paper_table(df: pd.DataFrame, metric: str = "miou", with_n: bool = False) -> pd.DataFrame:
    """Rows: pre-training size and arm (no pre-training first, the intermediate arms last);
    columns: fine-tune size; cells 'mean +- std', with ' (n)' runs appended when with_n."""
    s = summary(df, metric)
    if s.empty:
        return pd.DataFrame()
    s["arm"] = [arm_label(p, i) for p, i in zip(s.pretrain_size, s.intermediate)]
    s["cell"] = [
        f"{m:.2f} +- {sd:.2f}" + (f" ({n})" if with_n else "") for m, sd, n in zip(s["mean"], s["std"], s["n"])
    ]
    order = list(dict.fromkeys(s["arm"]))  # summary's order
    table = s.pivot(index="arm", columns="finetune_size", values="cell").reindex(order)
    table.columns.name, table.index.name = "fine-tune size", "arm (encoder, pre-training images)"
    return table.fillna("")


# ------------------------------------------------------------------------------------ derived tables

DIFF_COLUMNS = ["pretrain_size", "intermediate", "finetune_size", "diff", "lo", "hi", "n", "method"]


def _diff_frame(rows: list[tuple]) -> pd.DataFrame:
    """Tidy frame of differences from (pretrain_size, arm, finetune_size, Estimate) rows."""
    rows = sorted(rows, key=lambda r: (arm_rank(r[1]), r[0], r[2]))
    return pd.DataFrame([(p, a, f, e.value, e.lo, e.hi, e.n, e.method) for p, a, f, e in rows], columns=DIFF_COLUMNS)


def diff_pivot(table: pd.DataFrame) -> pd.DataFrame:
    """A difference table (gain_table / intermediate_table) as strings: rows the arm (arm_label),
    columns fine-tune size, cells '+diff [lo, hi] (n)'."""
    if table.empty:
        return pd.DataFrame()
    cell = [
        f"{d:+.2f} {fmt_interval(lo, hi)} ({n})" if not pd.isna(lo) else f"{d:+.2f} ({n})"
        for d, lo, hi, n in zip(table["diff"], table.lo, table.hi, table.n)
    ]
    rows = [arm_label(p, a) for p, a in zip(table.pretrain_size, table.intermediate)]
    out = table.assign(cell=cell, row=rows).pivot(index="row", columns="finetune_size", values="cell")
    out = out.reindex(list(dict.fromkeys(rows)))
    out.columns.name, out.index.name = "fine-tune size", "arm (encoder, pre-training images)"
    return out.fillna("")


def gain_table(df: pd.DataFrame, metric: str = "miou", pivot: bool = False) -> pd.DataFrame:
    """Pre-training gain per (pretrain_size p > 0, finetune_size f): mean(p, no intermediate, f) minus
    mean(no pre-training, f), with its 95% interval (see studylib.analysis.stats) and n.
    Columns: pretrain_size, intermediate (= 'none'), finetune_size, diff, lo, hi, n, method;
    pivot=True gives diff_pivot's strings."""
    c = cells(df, metric)
    rows = [
        (p, "none", f, contrast(c, {(p, "none", f): 1, (0, "none", f): -1}))
        for p, a, f in c
        if p and a == "none" and (0, "none", f) in c
    ]
    table = _diff_frame(rows)
    return diff_pivot(table) if pivot else table


def intermediate_table(df: pd.DataFrame, metric: str = "miou", pivot: bool = False) -> pd.DataFrame:
    """Change from an intermediate stage per (pretrain_size p > 0, arm a != 'none', finetune_size f):
    mean(p, a, f) minus mean(p, no intermediate stage, f) (negative = it hurts), with its 95% interval
    and n, for every arm that ran. Columns as gain_table's (intermediate = the arm);
    pivot=True gives diff_pivot's strings."""
    c = cells(df, metric)
    rows = [
        (p, a, f, contrast(c, {(p, a, f): 1, (p, "none", f): -1}))
        for p, a, f in c
        if a != "none" and (p, "none", f) in c
    ]
    table = _diff_frame(rows)
    return diff_pivot(table) if pivot else table


# ------------------------------------------------------------------------------------------- paper

COMPARISON_COLUMNS = [
    *KEY,
    "arm",
    "study_mean",
    "study_std",
    "study_n",
    "paper_mean",
    "paper_std",
    "paper_n",
    "diff",
    "lo",
    "hi",
]


def paper_comparison(df: pd.DataFrame, metric: str = "miou") -> pd.DataFrame:
    """This study next to the paper for every cell present in both (same pretrain_size, intermediate arm,
    finetune_size): study and paper mean, std, n; diff = study mean - paper mean, with a Welch 95%
    interval (the two are independent samples). Empty when nothing matches or the paper lacks the
    metric (it reports only miou and pixel_acc)."""
    ours = cells(df, metric)
    theirs = cells(paper_frame(), metric) if metric in PAPER_METRICS else {}
    rows = []
    for key in sorted(set(ours) & set(theirs), key=lambda k: (arm_rank(k[1]), k[0], k[2])):
        a, b = ours[key], theirs[key]
        e = contrast({"study": a, "paper": b}, {"study": 1, "paper": -1})
        rows.append((*key, arm_label(key[0], key[1]), a.mean, a.std, a.n, b.mean, b.std, b.n, e.value, e.lo, e.hi))
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def comparison_note(df: pd.DataFrame, metric: str) -> str:
    """Why a paper comparison is empty, in one sentence."""
    if metric not in PAPER_METRICS:
        return f"the paper reports no {METRICS.get(metric, metric)}: nothing to compare"
    ours = sorted({(p, f) for p, _, f in cells(df, metric)})
    sizes = sorted({p for p, _ in ours}), sorted({f for _, f in ours})
    return (
        f"no cell in common with the paper: this study has pre-training sizes {sizes[0]} and fine-tune sizes "
        f"{sizes[1]}, the paper 0/45000/100000/200000 and {paper_json()['finetune_sizes']}"
    )


def comparison_display(table: pd.DataFrame) -> pd.DataFrame:
    """paper_comparison as strings: arm, fine-tune size, study 'mean +- std (n)', paper 'mean +- std',
    study - paper '+diff [lo, hi]'."""
    return pd.DataFrame(
        {
            "arm": table["arm"],
            "fine-tune size": table.finetune_size,
            "study": [f"{m:.2f} +- {s:.2f} ({n})" for m, s, n in zip(table.study_mean, table.study_std, table.study_n)],
            "paper": [f"{m:.2f} +- {s:.2f}" for m, s in zip(table.paper_mean, table.paper_std)],
            "study - paper": [
                f"{d:+.2f} {fmt_interval(lo, hi)}" for d, lo, hi in zip(table["diff"], table.lo, table.hi)
            ],
        }
    )
