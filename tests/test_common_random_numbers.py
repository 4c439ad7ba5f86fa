"""Common random numbers: within one seed every arm starts its head from the same weights (whatever the
encoder's making drew), trains on the same images in the same order with the same augmentation draws, and
is tested on the same images, so the paired differences the findings test carry the arms' effect."""

from __future__ import annotations

import pytest
import torch

from studylib.study import stages
from studylib.study.groups import read_run_params


def _prepared(store, parent_dir: str, init: str, seed: int = 0, size: int = 8):
    """A smoke segmentation run prepared (not trained) from `parent_dir` ('' = a fresh encoder)."""
    (seg,) = [r for r in store.plan if r.stage == "segment" and r.labels["pretrain_size"] == 0]
    p = read_run_params(seg.dir(store.runs))
    settings = {**p["settings"], "init": init}
    return stages.prepare_segment("", p["model"], p["data"], settings, parent_dir, size, seed, "cpu")


@pytest.mark.parametrize("init", ["trunc_normal", "torch"])
def test_every_arm_of_a_seed_starts_from_the_same_head(smoke_store, init):
    (pre,) = [r for r in smoke_store.plan if r.stage == "pretrain"]
    scratch, pretrained = _prepared(smoke_store, "", init), _prepared(smoke_store, str(pre.dir(smoke_store.runs)), init)
    assert torch.equal(scratch.job.task.head.weight, pretrained.job.task.head.weight)
    assert torch.equal(scratch.job.task.head.bias, pretrained.job.task.head.bias)
    other_seed = _prepared(smoke_store, "", init, seed=1)
    assert not torch.equal(scratch.job.task.head.weight, other_seed.job.task.head.weight)


def test_every_arm_of_a_seed_draws_the_same_batches(smoke_store):
    (pre,) = [r for r in smoke_store.plan if r.stage == "pretrain"]
    a, b = _prepared(smoke_store, "", "trunc_normal"), _prepared(smoke_store, str(pre.dir(smoke_store.runs)), "torch")
    idx = torch.arange(4)
    xa, ya = a.job.batch(idx, torch.Generator().manual_seed(3))
    xb, yb = b.job.batch(idx, torch.Generator().manual_seed(3))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
