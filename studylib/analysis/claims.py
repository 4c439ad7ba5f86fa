"""The paper's findings tested on a study's runs (or on the paper's own table, `reference.paper_frame`):
(a) pre-training helps more with fewer labels, (b) returns diminish, (c) the intermediate stage hurts,
most where pre-training helps most. Each finding rests on one or two tests (`claim_parts`), each a
linear combination of cell means with its 95% interval (`studylib.analysis.stats.contrast`); the
_-functions named after each part define them. Every part is fixed by the design (which cells, which
weights) before looking at the numbers.

Verdicts (`VERDICTS`), of a part and of a finding:
- 'supported': the 95% interval lies wholly on the claimed side of 0;
- 'not supported': it lies wholly on the wrong side (the data contradict the claim);
- 'inconclusive (n=K)': it contains 0; K = the seeds (pairs) or fewest runs per cell behind it;
- 'not enough runs': there is no interval (fewer than 2 runs, missing arms or sizes, or zero spread
  across seeds, which is not evidence: the detail says which).
A finding of several parts is 'supported' when all parts are, 'not enough runs' if any part lacks
runs, 'mixed: <part> <verdict>, ...' (naming the parts that did not hold) when some but not all hold,
and otherwise the weakest honest word: 'not supported' if any part is contradicted, else inconclusive.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from studylib.analysis.reference import CLAIMS
from studylib.analysis.stats import Estimate, cells, contrast, fmt_interval
from studylib.analysis.vocabulary import PAPER_ARM, arm_rank

SUPPORTED, NOT_SUPPORTED, NOT_ENOUGH = "supported", "not supported", "not enough runs"
INCONCLUSIVE, MIXED = "inconclusive", "mixed"
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, MIXED, NOT_ENOUGH)  # verdict_kind's values
PER = 1000  # slopes (finding b) are in metric points per PER added images, on both axes
PART_COLUMNS = ["finding", "part", "verdict", "effect", "ci95", "n", "detail"]
CLAIM_COLUMNS = ["finding", "claim", "verdict", "effect", "ci95", "detail"]


def verdict_kind(verdict: str) -> str:
    """The kind of a verdict, one of VERDICTS: 'inconclusive (n=3)' -> 'inconclusive',
    'mixed: labels inconclusive (n=2)' -> 'mixed'."""
    for kind in VERDICTS:
        if verdict == kind or verdict.startswith(kind + " (") or verdict.startswith(kind + ":"):
            return kind
    raise ValueError(f"not a verdict: {verdict!r}")


def _inconclusive(n: int) -> str:
    return f"{INCONCLUSIVE} (n={n})"


def _part(finding: str, part: str, verdict: str, est: Estimate | None, detail: str) -> dict:
    """One row of claim_parts."""
    effect = math.nan if est is None else est.value
    ci = (math.nan, math.nan) if est is None else (est.lo, est.hi)
    n = 0 if est is None else est.n
    return {
        "finding": finding,
        "part": part,
        "verdict": verdict,
        "effect": effect,
        "ci95": ci,
        "n": n,
        "detail": detail,
    }


def _verdict(est: Estimate, positive: bool) -> str:
    """The claim is that the estimate is > 0 (positive) or < 0: 'supported' when the 95% interval lies
    wholly on that side, 'not supported' when wholly on the other, 'inconclusive (n=K)' when it
    contains 0, 'not enough runs' when there is no interval."""
    if pd.isna(est.lo):
        return NOT_ENOUGH
    right, wrong = (est.lo > 0, est.hi < 0) if positive else (est.hi < 0, est.lo > 0)
    return SUPPORTED if right else NOT_SUPPORTED if wrong else _inconclusive(est.n)


def _est_text(est: Estimate, digits: int = 2) -> str:
    """'+1.23 [lo, hi] (paired, n=3)', with the reason when there is no interval."""
    if pd.isna(est.lo):
        why = est.note or ("fewer than 2 pairs" if est.method == "paired" else "fewer than 2 runs in a cell")
        return f"{est.value:+.{digits}f}, no interval ({est.method}, n={est.n}: {why})"
    return f"{est.value:+.{digits}f} [{est.lo:+.{digits}f}, {est.hi:+.{digits}f}] ({est.method}, n={est.n})"


def _arm_sizes(c: dict, pretrain_size: int, arm: str = "none") -> set:
    """The fine-tune sizes at which an arm has runs."""
    return {f for p, a, f in c if p == pretrain_size and a == arm}


def _add(weights: dict, key: tuple, weight: float) -> None:
    """Accumulate a contrast weight (a cell may enter a contrast more than once)."""
    weights[key] = weights.get(key, 0.0) + weight


# ------------------------------------------------------------------------------------------ (a)


def _fewer_labels(c: dict) -> dict:
    """(a) gain(P, f_min) - gain(P, f_max) for the largest pre-training size P (no intermediate stage),
    f_min / f_max the smallest / largest fine-tune size where both P and no pre-training have runs;
    holds when its 95% interval is above 0."""
    sizes = sorted({p for p, a, _ in c if p and a == "none"})
    common = sorted(_arm_sizes(c, 0) & _arm_sizes(c, sizes[-1])) if sizes else []
    if len(common) < 2:
        return _part(
            "a",
            "fewer labels",
            NOT_ENOUGH,
            None,
            "needs no pre-training and a pre-trained arm at two or more fine-tune sizes",
        )
    p, lo, hi = sizes[-1], common[0], common[-1]
    est = contrast(c, {(p, "none", lo): 1, (0, "none", lo): -1, (p, "none", hi): -1, (0, "none", hi): 1})
    g_lo, g_hi = (c[(p, "none", f)].mean - c[(0, "none", f)].mean for f in (lo, hi))
    return _part(
        "a",
        "fewer labels",
        _verdict(est, True),
        est,
        f"gain of {p} pre-training over none: {g_lo:+.2f} at {lo} labels, {g_hi:+.2f} at {hi}; "
        f"difference {_est_text(est)}",
    )


# ------------------------------------------------------------------------------------------ (b)


def _label_returns(c: dict) -> dict:
    """(b, labels) Concavity in labels: on the no-pre-training curve with fine-tune sizes
    f_1 < ... < f_k (k >= 3), the slope over the first interval minus the slope over the last,
    (m(f_2) - m(f_1)) / (f_2 - f_1) - (m(f_k) - m(f_{k-1})) / (f_k - f_{k-1}), slopes in points per PER
    added labelled images; holds when its 95% interval is above 0 (each added image is worth less)."""
    f = sorted(_arm_sizes(c, 0))
    if len(f) < 3:
        return _part("b", "labels", NOT_ENOUGH, None, "labels: needs no pre-training at three or more fine-tune sizes")
    first, last = (f[1] - f[0]) / PER, (f[-1] - f[-2]) / PER
    w: dict = {}
    for size, weight in [(f[0], -1 / first), (f[1], 1 / first), (f[-2], 1 / last), (f[-1], -1 / last)]:
        _add(w, (0, "none", size), weight)
    est = contrast(c, w)
    s_first = (c[(0, "none", f[1])].mean - c[(0, "none", f[0])].mean) / first
    s_last = (c[(0, "none", f[-1])].mean - c[(0, "none", f[-2])].mean) / last
    return _part(
        "b",
        "labels",
        _verdict(est, True),
        est,
        f"labels: without pre-training {s_first:+.3f} points per {PER:,} added labels from {f[0]} to "
        f"{f[1]}, {s_last:+.3f} from {f[-2]} to {f[-1]}; first minus last slope {_est_text(est, 3)}",
    )


def _pretrain_returns(c: dict) -> dict:
    """(b, pre-training) Concavity in pre-training data: with pre-training sizes 0 < p_1 < ... < p_k
    (k >= 2, no intermediate stage), the slope of the first step, (m(p_1) - m(0)) / p_1, minus the slope
    of the last, (m(p_k) - m(p_{k-1})) / (p_k - p_{k-1}), in points per PER added pre-training images
    (the scale of the labels part), averaged over the fine-tune sizes the arms 0, p_1, p_{k-1}, p_k all
    have; holds when its 95% interval is above 0."""
    p = sorted({s for s, a, _ in c if a == "none"})
    if len(p) < 3 or p[0] != 0:
        return _part(
            "b",
            "pre-training",
            NOT_ENOUGH,
            None,
            "pre-training: needs no pre-training and two or more pre-training sizes",
        )
    common = sorted(set.intersection(*(_arm_sizes(c, s) for s in (0, p[1], p[-2], p[-1]))))
    if not common:
        return _part("b", "pre-training", NOT_ENOUGH, None, "pre-training: the arms share no fine-tune size")
    first, last = p[1] / PER, (p[-1] - p[-2]) / PER
    w: dict = {}
    for f in common:
        for size, weight in [(p[1], 1 / first), (0, -1 / first), (p[-1], -1 / last), (p[-2], 1 / last)]:
            _add(w, (size, "none", f), weight / len(common))
    est = contrast(c, w)
    slope = lambda a, b: np.mean([c[(b, "none", f)].mean - c[(a, "none", f)].mean for f in common]) / (b - a) * PER  # noqa: E731
    return _part(
        "b",
        "pre-training",
        _verdict(est, True),
        est,
        f"pre-training: first step 0->{p[1]} {slope(0, p[1]):+.3f} points per {PER:,} added pre-training "
        f"images, last step {p[-2]}->{p[-1]} {slope(p[-2], p[-1]):+.3f} (mean over {len(common)} fine-tune "
        f"sizes); first minus last slope {_est_text(est, 3)}",
    )


# ------------------------------------------------------------------------------------------ (c)


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
    return _part(
        "c",
        "hurts",
        _verdict(est, False),
        est,
        f"mean change with the {arm} stage {_est_text(est)} over {len(pairs)} cells, negative in "
        f"{negative}/{len(pairs)}; largest drop {change[worst]:+.2f} at {worst[0]} pre-training, "
        f"{worst[1]} labels",
    )


def design_corners(c: dict, arm: str) -> tuple[tuple, tuple] | None:
    """The two cells (pretrain_size, finetune_size) finding (c)'s interaction compares, fixed by the
    design: where pre-training helps most (the largest pre-training size with the arm, the smallest
    fine-tune size) and least (the smallest pre-training size > 0 with the arm, the largest fine-tune
    size). None when either lacks the arm or its no-intermediate counterpart, or they coincide."""
    pairs = _intermediate_cells(c, arm)
    sizes, tunes = sorted({p for p, _ in pairs if p}), sorted({f for _, f in pairs})
    if not sizes:
        return None
    most, least = (sizes[-1], tunes[0]), (sizes[0], tunes[-1])
    return (most, least) if most != least and most in pairs and least in pairs else None


def gain_change_correlation(c: dict, arm: str) -> tuple[float, int]:
    """A description, never a test: Pearson r across cells (p, f) between the pre-training gain
    m(p, none, f) - m(0, f) and the change with the arm, m(p, arm, f) - m(p, none, f), and the number of
    cells (NaN when under 3 cells or no variation). Both contain m(p, none, f) with opposite signs, so
    seed noise alone pulls r below 0 (about -0.5 when the true gains do not vary)."""
    pairs = [(p, f) for p, f in _intermediate_cells(c, arm) if p and (0, "none", f) in c]
    gain = np.array([c[(p, "none", f)].mean - c[(0, "none", f)].mean for p, f in pairs])
    change = np.array([c[(p, arm, f)].mean - c[(p, "none", f)].mean for p, f in pairs])
    if len(pairs) < 3 or gain.std() == 0 or change.std() == 0:
        return math.nan, len(pairs)
    return float(np.corrcoef(gain, change)[0, 1]), len(pairs)


def interaction_part(c: dict, arm: str) -> dict:
    """(c, most where pre-training helps most; a row of claim_parts from a cells() dict) The interaction
    at the corners fixed by the design (`design_corners`): the change with the arm's stage where
    pre-training helps most, (P_max, f_min), minus the change where it helps least, (P_min, f_max):
    [m(P_max, arm, f_min) - m(P_max, none, f_min)] - [m(P_min, arm, f_max) - m(P_min, none, f_max)];
    holds when its 95% interval is below 0. Unlike a correlation of gains with changes, no cell mean
    enters it on both sides, so seed noise does not bias it. The correlation is shown as a description."""
    name = "most where pre-training helps most"
    corners = design_corners(c, arm)
    if corners is None:
        return _part(
            "c",
            name,
            NOT_ENOUGH,
            None,
            f"needs the {arm} stage and no intermediate stage at two pre-training and fine-tune "
            "corners (largest pre-training, fewest labels; smallest pre-training, most labels)",
        )
    (p_hi, f_lo), (p_lo, f_hi) = corners
    est = contrast(c, {(p_hi, arm, f_lo): 1, (p_hi, "none", f_lo): -1, (p_lo, arm, f_hi): -1, (p_lo, "none", f_hi): 1})
    ch = {(p, f): c[(p, arm, f)].mean - c[(p, "none", f)].mean for p, f in corners}
    gains = [c[(p, "none", f)].mean - c[(0, "none", f)].mean for p, f in corners if (0, "none", f) in c]
    gain_text = f" (pre-training gains there {gains[0]:+.2f} and {gains[1]:+.2f})" if len(gains) == 2 else ""
    r, k = gain_change_correlation(c, arm)
    r_text = (
        ""
        if pd.isna(r)
        else (
            f"; description only: r of pre-training gain and change across {k} cells "
            f"{r:+.2f} (biased below 0 by shared noise)"
        )
    )
    return _part(
        "c",
        name,
        _verdict(est, False),
        est,
        f"change with the {arm} stage where pre-training helps most by design ({p_hi} pre-training, "
        f"{f_lo} labels) {ch[(p_hi, f_lo)]:+.2f}, where least ({p_lo}, {f_hi} labels) {ch[(p_lo, f_hi)]:+.2f}"
        f"{gain_text}; difference {_est_text(est)}{r_text}",
    )


# ---------------------------------------------------------------------------------------- tables


def claim_parts(df: pd.DataFrame, metric: str = "miou", arm: str = PAPER_ARM) -> pd.DataFrame:
    """Every test behind claims(), one row each: finding, part, verdict, effect, ci95 (lo, hi), n
    (seeds or fewest runs per cell behind the interval; 0 without one), detail.
    (a) fewer labels; (b) labels and pre-training (slopes per 1,000 added images); (c) hurts and most
    where pre-training helps most (the interaction at the design's corners), for the intermediate arm
    `arm`. See the _-functions named after each part for the definitions."""
    c = cells(df, metric)
    rows = [
        _fewer_labels(c),
        _label_returns(c),
        _pretrain_returns(c),
        _intermediate_hurts(c, arm),
        interaction_part(c, arm),
    ]
    return pd.DataFrame(rows, columns=PART_COLUMNS)


def combine(parts: pd.DataFrame) -> str:
    """A finding's verdict from its parts (rows of claim_parts): 'not enough runs' if any part lacks
    runs; 'supported' if all hold; 'mixed: <part> <verdict>, ...' naming every part that did not hold
    when some do; else 'not supported' if any part is contradicted, else 'inconclusive (n=K)' with K the
    fewest seeds of any part."""
    kinds = [verdict_kind(v) for v in parts.verdict]
    if NOT_ENOUGH in kinds:
        return NOT_ENOUGH
    if all(k == SUPPORTED for k in kinds):
        return SUPPORTED
    if SUPPORTED in kinds:
        return f"{MIXED}: " + ", ".join(
            f"{p} {v}" for p, v, k in zip(parts.part, parts.verdict, kinds) if k != SUPPORTED
        )
    if NOT_SUPPORTED in kinds:
        return NOT_SUPPORTED
    return _inconclusive(int(parts.n.min()))


def claims(df: pd.DataFrame, metric: str = "miou", arm: str = PAPER_ARM) -> pd.DataFrame:
    """The paper's findings tested on one protocol's runs (or on paper_frame()), one row each:
    finding ('a' | 'b' | 'c'), claim, verdict (see the module's docstring), effect and ci95 (lo, hi) of
    the finding's first part, detail (every part's numbers).
    (a) gain of the largest pre-training at the fewest labels minus at the most labels, > 0;
    (b) slope per 1,000 added images, first interval minus last, > 0 both for labels (no pre-training)
        and for pre-training data (mean over the shared fine-tune sizes);
    (c) mean change with the intermediate stage (arm: the paper's 'intel' unless given) < 0, and the
        change where pre-training helps most by design minus where it helps least < 0.
    Nothing but the 95% intervals decides."""
    parts = claim_parts(df, metric, arm)
    rows = []
    for finding, sub in parts.groupby("finding", sort=True):
        first = sub.iloc[0]
        claim = CLAIMS[finding] + (f" (arm {arm})" if finding == "c" and arm != PAPER_ARM else "")
        rows.append(
            {
                "finding": finding,
                "claim": claim,
                "verdict": combine(sub),
                "effect": first.effect,
                "ci95": first.ci95,
                "detail": "; ".join(sub.detail),
            }
        )
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
    out["ci95"] = [fmt_interval(lo, hi) for lo, hi in out.ci95]
    return out
