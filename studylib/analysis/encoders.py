"""`study geometry`: patch-token geometry of every encoder a study trained, stored in the run store.

Each encoder (a pre-training run: MIM only; an intermediate run: MIM + an arm) gets geometry.json in
its run folder, measured at every block and at the final normed output on the same Pets test images
(the study's fixed test split). A freshly initialised encoder per seed is measured too, as the
reference point that training moves away from (runs/geometry/scratch-<model>-<seed>.json).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from studylib.analysis.geometry import geometry_report
from studylib.analysis.reference import PAPER_NAMES, PAPER_TABLE2
from studylib.analysis.vocabulary import encoder_name
from studylib.core.files import atomic_write_json, read_json
from studylib.core.model import build_encoder, load_encoder
from studylib.data.sources import resolve_data
from studylib.data.splits import segmentation_split
from studylib.study.config import SegmentConfig, build
from studylib.study.grid import Run
from studylib.study.store import RunFolder

TABLE2_COLUMNS = {
    "within_image_variance": "within-image variance",
    "across_image_variance": "across-image variance",
    "patch_probe_train_pct": "patch probe train %",
    "patch_probe_heldout_pct": "patch probe held-out %",
    "patch_probe_balanced_pct": "patch probe balanced %",
    "effective_rank": "effective rank",
    "position_probe_pct": "position probe %",
}


def encoder_name_of(run: Run | None) -> str:
    """vocabulary.encoder_name of the encoder a pre-training or intermediate run trained: 'mim' or
    'mim + <arm>'; None (a freshly initialised encoder): 'scratch'."""
    if run is None:
        return encoder_name(0, "none")
    return encoder_name(run.labels["pretrain_size"], run.labels.get("arm", "none"))


def geometry_images(plan: list[Run], n: int):
    """The first n images (and trimaps) of the study's segmentation test split."""
    seg = next(r for r in plan if r.stage == "segment")
    s = build(SegmentConfig, seg.params["settings"], "segment")
    size = build_encoder(seg.params["model"]).cfg.img_size
    _, test = segmentation_split(resolve_data(seg.params["data"]), s, 0, 0, size)
    return test.images[:n], test.masks[:n]


def _measure(encoder, images, masks, device: str) -> dict:
    layers = list(range(encoder.cfg.depth)) + [-1]
    return geometry_report(encoder, images, masks, layers=layers, device=device)


def compute(runs: str | Path, plan: list[Run], n_images: int = 256, device: str = "cpu", echo=print) -> list[Path]:
    """Measure every finished encoder of the plan that has no geometry.json yet; returns the files."""
    runs = Path(runs).resolve()
    written, images = [], None
    targets = [(r, r.dir(runs) / "geometry.json") for r in plan if r.stage in ("pretrain", "intermediate")]
    seeds = sorted({r.params["seed"] for r in plan})
    model = plan[0].params["model"]
    targets += [(None, runs / "geometry" / f"scratch-{model}-{s}.json") for s in seeds]
    for run, out in targets:
        if out.exists() or (run is not None and not RunFolder.of(run, runs).is_done):
            continue
        if images is None:
            images, masks = geometry_images(plan, n_images)
        if run is None:
            torch.manual_seed(int(out.stem.rsplit("-", 1)[1]))
            encoder = build_encoder(model)
        else:
            encoder = load_encoder(run.dir(runs) / "encoder.safetensors")
        report = _measure(encoder, images, masks, device)
        report["encoder"] = {
            "name": encoder_name_of(run),
            "run": run.id if run else None,
            "pretrain_size": run.labels["pretrain_size"] if run else 0,
            "seed": run.params["seed"] if run else int(out.stem.rsplit("-", 1)[1]),
        }
        atomic_write_json(out, report)
        written.append(out)
        echo(
            f"geometry: {report['encoder']['name']} (pre-training {report['encoder']['pretrain_size']}, "
            f"seed {report['encoder']['seed']}) -> {out}"
        )
    return written


def reports(runs: str | Path, plan: list[Run]) -> list[dict]:
    """Every geometry.json of the plan's encoders (and the scratch references)."""
    runs = Path(runs).resolve()
    files = [r.dir(runs) / "geometry.json" for r in plan if r.stage in ("pretrain", "intermediate")]
    files += sorted((runs / "geometry").glob(f"scratch-{plan[0].params['model']}-*.json"))
    return [read_json(f) for f in files if f.exists()]


def frame(reports_: list[dict], layer: int = -1) -> pd.DataFrame:
    """One row per encoder at one layer (-1: the final normed tokens, as the paper measures)."""
    from studylib.analysis.geometry import table

    rows = []
    for rep in reports_:
        t = table(rep)
        if layer in t.index:
            rows.append({**rep["encoder"], **t.loc[layer].to_dict()})
    return pd.DataFrame(rows)


def one_per_encoder(reports_: list[dict]) -> list[dict]:
    """One report per encoder kind, the one with the most pre-training (for the pictures)."""
    seen, out = set(), []
    for r in sorted(reports_, key=lambda r: -r["encoder"]["pretrain_size"]):
        if r["encoder"]["name"] not in seen:
            seen.add(r["encoder"]["name"])
            out.append(r)
    return out


def by_layer(reports_: list[dict]) -> pd.DataFrame:
    """The Table 2 columns at every layer, mean over seeds and sizes per encoder kind: how the geometry
    develops through depth (the paper measures only the output)."""
    layers = sorted({r["layer"] for rep in reports_ for r in rep["per_layer"]}, key=lambda k: (k < 0, k))
    frames = [frame(reports_, k).assign(layer=k) for k in layers]
    df = pd.concat(frames) if frames else pd.DataFrame()
    if df.empty:
        return df
    return (
        df.groupby(["name", "layer"], sort=False)[list(TABLE2_COLUMNS)].mean().round(3).rename(columns=TABLE2_COLUMNS)
    )


def table2(reports_: list[dict], layer: int = -1) -> pd.DataFrame:
    """The paper's Table 2 for this study: mean over seeds per encoder and pre-training size, with the
    paper's values (its encoders all start from the 200k checkpoint) beside the matching rows."""
    df = frame(reports_, layer)
    if df.empty:
        return df
    agg = df.groupby(["name", "pretrain_size"])[list(TABLE2_COLUMNS)].mean().round(3)
    for ours, theirs in (
        ("within_image_variance", "within_image_variance"),
        ("across_image_variance", "across_image_variance"),
        ("patch_probe_train_pct", "patch_probe_accuracy_pct"),
    ):
        agg[f"paper: {TABLE2_COLUMNS[ours]}"] = [
            PAPER_TABLE2.get(PAPER_NAMES.get(name), {}).get(theirs) for name, _ in agg.index
        ]
    return agg.rename(columns=TABLE2_COLUMNS)


def token_umap(
    encoder, images, masks, names: list[str], layer: int = -1, n_neighbors: int = 15, seed: int = 0
) -> pd.DataFrame:
    """UMAP of the patch tokens of `images` at one layer -> one row per token: x, y, image name, grid
    row and column, majority trimap class."""
    import umap

    from studylib.analysis.tokens import patch_tokens
    from studylib.data.readers import PET_CLASSES
    from studylib.data.splits import patch_labels

    T = patch_tokens(encoder, images, [layer])[layer]  # [N, P, D]
    N, P, D = T.shape
    g = encoder.cfg.grid
    xy = umap.UMAP(n_neighbors=n_neighbors, random_state=seed).fit_transform(T.reshape(-1, D).numpy())
    cls = patch_labels(masks, g).reshape(-1)
    idx = torch.arange(N * P)
    return pd.DataFrame(
        {
            "x": xy[:, 0],
            "y": xy[:, 1],
            "image": (idx // P).numpy(),
            "name": [names[i] for i in (idx // P).tolist()],
            "row": ((idx % P) // g).numpy(),
            "col": (idx % g).numpy(),
            "class": [PET_CLASSES[c] for c in cls.tolist()],
        }
    )
