"""Power in the plan: for every part of every finding (`claims.all_parts`, (c) once per intermediate arm),
the minimal detectable effect with the study's seeds, the power at an effect and the seeds that effect
needs (`power_table`, `format_power`; `study plan PARAMS --power`).

A part is a paired contrast over seeds (`claims.part_weights`), tested one-sided at level 2.5% (the
claimed side of its 95% interval). With n seeds and a per-seed standard deviation sd of the contrast,
its power at a true effect delta is 1 - nct.cdf(t_{0.975, n-1}, n-1, |delta| sqrt(n) / sd)
(`stats.power_at`): the probability that the interval excludes 0 on the effect's side.

- sd: from the study's own finished runs when a part has >= 2 seeds with every cell of its contrast
  (the sd of the per-seed contrast values), else from the default noise model (`NoiseModel`, stated
  in the output): each cell's run-to-run sd and a correlation between cells of one seed that share the
  encoder entering fine-tuning, so the contrast's sd is sqrt(w' Sigma w).
- the effect: the one given (one number, or one per part; its size is taken on the claimed side), else
  the one measured on the study's finished runs (>= 2 seeds), else, before any run, the paper's own
  effect scaled by the study's noise: the paper's standardized effect d = effect / sd of the paper's
  contrast (one run per cell, its table's stds) times this study's sd. `effect_source` says which.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from studylib.analysis.claims import all_parts, part_weights, unit
from studylib.analysis.reference import PAPER_METRICS, paper_frame
from studylib.analysis.stats import SEEDS_CAP, TARGET_POWER, cells, contrast, mde_at, power_at, seeds_needed
from studylib.analysis.vocabulary import PAPER_ARM, select

DEFAULT_SOURCE = "default noise model (stated)"


@dataclass(frozen=True)
class NoiseModel:
    """Run-to-run noise of a study's segmentation cells, for planning before any run. Defaults measured on
    the demo's design (fine-tune sizes 20, 40, 80; 168 runs of 8 seeds, issue 21): per-cell sd 0.47-4.09
    mIoU points, median 0.97 above the fewest labels and 2.13 at them; residuals of one seed correlated
    +0.25 between cells that share the encoder entering fine-tuning (same pre-training size and arm; the
    scratch cells share the seed's initialisation) and +0.19 between its other cells (common random
    numbers: one seed's cells share their fine-tune images and draws). So: sd = `fewest_sd` for every cell
    at the design's smallest fine-tune size, `sd` elsewhere; correlation `rho` within an encoder,
    `rho_seed` between the other cells of a seed."""

    sd: float = 1.0
    fewest_sd: float = 2.1
    rho: float = 0.25
    rho_seed: float = 0.19

    def cell_sd(self, key: tuple, fewest: int) -> float:
        """The sd of one run of the cell key = (pretrain_size, arm, finetune_size)."""
        return self.fewest_sd if key[2] == fewest else self.sd

    def covariance(self, keys: list) -> np.ndarray:
        """Sigma over keys (in their order): sd_i sd_j, times rho between distinct cells of one encoder and
        rho_seed between the others."""
        fewest = min(f for _, _, f in keys)
        sd = np.array([self.cell_sd(k, fewest) for k in keys])
        encoder = [(p, a) for p, a, _ in keys]
        corr = np.array([[1.0 if i == j else self.rho if e == d else self.rho_seed for j, d in enumerate(encoder)]
                         for i, e in enumerate(encoder)])  # fmt: skip
        return corr * np.outer(sd, sd)

    def contrast_sd(self, keys, weights: dict) -> float:
        """The per-seed sd of a contrast, sqrt(w' Sigma w), over the design's cells keys."""
        keys = sorted(keys)
        w = np.array([weights.get(k, 0.0) for k in keys])
        return float(math.sqrt(w @ self.covariance(keys) @ w))

    def describe(self) -> str:
        return (
            f"default noise model: per-run sd {self.fewest_sd} points at the fewest labels, {self.sd} elsewhere; "
            f"correlation {self.rho:+.2f} between cells of one seed that share the encoder entering fine-tuning, "
            f"{self.rho_seed:+.2f} between its other cells (measured on the demo's 168 runs, 8 seeds)"
        )


DEFAULT_NOISE = NoiseModel()


@dataclass(frozen=True)
class PartPower:
    """One part's power: finding, part, arm (of finding c; the paper's for a and b), n (seeds), sd (per-seed
    sd of the part's paired contrast), mde (the true effect found with 80% power at n seeds, one-sided
    2.5%), power (0-1 at effect), seeds_needed (the fewest seeds >= 2 reaching 80% at effect; None when
    more than SEEDS_CAP, or no effect), effect (signed, in unit), unit, noise_source, effect_source, side
    ('claimed' or 'opposite': the effect's side of 0 against the claim) and note (why a number is missing)."""

    finding: str
    part: str
    arm: str
    n: int
    sd: float
    mde: float
    power: float
    seeds_needed: int | None
    effect: float
    unit: str
    noise_source: str
    effect_source: str
    side: str
    note: str = ""

    def to_dict(self) -> dict:
        """JSON-ready (NaN -> None)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def design_keys(grid) -> list[tuple]:
    """The segmentation cells (pretrain_size, arm, finetune_size) a grid (GridConfig, or a StudyConfig's)
    plans: every arm at every pre-training size > 0, no intermediate stage at every size, each at every
    fine-tune size (as `study.grid.plan` does)."""
    grid = getattr(grid, "grid", grid)
    return sorted(
        (int(p), str(a), int(f))
        for p in grid.pretrain_sizes
        for a in grid.intermediate
        if a == "none" or p
        for f in grid.finetune_sizes
    )


def _given(effect, finding: str, part: str, arm: str) -> float | None:
    """The effect given for a part: one number for all, or a dict keyed by part, (finding, part) or
    (finding, part, arm)."""
    if effect is None:
        return None
    if not isinstance(effect, dict):
        return float(effect)
    for key in ((finding, part, arm), (finding, part), part):
        if key in effect:
            return float(effect[key])
    return None


def paper_standardized(metric: str = "miou") -> dict[str, float]:
    """{part: the paper's effect / the sd of its contrast with one run per cell} on its own table (the
    paper's intermediate arm; metrics it lacks use its mIoU)."""
    pf = cells(paper_frame(), metric if metric in PAPER_METRICS else "miou")
    out = {}
    for part, w in part_weights(pf, PAPER_ARM).items():
        est = contrast(pf, w)
        out[part] = est.value / est.sd if est.sd > 0 else math.nan
    return out


def _measured(c: dict, weights: dict):
    """The part's Estimate on the study's runs when >= 2 seeds have every cell of it, else None."""
    if not all(k in c for k in weights):
        return None
    est = contrast(c, weights)
    return est if est.method == "paired" and est.n >= 2 and est.se > 0 else None


def power_table(
    cfg, runs: pd.DataFrame | None = None, effect=None, metric: str = "miou", noise: NoiseModel = DEFAULT_NOISE
) -> list[PartPower]:
    """Every part's PartPower for a study (a StudyConfig: its grid's cells and seeds, its protocol) and its
    collected runs (`studylib.study.store.collect`; None or empty before any run). effect: None, one number
    (every part, in its own unit) or {part | (finding, part) | (finding, part, arm): number}; a given size is
    taken on the claimed side. n is the grid's number of seeds."""
    grid = getattr(cfg, "grid", cfg)
    keys, n = design_keys(grid), len(grid.seeds)
    if runs is not None and not runs.empty:
        runs = select(runs, getattr(cfg, "protocol", None)) if "protocol" in runs.columns else runs
    c = cells(runs, metric) if runs is not None and not runs.empty else {}
    paper = None
    rows = []
    for finding, part, arm, sign, w in all_parts(keys):
        if isinstance(w, str):
            rows.append(PartPower(finding, part, arm, n, *[math.nan] * 3, None, math.nan, unit(part, metric),
                                  "", "", "", f"not tested by this design: {w}"))  # fmt: skip
            continue
        est = _measured(c, w)
        sd, noise_source = (
            (est.sd, f"this study's {est.n} finished seeds") if est else (noise.contrast_sd(keys, w), DEFAULT_SOURCE)
        )
        given = _given(effect, finding, part, arm)
        if given is not None:
            value, source = sign * abs(given), "given"
        elif est is not None:
            value, source = est.value, f"measured on {est.n} seeds"
        else:
            paper = paper or paper_standardized(metric)
            value, source = paper[part] * sd, f"the paper's, scaled: d = {paper[part]:+.2f} sd of the contrast"
        rows.append(_row(finding, part, arm, sign, n, sd, value, unit(part, metric), noise_source, source))
    return rows


def _row(finding, part, arm, sign, n, sd, value, units, noise_source, source) -> PartPower:
    """One PartPower from its numbers."""
    se, df = sd / math.sqrt(max(n, 1)), n - 1.0
    needed = seeds_needed(value, sd)
    note = "" if n >= 2 else "one seed gives no interval"
    if needed is None and value != 0 and sd > 0:
        note = f"more than {SEEDS_CAP:,} seeds"
    side = "claimed" if sign * value > 0 else "opposite" if sign * value < 0 else ""
    power = float(power_at(value, se, df)) if n >= 2 else math.nan
    return PartPower(finding, part, arm, n, sd, mde_at(se, df), power, needed, value, units, noise_source, source,
                     side, note)  # fmt: skip


def _fmt(x: float, digits: int = 2) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def _needed(r: PartPower) -> str:
    return str(r.seeds_needed) if r.seeds_needed else f"> {SEEDS_CAP:,}" if "more than" in r.note else ""


FEW_SEEDS = 5  # below this many seeds a measured sd is too uncertain to size a study on without saying so


def format_power(rows: list[PartPower], noise: NoiseModel = DEFAULT_NOISE) -> str:
    """The power table as aligned text, one line per part, with the noise model stated when it was used."""
    table = pd.DataFrame(
        {
            "finding": [r.finding for r in rows],
            "part": [r.part + ("" if r.finding != "c" or r.arm == PAPER_ARM else f" (arm {r.arm})") for r in rows],
            "n": [r.n for r in rows],
            "effect": [f"{r.effect:+,.2f} {r.unit}" if not math.isnan(r.effect) else "" for r in rows],
            "effect from": [r.effect_source for r in rows],
            "power": [f"{r.power:.0%}" if not math.isnan(r.power) else "" for r in rows],
            f"mde ({TARGET_POWER:.0%} power)": [_fmt(r.mde) for r in rows],
            "seeds needed": [_needed(r) for r in rows],
            "sd per seed": [_fmt(r.sd) for r in rows],
            "noise": [r.noise_source for r in rows],
            "note": [r.note if "not tested" in r.note else ("wrong side of the claim" if r.side == "opposite" else "")
                     for r in rows],
        }
    )  # fmt: skip
    lines = [
        "power of each part: a one-sided 2.5% paired t test over seeds (the claimed side of its 95% interval); "
        "mde: the smallest true effect found with 80% power at n seeds; power at the effect shown",
        table.to_string(index=False),
    ]
    if any(r.noise_source == DEFAULT_SOURCE for r in rows):
        lines.append(noise.describe())
    measured = [int(m.group(1)) for r in rows if (m := re.match(r"this study's (\d+) finished seeds", r.noise_source))]
    if measured and min(measured) < FEW_SEEDS:
        lines.append(sd_uncertainty(min(measured)))
    return "\n".join(lines)


def sd_uncertainty(n: int) -> str:
    """How far the true per-seed sd may lie from one measured on n seeds (n - 1 degrees of freedom): the 95%
    range of sd_true / sd_measured from the chi-square law, and what that does to the seeds needed (they
    scale with the variance)."""
    from scipy import stats

    df = n - 1
    lo, hi = (math.sqrt(df / stats.chi2.ppf(q, df)) for q in (0.975, 0.025))
    return (
        f"caution: the sd comes from {n} seeds ({df} degree{'s' if df != 1 else ''} of freedom): the true sd may be "
        f"{lo:.2f}x to {hi:,.1f}x the measured one (95%), and the seeds needed scale with its square; measure more "
        f"seeds (or run --until-decided) before sizing a study on it"
    )
