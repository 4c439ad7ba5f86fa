"""Plotly figures for the notebooks: one function per picture a researcher wants to see."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from studylib.analysis.reference import PAPER_NAMES
from studylib.analysis.vocabulary import METRICS, arm_label, arm_rank
from studylib.core.augment import IMAGENET_MEAN, IMAGENET_STD
from studylib.core.model import patchify, unpatchify

# trimap classes: pet, background, boundary
CLASS_COLOURS = np.array([[230, 120, 40], [40, 60, 110], [250, 240, 180]], dtype=np.uint8)


def _to_uint8(x: torch.Tensor, normalized: bool) -> np.ndarray:
    """[3, H, W] float (normalised or in [0, 1]) or uint8 -> [H, W, 3] uint8 for display."""
    if x.dtype == torch.uint8:
        return x.permute(1, 2, 0).numpy()
    if normalized:
        x = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def _grid(rows: list[list[np.ndarray]], col_titles: list[str], height_per_row: int = 150) -> go.Figure:
    fig = make_subplots(
        rows=len(rows), cols=len(col_titles), column_titles=col_titles, horizontal_spacing=0.01, vertical_spacing=0.01
    )
    for r, row in enumerate(rows, 1):
        for c, img in enumerate(row, 1):
            fig.add_trace(go.Image(z=img), row=r, col=c)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(height=height_per_row * len(rows) + 60, margin=dict(l=5, r=5, t=40, b=5))
    return fig


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
    return CLASS_COLOURS[m.long().numpy()]


def segmentations(examples: dict, n: int = 6) -> go.Figure:
    """Test image, true trimap, prediction and its errors (white = wrong) for n images."""
    rows = []
    for img, true, pred in list(zip(examples["images"], examples["masks"], examples["pred"]))[:n]:
        err = np.repeat(((pred != true.long()).numpy()[..., None] * 255).astype(np.uint8), 3, axis=2)
        rows.append([_to_uint8(img, False), colour_trimap(true), colour_trimap(pred), err])
    return _grid(rows, ["image", "trimap", "prediction", "errors"])


def training_curve(history: list[dict], title: str = "training loss") -> go.Figure:
    fig = go.Figure(go.Scatter(x=[h["epoch"] for h in history], y=[h["loss"] for h in history], mode="lines+markers"))
    fig.update_layout(title=title, xaxis_title="epoch", yaxis_title="loss", height=300)
    return fig


def _arm_colours(sizes) -> dict:
    """A fixed colour per pre-training size (sorted), shared by the study's and the paper's curves."""
    from plotly.colors import qualitative

    return {p: qualitative.Plotly[k % len(qualitative.Plotly)] for k, p in enumerate(sorted(set(sizes)))}


_ARM_DASH = {"none": "solid", "intel": "dash", "pets-breeds": "longdash", "spatial": "dashdot"}


def scaling_curves(
    df: pd.DataFrame, metric: str = "miou", paper: pd.DataFrame | None = None, label: str | None = None
) -> go.Figure:
    """The study's main picture: metric against fine-tune size (log axis), one line per arm (dashed:
    the paper's intermediate stage, dash-dotted: spatial, long dashes: pets-breeds), error bars = std
    over seeds (ddof 1). With paper (paper_frame()) and a metric the paper reports, its curves are
    overlaid dotted in the arm's colour, error bars = the paper's std; paper arms the study lacks start
    hidden (click the legend to show them)."""
    from studylib.analysis.tables import summary  # the stage notebooks import plots: keep scipy out

    s = summary(df, metric)
    theirs = pd.DataFrame() if paper is None else paper[paper["metric"] == metric]
    colours = _arm_colours(list(s.pretrain_size) + list(theirs.get("pretrain_size", [])))
    fig = go.Figure()
    for (p, inter), sub in s.groupby(["pretrain_size", "intermediate"], sort=False):
        fig.add_trace(
            go.Scatter(
                x=sub.finetune_size,
                y=sub["mean"],
                error_y=dict(type="data", array=sub["std"]),
                mode="lines+markers",
                name=arm_label(p, inter),
                legendgroup=arm_label(p, inter),
                line=dict(color=colours[p], dash=_ARM_DASH.get(inter, "dashdot")),
            )
        )
    ours = set(zip(s.pretrain_size, s.intermediate))
    theirs = theirs.iloc[
        sorted(range(len(theirs)), key=lambda k: (arm_rank(theirs.intermediate.iloc[k]), theirs.pretrain_size.iloc[k]))
    ]
    for (p, inter), sub in theirs.groupby(["pretrain_size", "intermediate"], sort=False) if len(theirs) else []:
        sub = sub.sort_values("finetune_size")
        fig.add_trace(
            go.Scatter(
                x=sub.finetune_size,
                y=sub["mean"],
                mode="lines+markers",
                error_y=dict(type="data", array=sub["std"], thickness=1),
                name=f"paper: {arm_label(p, inter)}",
                legendgroup=arm_label(p, inter),
                marker=dict(size=4),
                opacity=0.7,
                line=dict(color=colours[p], dash="dot", width=1.5),
                visible=True if (p, inter) in ours or s.empty else "legendonly",
            )
        )
    if s.empty:
        fig.add_annotation(text="no finished runs yet", xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False)
    fig.update_layout(
        xaxis_type="log",
        xaxis_title="labelled fine-tune images",
        yaxis_title=label or METRICS.get(metric, metric),
        height=450,
    )
    return fig


def intermediate_heatmap(table: pd.DataFrame, label: str = "change with the intermediate stage") -> go.Figure:
    """A difference table (tables.intermediate_table, or gain_table) as a heatmap: arm (pre-training
    size + intermediate arm) down, fine-tune size across, colour = difference in metric points (red
    below 0, blue above, white at 0), text = difference and its 95% interval."""
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
            x=[str(c) for c in z.columns],
            y=[str(i) for i in z.index],
            text=text.fillna("").to_numpy(),
            texttemplate="%{text}",
            colorscale="RdBu",
            zmid=0,
            zmin=-limit,
            zmax=limit,
            colorbar=dict(title="points"),
        )
    )
    fig.update_layout(
        title=label,
        xaxis_title="labelled fine-tune images",
        yaxis_title="arm",
        xaxis_type="category",
        yaxis_type="category",
        height=120 + 70 * len(z),
    )
    return fig


# ---------------------------------------------------------------- patch-token geometry


def cosine_curves(reports: list[dict], layer: int = -1, paper: dict | None = None) -> go.Figure:
    """Mean token cosine against Manhattan distance on the patch grid, one line per encoder (mean
    over seeds and pre-training sizes), at one layer; the paper's Fig. 5 curves dotted."""
    curves: dict[str, list] = {}
    for rep in reports:
        row = next((r for r in rep["per_layer"] if r["layer"] == layer), None)
        if row is not None:
            curves.setdefault(rep["encoder"]["name"], []).append(row["cosine_by_distance"])
    fig = go.Figure()
    for name, vals in curves.items():
        d = reports[0]["distances"]
        fig.add_trace(go.Scatter(x=d, y=np.mean(vals, axis=0), mode="lines+markers", name=name))
    for theirs in PAPER_NAMES.values():
        if paper and theirs in paper:
            fig.add_trace(
                go.Scatter(
                    x=list(range(1, len(paper[theirs]) + 1)),
                    y=paper[theirs],
                    mode="lines",
                    name=f"paper: {theirs}",
                    line=dict(dash="dot"),
                    opacity=0.7,
                )
            )
    fig.update_layout(
        xaxis_title="Manhattan distance on the patch grid",
        yaxis_title="mean cosine similarity",
        height=380,
        title=f"token similarity against distance (layer {layer})",
    )
    return fig


def reference_maps(report: dict, layer: int = -1) -> go.Figure:
    """Cosine similarity of a reference patch (background corner, pet interior, boundary) to every
    patch of the same image."""
    row = next(r for r in report["per_layer"] if r["layer"] == layer)
    maps = row["reference"]["maps"]
    fig = make_subplots(rows=1, cols=max(1, len(maps)), subplot_titles=list(maps) or ["no reference patches"])
    for c, grid in enumerate(maps.values(), 1):
        fig.add_trace(
            go.Heatmap(z=grid, zmin=-1, zmax=1, colorscale="RdBu", reversescale=True, showscale=c == len(maps)),
            row=1,
            col=c,
        )
        fig.update_yaxes(autorange="reversed", row=1, col=c)
    fig.update_layout(height=300, title=f"{report['encoder']['name']}: similarity to a reference patch")
    return fig


def cka_heatmap(report: dict) -> go.Figure:
    """Linear CKA (minibatch, unbiased) between the layers of one encoder."""
    names = [("out" if n == "-1" else f"block {n}") for n in report["cka"]["names"]]
    fig = go.Figure(
        go.Heatmap(
            z=report["cka"]["matrix"], x=names, y=names, zmin=0, zmax=1, colorscale="Viridis", texttemplate="%{z:.2f}"
        )
    )
    fig.update_layout(
        height=380, width=460, yaxis_autorange="reversed", title=f"{report['encoder']['name']}: CKA between layers"
    )
    return fig


def token_scatter(points: pd.DataFrame, colour: str = "class") -> go.Figure:
    """A 2-D embedding of patch tokens (encoders.token_umap), coloured by trimap class, grid row or
    column, or image; hovering a point names its image and patch."""
    discrete = colour in ("class", "image")
    fig = go.Figure()
    groups = points.groupby(colour) if discrete else [(None, points)]
    for key, sub in groups:
        fig.add_trace(
            go.Scattergl(
                x=sub.x,
                y=sub.y,
                mode="markers",
                name=str(key) if discrete else colour,
                marker=dict(
                    size=4, color=None if discrete else sub[colour], colorscale="Viridis", showscale=not discrete
                ),
                text=[f"{n}, patch ({r}, {c}), {k}" for n, r, c, k in zip(sub.name, sub.row, sub.col, sub["class"])],
                hoverinfo="text",
            )
        )
    fig.update_layout(height=480, xaxis_visible=False, yaxis_visible=False, legend_title=colour)
    return fig
