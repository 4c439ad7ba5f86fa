"""Power in the plan (power.py) and the run-until-decided rule (sequential.py) on hand-made designs:
the noncentral-t power and its minimal detectable effect, seeds needed, where the noise and the effect
come from, the JSON fields; the alpha spending, its boundaries and the verdicts of decide()."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from studylib.analysis.power import DEFAULT_NOISE, DEFAULT_SOURCE, design_keys, format_power, power_table
from studylib.analysis.sequential import critical_t, decide, look_levels, spent
from studylib.analysis.stats import mde_at, power_at, seeds_needed

GRID = SimpleNamespace(pretrain_sizes=[0, 500, 2000], intermediate=["none", "intel"], finetune_sizes=[20, 60, 180])


def grid(seeds: int) -> SimpleNamespace:
    return SimpleNamespace(**GRID.__dict__, seeds=list(range(seeds)))


def runs(seeds, interaction: float = 0.0, sd: float = 0.6, seed: int = 0) -> pd.DataFrame:
    """Runs of GRID: pre-training helps 4 points at 20 labels, 1 at 180; the intel stage costs 1 point,
    plus `interaction` where pre-training helps most by design (2000, 20); Gaussian noise sd per run."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in seeds:
        for p, a, f in design_keys(grid(1)):
            m = (
                40
                + f / 20
                + (bool(p) * (4 if f == 20 else 1))
                - (a == "intel") * (1 + interaction * ((p, f) == (2000, 20)))
            )
            rows.append({"protocol": "clean", "pretrain_size": p, "intermediate": a, "finetune_size": f, "seed": s,
                         "miou": m + rng.normal(0, sd)})  # fmt: skip
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ power


def test_power_and_minimal_detectable_effect_are_the_noncentral_t():
    # n = 5 seeds, sd 2: se 0.894, 4 df; power at 3 points = 1 - nct.cdf(t_.975(4), 4, 3 / 0.894)
    se = 2 / math.sqrt(5)
    assert power_at(3.0, se, 4) == pytest.approx(1 - stats.nct.cdf(stats.t.ppf(0.975, 4), 4, 3 / se))
    assert power_at(mde_at(se, 4), se, 4) == pytest.approx(0.8)
    assert mde_at(1 / math.sqrt(1e4), 1e4 - 1) == pytest.approx((1.959964 + 0.841621) / 100, rel=1e-3)  # normal
    n = seeds_needed(1.0, 2.0)
    assert power_at(1.0, 2 / math.sqrt(n), n - 1) >= 0.8 > power_at(1.0, 2 / math.sqrt(n - 1), n - 2)
    assert seeds_needed(0.01, 2.0) is None and seeds_needed(0.0, 1.0) is None  # past 1,000 seeds; no effect


def test_before_any_run_the_default_noise_model_and_the_papers_scaled_effect():
    rows = power_table(grid(4))
    assert [(r.finding, r.part) for r in rows][:3] == [("a", "fewer labels"), ("b", "labels"), ("b", "pre-training")]
    assert {r.noise_source for r in rows} == {DEFAULT_SOURCE} and all(r.n == 4 for r in rows)
    a = rows[0]
    # (a): +(2000, 20) -(0, 20) -(2000, 180) +(0, 180): sds 2.1, 2.1, 1.0, 1.0; the two pairs of one encoder
    # (rho 0.25) have opposite weights; across encoders (rho_seed 0.19): -2.1 * 2.1 + 2.1 + 2.1 - 1.0
    assert a.sd == pytest.approx(math.sqrt(2 * 2.1**2 + 2 - 2 * 0.25 * (2 * 2.1) - 2 * 0.19 * (2.1**2 + 1 - 2 * 2.1)))
    assert a.effect_source.startswith("the paper's, scaled") and a.side == "claimed" and a.unit == "mIoU points"
    text = format_power(rows)
    assert "fewer labels" in text and DEFAULT_NOISE.describe() in text


def test_a_given_effect_is_on_the_claimed_side_and_its_power_and_seeds_follow():
    rows = {r.part: r for r in power_table(grid(5), effect={"hurts": 0.5, "fewer labels": 2.0})}
    hurts = rows["hurts"]
    assert hurts.effect == -0.5 and hurts.effect_source == "given" and hurts.side == "claimed"
    assert hurts.power == pytest.approx(power_at(0.5, hurts.sd / math.sqrt(5), 4))
    assert hurts.seeds_needed == seeds_needed(0.5, hurts.sd)
    assert rows["labels"].effect_source.startswith("the paper's")  # not given: the paper's


def test_with_finished_seeds_the_noise_and_effect_are_measured():
    df = runs(range(3), interaction=0.0)
    rows = {r.part: r for r in power_table(grid(3), df)}
    a = rows["fewer labels"]
    assert a.noise_source == "this study's 3 finished seeds" and a.effect_source == "measured on 3 seeds"
    none = df[df.intermediate == "none"].pivot_table(index="seed", columns=["pretrain_size", "finetune_size"],
                                                     values="miou")  # fmt: skip
    d = none[(2000, 20)] - none[(0, 20)] - none[(2000, 180)] + none[(0, 180)]
    assert (a.effect, a.sd) == pytest.approx((d.mean(), d.std(ddof=1)))
    record = json.loads(json.dumps([r.to_dict() for r in rows.values()]))[0]
    assert {"finding", "part", "n", "mde", "power", "seeds_needed"} <= set(record)
    # 3 seeds: 2 degrees of freedom; sd_true / sd_hat in [sqrt(2 / 7.3778), sqrt(2 / 0.0506)] = [0.52, 6.29]
    assert "caution: the sd comes from 3 seeds (2 degrees of freedom): the true sd may be 0.52x to 6.3x" in (
        format_power(list(rows.values()))
    )
    assert "caution" not in format_power(power_table(grid(6), runs(range(6))))


def test_parts_a_design_cannot_test_say_so():
    flat = SimpleNamespace(pretrain_sizes=[0], intermediate=["none"], finetune_sizes=[20, 60], seeds=[0, 1])
    rows = power_table(flat)
    assert all("not tested by this design" in r.note for r in rows) and all(math.isnan(r.power) for r in rows)


# ------------------------------------------------------------------------------------------ sequential


def test_alpha_spending_sums_to_the_level_and_spends_little_early():
    assert spent(1.0) == pytest.approx(0.025) and spent(0.0) == 0
    levels = look_levels([2, 4, 8, 16], 16)
    assert levels.sum() == pytest.approx(0.025) and levels[0] < 1e-6 and (levels > 0).all()
    crit = critical_t([2, 4, 8, 16], 16)
    assert crit[-1] == pytest.approx(stats.t.isf(levels[-1], 15)) and crit[-1] > stats.t.ppf(0.975, 15)
    with pytest.raises(ValueError, match="increasing"):
        look_levels([4, 2], 16)


def test_decide_supports_a_clear_effect_and_continues_on_none():
    keys = design_keys(grid(1))
    df = runs(range(8), interaction=3.0, sd=0.3, seed=1)
    first = decide(df[df.seed < 4], [2, 4], 8, keys)
    assert not first.done and "look 2 (4 of at most 8 seeds)" in first.line()
    parts = {p.part: p for p in first.parts}
    assert parts["hurts"].verdict == "supported" and parts["hurts"].look == 2
    assert parts["most where pre-training helps most"].verdict in ("supported", "continue")
    later = decide(df, [2, 4, 6, 8], 8, keys)  # the same looks replayed, then two more
    again = {p.part: p for p in later.parts}
    assert again["hurts"] == parts["hurts"]  # a decided part stands
    assert later.done and "O'Brien-Fleming-like" in later.report() and "4 looks at 2, 4, 6, 8 seeds" in later.report()
    assert again["labels"].verdict.startswith(("no effect above", "undecided"))  # no curvature in labels


def test_decide_says_no_effect_above_a_stated_size_when_the_interval_is_narrow():
    keys = design_keys(grid(1))
    df = runs(range(16), sd=0.05, seed=2)
    # seeds 8-15 carry seeds 0-7's noise with the opposite sign: every part's mean over 16 seeds is exact (the
    # interaction 0), so the last interval is centred on 0 and narrower than the final design's detectable effect
    first, true = df[df.seed < 8], runs(range(16), sd=0.0)
    df.loc[df.seed >= 8, "miou"] = 2 * true.miou[df.seed >= 8].to_numpy() - first.miou.to_numpy()
    d = decide(df, [4, 8, 16], 16, keys)
    interaction = next(p for p in d.parts if p.part == "most where pre-training helps most")
    assert interaction.verdict.startswith("no effect above ") and interaction.verdict.endswith("mIoU points")
    assert -interaction.size < interaction.lo < interaction.hi < interaction.size
