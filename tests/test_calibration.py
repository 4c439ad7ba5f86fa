"""Calibration and power of the claims' tests, by simulation (numpy, vectorised, a few seconds): studies
drawn from the demo's noise model (power.DEFAULT_NOISE: per-cell sd, correlations within a seed)
pushed through the claims' own part contrasts (claims.all_parts) and t quantiles. Checked: without an
effect each part reads 'supported' in <= 2.5% of studies (within simulation error) at a fixed number of
seeds, with one run missing, and under the sequential rule (sequential.critical_t) looking after every
seed from 2 to 16; the uncorrected 'stop at the first significant look' rule exceeds it (the negative
control); and the simulated power matches power.py's analytic power."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from studylib.analysis.claims import all_parts, claim_parts
from studylib.analysis.power import DEFAULT_NOISE, NoiseModel, design_keys, power_table
from studylib.analysis.sequential import critical_t
from studylib.analysis.stats import t975

GRID = SimpleNamespace(pretrain_sizes=[0, 500, 2000], intermediate=["none", "intel", "spatial"],
                       finetune_sizes=[20, 40, 80], seeds=[0, 1])  # fmt: skip  # the demo's design
KEYS = design_keys(GRID)
PARTS = [(f"{f} {part} {arm}", sign, w) for f, part, arm, sign, w in all_parts(KEYS)]
NAMES = [name for name, _, _ in PARTS]
W = np.array([[w.get(k, 0.0) for _, _, w in PARTS] for k in KEYS])  # cells x parts
SIGN = np.array([s for _, s, _ in PARTS])
L = np.linalg.cholesky(DEFAULT_NOISE.covariance(KEYS))
STUDIES = 4000
# a rate of 2.5% measured on STUDIES studies: its upper 99.9% binomial bound (3.1 standard errors)
BOUND = 0.025 + 3.1 * math.sqrt(0.025 * 0.975 / STUDIES)


# where only the cells of one encoder move together (no common random numbers across arms: the old demo's noise)
L_ENCODER_ONLY = np.linalg.cholesky(NoiseModel(rho_seed=0.0).covariance(KEYS))


def draw(seed: int, seeds: int, studies: int = STUDIES, chol: np.ndarray = L) -> np.ndarray:
    """Runs of null studies: [study, seed, cell], every cell's true mean 0 (so every part's effect is 0)."""
    z = np.random.default_rng(seed).standard_normal((studies, seeds, len(KEYS)))
    return z @ chol.T


def supported(d: np.ndarray, crit) -> np.ndarray:
    """[study, part]: the paired t statistic of per-seed contrasts d [study, seed, part] beyond crit on
    the claimed side (crit = t975(n - 1): the 95% interval wholly on the claimed side)."""
    n = d.shape[1]
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    return SIGN * t > crit


def test_the_simulation_uses_the_claims_own_contrasts():
    """The vectorised rule above reproduces claim_parts on one simulated study (weights and interval)."""
    x = draw(0, 3, studies=1)[0] + 50
    df = pd.DataFrame(
        [{"protocol": "clean", "pretrain_size": p, "intermediate": a, "finetune_size": f, "seed": s, "miou": x[s, j]}
         for s in range(3) for j, (p, a, f) in enumerate(KEYS)]
    )  # fmt: skip
    parts = claim_parts(df)
    d = (x @ W)[:, :5]  # the paper arm's five parts come first
    half = t975(2) * d.std(0, ddof=1) / math.sqrt(3)
    assert parts.effect.to_numpy() == pytest.approx(d.mean(0))
    assert [hi - lo for lo, hi in parts.ci95] == pytest.approx(2 * half)
    assert set(parts.replicate) == {"paired over 3 seeds"}


@pytest.mark.parametrize("seeds", [2, 5])
def test_fixed_seeds_false_supported_at_most_2_5_percent_per_part(seeds):
    rate = supported(draw(seeds, seeds) @ W, t975(seeds - 1)).mean(0)
    assert (rate <= BOUND).all(), dict(zip(NAMES, rate))


@pytest.mark.parametrize("chol", [L, L_ENCODER_ONLY], ids=["default", "encoder-only"])
def test_a_missing_run_keeps_the_seed_as_the_unit(chol):
    """One cell lacks seed 0's run: every contrast that uses it is paired over the other seeds (what
    stats.contrast does, checked in test_claims), and stays calibrated under either noise model; treating
    the runs as independent (the old Welch fallback) is not where the cells of one encoder move together and
    the other cells of a seed do not: (c) hurts then reads 'supported' too often. (Under the default model,
    whose arms share a seed's draws, Welch happens to err the other way for (c) hurts: 1.8%.)"""
    seeds, missing = 5, KEYS.index((500, "intel", 80))  # in (c) hurts and the interaction
    x = draw(7, seeds, chol=chol)
    d = x @ W
    uses = W[missing] != 0
    rate = np.where(uses, supported(d[:, 1:], t975(seeds - 2)), supported(d, t975(seeds - 1))).mean(0)
    assert uses.sum() >= 2 and (rate <= BOUND).all(), dict(zip(NAMES, rate))
    # negative control: Welch over each cell's runs as independent samples, seed 0's run of the cell dropped
    n = np.full(len(KEYS), seeds)
    n[missing] = seeds - 1
    keep = np.ones((seeds, len(KEYS)), bool)
    keep[0, missing] = False
    mean = np.where(keep, x, 0).sum(1) / n
    var = (np.where(keep, x - mean[:, None], 0) ** 2).sum(1) / (n - 1)
    v = (W**2)[None] * (var / n)[:, :, None]  # [study, cell, part]
    df = v.sum(1) ** 2 / (v**2 / (n - 1)[None, :, None]).sum(1)
    from scipy import stats

    welch = (SIGN * (mean @ W) / np.sqrt(v.sum(1)) > stats.t.ppf(0.975, df)).mean(0)
    hurts = NAMES.index("c hurts intel")
    if chol is L_ENCODER_ONLY:
        assert welch[hurts] > BOUND, welch[hurts]  # measured 0.042


def test_sequential_rule_keeps_2_5_percent_but_stopping_at_the_first_significant_look_does_not():
    looks, max_seeds = list(range(2, 17)), 16
    d = draw(11, max_seeds) @ W
    crit = critical_t(looks, max_seeds)
    sequential = np.zeros(d.shape[::2], bool)
    naive = np.zeros_like(sequential)
    for n, c in zip(looks, crit):
        sequential |= supported(d[:, :n], c)
        naive |= supported(d[:, :n], t975(n - 1))
    rate, naive_rate = sequential.mean(0), naive.mean(0)
    assert (rate <= BOUND).all(), dict(zip(NAMES, rate))
    assert (naive_rate > 0.07).all(), dict(zip(NAMES, naive_rate))  # measured 0.10-0.12: the test can fail


@pytest.mark.parametrize("seeds", [3, 8])
def test_simulated_power_matches_the_analytic_power(seeds):
    """At each part's own minimal detectable effect (power 80% by power.py) and at the demo's measured
    effect of (a), +3.02 mIoU points, the simulated power is power.py's within simulation error."""
    grid = SimpleNamespace(**{**GRID.__dict__, "seeds": list(range(seeds))})
    mde = {(r.finding, r.part, r.arm): r.mde for r in power_table(grid)}
    effect = np.array([mde[(f, part, arm)] for f, part, arm, _, _ in all_parts(KEYS)])
    hit = supported(draw(20 + seeds, seeds) @ W + SIGN * effect, t975(seeds - 1)).mean(0)
    assert hit == pytest.approx(0.8, abs=3.1 * math.sqrt(0.16 / STUDIES))
    a = power_table(grid, effect={"fewer labels": 3.02})[0]
    sim = supported(draw(40 + seeds, seeds) @ W + SIGN * np.where(np.arange(len(PARTS)) == 0, 3.02, 0), t975(seeds - 1))
    assert sim[:, 0].mean() == pytest.approx(a.power, abs=3.1 * math.sqrt(a.power * (1 - a.power) / STUDIES) + 1e-3)
