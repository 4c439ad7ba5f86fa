"""Geometry of patch tokens: the paper's v2 analysis (Table 2, Fig. 5) and a few measurements beyond it,
run at every layer of an encoder (`geometry_report`) and laid out one row per layer (`table`).

The paper's four measurements (on final-layer tokens after the last LayerNorm):
``within_image_variance`` / ``across_image_variance``, ``cosine_by_distance``, ``linear_probe`` on
``patch_labels`` (majority trimap class per patch, ``studylib.data.splits``), and reference-patch
heatmaps (``pick_reference_patches`` + ``reference_similarity``). The token measurements live in
``studylib.analysis.tokens``, the probes in ``studylib.analysis.probes``; the paper's own values
(``PAPER_TABLE2``, ``PAPER_COSINE``) in ``studylib.analysis.reference``.

Beyond the paper: ``effective_rank`` (RankMe), ``linear_cka`` / ``minibatch_cka`` / ``cka_matrix``,
``position_probe``, and ``geometry_report`` which runs everything per layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from studylib.analysis.probes import cka_matrix, linear_probe, position_probe, token_effective_rank
from studylib.analysis.tokens import (
    across_image_variance,
    cosine_by_distance,
    grid_of,
    patch_tokens,
    pick_reference_patches,
    reference_similarity,
    within_image_variance,
)
from studylib.data.splits import patch_labels

__all__ = ["geometry_report", "table"]


# ------------------------------------------------------------------------------------------ report
def geometry_report(
    encoder,
    images: torch.Tensor,
    masks: torch.Tensor,
    layers: Iterable[int] | None = None,
    normalize: bool = True,
    batch_size: int = 256,
    device="cpu",
    train_frac: float = 0.5,
    probe_epochs: int = 100,
    probe_lr: float = 1e-2,
    seed: int = 0,
    max_rank_tokens: int | None = 65536,
    cka_tokens: int = 8192,
    cka_batch_size: int = 512,
    reference_image: int = 0,
) -> dict:
    """Every measurement of this module at each layer of `encoder` (see `patch_tokens` for the layer
    numbering; -1 is the final normed output the paper measures) on `images` uint8 [N, 3, S, S] with
    trimaps `masks` [N, S, S] -> a JSON-ready dict of plain Python types:

    layers, grid, num_images, dim, distances (1..2(grid-1)), settings, and per_layer: one dict per layer
    with within_image_variance, across_image_variance, effective_rank (RankMe of all tokens, uncentred),
    effective_rank_centered, cosine_by_distance (list aligned with `distances`), patch_probe
    (`linear_probe` on majority trimap classes), position_probe, and reference (the reference patches of
    image `reference_image` and their [grid][grid] cosine maps);
    cka: {names, matrix} minibatch (unbiased) linear CKA between the layers. Its examples are tokens (a
    seeded sample of at most `cka_tokens`, the same for every layer): the question is how patch-level
    structure changes through depth, which per-image mean tokens would average away.
    """
    tokens = patch_tokens(encoder, images, layers, normalize=normalize, batch_size=batch_size, device=device)
    layer_ids = list(tokens)
    N, P, D = tokens[layer_ids[0]].shape
    g = grid_of(P, encoder.cfg.grid if hasattr(encoder, "cfg") else None)
    labels = patch_labels(masks, g)
    refs = pick_reference_patches(labels[reference_image], g)
    per_layer = []
    for k in layer_ids:
        T = tokens[k]
        cos = cosine_by_distance(T, g)
        maps = {
            name: reference_similarity(T[reference_image], i, g).tolist()
            for name, i in refs.items()
            if name != "rules" and i is not None
        }
        per_layer.append(
            {
                "layer": k,
                "within_image_variance": within_image_variance(T),
                "across_image_variance": across_image_variance(T),
                "effective_rank": token_effective_rank(T, max_rank_tokens, seed),
                "effective_rank_centered": token_effective_rank(T, max_rank_tokens, seed, center=True),
                "cosine_by_distance": [cos[d] for d in sorted(cos)],
                "patch_probe": linear_probe(T, labels, 3, train_frac, probe_epochs, probe_lr, seed),
                "position_probe": position_probe(T, g, train_frac, probe_epochs, probe_lr, seed),
                "reference": {"image": reference_image, "patches": refs, "maps": maps},
            }
        )
    # tokens as CKA examples: one seeded sample of token positions shared by every layer
    flat = {str(k): tokens[k].reshape(-1, D) for k in layer_ids}
    pick = torch.randperm(N * P, generator=torch.Generator().manual_seed(seed))[:cka_tokens]
    names, matrix = cka_matrix({k: v[pick] for k, v in flat.items()}, "minibatch", cka_batch_size, seed)
    return {
        "layers": layer_ids,
        "grid": g,
        "num_images": N,
        "dim": D,
        "distances": list(range(1, 2 * g - 1)),
        "per_layer": per_layer,
        "cka": {"names": names, "matrix": matrix, "method": "minibatch unbiased linear CKA", "examples": "tokens"},
        "settings": {
            "normalize": normalize,
            "train_frac": train_frac,
            "probe_epochs": probe_epochs,
            "probe_lr": probe_lr,
            "seed": seed,
            "max_rank_tokens": max_rank_tokens,
            "cka_tokens": min(cka_tokens, N * P),
            "cka_batch_size": cka_batch_size,
        },
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
