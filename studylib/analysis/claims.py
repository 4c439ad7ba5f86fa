"""The paper's findings tested on a study's runs (or on the paper's own table, `reference.paper_frame`):
(a) pre-training helps more with fewer labels, (b) returns diminish, (c) the intermediate stage hurts,
most where pre-training helps most. Each finding rests on one or two tests (`claim_parts`), each a
linear combination of cell means with its 95% interval (`studylib.analysis.stats.contrast`, paired over
seeds). Which cells and which weights (`part_weights`) follow from the design alone, before looking at
the numbers; the power planner (`studylib.analysis.power`), the sequential rule
(`studylib.analysis.sequential`) and the calibration tests use the same weights.

Verdicts (`VERDICTS`), of a part and of a finding:
- 'supported': the 95% interval lies wholly on the claimed side of 0;
- 'not supported': it lies wholly on the wrong side (the data contradict the claim);
- 'inconclusive (n=K)': it contains 0; K = the seeds (pairs) or fewest runs per cell behind it;
- 'not enough runs': there is no interval (fewer than 2 runs, missing arms or sizes, or zero spread
  across seeds, which is not evidence: the detail says which).
A finding of several parts is 'supported' when all parts are, 'not enough runs' if any part lacks
runs, 'mixed: <part> <verdict>, ...' (naming the parts that did not hold) when some but not all hold,
and otherwise the weakest honest word: 'not supported' if any part is contradicted, else inconclusive.
`claims_summary` shows every part on its own row with its unit, its replicate and, beside an
inconclusive verdict, the smallest effect it could have detected.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from studylib.analysis.reference import CLAIMS
from studylib.analysis.stats import Estimate, cells, contrast, fmt_interval, mde_at
from studylib.analysis.vocabulary import PAPER_ARM, arm_rank

SUPPORTED, NOT_SUPPORTED, NOT_ENOUGH = "supported", "not supported", "not enough runs"
INCONCLUSIVE, MIXED = "inconclusive", "mixed"
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, MIXED, NOT_ENOUGH)  # verdict_kind's values
PER = 1000  # slopes (finding b) are in metric points per PER added images, on both axes
INTERACTION = "most where pre-training helps most"
#: every part: (finding, part, claimed sign: +1 the claim is that the contrast is > 0, -1 that it is < 0)
PARTS = (
    ("a", "fewer labels", 1),
    ("b", "labels", 1),
    ("b", "pre-training", 1),
    ("c", "hurts", -1),
    ("c", INTERACTION, -1),
)
PART_COLUMNS = ["finding", "part", "verdict", "effect", "ci95", "n", "detail", "unit", "replicate", "mde"]
CLAIM_COLUMNS = ["finding", "claim", "verdict", "effect", "ci95", "detail", "unit"]
SUMMARY_COLUMNS = ["finding", "claim", "finding verdict", "part", "verdict", "effect", "ci95", "replicate"]
POINTS = {"miou": "mIoU points", "pixel_acc": "pixel-accuracy points", "miou_dataset": "dataset-mIoU points"}
SLOPE_UNIT = f"points per {PER:,} images"


def unit(part: str, metric: str = "miou") -> str:
    """The unit of a part's effect: points of the metric, or points per 1,000 images for the slopes of (b)."""
    return SLOPE_UNIT if part in ("labels", "pre-training") else POINTS.get(metric, f"{metric} points")


def verdict_kind(verdict: str) -> str:
    """The kind of a verdict, one of VERDICTS: 'inconclusive (n=3)' -> 'inconclusive',
    'mixed: labels inconclusive (n=2)' -> 'mixed'."""
    for kind in VERDICTS:
        if verdict == kind or verdict.startswith(kind + " (") or verdict.startswith(kind + ":"):
            return kind
    raise ValueError(f"not a verdict: {verdict!r}")


def _inconclusive(n: int) -> str:
    return f"{INCONCLUSIVE} (n={n})"


def _part(finding: str, part: str, verdict: str, est: Estimate | None, detail: str, metric: str) -> dict:
    """One row of claim_parts; mde: the smallest true effect its test finds with 80% power at its seeds."""
    return {
        "finding": finding,
        "part": part,
        "verdict": verdict,
        "effect": math.nan if est is None else est.value,
        "ci95": (math.nan, math.nan) if est is None else (est.lo, est.hi),
        "n": 0 if est is None else est.n,
        "detail": detail,
        "unit": unit(part, metric),
        "replicate": "" if est is None else est.replicate,
        "mde": math.nan if est is None else mde_at(est.se, est.df),
    }


def _verdict(est: Estimate, positive: bool) -> str:
    """The claim is that the estimate is > 0 (positive) or < 0: 'supported' when the 95% interval lies
    wholly on that side, 'not supported' when wholly on the other, 'inconclusive (n=K)' when it
    contains 0, 'not enough runs' when there is no interval."""
    if pd.isna(est.lo):
        return NOT_ENOUGH
    right, wrong = (est.lo > 0, est.hi < 0) if positive else (est.hi < 0, est.lo > 0)
    return SUPPORTED if right else NOT_SUPPORTED if wrong else _inconclusive(est.n)


def _est_text(est: Estimate, units: str, digits: int = 2) -> str:
    """'+1.23 mIoU points [lo, hi] (paired over 3 seeds)', with the reason when there is no interval."""
    if pd.isna(est.lo):
        why = est.note or ("fewer than 2 seeds" if est.method == "paired" else "fewer than 2 runs in a cell")
        return f"{est.value:+.{digits}f} {units}, no interval ({est.replicate}: {why})"
    return f"{est.value:+.{digits}f} {units} [{est.lo:+.{digits}f}, {est.hi:+.{digits}f}] ({est.replicate})"


def _arm_sizes(keys, pretrain_size: int, arm: str = "none") -> set:
    """The fine-tune sizes at which an arm has runs."""
    return {f for p, a, f in keys if p == pretrain_size and a == arm}


def _add(weights: dict, key: tuple, weight: float) -> None:
    """Accumulate a contrast weight (a cell may enter a contrast more than once)."""
    weights[key] = weights.get(key, 0.0) + weight


# ------------------------------------------------------------------------------------------ (a)


def _fewer_labels_weights(keys) -> tuple[dict, tuple] | str:
    """(a) gain(P, f_min) - gain(P, f_max) for the largest pre-training size P (no intermediate stage),
    f_min / f_max the smallest / largest fine-tune size where both P and no pre-training have runs:
    (weights, (P, f_min, f_max)), or why there is no test."""
    sizes = sorted({p for p, a, _ in keys if p and a == "none"})
    common = sorted(_arm_sizes(keys, 0) & _arm_sizes(keys, sizes[-1])) if sizes else []
    if len(common) < 2:
        return "needs no pre-training and a pre-trained arm at two or more fine-tune sizes"
    p, lo, hi = sizes[-1], common[0], common[-1]
    return {(p, "none", lo): 1, (0, "none", lo): -1, (p, "none", hi): -1, (0, "none", hi): 1}, (p, lo, hi)


def _fewer_labels(c: dict, metric: str) -> dict:
    """(a) holds when the 95% interval of _fewer_labels_weights' contrast is above 0."""
    design = _fewer_labels_weights(c)
    if isinstance(design, str):
        return _part("a", "fewer labels", NOT_ENOUGH, None, design, metric)
    w, (p, lo, hi) = design
    est = contrast(c, w)
    g_lo, g_hi = (c[(p, "none", f)].mean - c[(0, "none", f)].mean for f in (lo, hi))
    detail = (
        f"gain of {p:,} pre-training images over none: {g_lo:+.2f} at {lo:,} labels, {g_hi:+.2f} at {hi:,}; "
        f"difference {_est_text(est, unit('fewer labels', metric))}"
    )
    return _part("a", "fewer labels", _verdict(est, True), est, detail, metric)


# ------------------------------------------------------------------------------------------ (b)


def _label_returns_weights(keys) -> tuple[dict, list] | str:
    """(b, labels) Concavity in labels: on the no-pre-training curve with fine-tune sizes
    f_1 < ... < f_k (k >= 3), the slope over the first interval minus the slope over the last,
    (m(f_2) - m(f_1)) / (f_2 - f_1) - (m(f_k) - m(f_{k-1})) / (f_k - f_{k-1}), slopes in points per PER
    added labelled images: (weights, the sizes), or why there is no test."""
    f = sorted(_arm_sizes(keys, 0))
    if len(f) < 3:
        return "labels: needs no pre-training at three or more fine-tune sizes"
    first, last = (f[1] - f[0]) / PER, (f[-1] - f[-2]) / PER
    w: dict = {}
    for size, weight in [(f[0], -1 / first), (f[1], 1 / first), (f[-2], 1 / last), (f[-1], -1 / last)]:
        _add(w, (0, "none", size), weight)
    return w, f


def _label_returns(c: dict, metric: str) -> dict:
    """(b, labels) holds when the 95% interval of _label_returns_weights' contrast is above 0 (each added
    labelled image is worth less)."""
    design = _label_returns_weights(c)
    if isinstance(design, str):
        return _part("b", "labels", NOT_ENOUGH, None, design, metric)
    w, f = design
    est = contrast(c, w)
    s_first = (c[(0, "none", f[1])].mean - c[(0, "none", f[0])].mean) / (f[1] - f[0]) * PER
    s_last = (c[(0, "none", f[-1])].mean - c[(0, "none", f[-2])].mean) / (f[-1] - f[-2]) * PER
    detail = (
        f"labels: without pre-training {s_first:+.3f} points per {PER:,} added labels from {f[0]:,} to "
        f"{f[1]:,}, {s_last:+.3f} from {f[-2]:,} to {f[-1]:,}; first minus last slope "
        f"{_est_text(est, unit('labels', metric), 3)}"
    )
    return _part("b", "labels", _verdict(est, True), est, detail, metric)


def _pretrain_returns_weights(keys) -> tuple[dict, tuple] | str:
    """(b, pre-training) Concavity in pre-training data: with pre-training sizes 0 < p_1 < ... < p_k
    (k >= 2, no intermediate stage), the slope of the first step, (m(p_1) - m(0)) / p_1, minus the slope
    of the last, (m(p_k) - m(p_{k-1})) / (p_k - p_{k-1}), in points per PER added pre-training images
    (the scale of the labels part), averaged over the fine-tune sizes the arms 0, p_1, p_{k-1}, p_k all
    have: (weights, (sizes, fine-tune sizes)), or why there is no test."""
    p = sorted({s for s, a, _ in keys if a == "none"})
    if len(p) < 3 or p[0] != 0:
        return "pre-training: needs no pre-training and two or more pre-training sizes"
    common = sorted(set.intersection(*(_arm_sizes(keys, s) for s in (0, p[1], p[-2], p[-1]))))
    if not common:
        return "pre-training: the arms share no fine-tune size"
    first, last = p[1] / PER, (p[-1] - p[-2]) / PER
    w: dict = {}
    for f in common:
        for size, weight in [(p[1], 1 / first), (0, -1 / first), (p[-1], -1 / last), (p[-2], 1 / last)]:
            _add(w, (size, "none", f), weight / len(common))
    return w, (p, common)


def _pretrain_returns(c: dict, metric: str) -> dict:
    """(b, pre-training) holds when the 95% interval of _pretrain_returns_weights' contrast is above 0."""
    design = _pretrain_returns_weights(c)
    if isinstance(design, str):
        return _part("b", "pre-training", NOT_ENOUGH, None, design, metric)
    w, (p, common) = design
    est = contrast(c, w)
    slope = lambda a, b: np.mean([c[(b, "none", f)].mean - c[(a, "none", f)].mean for f in common]) / (b - a) * PER  # noqa: E731
    detail = (
        f"pre-training: first step 0->{p[1]:,} {slope(0, p[1]):+.3f} points per {PER:,} added pre-training "
        f"images, last step {p[-2]:,}->{p[-1]:,} {slope(p[-2], p[-1]):+.3f} (mean over {len(common)} fine-tune "
        f"sizes); first minus last slope {_est_text(est, unit('pre-training', metric), 3)}"
    )
    return _part("b", "pre-training", _verdict(est, True), est, detail, metric)


# ------------------------------------------------------------------------------------------ (c)


def _intermediate_cells(keys, arm: str) -> list[tuple]:
    """(pretrain_size, finetune_size) where both the arm and no intermediate stage ran."""
    return sorted((p, f) for p, a, f in keys if a == arm and (p, "none", f) in keys)


def _hurts_weights(keys, arm: str) -> tuple[dict, list] | str:
    """(c, hurts) The mean over cells (p, f) of mean(p, arm, f) - mean(p, none, f): (weights, the cells),
    or why there is no test."""
    pairs = _intermediate_cells(keys, arm)
    if not pairs:
        return f"needs arms with the {arm} stage and without"
    w: dict = {}
    for p, f in pairs:
        _add(w, (p, arm, f), 1 / len(pairs))
        _add(w, (p, "none", f), -1 / len(pairs))
    return w, pairs


def _intermediate_hurts(c: dict, arm: str, metric: str) -> dict:
    """(c, hurts) holds when the 95% interval of _hurts_weights' contrast is below 0."""
    design = _hurts_weights(c, arm)
    if isinstance(design, str):
        return _part("c", "hurts", NOT_ENOUGH, None, design, metric)
    w, pairs = design
    est = contrast(c, w)
    change = {k: c[(k[0], arm, k[1])].mean - c[(k[0], "none", k[1])].mean for k in pairs}
    worst = min(change, key=change.get)
    negative = sum(v < 0 for v in change.values())
    detail = (
        f"mean change with the {arm} stage {_est_text(est, unit('hurts', metric))} over {len(pairs)} cells, "
        f"negative in {negative}/{len(pairs)}; largest drop {change[worst]:+.2f} at {worst[0]:,} pre-training "
        f"images, {worst[1]:,} labels"
    )
    return _part("c", "hurts", _verdict(est, False), est, detail, metric)


def design_corners(keys, arm: str) -> tuple[tuple, tuple] | None:
    """The two cells (pretrain_size, finetune_size) finding (c)'s interaction compares, fixed by the
    design: where pre-training helps most (the largest pre-training size with the arm, the smallest
    fine-tune size) and least (the smallest pre-training size > 0 with the arm, the largest fine-tune
    size). None when either lacks the arm or its no-intermediate counterpart, or they coincide."""
    pairs = _intermediate_cells(keys, arm)
    sizes, tunes = sorted({p for p, _ in pairs if p}), sorted({f for _, f in pairs})
    if not sizes:
        return None
    most, least = (sizes[-1], tunes[0]), (sizes[0], tunes[-1])
    return (most, least) if most != least and most in pairs and least in pairs else None


def _interaction_weights(keys, arm: str) -> tuple[dict, tuple] | str:
    """(c, most where pre-training helps most) The change with the arm's stage at design_corners' first
    cell minus the change at its second: (weights, corners), or why there is no test."""
    corners = design_corners(keys, arm)
    if corners is None:
        return (
            f"needs the {arm} stage and no intermediate stage at two pre-training and fine-tune "
            "corners (largest pre-training, fewest labels; smallest pre-training, most labels)"
        )
    (p_hi, f_lo), (p_lo, f_hi) = corners
    return {(p_hi, arm, f_lo): 1, (p_hi, "none", f_lo): -1, (p_lo, arm, f_hi): -1, (p_lo, "none", f_hi): 1}, corners


def gain_change_correlation(c: dict, arm: str) -> tuple[float, int]:
    """A description, never a test: Pearson r across cells (p, f) between the pre-training gain
    m(p, none, f) - m(0, f) and the change with the arm, m(p, arm, f) - m(p, none, f), and the number of
    cells (NaN when under 3 cells or no variation). Both contain m(p, none, f) with opposite signs, so
    seed noise pulls r below 0 (about -0.5 when the true gains do not vary and noise dominates); when
    true gains and changes vary much more than the noise, as in the paper's table, the pull is negligible."""
    pairs = [(p, f) for p, f in _intermediate_cells(c, arm) if p and (0, "none", f) in c]
    gain = np.array([c[(p, "none", f)].mean - c[(0, "none", f)].mean for p, f in pairs])
    change = np.array([c[(p, arm, f)].mean - c[(p, "none", f)].mean for p, f in pairs])
    if len(pairs) < 3 or gain.std() == 0 or change.std() == 0:
        return math.nan, len(pairs)
    return float(np.corrcoef(gain, change)[0, 1]), len(pairs)


def interaction_part(c: dict, arm: str, metric: str = "miou") -> dict:
    """(c, most where pre-training helps most; a row of claim_parts from a cells() dict) The interaction
    at the corners fixed by the design (`design_corners`): the change with the arm's stage where
    pre-training helps most, (P_max, f_min), minus the change where it helps least, (P_min, f_max):
    [m(P_max, arm, f_min) - m(P_max, none, f_min)] - [m(P_min, arm, f_max) - m(P_min, none, f_max)];
    holds when its 95% interval is below 0. Unlike a correlation of gains with changes, no cell mean
    enters it on both sides, so seed noise does not bias it. The correlation is shown as a description."""
    design = _interaction_weights(c, arm)
    if isinstance(design, str):
        return _part("c", INTERACTION, NOT_ENOUGH, None, design, metric)
    w, corners = design
    (p_hi, f_lo), (p_lo, f_hi) = corners
    est = contrast(c, w)
    ch = {(p, f): c[(p, arm, f)].mean - c[(p, "none", f)].mean for p, f in corners}
    gains = [c[(p, "none", f)].mean - c[(0, "none", f)].mean for p, f in corners if (0, "none", f) in c]
    gain_text = f" (pre-training gains there {gains[0]:+.2f} and {gains[1]:+.2f})" if len(gains) == 2 else ""
    r, k = gain_change_correlation(c, arm)
    r_text = "" if pd.isna(r) else f"; description only: r of pre-training gain and change across {k} cells {r:+.2f}"
    detail = (
        f"change with the {arm} stage where pre-training helps most by design ({p_hi:,} pre-training images, "
        f"{f_lo:,} labels) {ch[(p_hi, f_lo)]:+.2f}, where least ({p_lo:,}, {f_hi:,} labels) "
        f"{ch[(p_lo, f_hi)]:+.2f}{gain_text}; difference {_est_text(est, unit(INTERACTION, metric))}{r_text}"
    )
    return _part("c", INTERACTION, _verdict(est, False), est, detail, metric)


# ------------------------------------------------------------------------------------------ designs


def part_weights(keys, arm: str = PAPER_ARM) -> dict[str, dict | str]:
    """{part: its contrast weights {cell key: weight}, or why the cells give no test} for the five parts
    (PARTS' order), from the cells a design has (any collection of (pretrain_size, arm, finetune_size)).
    The claims, the power planner, the sequential rule and the calibration tests all use these."""
    keys = set(keys)
    designs = {
        "fewer labels": _fewer_labels_weights(keys),
        "labels": _label_returns_weights(keys),
        "pre-training": _pretrain_returns_weights(keys),
        "hurts": _hurts_weights(keys, arm),
        INTERACTION: _interaction_weights(keys, arm),
    }
    return {part: d if isinstance(d, str) else d[0] for part, d in designs.items()}


def arms_tested(keys) -> list[str]:
    """The intermediate arms finding (c) is tested for: the paper's, then every other arm among keys."""
    return [PAPER_ARM] + sorted({a for _, a, _ in keys} - {"none", PAPER_ARM}, key=arm_rank)


def all_parts(keys) -> list[tuple[str, str, str, int, dict | str]]:
    """Every part of every finding as claims_all_arms tests them: (finding, part, arm, claimed sign,
    weights or why there is no test); (a) and (b) once, (c) once per arm of arms_tested (the paper's
    arm first)."""
    keys = set(keys)
    out = []
    for i, arm in enumerate(arms_tested(keys)):
        w = part_weights(keys, arm)
        out += [(f, part, arm, sign, w[part]) for f, part, sign in PARTS if f == "c" or i == 0]
    return out


# ---------------------------------------------------------------------------------------- tables


def claim_parts(df: pd.DataFrame, metric: str = "miou", arm: str = PAPER_ARM) -> pd.DataFrame:
    """Every test behind claims(), one row each: finding, part, verdict, effect, ci95 (lo, hi), n
    (seeds or fewest runs per cell behind the interval; 0 without one), detail, unit (of the effect),
    replicate (what the interval is over, in words) and mde (the true effect its test would find with
    80% power at its seeds; NaN without an interval).
    (a) fewer labels; (b) labels and pre-training (slopes per 1,000 added images); (c) hurts and most
    where pre-training helps most (the interaction at the design's corners), for the intermediate arm
    `arm`. See the _-functions named after each part for the definitions."""
    c = cells(df, metric)
    rows = [
        _fewer_labels(c, metric),
        _label_returns(c, metric),
        _pretrain_returns(c, metric),
        _intermediate_hurts(c, arm, metric),
        interaction_part(c, arm, metric),
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


def _claim_text(finding: str, arm: str) -> str:
    return CLAIMS[finding] + (f" (arm {arm})" if finding == "c" and arm != PAPER_ARM else "")


def claims(df: pd.DataFrame, metric: str = "miou", arm: str = PAPER_ARM) -> pd.DataFrame:
    """The paper's findings tested on one protocol's runs (or on paper_frame()), one row each:
    finding ('a' | 'b' | 'c'), claim, verdict (see the module's docstring), effect, ci95 (lo, hi) and
    unit of the finding's first part (claims_summary shows every part), detail (every part's numbers).
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
        rows.append(
            {
                "finding": finding,
                "claim": _claim_text(finding, arm),
                "verdict": combine(sub),
                "effect": first.effect,
                "ci95": first.ci95,
                "detail": "; ".join(sub.detail),
                "unit": first.unit,
            }
        )
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)


def claims_all_arms(df: pd.DataFrame, metric: str = "miou") -> pd.DataFrame:
    """claims() for the paper's intermediate arm, followed by finding (c) for every other intermediate
    arm that ran (v2's 'spatial', 'pets-breeds'), its claim naming the arm."""
    arms = arms_tested(cells(df, metric))[1:]
    return pd.concat([claims(df, metric)] + [claims(df, metric, a).iloc[[2]] for a in arms], ignore_index=True)


def parts_all_arms(df: pd.DataFrame, metric: str = "miou") -> pd.DataFrame:
    """claim_parts() for the paper's intermediate arm, then finding (c)'s parts for every other arm that
    ran; with columns arm, claim (the finding's, naming the arm) and finding_verdict (combine's)."""
    frames = []
    for i, arm in enumerate(arms_tested(cells(df, metric))):
        parts = claim_parts(df, metric, arm)
        parts = parts if i == 0 else parts[parts.finding == "c"]
        verdicts = {f: combine(sub) for f, sub in parts.groupby("finding")}
        frames.append(
            parts.assign(
                arm=arm,
                claim=[_claim_text(f, arm) for f in parts.finding],
                finding_verdict=[verdicts[f] for f in parts.finding],
            )
        )
    return pd.concat(frames, ignore_index=True)


def _number(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}" if abs(x) >= 100 else f"{x:.{digits}f}"


def effect_text(effect: float, units: str) -> str:
    """'+3.02 mIoU points', '+210.40 points per 1,000 images'; '' without an effect."""
    return "" if pd.isna(effect) else f"{'+' if effect >= 0 else '-'}{_number(abs(effect))} {units}"


def verdict_text(verdict: str, mde: float, units: str) -> str:
    """A part's verdict, with the smallest effect its test could have detected beside an inconclusive one:
    'inconclusive (n=2; could detect >= 4.10 mIoU points)'."""
    if verdict_kind(verdict) != INCONCLUSIVE or pd.isna(mde):
        return verdict
    return f"{verdict[:-1]}; could detect >= {_number(mde)} {units})"


def claims_summary(df: pd.DataFrame, metric: str = "miou") -> pd.DataFrame:
    """The findings for reading, every part on its own row (parts_all_arms): finding, claim and finding
    verdict (on a finding's first row only), part, verdict (with the minimal detectable effect beside an
    inconclusive one), effect with its unit, ci95 ('[lo, hi]') and replicate ('paired over 5 seeds')."""
    parts = parts_all_arms(df, metric)
    first = ~parts.duplicated(["claim"])
    return pd.DataFrame(
        {
            "finding": parts.finding.where(first, ""),
            "claim": parts.claim.where(first, ""),
            "finding verdict": parts.finding_verdict.where(first, ""),
            "part": parts.part,
            "verdict": [verdict_text(v, m, u) for v, m, u in zip(parts.verdict, parts.mde, parts.unit)],
            "effect": [effect_text(e, u) for e, u in zip(parts.effect, parts.unit)],
            "ci95": [fmt_interval(lo, hi) for lo, hi in parts.ci95],
            "replicate": parts.replicate,
        },
        columns=SUMMARY_COLUMNS,
    )


def claims_display(table: pd.DataFrame) -> pd.DataFrame:
    """claims() (or claim_parts()) with effect (and its unit, when the table has one) and interval as
    short strings, for reading. claims_summary shows every part on its own row."""
    out = table.copy()
    units = out["unit"] if "unit" in out.columns else [""] * len(out)
    out["effect"] = [effect_text(e, u).strip() for e, u in zip(out.effect, units)]
    out["ci95"] = [fmt_interval(lo, hi) for lo, hi in out.ci95]
    return out.drop(columns=[c for c in ("unit", "mde") if c in out.columns])
