"""`study geometry`: patch-token geometry of every encoder a study trained, stored in the run store.

How the geometry is measured follows the study's protocol (`GeometrySettings.for_study`):

* clean: each encoder is measured at every block and at the final normed output on the same Pets test
  images (the first 256 of the study's fixed test split, untransformed), into geometry.json in its run
  folder.
* paper: as the authors' diagnostics: the final normed tokens of the first 2,048 Pets trainval images
  with the segmentation transforms drawn once (flip, contrast jitter, the study's segment.normalize),
  unbiased variances, the authors' probe (trained on every trainval image; held out: the Pets test
  list) and reference patches, into geometry-paper.json.

Every report records its protocol and settings, so the two kinds never mix. A freshly initialised
encoder per seed is measured too, as the reference point that training moves away from
(runs/geometry/scratch-<model>-<seed>.json; scratch-<model>-<seed>-paper.json under paper).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from studylib.analysis.geometry import GeometrySettings, geometry_report
from studylib.analysis.reference import PAPER_GEOMETRY_LABEL, PAPER_NAMES, PAPER_TABLE2
from studylib.analysis.vocabulary import encoder_name, layer_name
from studylib.core import augment as A
from studylib.core.files import atomic_write_json, read_json
from studylib.core.model import build_encoder, load_encoder
from studylib.data.readers import load_pets
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

#: The report file of each protocol, in an encoder's run folder.
GEOMETRY_FILES = {"clean": "geometry.json", "paper": "geometry-paper.json"}


def geometry_file(protocol: str) -> str:
    """The name of an encoder's geometry report under a protocol: geometry.json (clean), geometry-paper.json."""
    if protocol not in GEOMETRY_FILES:
        raise ValueError(f"protocol must be one of {', '.join(GEOMETRY_FILES)}, got {protocol!r}")
    return GEOMETRY_FILES[protocol]


def scratch_file(runs: str | Path, model: str, seed: int, protocol: str = "clean") -> Path:
    """The report of a freshly initialised encoder: runs/geometry/scratch-<model>-<seed>[-paper].json."""
    suffix = "" if geometry_file(protocol) == GEOMETRY_FILES["clean"] else f"-{protocol}"
    return Path(runs) / "geometry" / f"scratch-{model}-{seed}{suffix}.json"


def report_protocol(report: dict) -> str:
    """The protocol a report was measured under (reports written before protocols were recorded: clean)."""
    return report.get("protocol", "clean")


def encoder_name_of(run: Run | None) -> str:
    """vocabulary.encoder_name of the encoder a pre-training or intermediate run trained: 'mim' or
    'mim + <arm>'; None (a freshly initialised encoder): 'scratch'."""
    if run is None:
        return encoder_name(0, "none")
    return encoder_name(run.labels["pretrain_size"], run.labels.get("arm", "none"))


def _segment_settings(plan: list[Run]):
    seg = next(r for r in plan if r.stage == "segment")
    return seg, build(SegmentConfig, seg.params["settings"], "segment")


def geometry_images(plan: list[Run], n: int | None):
    """The first n images (and trimaps) of the study's segmentation test split (None: all of them)."""
    seg, s = _segment_settings(plan)
    size = build_encoder(seg.params["model"]).cfg.img_size
    _, test = segmentation_split(resolve_data(seg.params["data"]), s, 0, 0, size)
    return test.images[:n], test.masks[:n]


def segmentation_transform(images: torch.Tensor, masks: torch.Tensor, contrast: float, seed: int):
    """The segmentation stage's random transforms drawn once per image (as the authors materialise their
    Pets datasets): a horizontal flip of image and trimap with probability 1/2, then contrast jitter of
    strength `contrast` on the image; the draws in the stage's order (every flip, then every contrast
    factor) from a generator seeded with `seed`. uint8 images [N, 3, S, S] -> (float images in [0, 1],
    trimaps); not normalised (`patch_tokens` normalises when asked)."""
    g = torch.Generator().manual_seed(seed)
    flips = A.random_flips(len(images), g)
    factors = A.contrast_factors(len(images), contrast, g)
    x, y = A.to_float(images), masks.clone()
    x[flips], y[flips] = x[flips].flip(-1), y[flips].flip(-1)  # an exact mirror of the pixel columns
    return A.adjust_contrast(x, factors), y


def geometry_data(plan: list[Run], settings: GeometrySettings) -> dict:
    """The images a geometry report measures, as `settings` say -> {images, masks, probe_sets, description}.

    images 'test': the first settings.num_images of the study's segmentation test split.
    images 'trainval': the first settings.num_images of the Pets trainval list (in its order).
    With settings.augment the segmentation transforms are applied (`segmentation_transform`, seeded with
    settings.seed). probe_data 'trainval': probe_sets holds every trainval image (train; the same
    transformed images the statistics take their first ones from) and every image of the Pets test list
    (held out; transformed with seed + 1); else None (the probe splits the measured images)."""
    seg, s = _segment_settings(plan)
    size = build_encoder(seg.params["model"]).cfg.img_size
    paths = resolve_data(seg.params["data"])

    def official(split: str, seed: int):
        d = load_pets(paths.pets, split, size, s.interpolation, paths.cache, paths.skip_unreadable)
        if settings.augment:
            return segmentation_transform(d.images, d.masks, settings.contrast, seed)
        return d.images, d.masks

    n = settings.num_images
    trainval = official("trainval", settings.seed) if "trainval" in (settings.images, settings.probe_data) else None
    if settings.images == "trainval":
        images, masks = trainval[0][:n], trainval[1][:n]
        source = f"Pets trainval list, first {len(images)} images"
    else:
        images, masks = geometry_images(plan, n)
        if settings.augment:
            images, masks = segmentation_transform(images, masks, settings.contrast, settings.seed)
        source = f"the study's segmentation test split, first {len(images)} images"
    if settings.augment:
        source += f", segmentation transforms drawn once (flip, contrast {settings.contrast:g}, seed {settings.seed})"
    probe_sets, probe = None, "a seeded split of the measured images"
    if settings.probe_data == "trainval":
        probe_sets = {"train": trainval, "heldout": official("test", settings.seed + 1)}
        probe = (
            f"trained on every Pets trainval image ({len(trainval[0])}), held out: the Pets test list "
            f"({len(probe_sets['heldout'][0])})" + (", the same transforms" if settings.augment else "")
        )
    description = {
        "images": source,
        "normalized": settings.normalize,
        "interpolation": s.interpolation,
        "size": size,
        "probe": probe,
    }
    return {"images": images, "masks": masks, "probe_sets": probe_sets, "description": description}


def reference_image(plan: list[Run], report: dict):
    """The image a report's reference maps were measured on, as uint8 [H, W, 3] (numpy), drawn as the
    report's protocol drew it (clean: the test split; paper: trainval with its transforms)."""
    ref = report["per_layer"][-1]["reference"]["image"]
    settings = GeometrySettings.for_protocol(report_protocol(report), num_images=ref + 1, probe_data="split")
    x = geometry_data(plan, settings)["images"][ref]
    if x.dtype != torch.uint8:  # transformed images are floats in [0, 1]
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


def _measure(encoder, data: dict, settings: GeometrySettings, device: str) -> dict:
    return geometry_report(
        encoder, data["images"], data["masks"], settings=settings, probe_sets=data["probe_sets"], device=device
    )


def compute(
    runs: str | Path,
    plan: list[Run],
    n_images: int | None = None,
    device: str = "cpu",
    echo=print,
    settings: GeometrySettings | None = None,
) -> list[Path]:
    """Measure every finished encoder of the plan that has no report for `settings`' protocol yet
    (default: the clean preset; `study geometry` passes `GeometrySettings.for_study` of the study);
    `n_images` replaces settings.num_images. Returns the files written."""
    settings = GeometrySettings() if settings is None else settings
    if n_images is not None:
        settings = settings.replace(num_images=int(n_images))
    runs = Path(runs).resolve()
    name = geometry_file(settings.protocol)
    written, data = [], None
    targets = [(r, r.dir(runs) / name, r.params["seed"]) for r in plan if r.stage in ("pretrain", "intermediate")]
    seeds = sorted({r.params["seed"] for r in plan})
    model = plan[0].params["model"]
    init = _segment_settings(plan)[1].init  # the fresh encoder the study's no-pre-training runs start from
    targets += [(None, scratch_file(runs, model, s, settings.protocol), s) for s in seeds]
    for run, out, seed in targets:
        if out.exists() or (run is not None and not RunFolder.of(run, runs).is_done):
            continue
        if data is None:
            data = geometry_data(plan, settings)
        if run is None:
            torch.manual_seed(seed)
            encoder = build_encoder(model, init)
        else:
            encoder = load_encoder(run.dir(runs) / "encoder.safetensors")
        report = _measure(encoder, data, settings, device)
        report["encoder"] = {
            "name": encoder_name_of(run),
            "run": run.id if run else None,
            "pretrain_size": run.labels["pretrain_size"] if run else 0,
            "seed": seed,
        }
        report["data"] = data["description"]
        atomic_write_json(out, report)
        written.append(out)
        echo(
            f"geometry ({settings.protocol}): {report['encoder']['name']} (pre-training "
            f"{report['encoder']['pretrain_size']}, seed {seed}) -> {out}"
        )
    return written


def reports(runs: str | Path, plan: list[Run], protocol: str | None = None) -> list[dict]:
    """Every geometry report of the plan's encoders (and the scratch references of its seeds) measured
    under `protocol` ('clean' or 'paper'). None: under whichever protocols the plan's trained encoders
    were measured (each report says which, `report_protocol`); the scratch references, which studies
    of one model share, only under those (under every protocol when no trained encoder is measured)."""
    runs = Path(runs).resolve()
    seeds = sorted({r.params["seed"] for r in plan})
    model = plan[0].params["model"]

    def read(files, p):
        return [rep for rep in (read_json(f) for f in files if f.exists()) if report_protocol(rep) == p]

    trained = {
        p: read([r.dir(runs) / geometry_file(p) for r in plan if r.stage in ("pretrain", "intermediate")], p)
        for p in ([protocol] if protocol else GEOMETRY_FILES)
    }
    found = [p for p, reps in trained.items() if reps] or list(trained)
    return [rep for p in trained for rep in trained[p]] + [
        rep for p in found for rep in read([scratch_file(runs, model, s, p) for s in seeds], p)
    ]


def frame(reports_: list[dict], layer: int = -1) -> pd.DataFrame:
    """One row per encoder at one layer (-1: the final normed tokens, as the paper measures), with the
    protocol it was measured under."""
    from studylib.analysis.geometry import table

    rows = []
    for rep in reports_:
        t = table(rep)
        if layer in t.index:
            rows.append({**rep["encoder"], "protocol": report_protocol(rep), **t.loc[layer].to_dict()})
    return pd.DataFrame(rows)


def _keys(df: pd.DataFrame, *keys: str) -> list[str]:
    """Group keys, led by the protocol when the reports mix protocols."""
    return (["protocol"] if df["protocol"].nunique() > 1 else []) + list(keys)


def one_per_encoder(reports_: list[dict]) -> list[dict]:
    """One report per encoder kind (and protocol), the one with the most pre-training (for the pictures)."""
    seen, out = set(), []
    for r in sorted(reports_, key=lambda r: -r["encoder"]["pretrain_size"]):
        key = (report_protocol(r), r["encoder"]["name"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def by_layer(reports_: list[dict]) -> pd.DataFrame:
    """The Table 2 columns at every layer, mean over seeds and sizes per encoder kind: how the geometry
    develops through depth (the paper measures only the output)."""
    layers = sorted({r["layer"] for rep in reports_ for r in rep["per_layer"]}, key=lambda k: (k < 0, k))
    frames = [frame(reports_, k).assign(layer=layer_name(k)) for k in layers]
    df = pd.concat(frames) if frames else pd.DataFrame()
    if df.empty:
        return df
    return (
        df.groupby(_keys(df, "name", "layer"), sort=False)[list(TABLE2_COLUMNS)]
        .mean()
        .round(3)
        .rename(columns=TABLE2_COLUMNS)
    )


def table2(reports_: list[dict], layer: int = -1, largest: int | None = None) -> pd.DataFrame:
    """The paper's Table 2 for this study: mean over seeds per encoder and pre-training size. The paper's
    encoders all start from its 200k checkpoint, so its values sit only beside this study's
    200k-equivalent encoders, those of the largest pre-training size (`largest`; default the largest
    in the reports), in columns labelled PAPER_GEOMETRY_LABEL ('paper (200k encoders)'); the paper's probe
    number is its last-epoch training accuracy, so it sits beside 'patch probe train %'."""
    df = frame(reports_, layer)
    if df.empty:
        return df
    agg = df.groupby(_keys(df, "name", "pretrain_size"))[list(TABLE2_COLUMNS)].mean().round(3)
    largest = int(df["pretrain_size"].max()) if largest is None else int(largest)
    names = agg.index.get_level_values("name")
    sizes = agg.index.get_level_values("pretrain_size")
    for ours, theirs in (
        ("within_image_variance", "within_image_variance"),
        ("across_image_variance", "across_image_variance"),
        ("patch_probe_train_pct", "patch_probe_accuracy_pct"),
    ):
        agg[f"{PAPER_GEOMETRY_LABEL}: {TABLE2_COLUMNS[ours]}"] = [
            PAPER_TABLE2.get(PAPER_NAMES.get(name), {}).get(theirs) if size == largest and size > 0 else None
            for name, size in zip(names, sizes)
        ]
    return agg.rename(columns=TABLE2_COLUMNS)


#: how Table 2's display names its index levels
DISPLAY_KEYS = {"protocol": "protocol", "name": "encoder", "pretrain_size": "pre-training images", "layer": "layer"}


def table2_display(table: pd.DataFrame, position_chance_pct: float | None = None) -> pd.DataFrame:
    """table2 (or by_layer) for reading, its numbers unchanged: the index as plain columns named for people
    ('encoder', 'pre-training images'), rows in encoder order (scratch, mim, mim + <arm>) then size; the
    paper's columns dropped when none of its values applies (no encoder of the largest size); with
    `position_chance_pct`, the position probe's header gives its chance level."""
    from studylib.analysis.vocabulary import arm_rank

    if table.empty:
        return table
    out = table.reset_index().rename(columns=DISPLAY_KEYS)
    paper = [c for c in out.columns if str(c).startswith(PAPER_GEOMETRY_LABEL)]
    out = out.drop(columns=[c for c in paper if out[c].isna().all()])
    if position_chance_pct is not None:
        name = TABLE2_COLUMNS["position_probe_pct"]
        out = out.rename(columns={name: f"{name} (chance {position_chance_pct:.1f}%)"})

    def rank(name: str) -> tuple:
        return (0, ()) if name == "scratch" else (1, ()) if name == "mim" else (2, arm_rank(name[6:]))

    order = sorted(range(len(out)), key=lambda i: (rank(out["encoder"].iloc[i]), i))
    return out.iloc[order].reset_index(drop=True)


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
    # n_jobs=1: a seeded UMAP runs on one thread anyway, and saying so avoids umap's warning
    xy = umap.UMAP(n_neighbors=n_neighbors, random_state=seed, n_jobs=1).fit_transform(T.reshape(-1, D).numpy())
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
