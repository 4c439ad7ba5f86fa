"""Statistics of a study's cells: one configuration's runs (`Cell`, `cells`) and linear combinations of
cell means with their 95% intervals (`Estimate`, `contrast`).

- a *95% interval* of a difference: when every cell involved holds the same seeds, once each, the
  difference is formed per seed and the interval is mean +- t(n-1) * sd / sqrt(n) over those per-seed
  differences (paired); otherwise it is Welch's: the cells are independent samples,
  se^2 = sum w^2 s^2 / n and the degrees of freedom are Welch-Satterthwaite's. The t quantile is the
  exact one for any (also fractional) degrees of freedom (`t975`). There is no interval with fewer than
  2 runs (pairs), nor when the estimated standard error is 0: zero spread across seeds is not evidence
  of a precise effect (the Estimate's note says so).

`cells` accepts a frame of runs (`tables.collect`) or of summary statistics (`reference.paper_frame`:
columns metric, mean, std, n), so the paper's own table goes through the same tests (always Welch, it
has no seeds). Cells, arms and the other names are defined in `studylib.analysis.vocabulary`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from studylib.analysis.vocabulary import KEY, intermediate_arm, protocols


def _one_protocol(df: pd.DataFrame) -> None:
    """Refuse to pool runs of different protocols into one cell."""
    found = protocols(df)
    if len(found) > 1:
        raise ValueError(
            f"runs of {len(found)} protocols ({', '.join(found)}): pass one, e.g. vocabulary.select(df, {found[0]!r})"
        )


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
        return {
            (int(p), intermediate_arm(i), int(f)): Cell(float(m), float(s), int(n))
            for p, i, f, m, s, n in zip(
                sub.pretrain_size, sub.intermediate, sub.finetune_size, sub["mean"], sub["std"], sub["n"]
            )
        }
    out = {}
    runs = df.dropna(subset=[metric]).assign(intermediate=lambda d: d["intermediate"].map(intermediate_arm))
    for (p, i, f), g in runs.groupby(KEY):
        v = pd.Series(g[metric].astype(float).to_numpy(), index=g["seed"].to_numpy())
        out[(int(p), str(i), int(f))] = Cell(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v), v)
    return out


# ------------------------------------------------------------------------------------------ intervals


def t975(df: float) -> float:
    """0.975 quantile of Student's t with df degrees of freedom (exact, scipy's `t.ppf`, for any df >= 1,
    fractional Welch df included), so mean +- t975(df) * se is a two-sided 95% interval."""
    if not df >= 1 - 1e-9:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    from scipy import stats  # imported when needed: a stage kernel never needs scipy

    return float(stats.t.ppf(0.975, max(float(df), 1.0)))


NO_SPREAD = "no spread across seeds (standard error 0): no interval"


@dataclass(frozen=True)
class Estimate:
    """A linear combination of cell means with its 95% interval (lo, hi; NaN when there is none),
    n (pairs when paired, else the fewest runs of any cell), method ('paired' or 'welch') and a note
    saying why there is no interval when the runs suffice but their spread is 0 (else '')."""

    value: float
    lo: float
    hi: float
    n: int
    method: str
    note: str = ""


def _zero(se: float, scale: float) -> bool:
    """True when a standard error is 0 up to floating-point rounding of numbers of size scale."""
    return se <= 1e-9 * (1.0 + scale)


def contrast(cell_map: dict, weights: dict) -> Estimate:
    """Estimate sum_k w_k * mean_k over the cells named in weights (keys of cell_map).
    Paired when every cell holds the same seeds once each: per seed d_s = sum_k w_k x_{k,s}, interval
    mean(d) +- t975(n-1) sd(d) / sqrt(n). Otherwise Welch: se^2 = sum_k w_k^2 s_k^2 / n_k, degrees of
    freedom (sum v_k)^2 / sum v_k^2 / (n_k - 1) with v_k = w_k^2 s_k^2 / n_k; needs n_k >= 2 for all k.
    No interval (lo = hi = NaN) with fewer than 2 pairs/runs, nor when the estimated standard error is
    0 (paired sd 0, or Welch total variance 0; note NO_SPREAD): a zero-width interval would claim a
    certainty the runs do not give."""
    terms = [(cell_map[k], float(w)) for k, w in weights.items() if w != 0]
    value = sum(w * c.mean for c, w in terms)
    scale = sum(abs(w * c.mean) for c, w in terms)
    seed_sets = [c.seeds for c, _ in terms]
    if seed_sets[0] is not None and all(s == seed_sets[0] for s in seed_sets):
        order = sorted(seed_sets[0])
        per_seed = sum(w * c.values.reindex(order).to_numpy() for c, w in terms)
        n = len(per_seed)
        if n < 2:
            return Estimate(value, math.nan, math.nan, n, "paired")
        se = float(np.std(per_seed, ddof=1)) / math.sqrt(n)
        if _zero(se, scale):
            return Estimate(value, math.nan, math.nan, n, "paired", NO_SPREAD)
        half = t975(n - 1) * se
        return Estimate(value, value - half, value + half, n, "paired")
    n = min(c.n for c, _ in terms)
    if n < 2:
        return Estimate(value, math.nan, math.nan, n, "welch")
    v = [(w * w * c.std * c.std / c.n, c.n) for c, w in terms]
    total = sum(vk for vk, _ in v)
    if _zero(math.sqrt(total), scale):
        return Estimate(value, math.nan, math.nan, n, "welch", NO_SPREAD)
    dof = total**2 / sum(vk * vk / (nk - 1) for vk, nk in v)
    half = t975(dof) * math.sqrt(total)
    return Estimate(value, value - half, value + half, n, "welch")


def fmt_interval(lo: float, hi: float) -> str:
    """'[lo, hi]' with two decimals, or 'no interval' when there is none."""
    return "no interval" if pd.isna(lo) else f"[{lo:+.2f}, {hi:+.2f}]"
