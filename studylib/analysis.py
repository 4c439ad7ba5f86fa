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

from .config import SegmentConfig, build
from .datasets import resolve_data
from .geometry import PAPER_TABLE2, geometry_report
from .grid import Run
from .model import build_encoder
from .runner import is_done
from .store import atomic_write_json, read_json
from .train import load_encoder

TABLE2_COLUMNS = {"within_image_variance": "within-image variance", "across_image_variance": "across-image variance",
                  "patch_probe_train_pct": "patch probe train %", "patch_probe_heldout_pct": "patch probe held-out %",
                  "patch_probe_balanced_pct": "patch probe balanced %", "effective_rank": "effective rank",
                  "position_probe_pct": "position probe %"}


def encoder_name(run: Run | None, pretrain_size: int = 0) -> str:
    """'scratch', 'mim' (pre-training only) or 'mim + <arm>'."""
    if run is None:
        return "scratch"
    return "mim" if run.stage == "pretrain" else f"mim + {run.params['arm']}"


def geometry_images(plan: list[Run], n: int):
    """The first n images (and trimaps) of the study's segmentation test split."""
    from .stages import segmentation_split
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
        if out.exists() or (run is not None and not is_done(run.dir(runs))):
            continue
        if images is None:
            images, masks = geometry_images(plan, n_images)
        if run is None:
            torch.manual_seed(int(out.stem.rsplit("-", 1)[1]))
            encoder = build_encoder(model)
        else:
            encoder = load_encoder(run.dir(runs) / "encoder.safetensors")
        report = _measure(encoder, images, masks, device)
        report["encoder"] = {"name": encoder_name(run), "run": run.id if run else None,
                             "pretrain_size": run.labels["pretrain_size"] if run else 0,
                             "seed": run.params["seed"] if run else int(out.stem.rsplit("-", 1)[1])}
        atomic_write_json(out, report)
        written.append(out)
        echo(f"geometry: {report['encoder']['name']} (pre-training {report['encoder']['pretrain_size']}, "
             f"seed {report['encoder']['seed']}) -> {out}")
    return written


def reports(runs: str | Path, plan: list[Run]) -> list[dict]:
    """Every geometry.json of the plan's encoders (and the scratch references)."""
    runs = Path(runs).resolve()
    files = [r.dir(runs) / "geometry.json" for r in plan if r.stage in ("pretrain", "intermediate")]
    files += sorted((runs / "geometry").glob(f"scratch-{plan[0].params['model']}-*.json"))
    return [read_json(f) for f in files if f.exists()]


def frame(reports_: list[dict], layer: int = -1) -> pd.DataFrame:
    """One row per encoder at one layer (-1: the final normed tokens, as the paper measures)."""
    from .geometry import table
    rows = []
    for rep in reports_:
        t = table(rep)
        if layer in t.index:
            rows.append({**rep["encoder"], **t.loc[layer].to_dict()})
    return pd.DataFrame(rows)


PAPER_NAMES = {"mim": "SimMIM", "mim + intel": "+CLS Intel", "mim + pets-breeds": "+CLS Pets",
               "mim + spatial": "+spatial Pets"}


def table2(reports_: list[dict], layer: int = -1) -> pd.DataFrame:
    """The paper's Table 2 for this study: mean over seeds per encoder and pre-training size, with the
    paper's values (its encoders all start from the 200k checkpoint) beside the matching rows."""
    df = frame(reports_, layer)
    if df.empty:
        return df
    agg = df.groupby(["name", "pretrain_size"])[list(TABLE2_COLUMNS)].mean().round(3)
    for ours, theirs in (("within_image_variance", "within_image_variance"),
                         ("across_image_variance", "across_image_variance"),
                         ("patch_probe_train_pct", "patch_probe_accuracy_pct")):
        agg[f"paper: {TABLE2_COLUMNS[ours]}"] = [PAPER_TABLE2.get(PAPER_NAMES.get(name), {}).get(theirs)
                                                 for name, _ in agg.index]
    return agg.rename(columns=TABLE2_COLUMNS)
