"""Browse segmentation maps: the test images of a study with each arm's prediction and its errors."""

from __future__ import annotations

import html
import json
from functools import lru_cache

import pandas as pd
import torch

from studylib.analysis.vocabulary import encoder_name
from studylib.core.augment import normalize, to_float
from studylib.core.metrics import PET_CLASS_NAMES, confusion_matrix, paper_miou, pixel_accuracy
from studylib.data.sources import resolve_data
from studylib.data.splits import segmentation_split
from studylib.study.config import SegmentConfig, build
from studylib.study.stages import predict_classes
from studylib.study.store import RunFolder
from studylib.views.style import encoder_rank

CHUNK = 16  # test images predicted at a time: paging through 1000 test images costs one chunk per page
PANEL = 180  # px per (square) image panel: room for a title line like "this image: mIoU 71.2%"
_loaded: set = set()  # (run dir, start) of the chunks predicted so far: a redraw without them is cheap


def encoder_choices(df: pd.DataFrame) -> list[str]:
    """The encoders of the runs (vocabulary.encoder_name), in encoder_rank order."""
    return sorted({encoder_name(p, i) for p, i in zip(df.pretrain_size, df.intermediate)}, key=encoder_rank)


@lru_cache(maxsize=8)
def _model(run_dir: str):
    return RunFolder(run_dir).load_segmenter()


def _key(value) -> str:
    return json.dumps(value, sort_keys=True)  # hashable, for the caches


@lru_cache(maxsize=4)
def _test_set(data: str, settings: str, size: int, seed: int, img_size: int):
    """A run's test split, cached by what decides it (so the arms of one picture load it once)."""
    s = build(SegmentConfig, json.loads(settings), "segment")
    return segmentation_split(resolve_data(json.loads(data)), s, size, seed, img_size)[1]


@lru_cache(maxsize=128)
def predictions(run_dir: str, start: int = 0, n: int = CHUNK) -> dict:
    """Test images start .. start + n - 1 of a finished run: the images, their trimaps and names, and
    the run's predictions."""
    p = RunFolder(run_dir).parameters
    s = build(SegmentConfig, p["settings"], "segment")
    model = _model(run_dir)
    test = _test_set(_key(p["data"]), _key(p["settings"]), p["size"], p["seed"], model.encoder.cfg.img_size)
    images, masks = test.images[start : start + n], test.masks[start : start + n]
    x = to_float(images)
    with torch.no_grad():
        pred = predict_classes(model(normalize(x) if s.normalize else x).float(), s.eval_log_softmax)
    _loaded.add((run_dir, start))
    return {"images": images, "masks": masks, "pred": pred, "names": list(test.names[start : start + n])}


def _example(run_dir: str, index: int) -> dict:
    """Test image `index` of a run: image, trimap, prediction and name (from its chunk)."""
    ex = predictions(run_dir, index - index % CHUNK)
    i = index % CHUNK
    return {k: ex[k][i] for k in ("images", "masks", "pred", "names")}


def n_test_images(run_dir: str) -> int:
    """How many test images a finished run was evaluated on (its metrics.json)."""
    m = RunFolder(run_dir).metrics
    return int(m.get("test_images", len(m.get("test_names", [])) or CHUNK))


def image_scores(pred: torch.Tensor, true: torch.Tensor) -> tuple[float, float]:
    """One image's mIoU by the paper's per-image rule (core.metrics.paper_miou: mean IoU over pet,
    background and boundary, a class absent from both counting 0) and its pixel accuracy, in %."""
    true, classes = true.long(), len(PET_CLASS_NAMES)
    return 100 * paper_miou(pred, true, classes), 100 * float(pixel_accuracy(confusion_matrix(pred, true, classes)))


def telling_cell(df: pd.DataFrame) -> tuple[int, int, int]:
    """The (pre-training size, fine-tune size, seed) the gallery opens on: the cell whose best arm has the
    highest mean mIoU over seeds (there the pets' outlines show, so the arms' differences can be seen;
    with the fewest labels every arm predicts coarse blocks), the largest spread of the arms' mIoU breaking
    ties, then the smaller sizes; the smallest seed that cell has."""
    named = df.assign(encoder=[encoder_name(p, i) for p, i in zip(df.pretrain_size, df.intermediate)])
    means = named.groupby(["encoder", "pretrain_size", "finetune_size"])["miou"].mean()
    pretrained = sorted(set(df.pretrain_size) - {0}) or [0]
    best = None
    for p in pretrained:
        for f in sorted(set(df.finetune_size)):
            found = [v for (e, q, g), v in means.items() if g == f and (q == p or e == "scratch")]
            score = (max(found), max(found) - min(found)) if found else (-1.0, 0.0)
            if best is None or score > best[0]:
                best = (score, p, f)
    _, p, f = best
    seeds = named[(named.finetune_size == f) & ((named.pretrain_size == p) | (named.encoder == "scratch"))].seed
    return int(p), int(f), int(seeds.min())


def selected(df: pd.DataFrame, arms: list[str], finetune_size: int, seed: int, pretrain_size: int) -> pd.DataFrame:
    """The run of each of `arms` (encoder names) at one fine-tune size, seed and pre-training size
    (scratch at any), one row per arm in encoder_rank order, with its name in column 'encoder'."""
    named = df.assign(encoder=[encoder_name(p, i) for p, i in zip(df.pretrain_size, df.intermediate)])
    rows = named[
        (named.finetune_size == finetune_size)
        & (named.seed == seed)
        & named.encoder.isin(arms)
        & ((named.pretrain_size == pretrain_size) | (named.encoder == "scratch"))
    ]
    rows = rows.sort_values(["encoder", "id" if "id" in rows else "dir"]).drop_duplicates("encoder")
    return rows.iloc[sorted(range(len(rows)), key=lambda k: encoder_rank(rows.encoder.iloc[k]))]


def figure(df: pd.DataFrame, index: int, arms: list[str], finetune_size: int, seed: int, pretrain_size: int):
    """One test image: the image above its true trimap, then a column per selected encoder (`arms`:
    vocabulary.encoder_name, shown in encoder_rank order) with its prediction above its errors, each
    titled with this image's mIoU and pixel accuracy; a legend names the colours."""
    from studylib.views.plots import TRIMAP_LEGEND, _grid, colour_trimap, error_map, wrap

    rows = selected(df, arms, finetune_size, seed, pretrain_size)
    if rows.empty:
        return _no_runs()
    index = max(0, min(index, min(n_test_images(d) for d in rows.dir) - 1))
    top, bottom, titles = [], [], [[], []]
    for _, row in rows.iterrows():
        ex = _example(row["dir"], index)
        if not top:
            top, bottom = [ex["images"].permute(1, 2, 0).numpy()], [colour_trimap(ex["masks"])]
            titles = [[f"test image {index}:<br>{wrap(ex['names'])}"], ["true trimap"]]
        miou, acc = image_scores(ex["pred"], ex["masks"])
        top.append(colour_trimap(ex["pred"]))
        bottom.append(error_map(ex["pred"], ex["masks"]))
        titles[0].append(f"<b>{row['encoder']}</b><br>this image: mIoU {miou:.1f}%<br>pixel accuracy {acc:.1f}%")
        titles[1].append(f"{row['encoder']}: errors")
    return _grid([top, bottom], panel=PANEL, titles=titles, legend=TRIMAP_LEGEND)


def _no_runs():
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_annotation(text="no runs match these settings", x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False)
    fig.update_layout(height=200, xaxis_visible=False, yaxis_visible=False)
    return fig


def caption(rows: pd.DataFrame, n_test: int) -> str:
    """HTML under the gallery's figure (whose legend names the colours): what the numbers mean, and each
    run's mIoU over the whole test set (not this image's)."""
    runs = ", ".join(f"{html.escape(e)} {m:.1f}%" for e, m in zip(rows.encoder, rows.miou))
    return (
        "<div style='font-size:0.9em; max-width:60em'>Error maps: white = wrong pixel, black = right. The titles "
        "score <i>this image</i>: its mIoU by the paper's per-image rule (mean IoU over pet, background and "
        "boundary; a class in neither map counts 0) and its pixel accuracy.<br>"
        f"Whole test set ({n_test} images), each run's mIoU: {runs}.</div>"
    )


def browse(df: pd.DataFrame):
    """ipywidgets: page through test images, pick encoders (vocabulary.encoder_name), pre-training size,
    fine-tune size and seed; it opens on `telling_cell`, and a label beside the slider says how many test
    images there are. The figure redraws when a control is released; a label says when the predictions
    of a run are being computed (the first look at a run or a page of 16 test images)."""
    import ipywidgets as W
    from IPython.display import HTML, display

    if df.empty:
        return W.HTML("no finished segmentation runs yet: run `make study`")
    arms = encoder_choices(df)
    pre, size, seed = telling_cell(df)  # not the fewest labels, where every arm predicts coarse blocks
    wide = {"description_width": "initial"}
    pick = {
        "arms": W.SelectMultiple(options=arms, value=tuple(arms), description="arms", rows=len(arms)),
        "pretrain_size": W.Dropdown(
            options=sorted(set(df.pretrain_size) - {0}) or [0], value=pre, description="pre-train", style=wide
        ),
        "finetune_size": W.Dropdown(
            options=sorted(set(df.finetune_size)), value=size, description="fine-tune", style=wide
        ),
        "seed": W.Dropdown(options=sorted(set(df.seed)), value=seed, description="seed", style=wide),
        "index": W.IntSlider(min=0, max=0, description="test image", continuous_update=False, style=wide),
    }
    status, count, out = W.Label(), W.Label(), W.Output()
    quiet = []  # set while the slider's range is adjusted, so that it does not redraw on its own

    def settings():
        return (list(pick["arms"].value), pick["finetune_size"].value, pick["seed"].value, pick["pretrain_size"].value)

    def fit_slider(rows) -> int:
        n = min((n_test_images(d) for d in rows.dir), default=1)
        quiet.append(1)
        try:
            pick["index"].max = max(n - 1, 0)  # ipywidgets clamps the value
        finally:
            quiet.pop()
        count.value = f"of {n:,} test images (0 to {max(n - 1, 0):,})"
        return n

    def draw(*_):
        if quiet:
            return
        arms_, size, seed, pre = settings()
        rows = selected(df, arms_, size, seed, pre)
        n = fit_slider(rows)
        index = pick["index"].value
        fresh = any((d, index - index % CHUNK) not in _loaded for d in rows.dir)
        status.value = "loading predictions..." if fresh else "drawing..."
        try:
            fig = figure(df, index, arms_, size, seed, pre)
            out.clear_output(wait=True)
            with out:
                display(fig)  # not fig.show(): outside a notebook that would open a web browser
                if len(rows):
                    display(HTML(caption(rows, n)))
        finally:
            status.value = ""

    for w in pick.values():
        w.observe(draw, names="value")
    draw()
    controls = list(pick.values())
    return W.VBox([W.HBox(controls[:2]), W.HBox([*controls[2:], count, status]), out])
