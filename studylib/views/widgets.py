"""JupyterLab widgets (ipywidgets): the results explorer, the patch-token explorer (the gallery's browser is
`views.gallery.browse`). ipywidgets and IPython are imported inside each function, so importing this module
needs neither."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from studylib.analysis.claims import claims_summary, parts_all_arms
from studylib.analysis.encoders import encoder_name_of, geometry_images, token_umap
from studylib.analysis.reference import paper_frame
from studylib.analysis.render import NO_RUNS
from studylib.analysis.tables import intermediate_table
from studylib.analysis.vocabulary import METRICS, layer_name, protocols, select
from studylib.core.model import build_encoder, load_encoder
from studylib.study.grid import Run
from studylib.study.store import RunFolder
from studylib.views import style
from studylib.views.plots import TOKEN_COLOURINGS, intermediate_heatmap, scaling_curves, token_marker, token_traces


def _explorer_class():
    import ipywidgets as W

    class Explorer(W.VBox):
        """A VBox whose plain-text form (what a notebook opened without a kernel shows in its place)
        says what it is instead of printing the widget tree."""

        def __repr__(self) -> str:
            return "[interactive explorer: run the notebook in JupyterLab to use it]"

    return Explorer


def _explorer(children):
    return _explorer_class()(children)


def full_text(table: pd.DataFrame):
    """A table shown whole: long cells wrap instead of being cut with '...' (pandas' 50-character
    limit), text left-aligned, numbers as they are."""
    return (
        table.style.set_properties(**{"white-space": "pre-wrap", "text-align": "left", "vertical-align": "top"})
        .set_table_styles([{"selector": "th", "props": [("text-align", "left")]}])
        .hide(axis="index")
    )


def findings_frame(df: pd.DataFrame, metric: str = "miou") -> pd.DataFrame:
    """claims.claims_summary (every part on its own row, effects with their units) with finding (c), tested
    once per intermediate arm, naming its arm: 'c (intel)', 'c (spatial)'."""
    table = claims_summary(df, metric)
    arms = parts_all_arms(df, metric).arm  # claims_summary has a row per part, in this order
    return table.assign(finding=[f"{f} ({a})" if f == "c" else f for f, a in zip(table.finding, arms)])


def findings(df: pd.DataFrame, metric: str = "miou"):
    """The paper's findings tested on one protocol's runs (findings_frame), formatted for people
    (style.table), titled with the metric."""
    table = findings_frame(df, metric)
    caption = f"The paper's findings tested on these runs, {METRICS.get(metric, metric)}: every part on its own row"
    return style.table(table, caption=caption)


def result_views(df: pd.DataFrame, metric: str = "miou", paper: pd.DataFrame | None = None) -> list:
    """What the explorer shows for one protocol's runs and a metric: the scaling curves (the paper's beside
    them), the intermediate-stage heatmap and the findings."""
    paper = paper_frame() if paper is None else paper
    return [
        scaling_curves(df, metric, paper=paper),
        intermediate_heatmap(intermediate_table(df, metric), metric),
        findings(df, metric),
    ]


BATCH_NOTE = (
    "*Batch run: no widget here. These are static copies of what the interactive explorer shows, for the "
    "first protocol and mIoU; run this notebook in JupyterLab to pick the metric and protocol.*"
)


def explore(df: pd.DataFrame, interactive: bool = True):
    """JupyterLab explorer of the results: dropdowns for metric and protocol redraw the scaling curves
    (the paper's in a second panel on the same y axis), the intermediate-stage heatmap and the findings
    (every part on its own row, finding c per intermediate arm); each (protocol, metric) is computed once.
    Returns the widget box (an HTML note when there are no runs). With interactive=False (a batch run or
    the report, where no frontend would show a widget) it displays the same views, static, for the first
    protocol and mIoU, under a note that says so, and builds no widget."""
    from IPython.display import Markdown, display

    if not interactive:
        if df.empty:
            return Markdown(f"*{NO_RUNS}*")
        display(Markdown(BATCH_NOTE))
        for view in result_views(select(df), "miou"):
            display(view)
        return None
    import ipywidgets as widgets

    if df.empty:
        return widgets.HTML(f"<i>{NO_RUNS}</i>")
    metric = widgets.Dropdown(options=[(v, k) for k, v in METRICS.items()], value="miou", description="metric")
    protocol = widgets.Dropdown(options=protocols(df), description="protocol")
    out, paper, shown = widgets.Output(), paper_frame(), {}

    def views(p: str, m: str) -> tuple:
        if (p, m) not in shown:
            shown[p, m] = result_views(select(df, p), m, paper)
        return shown[p, m]

    def draw(_=None):
        with out:
            out.clear_output(wait=True)
            for view in views(protocol.value, metric.value):
                display(view)

    metric.observe(draw, names="value")
    protocol.observe(draw, names="value")
    draw()
    return _explorer([widgets.HBox([metric, protocol]), out])


class TokenExplorer:
    """The patch-token UMAP explorer (ipywidgets): encoder, layer, number of test images and colouring.

    Why it answers fast: the UMAP of an (encoder, layer, images) choice is fitted once and kept, so going
    back to an earlier choice is instant; a colouring change only restyles the traces of the same
    FigureWidget; the images slider acts on release. A refit shows a busy line and disables the
    controls until it is done."""

    def __init__(self, runs: str | Path, plan: list[Run]):
        import ipywidgets as W
        import plotly.graph_objects as go

        self.runs, self.plan = Path(runs).resolve(), plan
        self.fits: dict[tuple, pd.DataFrame] = {}  # (run id, layer, images) -> token_umap points
        self.images, self.masks = geometry_images(plan, None)  # the whole test split, decoded once
        encoders = sorted(
            (r for r in plan if r.stage in ("pretrain", "intermediate") and RunFolder.of(r, self.runs).is_done),
            key=_encoder_order,
        )
        n = len(self.images)
        cfg = build_encoder(plan[0].params["model"]).cfg
        depth, self.tokens_per_image = cfg.depth, cfg.grid**2
        wide = dict(style={"description_width": "initial"})
        self.pick = {
            "encoder": W.Dropdown(options=[(_encoder_label(r), r) for r in encoders], description="encoder", **wide),
            "layer": W.Dropdown(options=[(layer_name(k), k) for k in [-1, *range(depth)]], description="layer", **wide),
            "images": W.IntSlider(
                value=min(32, n), min=min(4, n), max=n, step=1, description="images", continuous_update=False, **wide
            ),
            "colour": W.Dropdown(options=list(TOKEN_COLOURINGS), description="colour", **wide),
        }
        self.pick["encoder"].layout.width = "480px"
        self.status = W.HTML()
        self.figure = go.FigureWidget(layout=dict(width=FIGURE_WIDTH, height=FIGURE_HEIGHT))
        for key in ("encoder", "layer", "images"):
            self.pick[key].observe(self.refit, names="value")
        self.pick["colour"].observe(self.recolour, names="value")

    def choice(self) -> tuple:
        return (self.pick["encoder"].value, self.pick["layer"].value, self.pick["images"].value)

    def points(self) -> pd.DataFrame:
        """The UMAP of the current choice: from the cache, or fitted now (seconds) and cached."""
        run, layer, n = self.choice()
        key = (run.id, layer, n)
        if key not in self.fits:
            enc = load_encoder(run.dir(self.runs) / "encoder.safetensors")
            names = [f"test image {i}" for i in range(n)]
            self.fits[key] = token_umap(enc, self.images[:n], self.masks[:n], names, layer)
        return self.fits[key]

    def title(self) -> str:
        run, layer, n = self.choice()
        return f"{_encoder_label(run)}: {layer_name(layer)} patch tokens of {n} test images (UMAP)"

    def announce(self) -> bool:
        """Show the busy line (and disable the controls) when the current choice needs a fit; True then."""
        run, layer, n = self.choice()
        if (run.id, layer, n) in self.fits:
            return False
        tokens = style.size_text(n * self.tokens_per_image)
        self._busy(f"fitting a UMAP to {tokens} patch tokens of {_encoder_label(run)} ... (kept for later)")
        return True

    def refit(self, *_):
        """The slow path: new points (cached after the first time), shown with a busy state."""
        cached = not self.announce()
        t0 = time.perf_counter()
        try:
            points = self.points()
            with self.figure.batch_update():
                self.figure.data = []
                self.figure.add_traces(token_traces(points, self.pick["colour"].value))
                self._style()
        finally:
            self._busy(None)
        self.status.value = "" if cached else f"<small>UMAP fitted in {time.perf_counter() - t0:.1f} s</small>"

    def recolour(self, *_):
        """The fast path: the same points and traces, a new marker (no refit, no new traces)."""
        with self.figure.batch_update():
            self.figure.data[0].marker = token_marker(self.points(), self.pick["colour"].value)
            self._style()

    def _style(self):
        colour = self.pick["colour"].value
        for key in self.figure.data[1:]:  # the class legend, for the class colouring only
            key.visible = colour == "class"
        self.figure.update_layout(
            title=self.title(),
            legend_title=TOKEN_COLOURINGS[colour] if colour == "class" else None,
            width=FIGURE_WIDTH,
            height=FIGURE_HEIGHT,
            xaxis_visible=False,
            yaxis_visible=False,
            margin=dict(t=60),
        )

    def _busy(self, message: str | None):
        for w in self.pick.values():
            w.disabled = message is not None
        self.status.value = f"<b>{message}</b>" if message else ""

    def widget(self, fit: bool = True):
        """The controls, the status line and the figure in one box; fit=False leaves the first UMAP to the
        caller (explore_tokens shows the box, with its busy line, before it fits)."""
        import ipywidgets as W

        if fit:
            self.refit()
        p = self.pick
        return _explorer(
            [W.HBox([p["encoder"], p["layer"]]), W.HBox([p["images"], p["colour"]]), self.status, self.figure]
        )


FIGURE_WIDTH, FIGURE_HEIGHT = 1000, 600  # px: the token explorer's plot, most of JupyterLab's width at 1400 px


def _encoder_order(run: Run) -> tuple:
    """Sort key of encoder runs: encoder (style.encoder_rank: scratch, mim, mim + intel, ...), then
    pre-training size, then seed."""
    return (style.encoder_rank(encoder_name_of(run)), run.labels["pretrain_size"], run.params["seed"])


def _encoder_label(run: Run) -> str:
    """'mim + intel, pre-training 2,000, seed 1': the encoder a run trained, whole."""
    size = style.size_text(run.labels["pretrain_size"])
    return f"{encoder_name_of(run)}, pre-training {size}, seed {run.params['seed']}"


def explore_tokens(runs: str | Path, plan: list[Run]):
    """ipywidgets: pick an encoder, a layer, how many test images and the colouring; shows the UMAP of
    their patch tokens (hover: image and patch). See TokenExplorer. The box is displayed first, its busy
    line saying what is being fitted, and the first UMAP (seconds to tens of seconds) is fitted after, so
    the cell is never blank while it runs; returns None (the box is already shown)."""
    import ipywidgets as W
    from IPython.display import display

    if not any(r.stage in ("pretrain", "intermediate") and RunFolder.of(r, runs).is_done for r in plan):
        return W.HTML("<i>no finished encoders yet: run `make study`</i>")
    explorer = TokenExplorer(runs, plan)
    box = explorer.widget(fit=False)
    explorer.announce()
    display(box)
    explorer.refit()
    return None
