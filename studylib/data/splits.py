"""Split logic: which Pets images train and which test, and the per-patch labels of a trimap."""

from __future__ import annotations

import numpy as np
import torch

from studylib.data.readers import SegData, load_pets, nested_subset


def segmentation_split(paths, s, n_train: int, seed: int, img_size: int, all_but_test: bool = False, device=None):
    """Train and test sets of the Pets data (trainval and test lists).
    'fixed' (clean): both lists pooled; the test set is one subset (seeded by s.split_seed) that is the
      same for every fine-tune size and seed; train sets are nested subsets of the rest, seeded by `seed`.
    'official': train = a nested seeded subset of trainval, test = a fixed subset of test.txt.
    'pooled' (the paper): the pooled data permuted once, as torch's random_split does, with a generator
      seeded by s.split_seed (the authors: 42) for every run; train = the first n, test = the next
      test_size. Two seeds of one size share train and test sets; the test set moves with the size.
    With `all_but_test`, the train set is every image outside that test set (intermediate arms).
    `paths`: data.sources.DataPaths; `s`: the segment settings (split, split_seed, test_size, interpolation);
    `device`: what the images are decoded for (readers.load_pets)."""
    trainval, test = (
        load_pets(paths.pets, split, img_size, s.interpolation, paths.cache, paths.skip_unreadable, device)
        for split in ("trainval", "test")
    )
    if s.split == "official":
        _check_sizes(n_train, len(trainval), s.test_size, len(test), "trainval", "test.txt")
        train_idx = np.arange(len(trainval)) if all_but_test else nested_subset(len(trainval), n_train, seed)
        return trainval.subset(train_idx), test.subset(nested_subset(len(test), s.test_size, s.split_seed))
    pool = _concat(trainval, test)
    _check_sizes(
        n_train, len(pool) - s.test_size, s.test_size, len(pool), "the pooled data less the test set", "the pooled data"
    )
    if s.split == "pooled":
        perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(s.split_seed)).numpy()
        test_idx = perm[n_train : n_train + s.test_size]
        train_idx = np.concatenate([perm[:n_train], perm[n_train + s.test_size :]]) if all_but_test else perm[:n_train]
        return pool.subset(train_idx), pool.subset(test_idx)
    fixed = nested_subset(len(pool), len(pool), s.split_seed)
    rest = fixed[s.test_size :]
    train_idx = rest if all_but_test else rest[nested_subset(len(rest), n_train, seed)]
    return pool.subset(train_idx), pool.subset(fixed[: s.test_size])


def _check_sizes(n_train: int, train_avail: int, n_test: int, test_avail: int, train_name: str, test_name: str):
    if n_test > test_avail:
        raise ValueError(f"segment.test_size {n_test} is larger than {test_name} ({test_avail} images); lower it")
    if n_train > train_avail:
        raise ValueError(
            f"segment: fine-tune size {n_train} is larger than {train_name} ({train_avail} images); "
            f"lower grid.finetune_sizes or segment.test_size"
        )


def _concat(a: SegData, b: SegData) -> SegData:
    return SegData(
        torch.cat([a.images, b.images]),
        torch.cat([a.masks, b.masks]),
        a.names + b.names,
        torch.cat([a.labels, b.labels]),
        a.skipped + b.skipped,
        _concat_origin(a.origin, b.origin),
        _concat_origin(a.mask_origin, b.mask_origin),
    )


def _concat_origin(a, b):
    """The origin of a set concatenated from two (None unless both have one: an empty split has none)."""
    return a.concat(b) if a is not None and b is not None else None


def patch_labels(masks: torch.Tensor, grid: int, num_classes: int = 3) -> torch.Tensor:
    """masks [N, H, W] (classes 0..num_classes-1) -> long [N, grid*grid]: the majority class of the
    pixels in each (H/grid x W/grid) patch, row-major. Ties go to the lowest class id. Pixels outside
    0..num_classes-1 (e.g. an ignore value) are not counted; a patch with none of them gets class 0."""
    if masks.dim() != 3:
        raise ValueError(f"masks must be [N, H, W], got {tuple(masks.shape)}")
    N, H, W = masks.shape
    if H % grid or W % grid:
        raise ValueError(f"mask size {H}x{W} is not divisible by the {grid}x{grid} grid")
    ph, pw = H // grid, W // grid
    m = masks.reshape(N, grid, ph, grid, pw).transpose(2, 3).reshape(N, grid * grid, ph * pw)
    # per-class counts one class at a time: a one-hot of 2,048 128x128 masks would need ~800 MB
    counts = torch.stack([(m == k).sum(-1) for k in range(num_classes)], dim=-1)  # [N, P, K]
    # score = count * K + (K-1-k): strictly ordered, so argmax is unique and ties go to the lowest k
    # (not relying on torch.argmax's first-index behaviour)
    score = counts * num_classes + (num_classes - 1 - torch.arange(num_classes))
    return score.argmax(-1)
