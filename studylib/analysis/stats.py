"""Statistics of a study's cells: one configuration's runs (`Cell`, `cells`) and linear combinations of
cell means with their 95% intervals (`Estimate`, `contrast`).

- the *replicate* is the seed: one seed's runs share their pre-trained and intermediate encoders, so
  runs of different cells of one seed are not independent. A difference is formed per seed over the
  seeds that every cell involved has (a seed that lacks a cell is dropped, and the Estimate says so),
  and the *95% interval* is mean +- t(n-1) * sd / sqrt(n) over those per-seed differences (paired).
  Welch's interval (the cells independent samples, se^2 = sum w^2 s^2 / n, Welch-Satterthwaite degrees
  of freedom) is used only for summary statistics, which have no seeds (the paper's table): it treats
  the runs of each cell as independent of every other run (`WELCH_REPLICATE`). The t quantile is the
  exact one for any (also fractional) degrees of freedom (`t975`). There is no interval with fewer than
  2 seeds (runs), nor when the estimated standard error is 0: zero spread across seeds is not evidence
  of a precise effect (the Estimate's note says so).
- *power*: a one-sided test at level ALPHA (the claimed side of a 95% interval) of an effect with
  standard error se and df degrees of freedom detects a true effect delta with probability
  1 - nct.cdf(t_{1-ALPHA, df}, df, delta / se) (`power_at`); the minimal detectable effect is the delta
  that reaches TARGET_POWER (`mde_at`), and `seeds_needed` the fewest seeds that reach it.

`cells` accepts a frame of runs (`tables.collect`) or of summary statistics (`reference.paper_frame`:
columns metric, mean, std, n), so the paper's own table goes through the same tests. Cells, arms and
the other names are defined in `studylib.analysis.vocabulary`.
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
ALPHA = 0.025  # one-sided level of a part's test: the claimed side of a two-sided 95% interval
TARGET_POWER = 0.8  # the power a minimal detectable effect is defined at
SEEDS_CAP = 1000  # seeds_needed looks no further
WELCH_REPLICATE = "Welch, {n} runs per cell treated as independent"  # summary statistics have no seeds


@dataclass(frozen=True)
class Estimate:
    """A linear combination of cell means with its 95% interval (lo, hi; NaN when there is none),
    n (seeds when paired, else the fewest runs of any cell), method ('paired' or 'welch'), a note
    saying why there is no interval when the runs suffice but their spread is 0 (else ''), the
    replicate behind the interval in words ('paired over 4 of 5 seeds (seed 3 lacks a cell)'), and
    its standard error se and degrees of freedom df (NaN without an interval)."""

    value: float
    lo: float
    hi: float
    n: int
    method: str
    note: str = ""
    replicate: str = ""
    se: float = math.nan
    df: float = math.nan

    @property
    def sd(self) -> float:
        """The per-seed standard deviation of a paired contrast (se * sqrt(n)); for Welch the sd one run
        per cell would have, sqrt(sum w^2 s^2)."""
        return self.se * math.sqrt(self.n)


def _zero(se: float, scale: float) -> bool:
    """True when a standard error is 0 up to floating-point rounding of numbers of size scale."""
    return se <= 1e-9 * (1.0 + scale)


def _per_seed(cell: Cell) -> pd.Series:
    """A cell's value per seed; runs that repeat a seed are averaged (the seed is the unit)."""
    v = cell.values
    return v if v.index.is_unique else v.groupby(level=0).mean()


def _seed_text(seeds: list) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(str(s) for s in seeds)


def paired_replicate(n: int, dropped: list) -> str:
    """'paired over 5 seeds', or 'paired over 4 of 5 seeds (seed 3 lacks a cell)'."""
    if not dropped:
        return f"paired over {n} seed{'s' if n != 1 else ''}"
    lack = "lacks" if len(dropped) == 1 else "lack"
    return f"paired over {n} of {n + len(dropped)} seeds ({_seed_text(dropped)} {lack} a cell)"


def _paired(terms: list, value: float, scale: float) -> Estimate:
    """The paired estimate over the seeds every cell has (see contrast)."""
    series = [_per_seed(c) for c, _ in terms]
    common = sorted(set.intersection(*(set(s.index) for s in series)))
    dropped = sorted(set.union(*(set(s.index) for s in series)) - set(common))
    n, replicate = len(common), paired_replicate(len(common), dropped)
    if n:  # the value is over the seeds of the interval (equal to the cell means' when no seed is dropped)
        value = float(sum(w * s.reindex(common).mean() for s, (_, w) in zip(series, terms)))
    if n < 2:
        return Estimate(value, math.nan, math.nan, n, "paired", "", replicate)
    per_seed = sum(w * s.reindex(common).to_numpy() for s, (_, w) in zip(series, terms))
    se = float(np.std(per_seed, ddof=1)) / math.sqrt(n)
    if _zero(se, scale):
        return Estimate(value, math.nan, math.nan, n, "paired", NO_SPREAD, replicate)
    half = t975(n - 1) * se
    return Estimate(value, value - half, value + half, n, "paired", "", replicate, se, n - 1.0)


def _welch(terms: list, value: float, scale: float) -> Estimate:
    """Welch's estimate from summary statistics (see contrast)."""
    n = min(c.n for c, _ in terms)
    replicate = WELCH_REPLICATE.format(n=n if all(c.n == n for c, _ in terms) else f"{n} or more")
    if n < 2:
        return Estimate(value, math.nan, math.nan, n, "welch", "", replicate)
    v = [(w * w * c.std * c.std / c.n, c.n) for c, w in terms]
    total = sum(vk for vk, _ in v)
    if _zero(math.sqrt(total), scale):
        return Estimate(value, math.nan, math.nan, n, "welch", NO_SPREAD, replicate)
    dof = total**2 / sum(vk * vk / (nk - 1) for vk, nk in v)
    se = math.sqrt(total)
    half = t975(dof) * se
    return Estimate(value, value - half, value + half, n, "welch", "", replicate, se, dof)


def contrast(cell_map: dict, weights: dict) -> Estimate:
    """Estimate sum_k w_k * mean_k over the cells named in weights (keys of cell_map).
    Runs (cells with values per seed): paired over the seeds every cell has, the others dropped (named in
    the Estimate's replicate); per seed d_s = sum_k w_k x_{k,s}, value mean(d), interval
    mean(d) +- t975(n-1) sd(d) / sqrt(n). A missing run never turns runs that share an encoder into
    independent samples. Summary statistics (no values): Welch, se^2 = sum_k w_k^2 s_k^2 / n_k, degrees
    of freedom (sum v_k)^2 / sum v_k^2 / (n_k - 1) with v_k = w_k^2 s_k^2 / n_k; needs n_k >= 2.
    No interval (lo = hi = NaN) with fewer than 2 seeds/runs, nor when the estimated standard error is 0
    (note NO_SPREAD): a zero-width interval would claim a certainty the runs do not give."""
    terms = [(cell_map[k], float(w)) for k, w in weights.items() if w != 0]
    value = sum(w * c.mean for c, w in terms)
    scale = sum(abs(w * c.mean) for c, w in terms)
    if all(c.values is not None for c, _ in terms):
        return _paired(terms, value, scale)
    return _welch(terms, value, scale)


# ------------------------------------------------------------------------------------------ power


def power_at(effect, se, df, alpha: float = ALPHA):
    """The probability that a one-sided level-alpha t test (df degrees of freedom, standard error se)
    finds a true effect of size |effect| on its side: 1 - nct.cdf(t_{1-alpha, df}, df, |effect| / se).
    Vectorised over its arguments; NaN where df < 1 or se is not positive."""
    from scipy import stats

    effect, se, df = np.broadcast_arrays(*(np.asarray(x, float) for x in (effect, se, df)))
    ok = (df >= 1) & (se > 0)
    out = np.full(effect.shape, np.nan)
    d, s = np.where(ok, df, 1.0), np.where(ok, se, 1.0)
    crit, lam = stats.t.ppf(1 - alpha, d), np.abs(effect) / s
    miss = stats.nct.cdf(crit, d, lam)
    miss = np.where(np.isnan(miss) & (lam > crit), 0.0, miss)  # scipy's NaN far in the tail, where it is 0
    out[ok] = (1 - miss)[ok]
    return out if out.ndim else float(out)


def mde_at(se: float, df: float, alpha: float = ALPHA, target: float = TARGET_POWER) -> float:
    """The minimal detectable effect: the true effect a one-sided level-alpha t test with standard error
    se and df degrees of freedom finds with probability target (NaN without a test)."""
    if not (df >= 1 and se > 0):
        return math.nan
    from scipy.optimize import brentq

    z = brentq(lambda lam: power_at(lam, 1.0, df, alpha) - target, 0.0, 60.0)  # 60: power 1 at df 1
    return float(z * se)


def seeds_needed(effect: float, sd: float, alpha: float = ALPHA, target: float = TARGET_POWER, cap: int = SEEDS_CAP):
    """The fewest seeds n >= 2 at which a paired contrast with per-seed sd finds a true effect of size
    |effect| with probability >= target (se = sd / sqrt(n), n - 1 degrees of freedom); None when more
    than cap seeds would be needed (or the effect is 0, or there is no sd)."""
    if not (sd > 0) or not abs(effect) > 0:
        return None
    n = np.arange(2, cap + 1)
    reach = np.nonzero(power_at(effect, sd / np.sqrt(n), n - 1.0, alpha) >= target)[0]
    return int(n[reach[0]]) if len(reach) else None


def fmt_interval(lo: float, hi: float) -> str:
    """'[lo, hi]' with two decimals, or 'no interval' when there is none."""
    return "no interval" if pd.isna(lo) else f"[{lo:+.2f}, {hi:+.2f}]"
