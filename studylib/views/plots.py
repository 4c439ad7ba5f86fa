"""Plotly figures for the notebooks: one function per picture a researcher wants to see."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from studylib.analysis.claims import POINTS
from studylib.analysis.reference import PAPER_NAMES
from studylib.analysis.vocabulary import METRICS, arm_label, arm_rank, encoder_name, layer_name
from studylib.core.augment import IMAGENET_MEAN, IMAGENET_STD
from studylib.core.model import patchify, unpatchify
from studylib.views.style import encoder_colour, encoder_rank, size_axis, size_text

# trimap classes: pet, background, boundary
CLASS_COLOURS = np.array([[230, 120, 40], [40, 60, 110], [250, 240, 180]], dtype=np.uint8)


def _to_uint8(x: torch.Tensor, normalized: bool) -> np.ndarray:
    """[3, H, W] float (normalised or in [0, 1]) or uint8 -> [H, W, 3] uint8 for display."""
    if x.dtype == torch.uint8:
        return x.permute(1, 2, 0).numpy()
    if normalized:
        x = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


TITLE_LINE = 16  # px per line of a 12 px panel title


def _lines(title: str) -> int:
    return title.count("<br>") + 1 if title else 0


def _grid(
    rows: list[list[np.ndarray]],
    col_titles: list[str] | None = None,
    panel: int = 150,
    titles: list[list[str]] | None = None,
    legend: dict | None = None,
    title: str | None = None,
) -> go.Figure:
    """Images in a grid of square panels `panel` px wide, placed in pixels so that every title fits and
    the panels keep their size however many there are. `col_titles`: one per column, above the first
    row; `titles`: one per panel ('<br>' breaks a line) above it; `legend`: {name: rgb} swatches under
    the grid. Built as one layout (not make_subplots) so that a redraw takes milliseconds."""
    n_cols = max(len(r) for r in rows)
    titles = titles or [list(col_titles or [])] + [[] for _ in rows[1:]]
    gap_x, gap_y = 12, 10 + TITLE_LINE * max([_lines(t) for row in titles[1:] for t in row] or [0])
    # the top margin keeps the first titles clear of plotly's mode bar
    top = 30 + TITLE_LINE * max([_lines(t) for t in titles[0]] or [0]) + (30 if title else 0)
    bottom = 10 + (30 if legend else 0)
    width = max(n_cols * panel + (n_cols - 1) * gap_x, 420 if legend else 0)
    height = len(rows) * panel + (len(rows) - 1) * gap_y
    layout, data, notes = {}, [], []
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            k = "" if r == c == 0 else str(r * n_cols + c + 1)  # plotly names the first axes x, y
            left, high = c * (panel + gap_x), height - r * (panel + gap_y)  # px: the domains come out exact
            x, y = [left / width, (left + panel) / width], [(high - panel) / height, high / height]
            layout[f"xaxis{k}"] = dict(domain=x, anchor=f"y{k}", visible=False)
            layout[f"yaxis{k}"] = dict(domain=y, anchor=f"x{k}", visible=False)
            data.append(go.Image(z=img, xaxis=f"x{k}", yaxis=f"y{k}", hoverinfo="skip"))
            if c < len(titles[r]) and titles[r][c]:
                notes.append(
                    dict(text=titles[r][c], x=sum(x) / 2, y=y[1], xanchor="center", yanchor="bottom", font_size=12)
                )
    for name, rgb in (legend or {}).items():  # markers that draw nothing: the legend's colour swatches
        colour = f"rgb{tuple(int(v) for v in rgb)}"
        swatch = dict(symbol="square", size=13, color=colour, line=dict(color="#888", width=1))
        data.append(go.Scatter(x=[None], y=[None], mode="markers", marker=swatch, name=name))
    return go.Figure(
        data,
        dict(
            layout,
            annotations=[dict(n, xref="paper", yref="paper", showarrow=False) for n in notes],
            title=dict(text=title, x=0, xanchor="left", font_size=14) if title else None,
            width=width + 20,
            height=height + top + bottom,
            margin=dict(l=10, r=10, t=top, b=bottom),
            showlegend=bool(legend),
            legend=dict(orientation="h", x=0, y=0, yanchor="top", itemclick=False, itemdoubleclick=False),
            plot_bgcolor="white",
        ),
    )


def reconstructions(examples: dict, n: int = 4) -> go.Figure:
    """Original, masked input and reconstruction (visible patches pasted back) for n images."""
    x, mask, pred, p = examples["images"][:n], examples["mask"][:n], examples["pred"][:n], examples["patch"]
    patches = patchify(x, p)
    m = mask.unsqueeze(-1).float()
    masked = unpatchify(patches * (1 - m) + m * patches.min(), p, 3)
    recon = unpatchify(patches * (1 - m) + pred * m, p, 3)
    rows = [[_to_uint8(t[i], True) for t in (x, masked, recon)] for i in range(len(x))]
    return _grid(rows, ["image", "masked input", "reconstruction"])


def confusion(examples: dict) -> go.Figure:
    """Row-normalised confusion matrix of the scene classifier on the test split."""
    cm = np.array(examples["confusion"], dtype=float)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig = go.Figure(
        go.Heatmap(
            z=rates,
            x=examples["classes"],
            y=examples["classes"],
            colorscale="Blues",
            text=cm.astype(int),
            texttemplate="%{text}",
            zmin=0,
            zmax=1,
        )
    )
    fig.update_layout(
        xaxis_title="predicted",
        yaxis_title="true",
        yaxis_autorange="reversed",
        height=420,
        width=480,
        margin=dict(t=30),
    )
    return fig


def colour_trimap(m: torch.Tensor) -> np.ndarray:
    """[H, W] trimap classes -> [H, W, 3] uint8 in CLASS_COLOURS."""
    return CLASS_COLOURS[m.long().numpy()]


def error_map(pred: torch.Tensor, true: torch.Tensor) -> np.ndarray:
    """[H, W, 3] uint8: white where the prediction is wrong, black where it is right."""
    return np.repeat(((pred != true.long()).numpy()[..., None] * 255).astype(np.uint8), 3, axis=2)


# the trimap colours and the error maps' white, for the legend of every segmentation picture
TRIMAP_LEGEND = {**dict(zip(("pet", "background", "boundary"), CLASS_COLOURS)), "wrong pixel (error maps)": (255,) * 3}


def wrap(name: str, width: int = 20) -> str:
    """A file name broken after a '_' into lines of at most about `width` characters ('<br>' between)."""
    parts = name.split("_")
    lines = [""]
    for piece in [p + "_" for p in parts[:-1]] + parts[-1:]:
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
    return "<br>".join(lines)


def segmentations(examples: dict, n: int = 6, title: str | None = None) -> go.Figure:
    """Per row one test image: the image, its true trimap, the prediction with this image's mIoU (the
    paper's per-image rule) and the prediction's errors (white = wrong pixel)."""
    from studylib.core.metrics import paper_miou

    rows, titles = [], []
    names = examples.get("names") or [f"test image {i}" for i in range(len(examples["images"]))]
    for img, true, pred, name in list(zip(examples["images"], examples["masks"], examples["pred"], names))[:n]:
        miou = 100 * paper_miou(pred, true.long(), len(CLASS_COLOURS))
        wrong = 100 * float((pred != true.long()).double().mean())
        rows.append([_to_uint8(img, False), colour_trimap(true), colour_trimap(pred), error_map(pred, true)])
        titles.append(
            [wrap(name), "true trimap", f"prediction<br>this image: mIoU {miou:.1f}%", f"errors: {wrong:.1f}%"]
        )
    return _grid(rows, titles=titles, legend=TRIMAP_LEGEND, title=title)


def _epoch_step(n: int) -> int:
    """Tick spacing that puts at most about ten integer ticks on n epochs."""
    return next(s for s in (1, 2, 5, 10, 20, 25, 50, 100, 200, 500, 1000, n) if n / s <= 10)


def training_curve(history: list[dict], title: str = "training loss") -> go.Figure:
    """Loss per epoch: a marker per epoch on an integer epoch axis, so a short run reads as its epochs."""
    epochs = [h["epoch"] for h in history]
    fig = go.Figure(
        go.Scatter(
            x=epochs,
            y=[h["loss"] for h in history],
            mode="lines+markers",
            marker=dict(size=8),
            hovertemplate="epoch %{x}: loss %{y:.4g}<extra></extra>",
        )
    )
    fig.update_xaxes(title="epoch", tickmode="linear", tick0=0, dtick=_epoch_step(max(epochs, default=1)))
    if 0 < len(epochs) <= 3:  # pad the axis: plotly would stretch two points across the whole width
        fig.update_xaxes(range=[min(epochs) - 0.5, max(epochs) + 0.5])
    fig.update_layout(title=title, yaxis_title="loss", height=300, margin=dict(t=50, b=50))
    return fig


_SIZE_DASH = ("solid", "dash", "dot", "dashdot")  # largest pre-training size first
FINETUNE_AXIS = "labelled fine-tune images (log scale)"


def _curve_traces(s: pd.DataFrame, legend: str, group: str) -> list[go.Scatter]:
    """One line per arm of a summary frame (tables.summary or the paper's): colour = the encoder
    (vocabulary.encoder_name, style.encoder_colour), dash = the pre-training size's rank (solid = the
    largest); each trace's meta names its encoder."""
    sizes = sorted({p for p in s.pretrain_size if p}, reverse=True)
    keys = sorted({(p, i) for p, i in zip(s.pretrain_size, s.intermediate)}, key=lambda k: (arm_rank(k[1]), k[0]))
    traces = []
    for p, inter in keys:
        sub = s[(s.pretrain_size == p) & (s.intermediate == inter)].sort_values("finetune_size")
        dash = _SIZE_DASH[min(sizes.index(p), len(_SIZE_DASH) - 1)] if p else "solid"
        encoder = encoder_name(p, inter)
        traces.append(
            go.Scatter(
                x=sub.finetune_size,
                y=sub["mean"],
                error_y=dict(type="data", array=sub["std"], thickness=1),
                mode="lines+markers",
                name=arm_label(p, inter),
                legend=legend,
                legendgroup=group,
                line=dict(color=encoder_colour(encoder), dash=dash),
                meta=dict(encoder=encoder),
            )
        )
    return traces


def scaling_curves(
    df: pd.DataFrame, metric: str = "miou", paper: pd.DataFrame | None = None, label: str | None = None
) -> go.Figure:
    """The study's main picture: metric against labelled fine-tune images (log axis), one line per arm
    (colour = encoder: scratch, mim, mim + intel, ...; dash = pre-training size, solid the largest),
    error bars = std over seeds (ddof 1). With paper (paper_frame()) and a metric the paper reports, the
    paper's curves sit in a second panel on the same y axis: the demo's sizes (tens of images) and the
    paper's (thousands) never overlap on one x axis, so each panel spans its own sizes, ticked at them."""
    from studylib.analysis.tables import summary  # the stage notebooks import plots: keep scipy out

    s = summary(df, metric)
    theirs = pd.DataFrame() if paper is None else paper[paper["metric"] == metric]
    name = label or METRICS.get(metric, metric)
    panels = ["this study", "the paper (ViNy, Table 1)"] if len(theirs) else ["this study"]
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True, subplot_titles=panels, horizontal_spacing=0.05)
    for t in _curve_traces(s, "legend", "this study"):
        fig.add_trace(t, row=1, col=1)
    for t in _curve_traces(theirs, "legend2", "paper") if len(theirs) else []:
        fig.add_trace(t.update(name=f"paper: {t.name}"), row=1, col=2)
    if s.empty:
        fig.add_annotation(text="no finished runs yet", xref="x domain", yref="y domain", x=0.5, y=0.5, showarrow=False)
    size_axis(fig, s.finetune_size, FINETUNE_AXIS, row=1, col=1)
    if len(theirs):
        size_axis(fig, theirs.finetune_size, FINETUNE_AXIS, row=1, col=2)
    fig.update_yaxes(title_text=name, col=1)
    below = dict(orientation="h", yanchor="top", y=-0.22, xanchor="left")
    fig.update_layout(
        title=f"{name} against labelled fine-tune images, one line per arm (error bars: std over seeds)",
        height=520,
        margin=dict(b=150),
        legend=dict(**below, x=0.0, title_text="this study"),
        legend2=dict(**below, x=0.53, title_text="paper"),
    )
    return fig


def intermediate_heatmap(table: pd.DataFrame, metric: str = "miou") -> go.Figure:
    """The change an intermediate stage makes (tables.intermediate_table of `metric`) as a heatmap: arm
    (pre-training size + intermediate arm) down, fine-tune size across, colour = the arm minus `mim` of the
    same pre-training size (no intermediate stage), in points of the metric (red below 0, blue above, white
    at 0; the scale symmetric about 0), text = difference and its 95% interval. The title names the metric
    and the baseline."""
    name, points = METRICS.get(metric, metric), POINTS.get(metric, f"{metric} points")
    fig = go.Figure()
    if table.empty:
        fig.add_annotation(
            text="no pre-trained arms with and without the intermediate stage yet",
            xref="paper",
            yref="paper",
            x=0.5,
            y=0.5,
            showarrow=False,
        )
        fig.update_layout(height=250, xaxis_visible=False, yaxis_visible=False)
        return fig
    rows = [arm_label(p, a) for p, a in zip(table.pretrain_size, table.intermediate)]
    text = table.assign(
        row=rows,
        t=[
            f"{d:+.2f}" + ("" if pd.isna(lo) else f"<br>[{lo:+.2f}, {hi:+.2f}]")
            for d, lo, hi in zip(table["diff"], table.lo, table.hi)
        ],
    )
    z = text.pivot(index="row", columns="finetune_size", values="diff").reindex(list(dict.fromkeys(rows)))
    text = text.pivot(index="row", columns="finetune_size", values="t").reindex_like(z)
    limit = float(np.nanmax(np.abs(z.to_numpy()))) or 1.0
    fig.add_trace(
        go.Heatmap(
            z=z.to_numpy(),
            x=[size_text(c) for c in z.columns],
            y=[str(i) for i in z.index],
            text=text.fillna("").to_numpy(),
            texttemplate="%{text}",
            colorscale="RdBu",
            zmid=0,
            zmin=-limit,
            zmax=limit,
            colorbar=dict(title=f"{points}<br>(arm minus mim)"),
            hovertemplate="%{y}, %{x} labelled images: %{z:+.2f} " + points + "<extra></extra>",
        )
    )
    fig.update_layout(
        title=dict(
            text=f"Change in {name} with the intermediate stage<br><sup>each arm minus mim of the same "
            "pre-training size (no intermediate stage); [95% interval]</sup>",
        ),
        xaxis_title="labelled fine-tune images",
        yaxis_title="arm (pre-training images)",
        xaxis_type="category",
        yaxis_type="category",
        height=170 + 70 * len(z),
        margin=dict(t=90),
    )
    return fig


# ---------------------------------------------------------------- patch-token geometry


def _sizes_text(sizes) -> str:
    """'500 and 2,000' / '500, 1,000 and 2,000' / '2,000'."""
    texts = [size_text(p) for p in sorted(sizes)]
    return texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " and " + texts[-1]


def cosine_curves(reports: list[dict], layer: int = -1, paper: dict | None = None) -> go.Figure:
    """Mean token cosine against Manhattan distance on the patch grid, one line per encoder (mean over
    its seeds and pre-training sizes, which the title and legend name), at one layer; the paper's Fig. 5
    curves dotted in the colour of this study's counterpart (style.encoder_colour)."""
    curves: dict[str, list] = {}
    sizes: dict[str, set] = {}
    for rep in reports:
        row = next((r for r in rep["per_layer"] if r["layer"] == layer), None)
        if row is not None:
            name = rep["encoder"]["name"]
            curves.setdefault(name, []).append(row["cosine_by_distance"])
            sizes.setdefault(name, set()).add(rep["encoder"].get("pretrain_size") or 0)
    fig = go.Figure()
    for name in sorted(curves, key=encoder_rank):
        vals, pre = curves[name], sizes[name] - {0}
        count = f"{len(vals)} encoder" + ("s" if len(vals) > 1 else "")
        label = f"{name} (pre-training {_sizes_text(pre)}; {count})" if pre else f"{name} ({count})"
        fig.add_trace(
            go.Scatter(
                x=reports[0]["distances"],
                y=np.mean(vals, axis=0),
                mode="lines+markers",
                name=label,
                line=dict(color=encoder_colour(name)),
                meta=dict(encoder=name),
            )
        )
    for ours, theirs in PAPER_NAMES.items():
        if paper and theirs in paper:
            fig.add_trace(
                go.Scatter(
                    x=list(range(1, len(paper[theirs]) + 1)),
                    y=paper[theirs],
                    mode="lines",
                    name=f"paper: {theirs} (= {ours}, 200k)",
                    line=dict(dash="dot", color=encoder_colour(ours)),
                    meta=dict(encoder=ours),
                )
            )
    pre = set().union(*sizes.values()) - {0} if sizes else set()
    where = "the output (final normed tokens)" if layer == -1 else layer_name(layer)
    mean = f"; each line the mean over seeds and pre-training sizes {_sizes_text(pre)}" if len(pre) > 1 else ""
    fig.update_layout(
        xaxis_title="Manhattan distance on the patch grid (patches)",
        yaxis_title="mean cosine similarity of token pairs",
        height=420,
        title=dict(
            text=f"Token similarity against grid distance at {where}<br><sup>dotted: the paper's Fig. 5{mean}</sup>"
        ),
        margin=dict(t=80),
    )
    return fig


def _patch_box(grid: int, size: int, row: int, col: int) -> dict:
    step = size / grid
    return dict(x0=col * step - 0.5, x1=(col + 1) * step - 0.5, y0=row * step - 0.5, y1=(row + 1) * step - 0.5)


REFERENCE_ORDER = ("background", "pet", "boundary")  # the maps' (and the numbers') order
MAP_PANEL, MAP_GAP, MAP_BAR = 210, 24, 90  # px: a reference-map panel, the gap between, the colour bar's room


def reference_maps(report: dict, layer: int = -1, image: np.ndarray | None = None) -> go.Figure:
    """Cosine similarity of each reference patch (background corner, pet interior, boundary) to every
    patch of the same image, beside that image (uint8 [H, W, 3], when given) with the reference patches
    outlined and numbered as the maps' titles number them; square panels MAP_PANEL px wide placed in
    pixels, so the two-line titles fit whatever the number of maps; one shared colour bar."""
    row = next(r for r in report["per_layer"] if r["layer"] == layer)
    found, patches = row["reference"]["maps"], row["reference"].get("patches", {})
    order = [n for n in REFERENCE_ORDER if n in found] + [n for n in found if n not in REFERENCE_ORDER]
    maps = {n: found[n] for n in order}
    number = {name: k for k, name in enumerate(maps, 1)}
    titles = (["the image<br>(reference patches outlined)"] if image is not None else []) + [
        f"similarity to patch {number[n]}<br>({n})" for n in maps
    ]
    n = max(1, len(titles))
    plot_w = n * MAP_PANEL + (n - 1) * MAP_GAP
    fig = make_subplots(
        rows=1,
        cols=n,
        subplot_titles=titles or ["no reference patches"],
        horizontal_spacing=MAP_GAP / plot_w,
    )
    for a in fig.layout.annotations:
        a.font.size = 13
    first = 1
    if image is not None:
        fig.add_trace(go.Image(z=image, hoverinfo="skip"), row=1, col=1)
        for name, index in ((n, p) for n, p in patches.items() if n in maps and isinstance(p, int)):
            r, c = divmod(index, len(maps[name]))  # patches are flat indices on the grid, row-major
            box = _patch_box(len(maps[name]), image.shape[0], r, c)
            fig.add_shape(type="rect", **box, line=dict(color="red", width=2), row=1, col=1)
            fig.add_annotation(  # beside the box, on its row: clear of the panel's title above the image
                text=f"<b>{number[name]}</b>",
                x=box["x1"] + 1,
                y=(box["y0"] + box["y1"]) / 2,
                xanchor="left",
                yanchor="middle",
                showarrow=False,
                font=dict(color="red", size=13),
                bgcolor="rgba(255,255,255,0.8)",
                row=1,
                col=1,
            )
        first = 2
    for c, grid in enumerate(maps.values(), first):
        fig.add_trace(
            go.Heatmap(
                z=grid,
                zmin=-1,
                zmax=1,
                colorscale="RdBu",
                reversescale=True,
                showscale=c == first,
                colorbar=dict(title="cosine", len=0.9),
                hovertemplate="patch (%{y}, %{x}): %{z:.2f}<extra></extra>",
            ),
            row=1,
            col=c,
        )
        fig.update_yaxes(autorange="reversed", row=1, col=c)
    for c in range(1, len(titles) + 1):  # square cells: each panel's y scaled to its own x
        fig.update_yaxes(scaleanchor=f"x{'' if c == 1 else c}", showticklabels=False, row=1, col=c)
        fig.update_xaxes(showticklabels=False, constrain="domain", row=1, col=c)
    enc = report["encoder"]
    size = f", pre-training {size_text(enc['pretrain_size'])}" if enc.get("pretrain_size") else ""
    seed = f", seed {enc['seed']}" if "seed" in enc else ""
    fig.update_layout(
        height=MAP_PANEL + 150,
        width=plot_w + 20 + MAP_BAR,
        margin=dict(l=10, r=MAP_BAR, t=110, b=20),
        plot_bgcolor="white",
        title=dict(
            text=f"{enc['name']}{size}{seed}: similarity of a reference patch to every patch "
            f"<br><sup>{layer_name(layer)}; cosine of the token pair, -1 to 1</sup>",
            x=0,
            xanchor="left",
        ),
    )
    return fig


def cka_heatmap(report: dict) -> go.Figure:
    """Linear CKA (minibatch, unbiased) between the layers of one encoder, which the title names, the
    colours spanning the values found (they often lie close together near 1), each printed in its cell."""
    names = [layer_name(n) for n in report["cka"]["names"]]
    z = np.asarray(report["cka"]["matrix"], dtype=float)
    lo, hi = float(np.nanmin(z)), float(np.nanmax(z))
    lo = min(lo, hi - 0.01)  # a flat matrix still gets a scale
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=names,
            y=names,
            zmin=lo,
            zmax=hi,
            colorscale="Viridis",
            texttemplate="%{z:.2f}",
            colorbar=dict(title="linear CKA"),
            hovertemplate="%{y} and %{x}: CKA %{z:.3f}<extra></extra>",
        )
    )
    enc = report["encoder"]
    size = f", pre-training {size_text(enc['pretrain_size'])}" if enc.get("pretrain_size") else ""
    seed = f", seed {enc['seed']}" if "seed" in enc else ""
    fig.update_layout(
        height=440,
        width=540,
        yaxis_autorange="reversed",
        title=dict(
            text=f"{enc['name']}{size}{seed}: CKA between layers<br><sup>colours span the values found, "
            f"{lo:.2f} to {hi:.2f}</sup>",
        ),
        margin=dict(t=80),
    )
    return fig


TOKEN_COLOURINGS = {  # colouring -> its colour bar / legend title
    "class": "trimap class of the patch",
    "row": "grid row (0 = top)",
    "col": "grid column (0 = left)",
    "image": "test image (index)",
}


CLASS_MARKERS = {"pet": "#e6782a", "background": "#283c6e", "boundary": "#b8a000"}  # trimap class -> colour


def token_marker(points: pd.DataFrame, colour: str = "class") -> dict:
    """The marker of a patch-token embedding's points coloured one way: a colour per trimap class, or a
    value on a labelled colour bar (grid row, column or image). A colouring is only a new marker: the
    token explorer restyles its figure with it, the points stay."""
    if colour not in TOKEN_COLOURINGS:
        raise ValueError(f"unknown colouring {colour!r}; valid: {', '.join(TOKEN_COLOURINGS)}")
    if colour == "class":
        return dict(size=4, color=[CLASS_MARKERS.get(str(k), "#888") for k in points["class"]], showscale=False)
    return dict(
        size=4,
        color=points[colour].to_numpy(),
        colorscale="Turbo" if colour == "image" else "Viridis",
        showscale=True,
        colorbar=dict(title=dict(text=TOKEN_COLOURINGS[colour])),
    )


def token_traces(points: pd.DataFrame, colour: str = "class") -> list[go.Scattergl]:
    """The points of a patch-token embedding (encoders.token_umap) as one trace (hover: image and patch),
    then one empty trace per trimap class that only draws the class legend (shown for the class colouring)."""
    text = [f"{n}, patch ({r}, {c}), {k}" for n, r, c, k in zip(points.name, points.row, points.col, points["class"])]
    main = go.Scattergl(
        x=points.x, y=points.y, mode="markers", text=text, hoverinfo="text", showlegend=False, name="tokens"
    )
    keys = [
        go.Scattergl(x=[None], y=[None], mode="markers", name=k, marker=dict(size=8, color=c), hoverinfo="skip")
        for k, c in CLASS_MARKERS.items()
    ]
    return [main.update(marker=token_marker(points, colour)), *keys]
