"""`study report`: one self-contained HTML file (results, geometry, gallery) that opens offline.

plotly's JavaScript is embedded once in the page (no CDN); each figure is a div drawn by it. A tiny
script records any JavaScript error into the page (#js-errors), so a headless browser can check it.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
import plotly.io as pio
from plotly.offline import get_plotlyjs

from studylib.analysis import encoders, render, tables, vocabulary
from studylib.analysis.reference import PAPER_COSINE
from studylib.core.files import atomic_write_text
from studylib.study.grid import Run
from studylib.study.store import collect
from studylib.views import gallery, plots, style, widgets

CATCH_ERRORS = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  window.__errors.push(String(e.message));
  var box = document.getElementById('js-errors');
  if (box) { box.textContent += e.message + '\\n'; }
});
</script>"""

STYLE = """<style>
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
details { margin: 1em 0; } summary { cursor: pointer; font-size: 1.05em; }
</style>"""

METRIC_ORDER = ("miou", "pixel_acc", "miou_dataset")
POSITION_PROBE = (
    "Position probe: a linear probe predicts each token's own grid position from the token alone (held-out "
    "images; chance 1/{p} = {chance:.1f}%)."
)
POSITION_SATURATED = (
    " It reads 100% for every encoder, the freshly initialised one too: the position embedding added at the "
    "input still determines each token at the output, so no encoder here loses where its patch is and the "
    "column does not separate them; the variances, the patch probe and the similarity against distance do."
)


def _fig(fig) -> str:
    return f'<div class="figure">{pio.to_html(fig, full_html=False, include_plotlyjs=False)}</div>'


def _table(df: pd.DataFrame, **kwargs) -> str:
    """A table formatted for people (style.table): flat headers, no index column, a dash for missing."""
    return style.table_html(df, **kwargs)


def all_tables(df: pd.DataFrame, metrics: tuple = METRIC_ORDER) -> str:
    """Every table of `study results` per protocol (render.sections: the paper layout, the pre-training gains,
    the intermediate-stage changes, this study against the paper or why there is nothing to compare, the
    findings and the same tests on the paper's own table), formatted for people and collapsed under a
    heading that says what it holds: the notebook and the report show this same HTML."""
    out = []
    for p in vocabulary.protocols(df):
        sub = vocabulary.select(df, p)
        inner, count = [], 0
        for m in metrics:
            inner.append(f"<h4>{html.escape(vocabulary.METRICS.get(m, m))}</h4>")
            for s in render.sections(sub, m):
                count += 1
                unit = "labels" if s.index else ""  # the pivots' columns are fine-tune sizes
                shown = widgets.findings_frame(sub, m) if s.name == "claims" else s.display
                body = _table(shown, empty=s.note or "nothing to show", columns_unit=unit)
                inner.append(f"<h5>{html.escape(s.title)}</h5>{body}")
        note = render.machine_note(sub)
        summary = (
            f"<b>All tables, protocol {html.escape(str(p))}</b> ({len(sub)} runs, {count} tables): per metric, the "
            "paper-layout means, the pre-training gains, the intermediate-stage changes, this study against the "
            "paper, the findings and the same tests on the paper's own table"
        )
        out.append(
            f"<details><summary>{summary}</summary>{''.join(inner)}<p><small>{html.escape(note)}</small></p></details>"
        )
    return "\n".join(out)


def results_section(df: pd.DataFrame) -> list[str]:
    if df.empty:
        return ["<h2>Results</h2><p><i>no finished segmentation runs yet</i></p>"]
    sub = vocabulary.select(df)
    parts = ["<h2>Results</h2>"]
    for m in METRIC_ORDER:
        label = html.escape(vocabulary.METRICS[m])
        parts += [
            f"<h3>{label}: mean +- std (runs) over seeds, by labelled fine-tune images</h3>",
            _table(tables.paper_table(sub, m, with_n=True), columns_unit="labels"),
        ]
    curves, heatmap, findings = widgets.result_views(sub)  # what the results notebook's explorer shows
    return [*parts, _fig(curves), _fig(heatmap), findings.to_html(), all_tables(df)]


def geometry_section(reports: list[dict], plan: list[Run] | None = None) -> list[str]:
    """Table 2, similarity against distance, CKA and the reference maps (beside their image, given the plan)."""
    if not reports:
        return ["<h2>Patch-token geometry</h2><p><i>no geometry yet: run <code>study geometry</code></i></p>"]
    mim = next((r for r in encoders.one_per_encoder(reports) if r["encoder"]["name"] == "mim"), reports[0])
    parts = [
        "<h2>Patch-token geometry</h2>",
        "<h3>The paper's Table 2 for this study's encoders (output layer; mean over seeds)</h3>",
        table2_view(reports).to_html(),
        f"<p><small>{html.escape(position_note(reports))}</small></p>",
        _fig(plots.cosine_curves(reports, paper=PAPER_COSINE)),
        _fig(plots.cka_heatmap(mim)),
    ]
    for r in encoders.one_per_encoder(reports):
        image = encoders.reference_image(plan, r) if plan else None
        parts.append(_fig(plots.reference_maps(r, image=image)))
    return parts


def position_chance(reports: list[dict]) -> tuple[int, float]:
    """The position probe's classes (patches per image) and its chance level in %, from the first report."""
    chance = float(reports[0]["per_layer"][-1]["position_probe"]["chance"])
    return round(1 / chance), 100 * chance


def position_note(reports: list[dict]) -> str:
    """What the position probe's column means (POSITION_PROBE with this model's patches and chance)."""
    patches, chance = position_chance(reports)
    found = encoders.frame(reports)["position_probe_pct"]
    return POSITION_PROBE.format(p=patches, chance=chance) + (POSITION_SATURATED if found.min() >= 99.95 else "")


def table2_view(reports: list[dict], layers: bool = False):
    """The paper's Table 2 for this study's encoders (encoders.table2; by_layer with layers=True), formatted
    for people: the notebook and the report show this same table."""
    found = encoders.by_layer(reports) if layers else encoders.table2(reports)
    return style.table(encoders.table2_display(found, position_chance(reports)[1]))


def gallery_section(runs: Path, plan: list[Run], n: int = 3) -> list[str]:
    df = collect(runs, plan)
    if df.empty:
        return []
    pre, size, seed = gallery.telling_cell(df)
    arms = gallery.encoder_choices(df)
    rows = gallery.selected(df, arms, size, seed, pre)
    n_test = min((gallery.n_test_images(d) for d in rows.dir), default=0)
    parts = [
        f"<h2>Gallery</h2><p>The first {n} of {n_test:,} test images with each arm's prediction ({size:,} labelled "
        f"images, pre-training {pre:,}, seed {seed}: the cell whose best arm segments best; the notebook "
        "gallery.ipynb pages through all of them). Each prediction's title gives that image's own mIoU and pixel "
        "accuracy; white in an error map = a wrong pixel.</p>"
    ]
    return parts + [_fig(gallery.figure(df, i, arms, size, seed, pre)) for i in range(n)]


def write(runs: str | Path, plan: list[Run], out: str | Path, title: str = "study") -> Path:
    runs = Path(runs).resolve()
    body = (
        results_section(tables.collect(runs, plan))
        + geometry_section(encoders.reports(runs, plan), plan)
        + gallery_section(runs, plan)
    )
    page = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        STYLE,
        CATCH_ERRORS,
        f"<script>{get_plotlyjs()}</script></head><body>",
        f"<h1>{html.escape(title)}</h1><pre id='js-errors'></pre>",
        *body,
        "</body></html>",
    ]
    return atomic_write_text(out, "\n".join(page))
