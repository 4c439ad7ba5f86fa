"""The study's figures and tables read at a glance (issue 23), checked on the plotly figure objects and the
rendered HTML tables, no browser: log axes ticked at the fine-tune sizes, titles that name the metric and the
baseline, one colour per encoder in every figure, subplot titles that do not overlap at the report's width,
and tables without 'NaN', an index column or a second header row."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
import torch

from studylib.analysis import encoders, tables
from studylib.analysis.reference import PAPER_COSINE, paper_frame
from studylib.views import plots, report, style, widgets

SIZES = (20, 60, 180, 2000)  # fine-tune sizes; 2000 for the thousands separator
ARMS = [(0, "none"), (500, "none"), (2000, "none"), (500, "intel"), (2000, "intel"), (2000, "spatial")]


def runs_frame() -> pd.DataFrame:
    """Three seeds of every arm at every fine-tune size: mIoU rising with labels and pre-training, the intel
    arm a few points below, seeded noise (so that every contrast has an interval)."""
    rng = np.random.default_rng(0)
    rows = []
    for k, (p, arm) in enumerate(ARMS):
        for f in SIZES:
            for seed in range(3):
                miou = 30 + 5 * np.log10(f) + (4 if p else 0) - (3 if arm == "intel" else 0) + rng.normal(0, 0.5)
                rows.append(
                    dict(
                        pretrain_size=p,
                        intermediate=arm,
                        finetune_size=f,
                        seed=seed,
                        miou=miou,
                        pixel_acc=miou + 20,
                        miou_dataset=miou + 2,
                        protocol="clean",
                        dir=f"/nowhere/{k}-{f}-{seed}",
                    )
                )
    return pd.DataFrame(rows)


def geometry_report(name: str, pretrain_size: int, seed: int, grid: int = 4) -> dict:
    """A geometry report as `study geometry` writes it, with made-up numbers (the position probe saturated)."""
    rng = np.random.default_rng(seed + pretrain_size)
    maps = {n: rng.uniform(-1, 1, (grid, grid)).tolist() for n in ("background", "pet", "boundary")}

    def layer(k: int) -> dict:
        return {
            "layer": k,
            "within_image_variance": float(rng.uniform(0.1, 0.6)),
            "across_image_variance": float(rng.uniform(0.01, 0.3)),
            "patch_probe": {"train_accuracy": 0.8123, "heldout_accuracy": 0.7, "heldout_balanced_accuracy": 0.6},
            "effective_rank": 40.0,
            "effective_rank_centered": 38.0,
            "position_probe": {"heldout_accuracy": 1.0, "mean_manhattan_error": 0.0, "chance": 1 / grid**2},
            "cosine_by_distance": rng.uniform(0.2, 0.9, 5).tolist(),
            "reference": {"image": 0, "patches": {"background": 0, "pet": 5, "boundary": 6}, "maps": maps},
        }

    return {
        "encoder": {"name": name, "run": None, "pretrain_size": pretrain_size, "seed": seed},
        "distances": [1, 2, 3, 4, 5],
        "per_layer": [layer(0), layer(1), layer(-1)],
        "cka": {"names": [0, 1, -1], "matrix": [[1.0, 0.91, 0.8], [0.91, 1.0, 0.88], [0.8, 0.88, 1.0]]},
    }


REPORTS = [
    geometry_report(name, p, seed)
    for name, p in [("scratch", 0), ("mim", 500), ("mim", 2000), ("mim + intel", 2000), ("mim + spatial", 2000)]
    for seed in (0, 1)
]


# --------------------------------------------------------------------------------------------- axes


def test_scaling_axes_are_ticked_at_the_finetune_sizes():
    """Both panels' log axes carry exactly their data's fine-tune sizes as ticks (plotly's own log ticks would
    label minor ticks '2', '5', which read as sizes), written with thousands separators."""
    fig = plots.scaling_curves(runs_frame(), "miou", paper=paper_frame())
    assert fig.layout.xaxis.type == "log" and list(fig.layout.xaxis.tickvals) == list(SIZES)
    assert list(fig.layout.xaxis.ticktext) == ["20", "60", "180", "2,000"]
    paper_sizes = sorted(set(paper_frame().finetune_size))
    assert list(fig.layout.xaxis2.tickvals) == paper_sizes
    assert "(log scale)" in fig.layout.xaxis.title.text and "mIoU" in fig.layout.yaxis.title.text


def test_titles_name_the_metric_and_the_baseline():
    df = runs_frame()
    for metric, points in (("miou", "mIoU points"), ("pixel_acc", "pixel-accuracy points")):
        fig = plots.intermediate_heatmap(tables.intermediate_table(df, metric), metric)
        title = fig.layout.title.text
        assert plots.METRICS[metric] in title and "minus mim of the same pre-training size" in title
        assert points in fig.data[0].colorbar.title.text
        assert list(fig.data[0].x) == ["20", "60", "180", "2,000"]
        assert plots.METRICS[metric] in plots.scaling_curves(df, metric).layout.title.text
    cka = plots.cka_heatmap(REPORTS[2])
    assert cka.layout.title.text.startswith("mim, pre-training 500, seed 0")
    # the colours span the values found (0.80 to 1), not 0 to 1, and every value is printed
    assert (cka.data[0].zmin, cka.data[0].zmax) == (0.8, 1.0) and cka.data[0].texttemplate == "%{z:.2f}"
    cosine = plots.cosine_curves(REPORTS, paper=PAPER_COSINE)
    assert "output" in cosine.layout.title.text and "layer -1" not in cosine.layout.title.text
    assert "pre-training sizes 500 and 2,000" in cosine.layout.title.text  # what a line averages, said


# ------------------------------------------------------------------------------------------ colours


def _colours(*figures) -> dict[str, set]:
    """{encoder: the colours its lines have} over the figures; every line trace must name its encoder."""
    found: dict[str, set] = {}
    for fig in figures:
        for t in fig.data:
            assert t.meta and "encoder" in t.meta, f"trace {t.name!r} does not say which encoder it draws"
            found.setdefault(t.meta["encoder"], set()).add(t.line.color)
    return found


def test_each_encoder_has_one_colour_in_every_figure():
    """The scaling curves (study and paper panels) and the similarity curves (study and paper's Fig. 5)
    colour an encoder alike, and two encoders differently; scratch is grey everywhere."""
    colours = _colours(
        plots.scaling_curves(runs_frame(), "miou", paper=paper_frame()),
        plots.scaling_curves(runs_frame(), "pixel_acc", paper=paper_frame()),
        plots.cosine_curves(REPORTS, paper=PAPER_COSINE),
    )
    assert set(colours) >= {"scratch", "mim", "mim + intel", "mim + spatial", "mim + pets-breeds"}
    assert all(len(c) == 1 for c in colours.values()), colours
    one = {name: next(iter(c)) for name, c in colours.items()}
    assert len(set(one.values())) == len(one), one
    assert one == {name: style.encoder_colour(name) for name in one} and one["scratch"] == "#7f7f7f"


# ----------------------------------------------------------------------------------- subplot titles

CHAR_EM = 0.6  # a character's width in ems, generous for a proportional font (digits and most letters ~0.55)


def _title_boxes(fig) -> list[tuple[str, float, float, float, float]]:
    """(text, left, top, right, bottom) in px of every paper-anchored annotation (the subplot titles), at the
    figure's own width or, without one, the report's (style.REPORT_WIDTH): position from the layout's
    domains and margins, size from the font size and the longest line's characters."""
    lay = fig.layout
    width, height = lay.width or style.REPORT_WIDTH, lay.height or 450
    m = lay.margin
    left, right = 80 if m.l is None else m.l, 80 if m.r is None else m.r
    top, bottom = 100 if m.t is None else m.t, 80 if m.b is None else m.b
    plot_w, plot_h = width - left - right, height - top - bottom
    boxes = []
    for a in lay.annotations:
        if a.xref != "paper" or a.yref != "paper" or not a.text:
            continue
        lines = [re.sub(r"<[^>]+>", "", line) for line in re.split(r"<br\s*/?>", a.text)]
        size = a.font.size or (lay.font.size if lay.font and lay.font.size else 12)
        w, h = CHAR_EM * size * max(len(line) for line in lines), 1.25 * size * len(lines)
        x, y = left + a.x * plot_w, top + (1 - a.y) * plot_h  # y from the top
        x0 = {"left": x, "right": x - w}.get(a.xanchor, x - w / 2)
        y0 = {"top": y, "middle": y - h / 2}.get(a.yanchor, y - h)  # 'bottom': the text sits above y
        boxes.append((a.text, x0, y0, x0 + w, y0 + h))
    return boxes


def _overlaps(fig) -> list[tuple[str, str]]:
    boxes = _title_boxes(fig)
    return [
        (a[0], b[0]) for a, b in combinations(boxes, 2) if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]
    ]


def test_no_two_subplot_titles_overlap_at_the_report_width():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    examples = {
        "images": torch.zeros(3, 3, 16, 16, dtype=torch.uint8),
        "masks": torch.zeros(3, 16, 16, dtype=torch.uint8),
        "pred": torch.ones(3, 16, 16, dtype=torch.long),
        "names": ["american_pit_bull_terrier_101", "great_pyrenees_12", "Abyssinian_3"],
    }
    figures = {
        "reference maps": plots.reference_maps(REPORTS[4], image=image),
        "reference maps without the image": plots.reference_maps(REPORTS[4]),
        "scaling curves": plots.scaling_curves(runs_frame(), "miou", paper=paper_frame()),
        "segmentations": plots.segmentations(examples, n=3),
    }
    for name, fig in figures.items():
        boxes = _title_boxes(fig)
        assert len(boxes) >= 2, f"{name}: expected subplot titles"
        assert not _overlaps(fig), f"{name}: overlapping titles {_overlaps(fig)}"
        width = fig.layout.width or style.REPORT_WIDTH
        assert all(b[1] >= 0 and b[3] <= width for b in boxes), f"{name}: a title runs off the figure"
    # the check can fail: two long titles in neighbouring 150 px panels
    crowded = plots._grid([[image, image]], ["similarity to the background patch", "similarity to the boundary"])
    assert _overlaps(crowded)


def test_reference_patches_are_numbered_as_the_maps():
    fig = plots.reference_maps(REPORTS[4], image=np.zeros((64, 64, 3), dtype=np.uint8))
    labels = [a.text for a in fig.layout.annotations if a.xref == "x"]
    titles = [a.text for a in fig.layout.annotations if a.xref == "paper"]
    assert labels == ["<b>1</b>", "<b>2</b>", "<b>3</b>"] and len(fig.layout.shapes) == 3
    assert titles[1:] == [
        f"similarity to patch {k}<br>({n})" for k, n in enumerate(("background", "pet", "boundary"), 1)
    ]


# ------------------------------------------------------------------------------------------- tables


class _Cells(HTMLParser):
    """The rows of every table in an HTML text: header rows, body rows with ('th' | 'td', text) cells."""

    def __init__(self, text: str):
        super().__init__()
        self.head, self.body, self._part, self._row, self._cell = [], [], None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag in ("thead", "tbody"):
            self._part = tag
        elif tag == "tr":
            self._row = []
        elif tag in ("th", "td") and self._row is not None:
            self._cell = [tag, ""]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self._cell is not None:
            self._row.append((self._cell[0], self._cell[1].strip()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            (self.head if self._part == "thead" else self.body).append(self._row)
            self._row = None
        elif tag in ("thead", "tbody"):
            self._part = None


def _check_table_html(text: str, name: str) -> _Cells:
    """No 'NaN' (or 'nan', 'None') in a cell, no index column (a 'th' in the body), one header row."""
    cells = _Cells(text)
    assert cells.body, f"{name}: no table rows"
    assert "NaN" not in text, f"{name}: 'NaN' in the table"
    texts = [t for row in cells.body for _, t in row]
    assert not {"nan", "None", "NaN"} & set(texts), f"{name}: a missing value shown as text"
    assert all(kind == "td" for row in cells.body for kind, _ in row), f"{name}: an index column"
    tables = text.count("<table")
    assert len(cells.head) == tables, f"{name}: {len(cells.head)} header rows in {tables} tables (not flat)"
    return cells


def test_rendered_tables_have_no_nan_index_or_second_header_row():
    df = runs_frame()
    views = {
        "findings": widgets.findings(df, "miou").to_html(),
        "paper layout": style.table_html(tables.paper_table(df, "miou", with_n=True), columns_unit="labels"),
        "Table 2": report.table2_view(REPORTS).to_html(),
        "by layer": report.table2_view(REPORTS, layers=True).to_html(),
        "all tables": report.all_tables(df),
    }
    for name, text in views.items():
        _check_table_html(text, name)
    table2 = _Cells(views["Table 2"])
    header = [t for _, t in table2.head[0]]
    assert header[:2] == ["encoder", "pre-training images"] and "position probe % (chance 6.2%)" in header
    column = {h: [row[i][1] for row in table2.body] for i, h in enumerate(header)}
    assert column["encoder"] == ["scratch", "mim", "mim", "mim + intel", "mim + spatial"]  # encoder order
    assert column["pre-training images"] == ["0", "500", "2,000", "2,000", "2,000"]
    assert column["patch probe train %"] == ["81.2"] * 5  # a percentage to one decimal
    assert column["paper (200k encoders): patch probe train %"] == ["–", "–", "79.5", "76.1", "93.3"]
    assert header[2:].count("position probe %") == 0
    # the findings: every part on its own row with its unit
    findings = _Cells(views["findings"])
    assert any("mIoU points" in t for row in findings.body for _, t in row)
    labels = [row[0][1] for row in findings.body if row[0][1]]
    assert labels == ["a", "b", "c (intel)", "c (spatial)"]  # no two rows both labelled 'c'
    assert "20 labels" in [t for _, t in _Cells(views["paper layout"]).head[0]]


def test_the_table_check_catches_a_raw_pandas_frame():
    """What the check is for: pandas' own HTML of Table 2 has an index column, two header rows and 'NaN'."""
    raw = encoders.table2(REPORTS).to_html()
    with pytest.raises(AssertionError, match="NaN|index|header"):
        _check_table_html(raw, "raw")


def test_position_probe_is_explained_when_it_saturates():
    note = report.position_note(REPORTS)
    assert "chance 1/16 = 6.2%" in note and "does not separate them" in note
    unsaturated = [
        dict(
            r,
            per_layer=[dict(x, position_probe=dict(x["position_probe"], heldout_accuracy=0.5)) for x in r["per_layer"]],
        )
        for r in REPORTS
    ]
    assert "does not separate" not in report.position_note(unsaturated)


# ------------------------------------------------------------------------------------- token explorer


def test_token_explorer_lists_encoders_by_arm_size_and_seed():
    from studylib.study.grid import Run

    def run(p: int, arm: str | None, seed: int) -> Run:
        labels = {"pretrain_size": p, **({"arm": arm} if arm else {})}
        return Run("intermediate" if arm else "pretrain", {"seed": seed}, labels=labels)

    runs = [run(2000, "spatial", 0), run(500, None, 1), run(2000, "intel", 0), run(500, None, 0), run(2000, None, 0)]
    labels = [widgets._encoder_label(r) for r in sorted(runs, key=widgets._encoder_order)]
    assert labels == [
        "mim, pre-training 500, seed 0",
        "mim, pre-training 500, seed 1",
        "mim, pre-training 2,000, seed 0",
        "mim + intel, pre-training 2,000, seed 0",
        "mim + spatial, pre-training 2,000, seed 0",
    ]


def test_token_explorer_is_shown_busy_before_its_first_fit(monkeypatch):
    """The cell shows the box, its busy line set, before the first UMAP is fitted (tens of seconds on a CPU),
    not a blank cell until the fit is done."""
    calls = []

    class Explorer:
        def __init__(self, runs, plan):
            self.status = "idle"

        def widget(self, fit=True):
            calls.append(f"widget(fit={fit})")
            return self

        def announce(self):
            self.status = "busy"
            calls.append("announce")

        def refit(self):
            calls.append("refit")

    class Done:
        is_done = True

    monkeypatch.setattr(widgets, "TokenExplorer", Explorer)
    monkeypatch.setattr(widgets.RunFolder, "of", staticmethod(lambda run, runs: Done()))
    monkeypatch.setattr("IPython.display.display", lambda box: calls.append(f"display({box.status})"))
    assert widgets.explore_tokens("runs", [type("R", (), {"stage": "pretrain"})()]) is None
    assert calls == ["widget(fit=False)", "announce", "display(busy)", "refit"]
