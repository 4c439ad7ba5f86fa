"""The names of things: metrics, the key of a cell, the intermediate arms and how each is named in the
paper's tables and among the study's encoders, and the protocols a frame of runs holds.

- a *cell* is one configuration (pretrain_size, intermediate, finetune_size); its runs differ by seed;
- an *arm* is a row of the paper's tables: a pre-training size and an intermediate stage, named
  'none' (no intermediate stage), 'intel' (the paper's: scene classification on Intel through the CLS
  token), 'pets-breeds' or 'spatial' (v2's alternatives); older boolean labels mean True = 'intel',
  False = 'none'. Pre-training size 0 = no pre-training, which never has an intermediate stage;
- an *encoder* is what a pre-training size and an arm leave behind: 'scratch' (no pre-training),
  'mim' (pre-training only) or 'mim + <arm>' (`encoder_name`);
- all metrics are percentages; a *difference* is in percentage points.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

METRICS = {
    "miou": "mIoU % (per image, paper)",
    "pixel_acc": "pixel accuracy %",
    "miou_dataset": "mIoU % (dataset level)",
}
KEY = ["pretrain_size", "intermediate", "finetune_size"]  # intermediate: the arm's name
ARMS = ("none", "intel", "pets-breeds", "spatial")  # the order of rows and curves
PAPER_ARM = "intel"  # the paper's intermediate stage
UNKNOWN = "unknown"  # protocol of runs whose labels lack one


def intermediate_arm(value) -> str:
    """The intermediate arm a label names: the name itself ('none', 'intel', 'pets-breeds', 'spatial');
    the older boolean labels True = 'intel' (the paper's stage), False = 'none'; missing = 'none'."""
    if isinstance(value, (bool, np.bool_)):
        return PAPER_ARM if value else "none"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "none"
    return str(value)


def arm_label(pretrain_size: int, intermediate) -> str:
    """A row of the paper's tables in the study's one vocabulary (the encoder's name, `encoder_name`, with
    its pre-training size): 'scratch', 'mim 45000', 'mim 45000 + intel' (the paper's '45000 +
    intermediate'), 'mim 45000 + spatial'; an intermediate arm without pre-training: 'scratch + <arm>'."""
    arm = intermediate_arm(intermediate)
    if not pretrain_size:
        return "scratch" if arm == "none" else f"scratch + {arm}"
    return f"mim {pretrain_size}" + ("" if arm == "none" else f" + {arm}")


def encoder_name(pretrain_size: int, arm) -> str:
    """The encoder a pre-training size and an intermediate arm leave: 'scratch' (no pre-training),
    'mim' (pre-training only) or 'mim + <arm>' ('mim + intel', 'mim + spatial', ...). The geometry
    reports and the gallery name encoders so."""
    if not pretrain_size:
        return "scratch"
    arm = intermediate_arm(arm)
    return "mim" if arm == "none" else f"mim + {arm}"


def layer_name(layer: int) -> str:
    """A layer as the widgets and tables name it: 'output' (the final normed tokens) or 'block k'."""
    return "output" if int(layer) == -1 else f"block {int(layer)}"


def arm_rank(arm: str) -> tuple:
    """Sort key of intermediate arms: ARMS' order, unknown arms after them by name."""
    return (ARMS.index(arm), "") if arm in ARMS else (len(ARMS), arm)


def protocols(df: pd.DataFrame) -> list[str]:
    """The protocols present, sorted; runs without a protocol label count as 'unknown', and a frame
    without a protocol column (the paper's) as one protocol 'unknown'. Empty frame: []."""
    if df.empty:
        return []
    if "protocol" not in df.columns:
        return [UNKNOWN]
    return sorted(df["protocol"].fillna(UNKNOWN).astype(str).unique())


def select(df: pd.DataFrame, protocol: str | None = None) -> pd.DataFrame:
    """The runs of one protocol (default: the first of `protocols(df)`); a frame without a protocol
    column, or an empty one, is returned whole."""
    if df.empty or "protocol" not in df.columns:
        return df
    protocol = protocols(df)[0] if protocol is None else protocol
    return df[df["protocol"].fillna(UNKNOWN).astype(str) == str(protocol)]
