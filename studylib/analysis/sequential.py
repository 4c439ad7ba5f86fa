"""Run until decided: after each round of added seeds (a *look*), every part of every finding is tested
against a group-sequential boundary, so that looking after every round keeps each part's false
"supported" rate at the fixed-n level, 2.5% one-sided, over all looks (`decide`, `Decision.line`,
`Decision.report`; `study run PARAMS --until-decided --max-seeds N`).

The boundary: Lan-DeMets alpha spending with the O'Brien-Fleming-like function
alpha(t) = 2 - 2 Phi(z_{1 - 0.025/2} / sqrt(t)) over the information fraction t = n_k / n_max (n_k the
seeds at look k, n_max = max_seeds; alpha(1) = 0.025). Look k spends alpha_k = alpha(t_k) - alpha(t_{k-1})
and tests the part with the exact paired t test on its first n_k seeds at one-sided level alpha_k
(`critical_t`). Why a union bound rather than the usual joint normal boundaries: with 2 to 16 seeds the
t statistics are far from normal and their joint law depends on the unknown sd, so the classical
boundaries (computed for z statistics) would not hold; but each look's t test is exact at its own level,
so P(any look crosses) <= sum_k alpha_k = alpha(t_K) <= 2.5% whatever the correlation between looks and
however many looks are taken, as long as max_seeds is fixed before the first look. The price is a
little power against exact boundaries; the O'Brien-Fleming shape spends almost nothing early (about
1e-10 at 2 of 16 seeds), so the last look keeps most of the 2.5%.

Decisions of a part at a look (the first look that decides it stands; later looks do not revisit it):
- 'supported': its t statistic is beyond the boundary on the claimed side;
- 'not supported': beyond the same boundary on the wrong side;
- 'no effect above X <unit>': its interval at the look's level (mean +- critical t * se) lies within
  (-X, X), X the minimal detectable effect of the final design (80% power at max_seeds seeds, with the sd
  measured at that look): the study excludes every effect it was designed to detect;
- else 'continue' ('undecided' at the last look, with the largest effect the last interval leaves open).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from studylib.analysis.claims import INTERACTION, all_parts, effect_text, unit
from studylib.analysis.stats import ALPHA, cells, mde_at
from studylib.analysis.vocabulary import KEY, PAPER_ARM, intermediate_arm

SUPPORTED, NOT_SUPPORTED, NO_EFFECT, CONTINUE, UNDECIDED = (
    "supported",
    "not supported",
    "no effect above",
    "continue",
    "undecided",
)


def spent(t, alpha: float = ALPHA):
    """The alpha spent by information fraction t (0 <= t <= 1): 2 - 2 Phi(z_{1-alpha/2} / sqrt(t)), 0 at 0."""
    from scipy import stats

    t = np.clip(np.asarray(t, float), 0.0, 1.0)
    z = stats.norm.ppf(1 - alpha / 2)
    with np.errstate(divide="ignore"):
        out = np.where(t > 0, 2 - 2 * stats.norm.cdf(z / np.sqrt(np.where(t > 0, t, 1.0))), 0.0)
    return out if out.ndim else float(out)


def look_levels(looks: list[int], max_seeds: int, alpha: float = ALPHA) -> np.ndarray:
    """alpha_k = alpha(t_k) - alpha(t_{k-1}) per look, t_k = n_k / max_seeds (n_k the seeds at look k)."""
    if max_seeds < 2:
        raise ValueError(f"max_seeds must be >= 2 to test anything, got {max_seeds}")
    if any(b <= a for a, b in zip(looks, looks[1:])):
        raise ValueError(f"looks must be increasing seed counts, got {list(looks)}")
    cum = spent(np.asarray(looks, float) / max_seeds, alpha)
    return np.diff(np.concatenate([[0.0], np.atleast_1d(cum)]))


def critical_t(looks: list[int], max_seeds: int, alpha: float = ALPHA) -> np.ndarray:
    """The one-sided critical t per look: t_{1 - alpha_k, n_k - 1} (inf where n_k < 2 or nothing is spent)."""
    from scipy import stats

    levels, n = look_levels(looks, max_seeds, alpha), np.asarray(looks, float)
    ok = (n >= 2) & (levels > 0)
    with np.errstate(invalid="ignore"):
        crit = stats.t.isf(np.where(ok, levels, 0.5), np.where(ok, n - 1, 1.0))
    return np.where(ok, crit, np.inf)


def boundary_text(max_seeds: int, alpha: float = ALPHA) -> str:
    """The boundary in words, for the report."""
    from scipy import stats

    z = stats.norm.ppf(1 - alpha / 2)
    return (
        f"O'Brien-Fleming-like alpha spending (Lan-DeMets), alpha(t) = 2 - 2 Phi({z:.3f} / sqrt(t)), "
        f"t = seeds / {max_seeds} (max seeds); each look tests each part with the paired t test at level "
        f"alpha(t_k) - alpha(t_k-1), one-sided; false 'supported' <= {alpha:.1%} per part over all looks"
    )


@dataclass(frozen=True)
class PartDecision:
    """One part's state after the looks so far: verdict (SUPPORTED, NOT_SUPPORTED, 'no effect above X
    <unit>', CONTINUE or UNDECIDED ...), look (1-based index of the look that decided it; None if none),
    n (seeds at that look, or at the last), effect, lo and hi (its interval at that look's level), level
    (that look's one-sided alpha_k), size (X, the final design's minimal detectable effect) and unit."""

    finding: str
    part: str
    arm: str
    verdict: str
    look: int | None
    n: int
    effect: float
    lo: float
    hi: float
    level: float
    size: float
    unit: str

    @property
    def decided(self) -> bool:
        return self.look is not None or self.verdict.startswith("not tested")

    @property
    def name(self) -> str:
        arm = "" if self.finding != "c" or self.arm == PAPER_ARM else f" (arm {self.arm})"
        short = "interaction" if self.part == INTERACTION else self.part
        return f"({self.finding}) {short}{arm}"


@dataclass
class Decision:
    """The verdicts after the looks so far (`decide`): looks (seeds at each look), max_seeds, parts,
    done (every part decided, or the last look reached max_seeds) and the boundary in words."""

    looks: list[int]
    max_seeds: int
    parts: list[PartDecision] = field(default_factory=list)
    done: bool = False
    boundary: str = ""

    def line(self) -> str:
        """This round's verdicts on one line."""
        k, n = len(self.looks), self.looks[-1]
        head = f"look {k} ({n} of at most {self.max_seeds} seeds)"
        return head + ": " + "; ".join(f"{p.name} {_short(p)}" for p in self.parts)

    def report(self) -> str:
        """The final report: looks taken, the boundary, each part's verdict with its numbers."""
        lines = [
            f"{len(self.looks)} looks at {', '.join(map(str, self.looks))} seeds (at most {self.max_seeds}); "
            + ("every part decided" if all(p.decided for p in self.parts) else "stopped with parts undecided"),
            f"boundary: {self.boundary}",
        ]
        for p in self.parts:
            where = f"at look {p.look} ({p.n} seeds)" if p.look else f"after {p.n} seeds"
            numbers = "" if math.isnan(p.effect) else f": {effect_text(p.effect, p.unit)} [{p.lo:+.2f}, {p.hi:+.2f}]"
            level = "" if math.isnan(p.level) else f" at level {p.level:.2g}"
            lines.append(f"  {p.name}: {p.verdict} {where}{numbers}{level}")
        return "\n".join(lines)


def _short(p: PartDecision) -> str:
    return p.verdict if p.look is None or p.look == 0 else f"{p.verdict} (look {p.look})"


def per_seed_values(df: pd.DataFrame, metric: str = "miou") -> pd.DataFrame:
    """Seeds x cells: each run's metric (runs that repeat a seed averaged), NaN where a seed lacks a cell."""
    runs = df.dropna(subset=[metric]).assign(intermediate=lambda d: d["intermediate"].map(intermediate_arm))
    runs = runs.assign(cell=list(zip(*(runs[k] for k in KEY))))
    return runs.pivot_table(index="seed", columns="cell", values=metric, aggfunc="mean").sort_index()


def _decide_part(d: np.ndarray, sign: int, looks, crit, levels, max_seeds, units: str) -> tuple:
    """(verdict, look, n, mean, lo, hi, level, size) from a part's per-seed values d (in seed order)."""
    last = (None, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
    for k, (n_k, c, a) in enumerate(zip(looks, crit, levels), start=1):
        x = d[:n_k]
        if len(x) < 2 or not np.isfinite(c):
            continue
        mean, sd = float(x.mean()), float(x.std(ddof=1))
        if sd == 0:
            continue  # zero spread is no evidence
        se = sd / math.sqrt(len(x))
        size = mde_at(sd / math.sqrt(max_seeds), max_seeds - 1.0)
        lo, hi, t = mean - c * se, mean + c * se, sign * mean / se
        last = (len(x), mean, lo, hi, a, size, k)
        if t > c:
            return (SUPPORTED, k, len(x), mean, lo, hi, a, size)
        if t < -c:
            return (NOT_SUPPORTED, k, len(x), mean, lo, hi, a, size)
        if -size < lo and hi < size:
            return (f"{NO_EFFECT} {size:,.2f} {units}", k, len(x), mean, lo, hi, a, size)
    n, mean, lo, hi, a, size, _ = last
    return (CONTINUE, None, n if n is not None else min(len(d), looks[-1]), mean, lo, hi, a, size)


def decide(
    df: pd.DataFrame, looks: list[int], max_seeds: int, keys=None, metric: str = "miou", alpha: float = ALPHA
) -> Decision:
    """Every part's verdict after the looks so far. df: one protocol's finished runs (collect's frame);
    looks: the seeds the study had at each look so far, increasing, this one last (e.g. [2, 4, 6]); the
    seeds of look k are, per part, the first n_k seeds in seed order that have every cell of the part, so
    calling again with the same runs replays the same looks (a resumed study continues its looks);
    max_seeds: the most seeds the study will run (fixed before the first look); keys: the design's cells
    (`power.design_keys(cfg)`; default: the cells that ran). done: every part decided, or looks[-1] >=
    max_seeds (the undecided parts are then 'undecided', with the largest effect their last interval
    leaves open)."""
    looks = [int(n) for n in looks]
    levels, crit = look_levels(looks, max_seeds, alpha), critical_t(looks, max_seeds, alpha)
    values = per_seed_values(df, metric) if not df.empty else pd.DataFrame()
    keys = set(keys) if keys is not None else set(cells(df, metric))
    out = []
    for finding, part, arm, sign, w in all_parts(keys):
        units = unit(part, metric)
        if isinstance(w, str):
            out.append(PartDecision(finding, part, arm, f"not tested: {w}", None, 0, *[math.nan] * 5, units))
            continue
        cols = [k for k in w if k in values.columns]
        full = values[cols].dropna() if len(cols) == len(w) else values.iloc[:0, :0]
        d = full.to_numpy() @ np.array([w[k] for k in cols]) if len(full) else np.array([])
        out.append(
            PartDecision(finding, part, arm, *_decide_part(d, sign, looks, crit, levels, max_seeds, units), units)
        )
    final = looks[-1] >= max_seeds
    if final:
        out = [_undecided(p) if not p.decided else p for p in out]
    done = final or all(p.decided for p in out)
    return Decision(looks, max_seeds, out, done, boundary_text(max_seeds, alpha))


def _undecided(p: PartDecision) -> PartDecision:
    """A part still open at the last look: 'undecided; effects above Y excluded' (Y = the largest |bound|)."""
    if math.isnan(p.lo):
        return replace(p, verdict=f"{UNDECIDED}: no interval")
    bound = max(abs(p.lo), abs(p.hi))
    return replace(p, verdict=f"{UNDECIDED}; effects above {bound:,.2f} {p.unit} excluded")
