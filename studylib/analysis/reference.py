"""The paper's reference data: its segmentation tables (paper_results.json, `paper_frame`), the text of
its findings (`CLAIMS`), its Table 2 of patch-token geometry and its Fig. 5 curves, and the names its
encoders go by."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import pandas as pd

from studylib.analysis.vocabulary import KEY, intermediate_arm

PAPER_METRICS = ("miou", "pixel_acc")  # the metrics the paper reports

CLAIMS = {
    "a": "pre-training helps more with fewer labels",
    "b": "returns diminish, both with more labels and with more pre-training data",
    "c": "the intermediate stage hurts, most where pre-training helps most",
}

#: The paper's Table 2 (final-layer patch tokens of ~2,048 Pets images). Probe accuracy is the last
#: epoch's *training* accuracy, in percent. All four encoders start from the 200k pre-training checkpoint,
#: so these values compare with a study's largest-pre-training ("200k-equivalent") encoders only.
#: PAPER_GEOMETRY_PRETRAIN is that size; PAPER_GEOMETRY_LABEL labels the paper's columns beside them.
PAPER_GEOMETRY_PRETRAIN = 200_000
PAPER_GEOMETRY_LABEL = "paper (200k encoders)"
PAPER_TABLE2 = {
    "SimMIM": {"within_image_variance": 0.10, "across_image_variance": 0.02, "patch_probe_accuracy_pct": 79.5},
    "+CLS Intel": {"within_image_variance": 0.18, "across_image_variance": 0.11, "patch_probe_accuracy_pct": 76.1},
    "+CLS Pets": {"within_image_variance": 0.58, "across_image_variance": 0.29, "patch_probe_accuracy_pct": 78.6},
    "+spatial Pets": {"within_image_variance": 0.32, "across_image_variance": 0.06, "patch_probe_accuracy_pct": 93.3},
}

#: Fig. 5 of the paper, read off the figure: mean token cosine at Manhattan distances 1..9 on the 8x8 grid
#: (the figure stops at 9 although the grid reaches 14; "+CLS Pets" from the authors' figure data, shared/paper.md).
PAPER_COSINE = {
    "SimMIM": [0.58, 0.41, 0.33, 0.30, 0.29, 0.32, 0.33, 0.32, 0.35],
    "+CLS Intel": [0.68, 0.57, 0.51, 0.49, 0.47, 0.47, 0.46, 0.43, 0.43],
    "+CLS Pets": [0.57, 0.38, 0.30, 0.26, 0.24, 0.28, 0.29, 0.29, 0.32],
    "+spatial Pets": [0.54, 0.27, 0.13, 0.09, 0.13, 0.30, 0.44, 0.53, 0.63],
}

#: The paper's name of each of the study's encoders (vocabulary.encoder_name -> PAPER_TABLE2's keys).
PAPER_NAMES = {
    "mim": "SimMIM",
    "mim + intel": "+CLS Intel",
    "mim + pets-breeds": "+CLS Pets",
    "mim + spatial": "+spatial Pets",
}


@lru_cache(maxsize=1)
def paper_json() -> dict:
    """The paper's tables as shipped in paper_results.json."""
    return json.loads(resources.files("studylib.analysis").joinpath("paper_results.json").read_text())


def paper_frame() -> pd.DataFrame:
    """The paper's two tables (per-image mIoU and pixel accuracy, %), one row per (arm, fine-tune size,
    metric): columns pretrain_size, intermediate (the arm: 'none' or 'intel', the paper's stage; the
    json's booleans), finetune_size, metric ('miou' | 'pixel_acc'), mean, std (over the paper's runs),
    n (= 3)."""
    data = paper_json()
    rows = [
        (arm["pretrain_size"], intermediate_arm(arm["intermediate"]), f, metric, m, s, data["runs_per_cell"])
        for metric, table in data["tables"].items()
        for arm in table
        for f, m, s in zip(data["finetune_sizes"], arm["mean"], arm["std"])
    ]
    return pd.DataFrame(rows, columns=[*KEY, "metric", "mean", "std", "n"])
