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

from studylib.analysis import claims, encoders, tables, vocabulary
from studylib.analysis.reference import PAPER_COSINE, paper_frame
from studylib.core.files import atomic_write_text
from studylib.study.grid import Run
from studylib.study.store import collect
from studylib.views import gallery, plots

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
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
</style>"""


def _fig(fig) -> str:
    return f'<div class="figure">{pio.to_html(fig, full_html=False, include_plotlyjs=False)}</div>'


def _table(df: pd.DataFrame) -> str:
    return df.to_html(na_rep="", float_format=lambda v: f"{v:.3g}") if len(df) else "<p><i>nothing yet</i></p>"


def results_section(df: pd.DataFrame) -> list[str]:
    if df.empty:
        return ["<h2>Results</h2><p><i>no finished segmentation runs yet</i></p>"]
    sub = vocabulary.select(df)
    return [
        "<h2>Results</h2>",
        "<h3>mIoU % (per image, the paper's definition), mean +- std (n) over seeds</h3>",
        _table(tables.paper_table(sub, "miou", with_n=True)),
        "<h3>Pixel accuracy %</h3>",
        _table(tables.paper_table(sub, "pixel_acc", with_n=True)),
        "<h3>mIoU % (dataset level)</h3>",
        _table(tables.paper_table(sub, "miou_dataset", with_n=True)),
        _fig(plots.scaling_curves(sub, "miou", paper=paper_frame())),
        _fig(plots.intermediate_heatmap(tables.intermediate_table(sub, "miou"))),
        "<h3>The paper's findings, tested on these runs</h3>",
        _table(claims.claims_display(claims.claims_all_arms(sub, "miou"))),
    ]


def geometry_section(reports: list[dict]) -> list[str]:
    if not reports:
        return ["<h2>Patch-token geometry</h2><p><i>no geometry yet: run <code>study geometry</code></i></p>"]
    mim = next((r for r in reports if r["encoder"]["name"] == "mim"), reports[0])
    parts = [
        "<h2>Patch-token geometry</h2>",
        "<h3>The paper's Table 2 for this study's encoders (final layer)</h3>",
        _table(encoders.table2(reports)),
        _fig(plots.cosine_curves(reports, paper=PAPER_COSINE)),
        _fig(plots.cka_heatmap(mim)),
    ]
    parts += [_fig(plots.reference_maps(r)) for r in encoders.one_per_encoder(reports)]
    return parts


def gallery_section(runs: Path, plan: list[Run], n: int = 3) -> list[str]:
    df = collect(runs, plan)
    if df.empty:
        return []
    size, seed = int(df.finetune_size.min()), int(df.seed.min())
    pre = int(df.pretrain_size.max())
    arms = gallery.encoder_choices(df)
    parts = [
        f"<h2>Gallery</h2><p>Test images with each arm's prediction ({size} labelled images, "
        f"pre-training {pre}, seed {seed}; each prediction's title gives that image's own mIoU and pixel "
        "accuracy; white in an error map = a wrong pixel).</p>"
    ]
    return parts + [_fig(gallery.figure(df, i, arms, size, seed, pre)) for i in range(n)]


def write(runs: str | Path, plan: list[Run], out: str | Path, title: str = "study") -> Path:
    runs = Path(runs).resolve()
    body = (
        results_section(tables.collect(runs, plan))
        + geometry_section(encoders.reports(runs, plan))
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
