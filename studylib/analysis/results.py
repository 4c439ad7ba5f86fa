"""Read finished segmentation runs from the store, lay them out like the paper's tables, derive the
comparisons the paper's findings rest on, and test those findings.

Vocabulary used throughout:

- a *cell* is one configuration (pretrain_size, intermediate, finetune_size); its runs differ by seed;
- an *arm* is a row of the paper's tables: a pre-training size and an intermediate stage, named
  'none' (no intermediate stage), 'intel' (the paper's: scene classification on Intel through the CLS
  token), 'pets-breeds' or 'spatial' (v2's alternatives); older boolean labels mean True = 'intel',
  False = 'none'. Pre-training size 0 = no pre-training, which never has an intermediate stage;
- all metrics are percentages; a *difference* is in percentage points;
- a *95% interval* of a difference: when every cell involved holds the same seeds, once each, the
  difference is formed per seed and the interval is mean +- t(n-1) * sd / sqrt(n) over those per-seed
  differences (paired); otherwise it is Welch's: the cells are independent samples,
  se^2 = sum w^2 s^2 / n and the degrees of freedom are Welch-Satterthwaite's. Fewer than 2 runs (pairs)
  give no interval.

The functions accept a frame of runs (`collect`) or of summary statistics (`paper_frame`: columns
metric, mean, std, n), so the paper's own table goes through the same tests (always Welch, it has no seeds).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from studylib.study.grid import Run
from studylib.core.files import read_json

METRICS = {"miou": "mIoU % (per image, paper)", "pixel_acc": "pixel accuracy %",
           "miou_dataset": "mIoU % (dataset level)"}
PAPER_METRICS = ("miou", "pixel_acc")          # the metrics the paper reports
KEY = ["pretrain_size", "intermediate", "finetune_size"]     # intermediate: the arm's name
ARMS = ("none", "intel", "pets-breeds", "spatial")           # the order of rows and curves
PAPER_ARM = "intel"                                          # the paper's intermediate stage
FORMATS = ("text", "markdown", "csv", "json")
NO_RUNS = "no finished segmentation runs yet"
UNKNOWN = "unknown"                            # protocol of runs whose labels lack one

# 0.975 quantiles of Student's t by degrees of freedom (two-sided 95%); beyond 30 the normal's 1.96
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
         26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}
Z975 = 1.96

CLAIMS = {
    "a": "pre-training helps more with fewer labels",
    "b": "returns diminish, both with more labels and with more pre-training data",
    "c": "the intermediate stage hurts, most where pre-training helps most",
}
SUPPORTED, NOT_SUPPORTED, MIXED, NOT_ENOUGH = "supported", "not supported", "mixed", "not enough runs"


# ---------------------------------------------------------------------------------------------- runs

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


def intermediate_arm(value) -> str:
    """The intermediate arm a label names: the name itself ('none', 'intel', 'pets-breeds', 'spatial');
    the older boolean labels True = 'intel' (the paper's stage), False = 'none'; missing = 'none'."""
    if isinstance(value, (bool, np.bool_)):
        return PAPER_ARM if value else "none"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "none"
    return str(value)


def arm_label(pretrain_size: int, intermediate) -> str:
    """The paper's row names: 'none', '45000', '45000 + intermediate' (the paper's Intel stage), and
    '45000 + spatial' etc. for the other intermediate arms."""
    arm = intermediate_arm(intermediate)
    if not pretrain_size:
        return "none" if arm == "none" else f"0 + {arm}"
    return f"{pretrain_size}" + {"none": "", PAPER_ARM: " + intermediate"}.get(arm, f" + {arm}")


def arm_rank(arm: str) -> tuple:
    """Sort key of intermediate arms: ARMS' order, unknown arms after them by name."""
    return (ARMS.index(arm), "") if arm in ARMS else (len(ARMS), arm)


def protocols(df: pd.DataFrame) -> list[str]:
    """The protocols present, sorted; runs without a protocol label count as 'unknown', and a frame
    without a protocol column (the paper's) as one protocol 'unknown'. Empty frame: []."""
    if df.empty:
        return []
    if "protocol" not in df.columns:
        return [UNKNOWN]
    return sorted(df["protocol"].fillna(UNKNOWN).astype(str).unique())


def select(df: pd.DataFrame, protocol: str | None = None) -> pd.DataFrame:
    """The runs of one protocol (default: the first of `protocols(df)`); a frame without a protocol
    column, or an empty one, is returned whole."""
    if df.empty or "protocol" not in df.columns:
        return df
    protocol = protocols(df)[0] if protocol is None else protocol
    return df[df["protocol"].fillna(UNKNOWN).astype(str) == str(protocol)]


def _one_protocol(df: pd.DataFrame) -> None:
    """Refuse to pool runs of different protocols into one cell."""
    found = protocols(df)
    if len(found) > 1:
        raise ValueError(f"runs of {len(found)} protocols ({', '.join(found)}): "
                         f"pass one, e.g. results.select(df, {found[0]!r})")


# ---------------------------------------------------------------------------------------------- cells

@dataclass(frozen=True)
class Cell:
    """One configuration's results: mean, std (over runs, ddof 1; 0 for one run), number of runs n,
    and the per-seed values (a Series indexed by seed) when known; None for summary statistics."""
    mean: float
    std: float
    n: int
    values: pd.Series | None = None

    @property
    def seeds(self) -> frozenset | None:
        """The seeds when each occurs once (pairing by seed is possible), else None."""
        if self.values is None or not self.values.index.is_unique:
            return None
        return frozenset(self.values.index)


def _is_summary_frame(df: pd.DataFrame) -> bool:
    """True for frames of summary statistics (paper_frame's layout) rather than runs."""
    return {"metric", "mean", "std", "n"} <= set(df.columns)


def cells(df: pd.DataFrame, metric: str = "miou") -> dict[tuple, Cell]:
    """{(pretrain_size, intermediate, finetune_size): Cell} for one protocol's runs (collect's frame)
    or for summary statistics (paper_frame's frame; metrics it lacks give {})."""
    _one_protocol(df)
    if df.empty:
        return {}
    if _is_summary_frame(df):
        sub = df[df["metric"] == metric]
        return {(int(p), intermediate_arm(i), int(f)): Cell(float(m), float(s), int(n))
                for p, i, f, m, s, n in zip(sub.pretrain_size, sub.intermediate, sub.finetune_size,
                                            sub["mean"], sub["std"], sub["n"])}
    out = {}
    runs = df.dropna(subset=[metric]).assign(intermediate=lambda d: d["intermediate"].map(intermediate_arm))
    for (p, i, f), g in runs.groupby(KEY):
        v = pd.Series(g[metric].astype(float).to_numpy(), index=g["seed"].to_numpy())
        out[(int(p), str(i), int(f))] = Cell(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                                              len(v), v)
    return out


def summary(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean, std (over seeds, ddof 1; 0 for one seed) and n per (arm, fine-tune size); intermediate holds
    the arm's name. Rows: arms in ARMS order, then pre-training size, then fine-tune size."""
    found = cells(df, metric)
    rows = [(*key, found[key].mean, found[key].std, found[key].n)
            for key in sorted(found, key=lambda k: (arm_rank(k[1]), k[0], k[2]))]
    return pd.DataFrame(rows, columns=[*KEY, "mean", "std", "n"])


def paper_table(df: pd.DataFrame, metric: str = "miou", with_n: bool = False) -> pd.DataFrame:
    """Rows: pre-training size and arm (no pre-training first, the intermediate arms last);
    columns: fine-tune size; cells 'mean +- std', with ' (n)' runs appended when with_n."""
    s = summary(df, metric)
    if s.empty:
        return pd.DataFrame()
    s["arm"] = [arm_label(p, i) for p, i in zip(s.pretrain_size, s.intermediate)]
    s["cell"] = [f"{m:.2f} +- {sd:.2f}" + (f" ({n})" if with_n else "")
                 for m, sd, n in zip(s["mean"], s["std"], s["n"])]
    order = list(dict.fromkeys(s["arm"]))      # summary's order
    table = s.pivot(index="arm", columns="finetune_size", values="cell").reindex(order)
    table.columns.name, table.index.name = "fine-tune size", "pre-training"
    return table.fillna("")


# ------------------------------------------------------------------------------------------ intervals

def t975(df: float) -> float:
    """0.975 quantile of Student's t with df degrees of freedom, so mean +- t975(df) * se is a two-sided
    95% interval. Non-integer df (Welch) are rounded down, which widens the interval a little;
    beyond 30 degrees of freedom the normal quantile 1.96."""
    if not df >= 1 - 1e-9:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975.get(max(1, int(math.floor(df + 1e-9))), Z975)


@dataclass(frozen=True)
class Estimate:
    """A linear combination of cell means with its 95% interval (lo, hi; NaN when there is none),
    n (pairs when paired, else the fewest runs of any cell) and method ('paired' or 'welch')."""
    value: float
    lo: float
    hi: float
    n: int
    method: str


def contrast(cell_map: dict, weights: dict) -> Estimate:
    """Estimate sum_k w_k * mean_k over the cells named in weights (keys of cell_map).
    Paired when every cell holds the same seeds once each: per seed d_s = sum_k w_k x_{k,s}, interval
    mean(d) +- t975(n-1) sd(d) / sqrt(n). Otherwise Welch: se^2 = sum_k w_k^2 s_k^2 / n_k, degrees of
    freedom (sum v_k)^2 / sum v_k^2 / (n_k - 1) with v_k = w_k^2 s_k^2 / n_k; needs n_k >= 2 for all k."""
    terms = [(cell_map[k], float(w)) for k, w in weights.items() if w != 0]
    value = sum(w * c.mean for c, w in terms)
    seed_sets = [c.seeds for c, _ in terms]
    if seed_sets[0] is not None and all(s == seed_sets[0] for s in seed_sets):
        order = sorted(seed_sets[0])
        per_seed = sum(w * c.values.reindex(order).to_numpy() for c, w in terms)
        n = len(per_seed)
        if n < 2:
            return Estimate(value, math.nan, math.nan, n, "paired")
        half = t975(n - 1) * float(np.std(per_seed, ddof=1)) / math.sqrt(n)
        return Estimate(value, value - half, value + half, n, "paired")
    n = min(c.n for c, _ in terms)
    if n < 2:
        return Estimate(value, math.nan, math.nan, n, "welch")
    v = [(w * w * c.std * c.std / c.n, c.n) for c, w in terms]
    total = sum(vk for vk, _ in v)
    if total == 0:
        return Estimate(value, value, value, n, "welch")
    dof = total ** 2 / sum(vk * vk / (nk - 1) for vk, nk in v)
    half = t975(dof) * math.sqrt(total)
    return Estimate(value, value - half, value + half, n, "welch")


# ------------------------------------------------------------------------------------ derived tables

DIFF_COLUMNS = ["pretrain_size", "intermediate", "finetune_size", "diff", "lo", "hi", "n", "method"]


def _diff_frame(rows: list[tuple]) -> pd.DataFrame:
    """Tidy frame of differences from (pretrain_size, arm, finetune_size, Estimate) rows."""
    rows = sorted(rows, key=lambda r: (arm_rank(r[1]), r[0], r[2]))
    return pd.DataFrame([(p, a, f, e.value, e.lo, e.hi, e.n, e.method) for p, a, f, e in rows], columns=DIFF_COLUMNS)


def _fmt_interval(lo: float, hi: float) -> str:
    """'[lo, hi]' with two decimals, or 'no interval' when there is none."""
    return "no interval" if pd.isna(lo) else f"[{lo:+.2f}, {hi:+.2f}]"


def diff_pivot(table: pd.DataFrame) -> pd.DataFrame:
    """A difference table (gain_table / intermediate_table) as strings: rows the arm (arm_label),
    columns fine-tune size, cells '+diff [lo, hi] (n)'."""
    if table.empty:
        return pd.DataFrame()
    cell = [f"{d:+.2f} {_fmt_interval(lo, hi)} ({n})" if not pd.isna(lo) else f"{d:+.2f} ({n})"
            for d, lo, hi, n in zip(table["diff"], table.lo, table.hi, table.n)]
    rows = [arm_label(p, a) for p, a in zip(table.pretrain_size, table.intermediate)]
    out = table.assign(cell=cell, row=rows).pivot(index="row", columns="finetune_size", values="cell")
    out = out.reindex(list(dict.fromkeys(rows)))
    out.columns.name, out.index.name = "fine-tune size", "pre-training"
    return out.fillna("")


def gain_table(df: pd.DataFrame, metric: str = "miou", pivot: bool = False) -> pd.DataFrame:
    """Pre-training gain per (pretrain_size p > 0, finetune_size f): mean(p, no intermediate, f) minus
    mean(no pre-training, f), with its 95% interval (see the module docstring) and n.
    Columns: pretrain_size, intermediate (= 'none'), finetune_size, diff, lo, hi, n, method;
    pivot=True gives diff_pivot's strings."""
    c = cells(df, metric)
    rows = [(p, "none", f, contrast(c, {(p, "none", f): 1, (0, "none", f): -1}))
            for p, a, f in c if p and a == "none" and (0, "none", f) in c]
    table = _diff_frame(rows)
    return diff_pivot(table) if pivot else table


def intermediate_table(df: pd.DataFrame, metric: str = "miou", pivot: bool = False) -> pd.DataFrame:
    """Change from an intermediate stage per (pretrain_size p > 0, arm a != 'none', finetune_size f):
    mean(p, a, f) minus mean(p, no intermediate stage, f) (negative = it hurts), with its 95% interval
    and n, for every arm that ran. Columns as gain_table's (intermediate = the arm);
    pivot=True gives diff_pivot's strings."""
    c = cells(df, metric)
    rows = [(p, a, f, contrast(c, {(p, a, f): 1, (p, "none", f): -1}))
            for p, a, f in c if a != "none" and (p, "none", f) in c]
    table = _diff_frame(rows)
    return diff_pivot(table) if pivot else table


# ------------------------------------------------------------------------------------------- paper

@lru_cache(maxsize=1)
def _paper_json() -> dict:
    """The paper's tables as shipped in paper_results.json."""
    return json.loads(resources.files("studylib.analysis").joinpath("paper_results.json").read_text())


def paper_frame() -> pd.DataFrame:
    """The paper's two tables (per-image mIoU and pixel accuracy, %), one row per (arm, fine-tune size,
    metric): columns pretrain_size, intermediate (the arm: 'none' or 'intel', the paper's stage; the
    json's booleans), finetune_size, metric ('miou' | 'pixel_acc'), mean, std (over the paper's runs),
    n (= 3)."""
    data = _paper_json()
    rows = [(arm["pretrain_size"], intermediate_arm(arm["intermediate"]), f, metric, m, s, data["runs_per_cell"])
            for metric, table in data["tables"].items() for arm in table
            for f, m, s in zip(data["finetune_sizes"], arm["mean"], arm["std"])]
    return pd.DataFrame(rows, columns=[*KEY, "metric", "mean", "std", "n"])


COMPARISON_COLUMNS = [*KEY, "arm", "study_mean", "study_std", "study_n", "paper_mean", "paper_std", "paper_n",
                      "diff", "lo", "hi"]


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


def _comparison_note(df: pd.DataFrame, metric: str) -> str:
    """Why a paper comparison is empty, in one sentence."""
    if metric not in PAPER_METRICS:
        return f"the paper reports no {METRICS.get(metric, metric)}: nothing to compare"
    ours = sorted({(p, f) for p, _, f in cells(df, metric)})
    sizes = sorted({p for p, _ in ours}), sorted({f for _, f in ours})
    return (f"no cell in common with the paper: this study has pre-training sizes {sizes[0]} and fine-tune sizes "
            f"{sizes[1]}, the paper 0/45000/100000/200000 and {_paper_json()['finetune_sizes']}")


def comparison_display(table: pd.DataFrame) -> pd.DataFrame:
    """paper_comparison as strings: arm, fine-tune size, study 'mean +- std (n)', paper 'mean +- std',
    study - paper '+diff [lo, hi]'."""
    return pd.DataFrame({
        "arm": table["arm"], "fine-tune size": table.finetune_size,
        "study": [f"{m:.2f} +- {s:.2f} ({n})" for m, s, n in zip(table.study_mean, table.study_std, table.study_n)],
        "paper": [f"{m:.2f} +- {s:.2f}" for m, s in zip(table.paper_mean, table.paper_std)],
        "study - paper": [f"{d:+.2f} {_fmt_interval(lo, hi)}" for d, lo, hi in zip(table["diff"], table.lo, table.hi)],
    })


# ------------------------------------------------------------------------------------------- claims

def _part(finding: str, part: str, verdict: str, est: Estimate | None, detail: str) -> dict:
    """One row of claim_parts."""
    effect = math.nan if est is None else est.value
    ci = (math.nan, math.nan) if est is None else (est.lo, est.hi)
    return {"finding": finding, "part": part, "verdict": verdict, "effect": effect, "ci95": ci, "detail": detail}


def _verdict(est: Estimate, positive: bool) -> str:
    """'supported' when the 95% interval lies wholly above 0 (positive) or below 0 (not positive),
    'not enough runs' when there is no interval, otherwise 'not supported'."""
    if pd.isna(est.lo):
        return NOT_ENOUGH
    return SUPPORTED if (est.lo > 0 if positive else est.hi < 0) else NOT_SUPPORTED


def _est_text(est: Estimate) -> str:
    """'+1.23 [lo, hi] (paired, n=3)'."""
    return f"{est.value:+.2f} {_fmt_interval(est.lo, est.hi)} ({est.method}, n={est.n})"


def _arm_sizes(c: dict, pretrain_size: int, arm: str = "none") -> set:
    """The fine-tune sizes at which an arm has runs."""
    return {f for p, a, f in c if p == pretrain_size and a == arm}


def _add(weights: dict, key: tuple, weight: float) -> None:
    """Accumulate a contrast weight (a cell may enter a contrast more than once)."""
    weights[key] = weights.get(key, 0.0) + weight


def _fewer_labels(c: dict) -> dict:
    """(a) gain(P, f_min) - gain(P, f_max) for the largest pre-training size P (no intermediate stage),
    f_min / f_max the smallest / largest fine-tune size where both P and no pre-training have runs;
    supported when its 95% interval is above 0."""
    sizes = sorted({p for p, a, _ in c if p and a == "none"})
    common = sorted(_arm_sizes(c, 0) & _arm_sizes(c, sizes[-1])) if sizes else []
    if len(common) < 2:
        return _part("a", "fewer labels", NOT_ENOUGH, None,
                     "needs no pre-training and a pre-trained arm at two or more fine-tune sizes")
    p, lo, hi = sizes[-1], common[0], common[-1]
    est = contrast(c, {(p, "none", lo): 1, (0, "none", lo): -1, (p, "none", hi): -1, (0, "none", hi): 1})
    g_lo, g_hi = (c[(p, "none", f)].mean - c[(0, "none", f)].mean for f in (lo, hi))
    return _part("a", "fewer labels", _verdict(est, True), est,
                 f"gain of {p} pre-training over none: {g_lo:+.2f} at {lo} labels, {g_hi:+.2f} at {hi}; "
                 f"difference {_est_text(est)}")


def _label_returns(c: dict) -> dict:
    """(b, labels) On the no-pre-training curve with sizes f_1 < ... < f_k (k >= 3), the increase per
    doubling of labels, (m(f_{i+1}) - m(f_i)) / log2(f_{i+1} / f_i), of the first step minus that of the
    last step; holds when its 95% interval is above 0 (the increase shrinks)."""
    f = sorted(_arm_sizes(c, 0))
    if len(f) < 3:
        return _part("b", "labels", NOT_ENOUGH, None, "labels: needs no pre-training at three or more fine-tune sizes")
    first, last = math.log2(f[1] / f[0]), math.log2(f[-1] / f[-2])
    w: dict = {}
    for size, weight in [(f[0], -1 / first), (f[1], 1 / first), (f[-2], 1 / last), (f[-1], -1 / last)]:
        _add(w, (0, "none", size), weight)
    est = contrast(c, w)
    s_first = (c[(0, "none", f[1])].mean - c[(0, "none", f[0])].mean) / first
    s_last = (c[(0, "none", f[-1])].mean - c[(0, "none", f[-2])].mean) / last
    return _part("b", "labels", _verdict(est, True), est,
                 f"labels: without pre-training {s_first:+.2f} per doubling from {f[0]} to {f[1]}, {s_last:+.2f} "
                 f"from {f[-2]} to {f[-1]}; shrink {_est_text(est)}")


def _pretrain_returns(c: dict) -> dict:
    """(b, pre-training) With pre-training sizes 0 < p_1 < ... < p_k (k >= 2, no intermediate stage),
    the first step's gain m(p_1) - m(0) minus the last step's m(p_k) - m(p_{k-1}), averaged over the
    fine-tune sizes all four arms share; holds when its 95% interval is above 0."""
    p = sorted({s for s, a, _ in c if a == "none"})
    if len(p) < 3 or p[0] != 0:
        return _part("b", "pre-training", NOT_ENOUGH, None,
                     "pre-training: needs no pre-training and two or more pre-training sizes")
    common = sorted(set.intersection(*(_arm_sizes(c, s) for s in (0, p[1], p[-2], p[-1]))))
    if not common:
        return _part("b", "pre-training", NOT_ENOUGH, None, "pre-training: the arms share no fine-tune size")
    w: dict = {}
    for f in common:
        for size, weight in [(p[1], 1), (0, -1), (p[-1], -1), (p[-2], 1)]:
            _add(w, (size, "none", f), weight / len(common))
    est = contrast(c, w)
    step = lambda a, b: np.mean([c[(b, "none", f)].mean - c[(a, "none", f)].mean for f in common])  # noqa: E731
    return _part("b", "pre-training", _verdict(est, True), est,
                 f"pre-training: first step 0->{p[1]} {step(0, p[1]):+.2f}, last step {p[-2]}->{p[-1]} "
                 f"{step(p[-2], p[-1]):+.2f} (mean over {len(common)} fine-tune sizes); shrink {_est_text(est)}")


def _intermediate_cells(c: dict, arm: str) -> list[tuple]:
    """(pretrain_size, finetune_size) where both the arm and no intermediate stage ran."""
    return sorted((p, f) for p, a, f in c if a == arm and (p, "none", f) in c)


def _intermediate_hurts(c: dict, arm: str) -> dict:
    """(c, hurts) The mean over cells (p, f) of mean(p, arm, f) - mean(p, none, f); holds when its 95%
    interval is below 0."""
    pairs = _intermediate_cells(c, arm)
    if not pairs:
        return _part("c", "hurts", NOT_ENOUGH, None, f"needs arms with the {arm} stage and without")
    w: dict = {}
    for p, f in pairs:
        _add(w, (p, arm, f), 1 / len(pairs))
        _add(w, (p, "none", f), -1 / len(pairs))
    est = contrast(c, w)
    change = {k: c[(k[0], arm, k[1])].mean - c[(k[0], "none", k[1])].mean for k in pairs}
    worst = min(change, key=change.get)
    negative = sum(v < 0 for v in change.values())
    return _part("c", "hurts", _verdict(est, False), est,
                 f"mean change with the {arm} stage {_est_text(est)} over {len(pairs)} cells, negative in "
                 f"{negative}/{len(pairs)}; largest drop {change[worst]:+.2f} at {worst[0]} pre-training, "
                 f"{worst[1]} labels")


def _fisher_interval(r: float, n: int) -> tuple[float, float]:
    """95% interval of a Pearson correlation r over n pairs: tanh(atanh(r) +- 1.96 / sqrt(n - 3))."""
    if abs(r) >= 1:
        return r, r
    z, half = math.atanh(r), Z975 / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def _hurts_most_where_gain(c: dict, arm: str) -> dict:
    """(c, most where pre-training helps most) Pearson correlation, across cells (p, f), between the
    pre-training gain mean(p, none, f) - mean(0, f) and the change with the arm's stage; holds when its
    95% Fisher-z interval is below 0. Needs 4 or more cells with varying gains and changes."""
    pairs = [(p, f) for p, f in _intermediate_cells(c, arm) if (0, "none", f) in c]
    gain = np.array([c[(p, "none", f)].mean - c[(0, "none", f)].mean for p, f in pairs])
    change = np.array([c[(p, arm, f)].mean - c[(p, "none", f)].mean for p, f in pairs])
    if len(pairs) < 4 or gain.std() == 0 or change.std() == 0:
        return _part("c", "most where pre-training helps most", NOT_ENOUGH, None,
                     f"correlation needs 4 or more cells with varying gain and change, has {len(pairs)}")
    r = float(np.corrcoef(gain, change)[0, 1])
    lo, hi = _fisher_interval(r, len(pairs))
    est = Estimate(r, lo, hi, len(pairs), "fisher-z")
    return _part("c", "most where pre-training helps most", _verdict(est, False), est,
                 f"correlation of pre-training gain and {arm}-stage change over {len(pairs)} cells "
                 f"r = {r:+.2f} {_fmt_interval(lo, hi)}")


CLAIM_COLUMNS = ["finding", "claim", "verdict", "effect", "ci95", "detail"]


def claim_parts(df: pd.DataFrame, metric: str = "miou", arm: str = PAPER_ARM) -> pd.DataFrame:
    """Every test behind claims(), one row each: finding, part, verdict, effect, ci95 (lo, hi), detail.
    (a) fewer labels; (b) labels and pre-training axes; (c) hurts and correlation, for the intermediate
    arm `arm`. See the _-functions named after each part for the definitions."""
    c = cells(df, metric)
    rows = [_fewer_labels(c), _label_returns(c), _pretrain_returns(c), _intermediate_hurts(c, arm),
            _hurts_most_where_gain(c, arm)]
    return pd.DataFrame(rows, columns=["finding", "part", "verdict", "effect", "ci95", "detail"])


def _combine(verdicts: list[str]) -> str:
    """A finding's verdict from its parts: 'not enough runs' if any part lacks runs, 'supported' if all
    hold, 'mixed' if some do, else 'not supported'."""
    if NOT_ENOUGH in verdicts:
        return NOT_ENOUGH
    held = verdicts.count(SUPPORTED)
    return SUPPORTED if held == len(verdicts) else MIXED if held else NOT_SUPPORTED


def claims(df: pd.DataFrame, metric: str = "miou", arm: str = PAPER_ARM) -> pd.DataFrame:
    """The paper's findings tested on one protocol's runs (or on paper_frame()), one row each:
    finding ('a' | 'b' | 'c'), claim, verdict ('supported' | 'not supported' | 'mixed' | 'not enough runs'),
    effect and ci95 (lo, hi) of the finding's first part, detail (every part's numbers).
    (a) gain of the largest pre-training at the fewest labels minus at the most labels, > 0;
    (b) increase per doubling of labels shrinks from the first to the last step (no pre-training) and
        the gain of the last pre-training step is smaller than the first's: both > 0, 'mixed' if one;
    (c) mean change with the intermediate stage (arm: the paper's 'intel' unless given) < 0, and its
        correlation with the pre-training gain < 0.
    'Holds' means the 95% interval excludes 0 on the claimed side; nothing else is thresholded."""
    parts = claim_parts(df, metric, arm)
    rows = []
    for finding, sub in parts.groupby("finding", sort=True):
        first = sub.iloc[0]
        claim = CLAIMS[finding] + (f" (arm {arm})" if finding == "c" and arm != PAPER_ARM else "")
        rows.append({"finding": finding, "claim": claim, "verdict": _combine(list(sub.verdict)),
                     "effect": first.effect, "ci95": first.ci95, "detail": "; ".join(sub.detail)})
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)


def claims_all_arms(df: pd.DataFrame, metric: str = "miou") -> pd.DataFrame:
    """claims() for the paper's intermediate arm, followed by finding (c) for every other intermediate
    arm that ran (v2's 'spatial', 'pets-breeds'), its claim naming the arm."""
    arms = sorted({a for _, a, _ in cells(df, metric)} - {"none", PAPER_ARM}, key=arm_rank)
    return pd.concat([claims(df, metric)] + [claims(df, metric, a).iloc[[2]] for a in arms], ignore_index=True)


def claims_display(table: pd.DataFrame) -> pd.DataFrame:
    """claims() (or claim_parts()) with effect and interval as short strings, for reading."""
    out = table.copy()
    out["effect"] = [("" if pd.isna(e) else f"{e:+.2f}") for e in out.effect]
    out["ci95"] = [_fmt_interval(lo, hi) for lo, hi in out.ci95]
    return out


# ------------------------------------------------------------------------------------------- render

@dataclass
class Section:
    """One table of a report: name (machine key), title, display (strings, shown with its index when
    index), data (numbers, for csv and json) and a note shown instead of an empty display."""
    name: str
    title: str
    display: pd.DataFrame
    data: pd.DataFrame
    index: bool = True
    note: str = ""


def _seed_range(df: pd.DataFrame) -> str:
    """'2-3 seeds per cell' for one protocol's runs (runs per configuration, in fact)."""
    n = df.assign(intermediate=df["intermediate"].map(intermediate_arm)).groupby(KEY).size()
    return f"{n.min()}-{n.max()} seeds per cell" if n.min() != n.max() else f"{n.min()} seeds per cell"


def sections(df: pd.DataFrame, metric: str) -> list[Section]:
    """The report on one protocol's runs for one metric: paper-layout table, pre-training gains,
    intermediate-stage changes, comparison with the paper, claims (finding c once per intermediate arm)
    and the same tests on the paper's table."""
    label = METRICS.get(metric, metric)
    gain, inter, comp = gain_table(df, metric), intermediate_table(df, metric), paper_comparison(df, metric)
    found = claims_all_arms(df, metric)
    out = [
        Section("summary", f"{label}: mean +- std (runs)", paper_table(df, metric, with_n=True), summary(df, metric)),
        Section("gain", f"{label}: pre-training gain over no pre-training, difference [95% interval] (n)",
                diff_pivot(gain), gain, note="needs the no-pre-training arm and a pre-trained arm"),
        Section("intermediate", f"{label}: change with the intermediate stage, difference [95% interval] (n)",
                diff_pivot(inter), inter, note="needs pre-trained arms with and without the intermediate stage"),
        Section("paper_comparison", f"{label}: this study against the paper",
                comparison_display(comp), comp, index=False, note=_comparison_note(df, metric) if comp.empty else ""),
        Section("claims", f"{label}: the paper's findings tested on this study", claims_display(found), found,
                index=False),
    ]
    if metric in PAPER_METRICS:
        theirs = claims(paper_frame(), metric)
        out.append(Section("paper_claims", f"{label}: the same tests on the paper's own table (Welch, 3 runs per cell)",
                           claims_display(theirs), theirs, index=False))
    return out


def markdown_table(frame: pd.DataFrame, index: bool = True) -> str:
    """A GitHub-flavoured markdown table: a header line, the separator line '|---|...', one line per
    row; with index, the index is the first column (headed 'index name / columns name')."""
    if index:
        head = " / ".join(str(x) for x in (frame.index.name, frame.columns.name) if x is not None)
        frame = frame.reset_index(names=head or " ")
    cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _records(frame: pd.DataFrame) -> list[dict]:
    """JSON-safe records (NaN -> null, numpy -> Python, tuples -> lists)."""
    return json.loads(frame.to_json(orient="records")) if len(frame) else []


def _csv_frame(section: Section, protocol: str, metric: str) -> pd.DataFrame:
    """A section's numbers as rows of the long csv: protocol, metric, table, then its own columns
    (claims' ci95 split into lo and hi)."""
    data = section.data.copy()
    if "ci95" in data.columns:
        data["lo"], data["hi"] = [c[0] for c in data.ci95], [c[1] for c in data.ci95]
        data = data.drop(columns="ci95")
    data.insert(0, "table", section.name)
    data.insert(0, "metric", metric)
    data.insert(0, "protocol", protocol)
    return data


def render(df: pd.DataFrame, fmt: str = "text", metrics: tuple = ("miou", "pixel_acc", "miou_dataset")) -> str:
    """The whole report per protocol and metric (see sections()) as one string:
    'text' (aligned tables), 'markdown' (headings and tables), 'csv' (one long table of numbers: columns
    protocol, metric, table, then the union of the tables' columns) or 'json'
    ({protocol: {runs, seeds, tables: {metric: {summary, gain, intermediate, paper_comparison: [records]}},
    claims: [records with metric], paper_claims: [...]}})."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    per_protocol = {p: select(df, p) for p in protocols(df)}
    if fmt == "json":
        return json.dumps({p: _json_report(sub, metrics) for p, sub in per_protocol.items()}, indent=1)
    if fmt == "csv":
        frames = [_csv_frame(s, p, m) for p, sub in per_protocol.items() for m in metrics for s in sections(sub, m)]
        frames = [f for f in frames if len(f)]
        out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["protocol", "metric", "table"])
        return out.to_csv(index=False)
    if not per_protocol:
        return NO_RUNS
    parts = []
    for p, sub in per_protocol.items():
        head = f"protocol {p}: {len(sub)} runs, {_seed_range(sub)}"
        parts.append(f"## {head}" if fmt == "markdown" else f"== {head} ==")
        for m in metrics:
            for s in sections(sub, m):
                if s.display.empty:
                    body = f"({s.note or 'nothing to show'})"
                elif fmt == "markdown":
                    body = markdown_table(s.display, s.index)
                else:
                    body = s.display.to_string(index=s.index)
                parts.append(f"### {s.title}\n\n{body}" if fmt == "markdown" else f"{s.title}\n{body}")
    return "\n\n".join(parts) + "\n"


def _json_report(df: pd.DataFrame, metrics: tuple) -> dict:
    """One protocol's report as JSON-ready dicts."""
    out = {"runs": len(df), "seeds": _seed_range(df), "tables": {}, "claims": [], "paper_claims": []}
    for m in metrics:
        tables = {}
        for s in sections(df, m):
            if s.name in ("claims", "paper_claims"):
                out[s.name] += [{"metric": m, **r} for r in _records(s.data)]
            else:
                tables[s.name] = _records(s.data)
                if s.note and s.data.empty:
                    tables[s.name + "_note"] = s.note
        out["tables"][m] = tables
    return out


def format_tables(df: pd.DataFrame) -> str:
    """The paper-layout tables of every protocol and metric as text (mean +- std (runs))."""
    if df.empty:
        return NO_RUNS
    parts = []
    for protocol in protocols(df):
        sub = select(df, protocol)
        for metric in METRICS:
            parts.append(f"{METRICS[metric]}, protocol {protocol}, mean +- std (runs) over {_seed_range(sub)}\n"
                         f"{paper_table(sub, metric, with_n=True).to_string()}")
    return "\n\n".join(parts)
