"""The claims' tests are sound: under a null (no interaction) finding (c)'s interaction is rarely
'supported', while the old correlation rule, which shares noise between its two variables, often is;
a real interaction is found; the paper's own table supports all three findings; the verdict words, the
exact t quantiles and the refusal of zero-width intervals; `study results --paper`."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from studylib.analysis.claims import (
    claim_parts,
    claims,
    combine,
    design_corners,
    gain_change_correlation,
    interaction_part,
    verdict_kind,
)
from studylib.analysis.reference import paper_frame
from studylib.analysis.stats import NO_SPREAD, Cell, cells, contrast, t975

PRE, TUNE, SEEDS = (45000, 100000, 200000), (250, 500, 1000, 2000, 4000, 6000), (0, 1, 2)
BASE = np.array([44.0, 47.0, 53.0, 57.0, 63.0, 65.0])  # no pre-training, by fine-tune size
# true pre-training gains that vary gently by cell: +0.5 per pre-training size, -0.2 per fine-tune size
GENTLE = 3 + 0.5 * (np.arange(3)[:, None] - 1) - 0.2 * np.arange(6)[None, :]
NO_INTERACTION = np.full((3, 6), -2.0)  # the intermediate stage costs 2 points everywhere
SD = 0.7  # seed noise of one run


def _cell(x: np.ndarray, paired: bool) -> Cell:
    """A cell from its runs (seeds 0, 1, 2), or as summary statistics only (Welch) when not paired."""
    return Cell(float(x.mean()), float(x.std(ddof=1)), len(x), pd.Series(x, index=SEEDS) if paired else None)


def simulate(rng, gain: np.ndarray, change: np.ndarray, sd: float = SD, paired: bool = True) -> dict:
    """cells() of a 3 pre-training x 6 fine-tune grid (plus no pre-training), the 'intel' arm at every
    pre-trained cell, 3 seeds each: true means BASE + gain (+ change with the arm), Gaussian noise per run."""
    noisy = lambda m: _cell(m + rng.normal(0, sd, len(SEEDS)), paired)  # noqa: E731
    c = {}
    for j, f in enumerate(TUNE):
        c[(0, "none", f)] = noisy(BASE[j])
        for i, p in enumerate(PRE):
            c[(p, "none", f)] = noisy(BASE[j] + gain[i, j])
            c[(p, "intel", f)] = noisy(BASE[j] + gain[i, j] + change[i, j])
    return c


def new_rule(c: dict) -> bool:
    return interaction_part(c, "intel")["verdict"] == "supported"


def old_rule(c: dict) -> bool:
    """The rule this replaced: Pearson r of pre-training gain and intermediate change across cells, its
    95% Fisher-z interval wholly below 0."""
    r, n = gain_change_correlation(c, "intel")
    return math.tanh(math.atanh(r) + 1.959964 / math.sqrt(n - 3)) < 0


def _rates(gain, change, repeats: int, paired: bool = True, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    runs = [simulate(rng, gain, change, paired=paired) for _ in range(repeats)]
    return np.mean([new_rule(c) for c in runs]), np.mean([old_rule(c) for c in runs])


# ------------------------------------------------------------------------------- null simulation


def test_no_interaction_is_rarely_called_supported_but_the_old_correlation_often_was():
    new, old = _rates(GENTLE, NO_INTERACTION, 400)
    # measured: new 0.030 (one-sided 2.5% nominal), old 0.335 -- the shared m(p, none) makes r negative
    # (with gains constant across cells, old 0.62, mean r about -0.5)
    assert new <= 0.06
    assert old >= 0.25


def test_no_interaction_on_summary_statistics_welch():
    new, _ = _rates(GENTLE, NO_INTERACTION, 400, paired=False, seed=1)
    assert new <= 0.06  # measured 0.010


def test_a_real_interaction_is_found():
    pf = cells(paper_frame(), "miou")
    gain = np.array([[pf[(p, "none", f)].mean - pf[(0, "none", f)].mean for f in TUNE] for p in PRE])
    change = -1 - 0.4 * gain  # the paper's gains; the stage costs more where they are larger
    # true interaction: -0.4 * (gain(200k, 250) - gain(45k, 6000)) = -0.4 * (13.41 - 0.91) = -5.0
    new, _ = _rates(gain, change, 200, seed=2)
    assert new >= 0.8  # measured 0.87


def test_design_corners_are_fixed_by_the_design_not_the_data():
    c = simulate(np.random.default_rng(3), GENTLE, NO_INTERACTION)
    assert design_corners(c, "intel") == ((200000, 250), (45000, 6000))
    del c[(45000, "intel", 6000)]
    assert design_corners(c, "intel") is None
    assert interaction_part(c, "intel")["verdict"] == "not enough runs"


# ------------------------------------------------------------------------------- the paper's table


@pytest.mark.parametrize("metric", ["miou", "pixel_acc"])
def test_the_papers_own_table_supports_all_three_findings(metric):
    assert claims(paper_frame(), metric).verdict.tolist() == ["supported"] * 3
    assert claim_parts(paper_frame(), metric).verdict.tolist() == ["supported"] * 5


def test_the_papers_numbers_by_hand():
    parts = claim_parts(paper_frame(), "miou").set_index("part")
    # labels: (47.41 - 43.73) / 0.25 - (65.07 - 62.99) / 2 = 14.72 - 1.04 per 1,000 labels
    assert parts.loc["labels", "effect"] == pytest.approx(13.68)
    # pre-training: mean gain 0 -> 45k over the 6 sizes (9.00 + 8.16 + 5.40 + 4.49 + 1.43 + 0.91) / 6 = 4.8983
    # per 45 thousand images, minus mean step 100k -> 200k (1.23 + 1.03 + 0.78 + 0.57 + 0.65 + 0.76) / 6
    # = 0.8367 per 100 thousand
    assert parts.loc["pre-training", "effect"] == pytest.approx(29.39 / 6 / 45 - 5.02 / 6 / 100)
    # interaction: (49.93 - 57.14) - (64.76 - 65.98) = -7.21 + 1.22
    assert parts.loc["most where pre-training helps most", "effect"] == pytest.approx(-5.99)
    # Welch: variances (0.56^2 + 0.42^2 + 0.62^2 + 0.19^2) / 3 = 0.30350, se 0.55091
    lo, hi = parts.loc["most where pre-training helps most", "ci95"]
    v = np.array([0.56, 0.42, 0.62, 0.19]) ** 2 / 3
    dof = v.sum() ** 2 / (v**2 / 2).sum()
    assert (hi - lo) / 2 == pytest.approx(t975(dof) * math.sqrt(v.sum()))
    detail = parts.loc["most where pre-training helps most", "detail"]
    assert "(200,000 pre-training images, 250 labels) -7.21" in detail and "description only: r of" in detail
    assert "biased" not in detail  # at r = -0.94 the pull of shared noise is negligible: no note
    assert "(Welch, 3 runs per cell treated as independent)" in detail


# ------------------------------------------------------------------------------- verdict words


def _parts(*rows) -> pd.DataFrame:
    return pd.DataFrame([{"part": p, "verdict": v, "n": n} for p, v, n in rows])


def test_combining_the_parts_of_a_finding():
    ok, inc2, inc3, bad, none = (
        "supported",
        "inconclusive (n=2)",
        "inconclusive (n=3)",
        "not supported",
        "not enough runs",
    )
    assert combine(_parts(("labels", ok, 3), ("pre-training", ok, 3))) == "supported"
    assert combine(_parts(("labels", ok, 3), ("pre-training", inc2, 2))) == "mixed: pre-training inconclusive (n=2)"
    assert combine(_parts(("hurts", bad, 3), ("most", ok, 3))) == "mixed: hurts not supported"
    assert combine(_parts(("labels", inc3, 3), ("pre-training", bad, 3))) == "not supported"
    assert combine(_parts(("labels", inc3, 3), ("pre-training", inc2, 2))) == "inconclusive (n=2)"
    assert combine(_parts(("labels", ok, 3), ("pre-training", none, 0))) == "not enough runs"
    assert [verdict_kind(v) for v in (ok, inc2, bad, none, "mixed: labels inconclusive (n=2)")] == [
        "supported",
        "inconclusive",
        "not supported",
        "not enough runs",
        "mixed",
    ]
    with pytest.raises(ValueError):
        verdict_kind("holds")


def _summary_cells(table: dict) -> dict:
    """cells() of summary statistics {key: (mean, std, n)} (no seeds: Welch)."""
    return {k: Cell(m, s, n) for k, (m, s, n) in table.items()}


def test_a_part_is_supported_contradicted_or_inconclusive_by_its_interval():
    def verdict(drop_most, drop_least, sd):
        c = _summary_cells(
            {
                (200, "intel", 10): (50 + drop_most, sd, 3),
                (200, "none", 10): (50, sd, 3),
                (100, "intel", 40): (60 + drop_least, sd, 3),
                (100, "none", 40): (60, sd, 3),
            }
        )
        return interaction_part(c, "intel")["verdict"]

    # se = sd * sqrt(4 / 3), Welch df = 8, t = 2.306: half width 2.663 * sd
    assert verdict(-5, -1, 1.0) == "supported"  # -4 +- 2.66
    assert verdict(-1, -5, 1.0) == "not supported"  # +4 +- 2.66: contradicted
    assert verdict(-3, -1, 1.0) == "inconclusive (n=3)"  # -2 +- 2.66
    assert verdict(-5, -1, 0.0) == "not enough runs"  # zero spread is not evidence


# ------------------------------------------------------------------------------- intervals


def test_t_quantiles_are_exact_for_any_degrees_of_freedom():
    assert t975(1) == pytest.approx(12.7062047)
    assert t975(4) == pytest.approx(2.7764451)
    # fractional (Welch) df, between t(2) = 4.303 and t(3) = 3.182;
    # checked: 1 - I_{2.5/(2.5+t^2)}(1.25, 0.5) / 2 = 0.975 (regularised incomplete beta)
    assert t975(2.5) == pytest.approx(3.574655, abs=1e-6)
    assert t975(31) == pytest.approx(2.0395134)  # no longer 1.96 past 30
    assert t975(1e6) == pytest.approx(1.959966, abs=1e-5)
    with pytest.raises(ValueError):
        t975(0.5)


def test_zero_spread_gives_no_interval():
    same = pd.Series([1.0, 1.0], index=[0, 1])
    paired = {"a": Cell(1.0, 0.0, 2, same), "b": Cell(3.0, 0.0, 2, same + 2)}
    e = contrast(paired, {"b": 1, "a": -1})  # per seed 2, 2: sd 0
    assert (e.value, e.n, e.method, e.note) == (2.0, 2, "paired", NO_SPREAD) and math.isnan(e.lo)
    shifted = {"a": Cell(1.1, 0.1, 2, pd.Series([1.0, 1.2])), "b": Cell(3.1, 0.1, 2, pd.Series([3.0, 3.2]))}
    e = contrast(shifted, {"b": 1, "a": -1})  # per seed 2.0, 2.0 up to rounding
    assert e.value == pytest.approx(2.0) and math.isnan(e.lo) and e.note == NO_SPREAD
    welch = contrast(_summary_cells({"a": (1.0, 0.0, 3), "b": (3.0, 0.0, 3)}), {"b": 1, "a": -1})
    assert welch.method == "welch" and math.isnan(welch.hi) and welch.note == NO_SPREAD
    one = contrast(_summary_cells({"a": (1.0, 0.5, 3), "b": (3.0, 0.0, 3)}), {"b": 1, "a": -1})
    assert one.hi - one.lo > 0 and one.note == ""  # spread in one cell suffices


# ------------------------------------------------------------------------------- the command


def test_study_results_paper(capsys):
    from studylib.cli import main

    assert main(["results", "--paper"]) == 0
    out = capsys.readouterr().out
    assert out.count("supported") >= 2 * (3 + 5) and "inconclusive" not in out and "mixed" not in out
    assert "(c) the intermediate stage hurts, most where pre-training helps most: supported" in out
    assert "pixel accuracy %" in out and "difference -5.99 mIoU points [" in out
    assert "treated as independent" in out and "The authors' table gives a mean and std over 3 runs" in out
    assert "labels: supported, +13.68 points per 1,000 images [" in out


# ------------------------------------------------------------------------------- the replicate


def test_a_missing_run_stays_paired_over_the_seeds_every_cell_has():
    a = Cell(0, 0, 5, pd.Series([1.0, 2.0, 3.0, 4.0, 5.0], index=range(5)))
    b = Cell(0, 0, 4, pd.Series([2.0, 2.5, 5.0, 6.5], index=[0, 1, 2, 4]))  # seed 3 lacks this cell
    e = contrast({"a": a, "b": b}, {"b": 1, "a": -1})
    d = np.array([1.0, 0.5, 2.0, 1.5])  # per seed over seeds 0, 1, 2, 4
    half = t975(3) * d.std(ddof=1) / 2
    assert (e.method, e.n, e.value) == ("paired", 4, pytest.approx(d.mean()))
    assert (e.lo, e.hi) == pytest.approx((d.mean() - half, d.mean() + half))
    assert e.replicate == "paired over 4 of 5 seeds (seed 3 lacks a cell)"
    assert e.sd == pytest.approx(d.std(ddof=1))
    lone = contrast({"a": a, "b": Cell(0, 0, 1, pd.Series([2.0], index=[0]))}, {"b": 1, "a": -1})
    assert lone.method == "paired" and lone.n == 1 and math.isnan(lone.lo)  # never Welch over shared encoders


# ------------------------------------------------------------------------------- wording


def _grid_runs(seeds: int, effect: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    rows = [
        {"protocol": "clean", "pretrain_size": p, "intermediate": a, "finetune_size": f, "seed": s,
         "miou": 40 + f / 100 + (effect * 250 / f if p else 0) - (1 if a == "intel" else 0) + rng.normal(0, SD)}
        for s in range(seeds) for p in (0, 45000, 200000) for a in ("none", "intel") if a == "none" or p
        for f in (250, 1000, 6000)
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_the_summary_shows_every_part_with_unit_replicate_and_detectable_effect():
    from studylib.analysis.claims import claims_summary

    s = claims_summary(_grid_runs(2))
    assert s.part.tolist() == ["fewer labels", "labels", "pre-training", "hurts", "most where pre-training helps most"]
    assert s.claim.tolist()[1:3] == ["returns diminish, both with more labels and with more pre-training data", ""]
    assert s.effect[0].endswith(" mIoU points") and s.effect[1].endswith(" points per 1,000 images")
    assert set(s.replicate) == {"paired over 2 seeds"}
    inconclusive = [v for v in s.verdict if v.startswith("inconclusive")]
    assert inconclusive and all(v.startswith("inconclusive (n=2; could detect >= ") for v in inconclusive)
    parts = claim_parts(_grid_runs(2)).set_index("part")
    # the detectable effect is the 80%-power effect of a one-sided 2.5% t test with 1 df at the part's se
    from scipy import stats

    se = (parts.loc["hurts", "ci95"][1] - parts.loc["hurts", "ci95"][0]) / 2 / t975(1)
    mde = parts.loc["hurts", "mde"]
    assert 1 - stats.nct.cdf(stats.t.ppf(0.975, 1), 1, mde / se) == pytest.approx(0.8, abs=1e-6)
    assert "6,000 labels" in parts.loc["most where pre-training helps most", "detail"]
