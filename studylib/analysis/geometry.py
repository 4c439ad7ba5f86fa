"""Geometry of patch tokens: the paper's v2 analysis (Table 2, Fig. 5) and a few measurements beyond it,
run at every layer of an encoder (`geometry_report`) and laid out one row per layer (`table`).

The paper's four measurements (on final-layer tokens after the last LayerNorm):
``within_image_variance`` / ``across_image_variance``, ``cosine_by_distance``, a linear probe on
``patch_labels`` (majority trimap class per patch, ``studylib.data.splits``), and reference-patch
heatmaps. The token measurements live in ``studylib.analysis.tokens``, the probes in
``studylib.analysis.probes``; the paper's own values (``PAPER_TABLE2``, ``PAPER_COSINE``) in
``studylib.analysis.reference``.

How they are taken is one `GeometrySettings`, built from the study's protocol: ``clean`` is this
project's analysis, ``paper`` follows the authors' diagnostics (their ``diagnostics.py``) like for like.

Beyond the paper: ``effective_rank`` (RankMe), ``linear_cka`` / ``minibatch_cka`` / ``cka_matrix``,
``position_probe``, and ``geometry_report`` which runs everything per layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from studylib.analysis.probes import ProbeRecipe, linear_probe, position_probe, probe_on_sets, split_images
from studylib.analysis.similarity import cka_matrix, token_effective_rank
from studylib.analysis.tokens import (
    DISTANCES,
    across_image_variance,
    cosine_by_distance,
    grid_of,
    max_distance,
    paper_reference_patches,
    patch_tokens,
    pick_reference_patches,
    reference_similarity,
    within_image_variance,
)
from studylib.data.splits import patch_labels

__all__ = ["GeometrySettings", "geometry_report", "table"]

PROTOCOLS = ("clean", "paper")
REFERENCE_NAMES = ("background", "pet", "boundary")


# ---------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class GeometrySettings:
    """How the geometry of an encoder's patch tokens is measured. `for_protocol('clean' | 'paper')` (or
    `for_study(cfg)`, which reads the study's protocol and segmentation settings) gives the two presets;
    every field is recorded in the report (`to_dict`).

    protocol: 'clean' or 'paper' (the preset the fields came from).
    images: which images the token statistics are measured on.
      clean 'test': the first `num_images` images of the study's segmentation test split, as stored (no
        transforms).
      paper 'trainval': the first `num_images` Pets trainval images (list order) with the segmentation
        transforms drawn once per image and kept (random flip and contrast jitter `contrast`, the
        dataset the authors materialise), as `diagnostics.py` reads them.
    num_images: how many (clean 256, the `study geometry` default; paper 2048, the authors'
      ceil(2000 / 64) batches of 64).
    augment: apply the segmentation transforms to the images (clean False; paper True; seeded with
      `seed`, the held-out probe images with seed + 1).
    contrast: the contrast jitter strength of those transforms (the study's segment.contrast, 0.3).
    normalize: ImageNet-normalise the encoder's inputs. clean True (as pre-training); paper: as the
      segmentation stage normalises its inputs, i.e. the study's segment.normalize (False under paper).
    layers: 'all' (every block and the final normed output; clean) or 'output' (the final tokens after
      the last LayerNorm only, what the authors measure; paper).
    ddof: the variances divide by count - ddof: clean 0 (population), paper 1 (the authors' unbiased
      torch.var).
    cosine_distance: the grid distance of the cosine-vs-distance curve, 'manhattan' in both presets:
      distances 1..2(grid-1) (1..14 on 8x8), all ordered pairs i != j of an image, averaged over pairs
      and images.
    probe: the patch probe's recipe (`ProbeRecipe`). clean: standardised tokens, zero init, full-batch
      AdamW lr 1e-2 wd 0.01, 100 epochs. paper: Linear(D -> 3) on the RAW frozen tokens, PyTorch's default
      init, Adam lr 1e-2, 5 epochs, minibatches of 64 images in order. Both report the last epoch's
      training accuracy (the paper's number) and the held-out accuracy beside it.
    probe_data: the probe's images. clean 'split': a seeded split of the measured images
      (`probe_train_frac` train). paper 'trainval': trained on every Pets trainval image (3,680, the
      authors) with the same transforms, held out: the official Pets test list with the same kind of
      transforms (the authors report no held-out number; this one is ours). Without such sets passed to
      `geometry_report` it falls back to the split, and the report says so.
    probe_train_frac: the training share of the 'split' (0.5); the position probe always uses it.
    reference_rule: the heatmap reference patches. clean 'labels' (`pick_reference_patches` on the
      patches' majority classes: a background corner, the innermost pet patch, the first boundary
      patch); paper 'fractions' (`paper_reference_patches` on the trimap: patch (0, 0); the largest
      boundary fraction; the largest pet fraction among patches with boundary fraction <=
      `reference_threshold`).
    reference_threshold: 0.2 (the 'fractions' rule only).
    reference_image: the image of the heatmaps (0: the first measured image; paper: trainval image 0).
    seed: seeds the transforms, the probe split and order, the probe init, the rank and CKA samples.
    max_rank_tokens, cka_tokens, cka_batch_size: effective rank and CKA (beyond the paper, the same in
      both presets), as is the position probe (the clean recipe on the 'split').
    """

    protocol: str = "clean"
    images: str = "test"
    num_images: int = 256
    augment: bool = False
    contrast: float = 0.3
    normalize: bool = True
    layers: str = "all"
    ddof: int = 0
    cosine_distance: str = "manhattan"
    probe: ProbeRecipe = field(default_factory=ProbeRecipe.clean)
    probe_data: str = "split"
    probe_train_frac: float = 0.5
    reference_rule: str = "labels"
    reference_threshold: float = 0.2
    reference_image: int = 0
    seed: int = 0
    max_rank_tokens: int | None = 65536
    cka_tokens: int = 8192
    cka_batch_size: int = 512

    def __post_init__(self):
        choices = {
            "protocol": PROTOCOLS,
            "images": ("test", "trainval"),
            "layers": ("all", "output"),
            "ddof": (0, 1),
            "cosine_distance": tuple(DISTANCES),
            "probe_data": ("split", "trainval"),
            "reference_rule": ("labels", "fractions"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"geometry {name}: {getattr(self, name)!r} is not one of {valid}")
        if self.num_images < 1 or not 0 < self.probe_train_frac < 1 or not 0 <= self.reference_threshold <= 1:
            raise ValueError(f"geometry settings out of range: {self}")
        if isinstance(self.probe, dict):  # read back from a report
            object.__setattr__(self, "probe", ProbeRecipe(**self.probe))

    @classmethod
    def for_protocol(cls, protocol: str, **changes) -> GeometrySettings:
        """The preset of a study protocol ('clean' or 'paper'), with `changes` on top."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        preset = {}
        if protocol == "paper":
            preset = {
                "images": "trainval",
                "num_images": 2048,
                "augment": True,
                "normalize": False,
                "layers": "output",
                "ddof": 1,
                "probe": ProbeRecipe.paper(),
                "probe_data": "trainval",
                "reference_rule": "fractions",
            }
        return cls(protocol=protocol, **{**preset, **changes})

    @classmethod
    def for_study(cls, cfg, **changes) -> GeometrySettings:
        """The preset of a study's protocol (`cfg`: a study.config.StudyConfig). Under paper the inputs are
        treated as the study's segmentation stage treats them (segment.normalize, segment.contrast)."""
        if cfg.protocol == "paper":
            changes = {"normalize": cfg.segment.normalize, "contrast": cfg.segment.contrast, **changes}
        return cls.for_protocol(cfg.protocol, **changes)

    def replace(self, **changes) -> GeometrySettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "probe": self.probe.to_dict()}

    def layer_ids(self, depth: int) -> list[int]:
        return list(range(depth)) + [-1] if self.layers == "all" else [-1]


# ------------------------------------------------------------------------------------------ report
def _same_prefix(images: torch.Tensor, masks: torch.Tensor, sets) -> bool:
    """Are `images`/`masks` the first images of the probe's training set (then their tokens are reused)?"""
    tr_images, tr_masks = sets["train"]
    n = len(images)
    return (
        n <= len(tr_images)
        and images.dtype == tr_images.dtype
        and images.shape[1:] == tr_images.shape[1:]
        and torch.equal(images, tr_images[:n])
        and torch.equal(masks.long(), tr_masks[:n].long())
    )


def geometry_report(
    encoder,
    images: torch.Tensor,
    masks: torch.Tensor,
    layers: Iterable[int] | None = None,
    settings: GeometrySettings | None = None,
    probe_sets: dict | None = None,
    batch_size: int = 256,
    device="cpu",
) -> dict:
    """Every measurement of this module at each layer of `encoder` (see `patch_tokens` for the layer
    numbering; -1 is the final normed output the paper measures) on `images` [N, 3, S, S] (uint8, or
    float in [0, 1] once transformed) with trimaps `masks` [N, S, S], taken as `settings` say (default:
    the clean preset) -> a JSON-ready dict of plain Python types.

    `layers` (default: `settings.layers`); `probe_sets` {'train': (images, masks), 'heldout': (images,
    masks)}: the patch probe's own image sets when `settings.probe_data` is 'trainval' (without them the
    probe falls back to a seeded split of `images`, and `probe_data.source` says so). When `images` are
    the first images of the probe's training set, their tokens are taken from it, not computed twice.

    Returns protocol, settings (`settings.to_dict()`), layers, grid, num_images, dim, distances
    (1..max distance), probe_data (source, train_images, heldout_images), and per_layer: one dict per
    layer with within_image_variance, across_image_variance (ddof `settings.ddof`), effective_rank
    (RankMe of all tokens, uncentred), effective_rank_centered, cosine_by_distance (list aligned with
    `distances`), patch_probe (majority trimap classes: train_accuracy, the last epoch's, and
    heldout_accuracy beside it, ...), position_probe, and reference (the reference patches of image
    `settings.reference_image` and their [grid][grid] cosine maps);
    cka: {names, matrix} minibatch (unbiased) linear CKA between the layers. Its examples are tokens (a
    seeded sample of at most `cka_tokens`, the same for every layer): the question is how patch-level
    structure changes through depth, which per-image mean tokens would average away.
    """
    s = GeometrySettings() if settings is None else settings
    if layers is None:
        layers = s.layer_ids(len(encoder.blocks))
    layers = [int(k) for k in layers]

    def tokens_of(x):
        return patch_tokens(encoder, x, layers, normalize=s.normalize, batch_size=batch_size, device=device)

    use_sets = s.probe_data == "trainval" and probe_sets is not None
    if use_sets:
        train_tokens = tokens_of(probe_sets["train"][0])
        heldout_tokens = tokens_of(probe_sets["heldout"][0])
        if _same_prefix(images, masks, probe_sets):
            tokens = {k: v[: len(images)] for k, v in train_tokens.items()}
        else:
            tokens = tokens_of(images)
    else:
        tokens = tokens_of(images)
    layer_ids = list(tokens)
    N, P, D = tokens[layer_ids[0]].shape
    g = grid_of(P, encoder.cfg.grid if hasattr(encoder, "cfg") else None)
    labels = patch_labels(masks, g)
    ref_img = s.reference_image
    if s.reference_rule == "fractions":
        refs = paper_reference_patches(masks[ref_img], g, s.reference_threshold)
    else:
        refs = pick_reference_patches(labels[ref_img], g)
    if use_sets:
        train_labels, heldout_labels = (patch_labels(probe_sets[k][1], g) for k in ("train", "heldout"))
        probe_data = {
            "source": "trainval: every given training image; held out: the given held-out images",
            "train_images": len(train_labels),
            "heldout_images": len(heldout_labels),
        }
    else:
        probe_data = {"source": "seeded split of the measured images", "train_frac": s.probe_train_frac}
        if s.probe_data == "trainval":
            probe_data["source"] += " (probe_data 'trainval' but no probe sets were given)"
    clean_probe = ProbeRecipe.clean()
    per_layer = []
    for k in layer_ids:
        T = tokens[k]
        cos = cosine_by_distance(T, g, s.cosine_distance)
        maps = {
            name: reference_similarity(T[ref_img], refs[name], g).tolist()
            for name in REFERENCE_NAMES
            if refs.get(name) is not None
        }
        if use_sets:
            probe = probe_on_sets(train_tokens[k], train_labels, heldout_tokens[k], heldout_labels, 3, s.probe, s.seed)
        elif s.probe == clean_probe:
            probe = linear_probe(T, labels, 3, s.probe_train_frac, s.probe.epochs, s.probe.lr, s.seed)
        else:
            tr, te = split_images(N, s.probe_train_frac, s.seed)
            probe = probe_on_sets(T[tr], labels[tr], T[te], labels[te], 3, s.probe, s.seed)
        per_layer.append(
            {
                "layer": k,
                "within_image_variance": within_image_variance(T, s.ddof),
                "across_image_variance": across_image_variance(T, s.ddof),
                "effective_rank": token_effective_rank(T, s.max_rank_tokens, s.seed),
                "effective_rank_centered": token_effective_rank(T, s.max_rank_tokens, s.seed, center=True),
                "cosine_by_distance": [cos[d] for d in sorted(cos)],
                "patch_probe": probe,
                "position_probe": position_probe(
                    T, g, s.probe_train_frac, clean_probe.epochs, clean_probe.lr, s.seed, clean_probe.weight_decay
                ),
                "reference": {"image": ref_img, "patches": refs, "maps": maps},
            }
        )
    # tokens as CKA examples: one seeded sample of token positions shared by every layer
    flat = {str(k): tokens[k].reshape(-1, D) for k in layer_ids}
    pick = torch.randperm(N * P, generator=torch.Generator().manual_seed(s.seed))[: s.cka_tokens]
    names, matrix = cka_matrix({k: v[pick] for k, v in flat.items()}, "minibatch", s.cka_batch_size, s.seed)
    return {
        "protocol": s.protocol,
        "layers": layer_ids,
        "grid": g,
        "num_images": N,
        "dim": D,
        "distances": list(range(1, max_distance(g, s.cosine_distance) + 1)),
        "per_layer": per_layer,
        "probe_data": probe_data,
        "cka": {
            "names": names,
            "matrix": matrix,
            "method": "minibatch unbiased linear CKA",
            "examples": "tokens",
            "tokens": min(s.cka_tokens, N * P),
        },
        "settings": s.to_dict(),
    }


def table(report: dict):
    """A pandas DataFrame with one row per layer of a `geometry_report`: the Table 2 columns (variances,
    patch probe last-epoch training accuracy in percent, as the paper) plus held-out and balanced probe
    accuracy (percent), effective ranks, position-probe accuracy (percent) and error, and the cosine at
    each distance (cos_d1, cos_d2, ...)."""
    import pandas as pd  # only here: the measurements themselves need torch alone

    rows = []
    for r in report["per_layer"]:
        pp, pos = r["patch_probe"], r["position_probe"]
        row = {
            "layer": r["layer"],
            "within_image_variance": r["within_image_variance"],
            "across_image_variance": r["across_image_variance"],
            "patch_probe_train_pct": 100 * pp["train_accuracy"],
            "patch_probe_heldout_pct": 100 * pp["heldout_accuracy"],
            "patch_probe_balanced_pct": 100 * pp["heldout_balanced_accuracy"],
            "effective_rank": r["effective_rank"],
            "effective_rank_centered": r["effective_rank_centered"],
            "position_probe_pct": 100 * pos["heldout_accuracy"],
            "position_error": pos["mean_manhattan_error"],
        }
        row.update({f"cos_d{d}": c for d, c in zip(report["distances"], r["cosine_by_distance"])})
        rows.append(row)
    return pd.DataFrame(rows).set_index("layer")
