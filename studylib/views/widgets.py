"""JupyterLab widgets (ipywidgets): the results explorer, the patch-token explorer and the segmentation
gallery's browser. ipywidgets and IPython are imported inside each function, so importing this module
needs neither."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from studylib.analysis.claims import claims_all_arms, claims_display
from studylib.analysis.encoders import encoder_name_of, geometry_images, token_umap
from studylib.analysis.reference import paper_frame
from studylib.analysis.render import NO_RUNS
from studylib.analysis.tables import intermediate_table
from studylib.analysis.vocabulary import METRICS, protocols, select
from studylib.core.model import build_encoder, load_encoder
from studylib.study.grid import Run
from studylib.study.store import RunFolder
from studylib.views.gallery import encoder_choices, figure
from studylib.views.plots import intermediate_heatmap, scaling_curves, token_scatter


def explore(df: pd.DataFrame, interactive: bool = True):
    """JupyterLab explorer of the results: dropdowns for metric and protocol redraw the scaling curves
    (with the paper's overlaid), the intermediate-stage heatmap and the claims (finding c per intermediate
    arm). Returns the widget box (an HTML note when there are no runs). With interactive=False (a batch
    run, where no frontend would show a widget) it returns a note instead and builds no widget."""
    if not interactive:
        from IPython.display import Markdown

        return Markdown(
            "*Batch run: the interactive explorer is built when this notebook is run in JupyterLab; "
            "the static figures follow.*"
        )
    import ipywidgets as widgets
    from IPython.display import display

    if df.empty:
        return widgets.HTML(f"<i>{NO_RUNS}</i>")
    metric = widgets.Dropdown(options=[(v, k) for k, v in METRICS.items()], value="miou", description="metric")
    protocol = widgets.Dropdown(options=protocols(df), description="protocol")
    out, paper = widgets.Output(), paper_frame()

    def draw(_=None):
        sub = select(df, protocol.value)
        with out:
            out.clear_output(wait=True)
            display(scaling_curves(sub, metric.value, paper=paper))
            display(intermediate_heatmap(intermediate_table(sub, metric.value)))
            display(claims_display(claims_all_arms(sub, metric.value)))

    metric.observe(draw, names="value")
    protocol.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([metric, protocol]), out])


def explore_tokens(runs: str | Path, plan: list[Run]):
    """ipywidgets: pick an encoder, a layer, how many test images and the colouring; shows the UMAP of
    their patch tokens (hover: image and patch)."""
    import ipywidgets as W
    from IPython.display import display

    runs = Path(runs).resolve()
    choices = [
        (f"{encoder_name_of(r)}, pre-training {r.labels['pretrain_size']}, seed {r.params['seed']}", r)
        for r in plan
        if r.stage in ("pretrain", "intermediate") and RunFolder.of(r, runs).is_done
    ]
    if not choices:
        return W.HTML("<i>no finished encoders yet: run `make study`</i>")
    depth = build_encoder(plan[0].params["model"]).cfg.depth
    pick = {
        "encoder": W.Dropdown(options=choices, description="encoder"),
        "layer": W.Dropdown(options=[("output", -1)] + [(f"block {i}", i) for i in range(depth)], description="layer"),
        "images": W.IntSlider(value=32, min=8, max=128, step=8, description="images"),
        "colour": W.Dropdown(options=["class", "row", "col", "image"], description="colour"),
    }
    out = W.Output()

    def draw(*_):
        images, masks = geometry_images(plan, pick["images"].value)
        enc = load_encoder(pick["encoder"].value.dir(runs) / "encoder.safetensors")
        points = token_umap(enc, images, masks, [f"test image {i}" for i in range(len(images))], pick["layer"].value)
        with out:
            out.clear_output(wait=True)
            display(token_scatter(points, pick["colour"].value))

    for w in pick.values():
        w.observe(draw, names="value")
    draw()
    return W.VBox([W.HBox([pick["encoder"], pick["layer"]]), W.HBox([pick["images"], pick["colour"]]), out])


def browse(df: pd.DataFrame):
    """ipywidgets: page through test images, pick encoders (vocabulary.encoder_name), pre-training size,
    fine-tune size and seed."""
    import ipywidgets as W

    if df.empty:
        return W.HTML("no finished segmentation runs yet: run `make study`")
    arms = encoder_choices(df)
    pick = {
        "arms": W.SelectMultiple(options=arms, value=tuple(arms), description="arms"),
        "pretrain_size": W.Dropdown(options=sorted(set(df.pretrain_size) - {0}) or [0], description="pre-train"),
        "finetune_size": W.Dropdown(options=sorted(set(df.finetune_size)), description="fine-tune"),
        "seed": W.Dropdown(options=sorted(set(df.seed)), description="seed"),
        "index": W.IntSlider(min=0, max=15, value=0, description="test image"),
    }
    out = W.Output()

    def draw(*_):
        out.clear_output(wait=True)
        with out:
            figure(
                df,
                pick["index"].value,
                list(pick["arms"].value),
                pick["finetune_size"].value,
                pick["seed"].value,
                pick["pretrain_size"].value,
            ).show()

    for w in pick.values():
        w.observe(draw, names="value")
    draw()
    return W.VBox([W.HBox(list(pick.values())[:2]), W.HBox(list(pick.values())[2:]), out])
