"""The results module on hand-made frames whose numbers can be checked by hand: tables, differences
with their intervals, the paper's tables, the comparison with them, the claims and the report formats."""

from __future__ import annotations

import io
import json

import ipywidgets
import pandas as pd
import pytest

from studylib.analysis.claims import claim_parts, claims, claims_all_arms
from studylib.analysis.reference import paper_frame
from studylib.analysis.render import NO_RUNS, format_tables, render
from studylib.analysis.stats import t975
from studylib.analysis.tables import collect, gain_table, intermediate_table, paper_comparison, paper_table, summary
from studylib.analysis.vocabulary import arm_label, intermediate_arm, protocols, select
from studylib.views import plots, widgets

T1 = 12.7062047  # t quantile 0.975, 1 degree of freedom (two seeds, paired)
H1 = T1 * 0.5  # its half width with se 0.5: 6.3531


def runs(table: dict, protocol: str = "clean", seeds: dict | None = None) -> pd.DataFrame:
    """A frame like collect()'s from {(pretrain_size, intermediate, finetune_size): [value per run]}; the
    runs' seeds are 0, 1, ... unless seeds gives them per cell; pixel_acc = value + 30,
    miou_dataset = value - 1."""
    rows = []
    for (p, i, f), values in table.items():
        for seed, v in zip((seeds or {}).get((p, i, f), range(len(values))), values):
            rows.append(
                {
                    "protocol": protocol,
                    "pretrain_size": p,
                    "intermediate": i,
                    "finetune_size": f,
                    "seed": seed,
                    "id": f"{p}-{i}-{f}-{seed}",
                    "miou": v,
                    "pixel_acc": v + 30,
                    "miou_dataset": v - 1,
                }
            )
    return pd.DataFrame(rows)


SMALL = runs({(0, False, 10): [40, 42], (200, False, 10): [50, 53], (200, True, 10): [47, 49]})


# ------------------------------------------------------------------------------------ tables


def test_summary_means_and_stds_are_over_seeds_with_ddof_1():
    s = summary(SMALL, "miou").set_index(["pretrain_size", "intermediate", "finetune_size"])
    assert s.loc[(0, "none", 10), "mean"] == pytest.approx(41.0)
    assert s.loc[(0, "none", 10), "std"] == pytest.approx(1.414214, abs=1e-6)  # sqrt(2)
    assert s.loc[(200, "none", 10), "mean"] == pytest.approx(51.5)
    assert s.loc[(200, "none", 10), "std"] == pytest.approx(2.121320, abs=1e-6)  # 3 / sqrt(2)
    assert list(s.n) == [2, 2, 2]


def test_paper_table_layout_and_cells():
    t = paper_table(SMALL, "miou")
    assert list(t.index) == ["scratch", "mim 200", "mim 200 + intel"] and list(t.columns) == [10]
    assert t.loc["scratch", 10] == "41.00 +- 1.41"
    assert t.loc["mim 200", 10] == "51.50 +- 2.12"
    assert paper_table(SMALL, "pixel_acc", with_n=True).loc["mim 200 + intel", 10] == "78.00 +- 1.41 (2)"
    assert paper_table(SMALL.iloc[:0], "miou").empty


def test_gain_is_paired_by_seed_with_a_t_interval():
    g = gain_table(SMALL, "miou").iloc[0]
    # per seed 50-40 = 10 and 53-42 = 11: mean 10.5, sd 0.7071, se 0.5, half width 12.7062 * 0.5 = 6.3531
    assert (g.pretrain_size, g.intermediate, g.finetune_size, g.n, g.method) == (200, "none", 10, 2, "paired")
    assert (g["diff"], g.lo, g.hi) == pytest.approx((10.5, 10.5 - H1, 10.5 + H1))
    assert gain_table(SMALL, "miou", pivot=True).loc["mim 200", 10] == "+10.50 [+4.15, +16.85] (2)"


def test_intermediate_change_is_with_minus_without():
    t = intermediate_table(SMALL, "miou").iloc[0]
    # per seed 47-50 = -3 and 49-53 = -4
    assert (t["diff"], t.lo, t.hi, t.n) == pytest.approx((-3.5, -3.5 - H1, -3.5 + H1, 2))


def test_paired_over_the_common_seeds_when_a_cell_has_more():
    # the seed is the replicate: seed 2 of the pre-trained cell has no scratch partner, so the gain is paired over
    # seeds 0 and 1 (differences 5 and 6; mean 5.5, sd 0.7071, se 0.5, t(1) = 12.7062: half width 6.3531),
    # never a Welch interval over runs that share their seed's draws
    df = runs({(0, False, 10): [40, 42], (100, False, 10): [45, 48, 49]})
    g = gain_table(df, "miou").iloc[0]
    assert g.method == "paired" and g.n == 2
    assert (g["diff"], g.lo, g.hi) == pytest.approx((5.5, 5.5 - 6.3531, 5.5 + 6.3531), abs=1e-4)


def test_one_seed_gives_a_difference_but_no_interval():
    one = runs({(0, False, 10): [40], (200, False, 10): [50]})
    g = gain_table(one, "miou").iloc[0]
    assert g["diff"] == 10 and g.n == 1 and pd.isna(g.lo) and pd.isna(g.hi)
    assert gain_table(one, "miou", pivot=True).loc["mim 200", 10] == "+10.00 (1)"


def test_intermediate_arms_old_booleans_and_names():
    assert [intermediate_arm(v) for v in (False, True, None, float("nan"), "spatial")] == [
        "none",
        "intel",
        "none",
        "none",
        "spatial",
    ]
    assert [arm_label(p, a) for p, a in [(0, "none"), (32, False), (32, "intel"), (32, True), (32, "spatial")]] == [
        "scratch",
        "mim 32",
        "mim 32 + intel",
        "mim 32 + intel",
        "mim 32 + spatial",
    ]
    named = runs(
        {
            (0, "none", 10): [40, 42],
            (200, "none", 10): [50, 53],
            (200, "intel", 10): [47, 49],
            (200, "spatial", 10): [52, 56],
        }
    )
    assert list(paper_table(named, "miou").index) == ["scratch", "mim 200", "mim 200 + intel", "mim 200 + spatial"]
    t = intermediate_table(named, "miou")
    assert list(t.intermediate) == ["intel", "spatial"]
    # spatial: per seed 52-50 = 2, 56-53 = 3 -> +2.5, half width 12.7062 * 0.5
    assert tuple(t.iloc[1][["diff", "lo", "hi"]]) == pytest.approx((2.5, 2.5 - H1, 2.5 + H1))
    assert list(intermediate_table(named, "miou", pivot=True).index) == ["mim 200 + intel", "mim 200 + spatial"]


def test_t_quantiles():
    # exact quantiles (scipy), also fractional df and past 30 (the normal's 1.96 only in the limit)
    assert t975(1) == pytest.approx(T1) and t975(30) == pytest.approx(2.0422725)
    assert 3.182 < t975(2.9) < 4.303 and t975(31) == pytest.approx(2.0395134)
    with pytest.raises(ValueError):
        t975(0.5)


def test_protocols_are_never_pooled():
    both = pd.concat([SMALL, runs({(0, False, 10): [30, 31]}, protocol="paper")])
    assert protocols(both) == ["clean", "paper"]
    with pytest.raises(ValueError, match="2 protocols"):
        summary(both, "miou")
    assert len(select(both, "paper")) == 2 and len(select(both)) == len(SMALL)


def test_collect_of_an_empty_store(tmp_path):
    df = collect(tmp_path)
    assert df.empty and {"protocol", "seed", "miou", "pixel_acc", "miou_dataset"} <= set(df.columns)


# ------------------------------------------------------------------------------------ paper


def test_paper_frame_reproduces_the_papers_tables():
    pf = paper_frame().set_index(["metric", "pretrain_size", "intermediate", "finetune_size"])
    assert len(pf) == 2 * 7 * 6 and (pf.n == 3).all()
    assert tuple(pf.loc[("miou", 0, "none", 250), ["mean", "std"]]) == (43.73, 1.02)
    assert pf.loc[("pixel_acc", 200000, "intel", 6000), "mean"] == 87.18
    assert pf.loc[("pixel_acc", 200000, "intel", 6000), "std"] == 0.14
    assert tuple(pf.loc[("miou", 45000, "intel", 2000), ["mean", "std"]]) == (59.38, 0.88)
    assert paper_table(paper_frame(), "miou").loc["scratch", 250] == "43.73 +- 1.02"


def _paper_plus_one(metric: str) -> pd.DataFrame:
    """A fake study: three runs per paper cell, m+1-s, m+1, m+1+s (in column metric), so its mean is the
    paper's + 1 and its std (ddof 1) the paper's."""
    pf = paper_frame()
    df = runs(
        {
            (r.pretrain_size, r.intermediate, r.finetune_size): [r.mean + 1 - r.std, r.mean + 1, r.mean + 1 + r.std]
            for r in pf[pf.metric == metric].itertuples()
        }
    )
    return df.assign(**{metric: df.miou})


def test_paper_comparison_differences():
    c = paper_comparison(_paper_plus_one("miou"), "miou")
    assert len(c) == 42
    assert c["diff"].to_numpy() == pytest.approx([1.0] * 42)
    assert c.study_std.to_numpy() == pytest.approx(c.paper_std.to_numpy())
    none = c[(c.pretrain_size == 0) & (c.finetune_size == 250)].iloc[0]
    # Welch with equal std 1.02 and n 3 on both sides: df = 4, half = 2.77645 * 1.02 * sqrt(2/3) = 2.31230
    assert (none.paper_mean, none.lo, none.hi) == pytest.approx((43.73, 1 - 2.31230, 1 + 2.31230), abs=1e-4)
    acc = paper_comparison(_paper_plus_one("pixel_acc"), "pixel_acc")
    assert acc["diff"].to_numpy() == pytest.approx([1.0] * 42)
    row = acc.set_index(["pretrain_size", "intermediate", "finetune_size"])
    assert row.loc[(200000, "intel", 6000), "paper_mean"] == 87.18
    assert row.loc[(200000, "intel", 6000), "study_mean"] == pytest.approx(88.18)


def test_paper_comparison_is_empty_for_other_sizes_and_says_so():
    assert paper_comparison(SMALL, "miou").empty
    assert paper_comparison(SMALL, "miou_dataset").empty
    text = render(SMALL, "text", metrics=("miou", "miou_dataset"))
    assert "no cell in common with the paper" in text
    assert "the paper reports no mIoU % (dataset level)" in text


# ------------------------------------------------------------------------------------ claims

HELPS = {  # fine-tune sizes 10, 20, 40; pre-training helps most at 10, returns diminish, intermediate hurts
    (0, False): [40, 50, 55],
    (100, False): [50, 57, 60],
    (200, False): [54, 60, 62],
    (100, True): [46, 54, 58],
    (200, True): [47, 54, 58],
}
HURTS = {  # the opposite of every finding: changes with the stage +1 +2 +1 at 100, +4 +4 +5 at 200
    (0, False): [40, 42, 50],
    (100, False): [41, 45, 55],
    (200, False): [43, 50, 62],
    (100, True): [42, 47, 56],
    (200, True): [47, 54, 67],
}


def grid_runs(arms: dict, n_seeds: int = 2) -> pd.DataFrame:
    """Runs for arms {(pretrain_size, intermediate arm or bool): [value at 10, 20, 40]}: seed 0 the value, seed 1 the
    value moved by -0.1, 0 or +0.1 (varying over cells) plus 0.01 a^2 for the a-th arm. The -0.1/0/+0.1 alone
    sum to 0 over each arm, so contrasts averaged over fine-tune sizes would have the same per-seed value
    for both seeds: zero spread, no interval; the arm term gives every contrast some spread."""
    table = {}
    for a, ((p, i), values) in enumerate(arms.items()):
        for j, (f, v) in enumerate(zip((10, 20, 40), values)):
            table[(p, i, f)] = [v, v + 0.1 * ((a + 2 * j) % 3) - 0.1 + 0.01 * a * a][:n_seeds]
    return runs(table)


def _verdicts(df: pd.DataFrame) -> dict:
    return dict(zip(claims(df, "miou").finding, claims(df, "miou").verdict))


def test_claims_supported():
    c = claims(grid_runs(HELPS), "miou").set_index("finding")
    assert dict(c.verdict) == {"a": "supported", "b": "supported", "c": "supported"}
    # (a): gain of 200 at 10 labels (54 - 40 = 14) minus at 40 labels (62 - 55 = 7), give or take the jitter
    assert c.loc["a", "effect"] == pytest.approx(7.0, abs=0.2)
    assert c.loc["a", "ci95"][0] > 0
    # (c): changes -4 -3 -2 -7 -6 -4, mean -4.33
    assert c.loc["c", "effect"] == pytest.approx(-26 / 6, abs=0.1) and c.loc["c", "ci95"][1] < 0
    assert "negative in 6/6" in c.loc["c", "detail"] and "description only: r of" in c.loc["c", "detail"]
    # (c) interaction: change at (200, 10) 47 - 54 = -7 minus change at (100, 40) 58 - 60 = -2, about -5
    part = claim_parts(grid_runs(HELPS), "miou").set_index("part").loc["most where pre-training helps most"]
    assert part.effect == pytest.approx(-5.0, abs=0.1) and part.ci95[1] < 0 and part.verdict == "supported"


def test_claim_parts_numbers_without_jitter():
    exact = runs({(p, i, f): [v, v] for (p, i), vals in HELPS.items() for f, v in zip((10, 20, 40), vals)})
    parts = claim_parts(exact, "miou").set_index("part")
    assert parts.loc["fewer labels", "effect"] == pytest.approx(7.0)
    # labels, points per 1,000 labels: (50 - 40) / 10 * 1000 = 1000 from 10 to 20, (55 - 50) / 20 * 1000 = 250
    assert parts.loc["labels", "effect"] == pytest.approx(1000 - 250)
    # pre-training, points per 1,000 pre-training images: first step 0 -> 100 gains 10, 7, 5 (mean 22/3) per 0.1
    # thousand images, last step 100 -> 200 gains 4, 3, 2 (mean 3) per 0.1 thousand
    assert parts.loc["pre-training", "effect"] == pytest.approx(22 / 3 / 0.1 - 3 / 0.1)
    assert parts.loc["hurts", "effect"] == pytest.approx(-26 / 6)
    # interaction: change at (200, 10) 47 - 54 = -7 minus change at (100, 40) 58 - 60 = -2
    assert parts.loc["most where pre-training helps most", "effect"] == pytest.approx(-5.0)
    # identical seeds: zero spread is no evidence -- no interval (never a zero-width one), and the detail says so
    assert all(pd.isna(lo) and pd.isna(hi) for lo, hi in parts.ci95)
    assert set(parts.verdict) == {"not enough runs"}
    assert all("no spread across seeds (standard error 0): no interval" in d for d in parts.detail)


def test_labels_slope_contrast_by_hand():
    # no pre-training only, 3 seeds: per seed d = (m20 - m10) / 10 * 1000 - (m40 - m20) / 20 * 1000
    df = runs({(0, False, 10): [40, 41, 42], (0, False, 20): [50, 50, 53], (0, False, 40): [55, 56, 54]})
    # seed 0: 100 * 10 - 50 * 5 = 750; seed 1: 100 * 9 - 50 * 6 = 600; seed 2: 100 * 11 - 50 * 1 = 1050
    # mean 800, sd sqrt((50^2 + 200^2 + 250^2) / 2) = 229.129, se 132.288, t(2) = 4.302653: half 569.19
    part = claim_parts(df, "miou").set_index("part").loc["labels"]
    assert part.effect == pytest.approx(800.0)
    assert part.ci95 == pytest.approx((800 - 569.19, 800 + 569.19), abs=0.01)
    assert (part.verdict, part.n) == ("supported", 3)
    # mean slopes: (51 - 41) / 10 * 1000 = 1000 from 10 to 20, (55 - 51) / 20 * 1000 = 200 from 20 to 40
    assert "+1000.000 points per 1,000 added labels from 10 to 20, +200.000 from 20 to 40" in part.detail
    assert claims(df, "miou").set_index("finding").loc["b", "verdict"] == "not enough runs"  # no pre-training arm


def test_claims_not_supported():
    assert _verdicts(grid_runs(HURTS)) == {"a": "not supported", "b": "not supported", "c": "not supported"}


def test_claims_mixed_when_one_axis_of_diminishing_returns_fails():
    arms = {**HELPS, (0, False): [40, 42, 53]}  # 200 then 550 points per 1,000 labels: returns in labels grow
    parts = claim_parts(grid_runs(arms), "miou").set_index("part")
    assert parts.loc["labels", "verdict"] == "not supported"
    # seed 1: jitter -0.1, +0.1, 0 at 10, 20, 40 moves d by 100 * 0.2 + 50 * 0.1 = +25, the mean by +12.5
    assert parts.loc["labels", "effect"] == pytest.approx(200 - 550 + 12.5)
    assert parts.loc["pre-training", "verdict"] == "supported"
    assert _verdicts(grid_runs(arms))["b"] == "mixed: labels not supported"


def test_claims_inconclusive_when_the_interval_spans_zero():
    arms = {**HELPS, (0, False): [40, 45, 53]}  # 500 then 400 points per 1,000 labels: +100, seed spread larger
    parts = claim_parts(grid_runs(arms), "miou").set_index("part")
    lo, hi = parts.loc["labels", "ci95"]
    assert lo < 0 < hi and parts.loc["labels", "verdict"] == "inconclusive (n=2)"
    assert _verdicts(grid_runs(arms))["b"] == "mixed: labels inconclusive (n=2)"


def test_claims_need_two_seeds_and_the_arms():
    assert set(_verdicts(grid_runs(HELPS, n_seeds=1)).values()) == {"not enough runs"}
    one = claims(grid_runs(HELPS, n_seeds=1), "miou").set_index("finding")
    assert one.loc["a", "effect"] == pytest.approx(7.0) and pd.isna(one.loc["a", "ci95"][0])
    assert set(_verdicts(SMALL).values()) == {"not enough runs"}
    assert set(_verdicts(SMALL.iloc[:0]).values()) == {"not enough runs"}


def test_finding_c_per_intermediate_arm():
    spatial = {**HELPS, (100, "spatial"): [52, 58, 61], (200, "spatial"): [56, 61, 63]}  # a little better
    df = grid_runs(spatial)
    assert claims(df, "miou").verdict.tolist() == ["supported"] * 3
    c = claims(df, "miou", arm="spatial").set_index("finding")
    assert c.loc["c", "verdict"] == "not supported" and "(arm spatial)" in c.loc["c", "claim"]
    both = claims_all_arms(df, "miou")
    assert list(both.finding) == ["a", "b", "c", "c"] and both.claim.iloc[3].endswith("(arm spatial)")


def test_claims_on_the_papers_own_table():
    c = claims(paper_frame(), "miou").set_index("finding")
    assert c.loc["a", "verdict"] == "supported" and c.loc["c", "verdict"] == "supported"
    assert c.loc["a", "effect"] == pytest.approx((57.14 - 43.73) - (68.76 - 65.07))
    assert c.loc["b", "verdict"] == "supported"
    assert "largest drop -7.21 at 200,000 pre-training images, 250 labels" in c.loc["c", "detail"]
    # (b) labels: (47.41 - 43.73) / 250 * 1000 = 14.72, (65.07 - 62.99) / 2000 * 1000 = 1.04 points per 1,000
    assert c.loc["b", "effect"] == pytest.approx(14.72 - 1.04)


# ------------------------------------------------------------------------------------ render


def test_render_text_and_markdown():
    df = grid_runs(HELPS)
    text = render(df)
    assert "== protocol clean: 30 runs, 2 seeds per cell ==" in text
    assert "pre-training gain over no pre-training" in text and "supported" in text
    md = render(df, "markdown")
    assert "\n|---|---|---|---|\n" in md and "## protocol clean" in md
    assert "| arm (encoder, pre-training images) / fine-tune size | 10 | 20 | 40 |" in md


def test_render_csv_parses():
    out = pd.read_csv(io.StringIO(render(grid_runs(HELPS), "csv")))
    assert {"protocol", "metric", "table", "diff", "lo", "hi", "verdict"} <= set(out.columns)
    assert set(out.table) == {"summary", "gain", "intermediate", "claims", "paper_claims"}
    gains = out[(out.table == "gain") & (out.metric == "miou")]
    assert len(gains) == 6 and set(out.metric) == {"miou", "pixel_acc", "miou_dataset"}


def test_render_json_parses():
    both = pd.concat([grid_runs(HELPS), runs({(0, False, 10): [1, 2]}, protocol="paper")])
    data = json.loads(render(both, "json"))
    assert set(data) == {"clean", "paper"}
    clean = data["clean"]
    assert clean["runs"] == 30 and len(clean["claims"]) == 3 * 3
    assert {c["verdict"] for c in clean["claims"] if c["metric"] == "miou"} == {"supported"}
    assert len(clean["claims"][0]["ci95"]) == 2
    assert len(clean["tables"]["miou"]["gain"]) == 6 and clean["tables"]["miou"]["paper_comparison"] == []
    assert data["paper"]["claims"][0]["ci95"] == [None, None]


def test_render_of_no_runs():
    empty = SMALL.iloc[:0]
    assert render(empty) == NO_RUNS and json.loads(render(empty, "json")) == {}
    assert pd.read_csv(io.StringIO(render(empty, "csv"))).empty
    with pytest.raises(ValueError):
        render(SMALL, "html")


def test_format_tables_still_prints_every_metric():
    text = format_tables(SMALL)
    assert text.count("protocol clean") == 3 and "41.00 +- 1.41 (2)" in text


# ------------------------------------------------------------------------------------ figures


def test_scaling_curves_overlay_the_paper():
    fig = plots.scaling_curves(grid_runs(HELPS), "miou", paper=paper_frame())
    names = [t.name for t in fig.data]
    assert names[:5] == ["scratch", "mim 100", "mim 200", "mim 100 + intel", "mim 200 + intel"]
    paper = [t for t in fig.data[5:]]
    assert len(paper) == 7 and {t.xaxis for t in paper} == {"x2"} and {t.xaxis for t in fig.data[:5]} == {"x"}
    assert paper[0].name == "paper: scratch" and list(paper[0].x) == [250, 500, 1000, 2000, 4000, 6000]
    assert fig.layout.yaxis2.matches == "y"  # one y axis: the study's and the paper's values compare directly
    colours = {t.name: t.line.color for t in fig.data}
    assert colours["mim 200 + intel"] == colours["paper: mim 200000 + intel"] != colours["mim 200"]
    assert len(plots.scaling_curves(grid_runs(HELPS), "miou_dataset", paper=paper_frame()).data) == 5
    assert len(plots.scaling_curves(SMALL.iloc[:0], "miou").data) == 0


def test_intermediate_heatmap_and_explorer():
    fig = plots.intermediate_heatmap(intermediate_table(grid_runs(HELPS), "miou"))
    assert fig.data[0].z.shape == (2, 3)
    assert len(plots.intermediate_heatmap(intermediate_table(SMALL.iloc[:0], "miou")).data) == 0
    assert type(widgets.explore(SMALL.iloc[:0])).__name__ == "HTML"
    box = widgets.explore(grid_runs(HELPS))
    assert isinstance(box, ipywidgets.VBox) and "run the notebook in JupyterLab" in repr(box)  # kernel-less view
    box.children[0].children[0].value = "pixel_acc"  # redraws (the browser test sees the figure change)


def test_claims_are_shown_whole():
    claim = "x" * 300  # pandas cuts cells at 50 characters with '...'
    html = widgets.full_text(pd.DataFrame({"claim": [claim], "verdict": ["supported"]})).to_html()
    assert claim in html and "..." not in html
