"""Browse segmentation maps: the test images of a study with each arm's prediction and its errors."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from studylib.core.augment import normalize, to_float
from studylib.study.config import SegmentConfig, build
from studylib.data.sources import resolve_data
from studylib.core.model import Segmenter
from studylib.core.files import read_json
from studylib.core.train import load_encoder


def segment_runs(runs: str | Path, plan=None) -> pd.DataFrame:
    """One row per finished segmentation run: its grid labels and folder."""
    wanted = None if plan is None else {r.id for r in plan if r.stage == "segment"}
    rows = []
    for m in sorted(Path(runs).glob("segment/*/metrics.json")):
        if wanted is not None and m.parent.name not in wanted:
            continue
        labels = read_json(m.parent / "params.json", {}).get("labels", {})
        rows.append({**labels, "dir": str(m.parent), "miou": 100 * read_json(m)["miou_per_image"]})
    return pd.DataFrame(rows)


def load_segmenter(run_dir: str | Path) -> Segmenter:
    run_dir = Path(run_dir)
    enc = load_encoder(run_dir / "encoder.safetensors")
    head = load_file(run_dir / "head.safetensors")
    model = Segmenter(enc, head["head.weight"].shape[0] // enc.cfg.patch_size ** 2)
    model.load_state_dict(head, strict=False)
    return model.eval()


@lru_cache(maxsize=64)
def predictions(run_dir: str, n: int = 16) -> dict:
    """The first n test images of a finished run, their trimaps and the run's predictions."""
    from studylib.study.stages import segmentation_split
    p = read_json(Path(run_dir) / "params.json")["parameters"]
    s = build(SegmentConfig, p["settings"], "segment")
    model = load_segmenter(run_dir)
    _, test = segmentation_split(resolve_data(p["data"]), s, p["size"], p["seed"], model.encoder.cfg.img_size)
    x = to_float(test.images[:n])
    with torch.no_grad():
        pred = model(normalize(x) if s.normalize else x).argmax(1)
    return {"images": test.images[:n], "masks": test.masks[:n], "pred": pred, "names": test.names[:n]}


def arm_of(pretrain_size: int, intermediate: str) -> str:
    """'scratch' (no pre-training), 'mim' (pre-training only) or the intermediate arm's name."""
    return "scratch" if not pretrain_size else ("mim" if intermediate == "none" else intermediate)


def figure(df: pd.DataFrame, index: int, arms: list[str], finetune_size: int, seed: int, pretrain_size: int):
    """Image, trimap, then each selected arm's prediction and its error map, for one test image."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from studylib.views.plots import colour_trimap
    arm = pd.Series([arm_of(p, i) for p, i in zip(df.pretrain_size, df.intermediate)], index=df.index)
    rows = df[(df.finetune_size == finetune_size) & (df.seed == seed) & arm.isin(arms) &
              ((df.pretrain_size == pretrain_size) | (arm == "scratch"))]
    panels, titles = [], []
    for _, row in rows.iterrows():
        ex = predictions(row["dir"])
        i = min(index, len(ex["names"]) - 1)
        if not panels:
            panels += [ex["images"][i].permute(1, 2, 0).numpy(), colour_trimap(ex["masks"][i])]
            titles += [ex["names"][i], "trimap"]
        name = arm_of(row["pretrain_size"], row["intermediate"])
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


def browse(df: pd.DataFrame):
    """ipywidgets: page through test images, pick arms, pre-training size, fine-tune size and seed."""
    import ipywidgets as W
    if df.empty:
        return W.HTML("no finished segmentation runs yet: run `make study`")
    arms = ["scratch", "mim"] + sorted(set(df.intermediate) - {"none"})
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
            figure(df, pick["index"].value, list(pick["arms"].value), pick["finetune_size"].value,
                   pick["seed"].value, pick["pretrain_size"].value).show()

    for w in pick.values():
        w.observe(draw, names="value")
    draw()
    return W.VBox([W.HBox(list(pick.values())[:2]), W.HBox(list(pick.values())[2:]), out])
