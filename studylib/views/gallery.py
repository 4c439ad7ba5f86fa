"""Browse segmentation maps: the test images of a study with each arm's prediction and its errors."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd
import torch

from studylib.analysis.vocabulary import encoder_name
from studylib.core.augment import normalize, to_float
from studylib.data.sources import resolve_data
from studylib.data.splits import segmentation_split
from studylib.study.config import SegmentConfig, build
from studylib.study.stages import predict_classes
from studylib.study.store import RunFolder


@lru_cache(maxsize=64)
def predictions(run_dir: str, n: int = 16) -> dict:
    """The first n test images of a finished run, their trimaps and the run's predictions."""
    p = RunFolder(run_dir).parameters
    s = build(SegmentConfig, p["settings"], "segment")
    model = RunFolder(run_dir).load_segmenter()
    _, test = segmentation_split(resolve_data(p["data"]), s, p["size"], p["seed"], model.encoder.cfg.img_size)
    x = to_float(test.images[:n])
    with torch.no_grad():
        pred = predict_classes(model(normalize(x) if s.normalize else x).float(), s.eval_log_softmax)
    return {"images": test.images[:n], "masks": test.masks[:n], "pred": pred, "names": test.names[:n]}


def encoder_choices(df: pd.DataFrame) -> list[str]:
    """The encoders (vocabulary.encoder_name) to pick from: 'scratch', 'mim', then every 'mim + <arm>'
    of the runs, by name."""
    found = {encoder_name(p, i) for p, i in zip(df.pretrain_size, df.intermediate)}
    return ["scratch", "mim"] + sorted(found - {"scratch", "mim"})


def figure(df: pd.DataFrame, index: int, arms: list[str], finetune_size: int, seed: int, pretrain_size: int):
    """Image, trimap, then each selected encoder's (`arms`: vocabulary.encoder_name) prediction and its
    error map, for one test image."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from studylib.views.plots import colour_trimap

    arm = pd.Series([encoder_name(p, i) for p, i in zip(df.pretrain_size, df.intermediate)], index=df.index)
    rows = df[
        (df.finetune_size == finetune_size)
        & (df.seed == seed)
        & arm.isin(arms)
        & ((df.pretrain_size == pretrain_size) | (arm == "scratch"))
    ]
    panels, titles = [], []
    for _, row in rows.iterrows():
        ex = predictions(row["dir"])
        i = min(index, len(ex["names"]) - 1)
        if not panels:
            panels += [ex["images"][i].permute(1, 2, 0).numpy(), colour_trimap(ex["masks"][i])]
            titles += [ex["names"][i], "trimap"]
        name = encoder_name(row["pretrain_size"], row["intermediate"])
        err = (ex["pred"][i] != ex["masks"][i].long()).numpy()
        panels += [colour_trimap(ex["pred"][i]), np.repeat((err[..., None] * 255).astype(np.uint8), 3, 2)]
        titles += [f"{name} ({row['miou']:.1f})", f"{name} errors"]
    fig = make_subplots(rows=1, cols=max(1, len(panels)), subplot_titles=titles or ["no runs match"])
    for c, img in enumerate(panels, 1):
        fig.add_trace(go.Image(z=img), row=1, col=c)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(height=260, margin=dict(l=5, r=5, t=40, b=5))
    return fig
