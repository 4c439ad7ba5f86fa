"""The split and augmentation semantics of the paper and clean protocols."""
from __future__ import annotations

import pytest
import torch

from studylib.study import config, grid, stages
from studylib.study.config import SegmentConfig
from studylib.data.sources import resolve_data

DATA = {"kind": "synthetic", "synth": {"pets": 80, "unlabeled": 8, "intel_train_per_class": 2,
                                       "intel_test_per_class": 1}}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return resolve_data({**DATA, "cache": str(tmp_path_factory.mktemp("cache"))})


def split(paths, mode: str, n: int, seed: int):
    train, test = stages.segmentation_split(paths, SegmentConfig(split=mode, test_size=20), n, seed, 32)
    return train.names, test.names


def test_clean_split_keeps_one_test_set_and_nests_train_sets(paths):
    tests = {tuple(split(paths, "fixed", n, seed)[1]) for n in (5, 10, 40) for seed in (0, 1)}
    assert len(tests) == 1
    small, big = split(paths, "fixed", 5, 3)[0], split(paths, "fixed", 40, 3)[0]
    assert set(small) <= set(big)
    assert not set(big) & set(next(iter(tests)))            # never train on a test image


def test_paper_split_moves_the_test_set_with_the_size(paths):
    t5, t10 = split(paths, "pooled", 5, 0)[1], split(paths, "pooled", 10, 0)[1]
    assert t5 != t10 and set(t5) & set(split(paths, "pooled", 10, 0)[0])   # yesterday's test is today's train


def test_official_split_uses_the_lists(paths):
    train, test = split(paths, "official", 10, 0)
    trainval = set(stages.load_pets(paths.pets, "trainval", 32, cache_dir=paths.cache).names)
    assert set(train) <= trainval and not set(test) & trainval


def test_too_many_images_is_a_clear_error(paths):
    with pytest.raises(ValueError, match="fine-tune size 70 is larger"):
        split(paths, "fixed", 70, 0)


def test_paper_protocol_reruns_the_intermediate_stage_per_downstream_run():
    values = {"model": "viny-tiny", "grid": {"pretrain_sizes": [0, 8], "intermediate": [True],
                                             "finetune_sizes": [4, 8, 16], "seeds": [0]}}
    paper = grid.plan(config.resolve({**values, "protocol": "paper"}))
    clean = grid.plan(config.resolve({**values, "protocol": "clean"}))
    count = lambda plan: sum(r.stage == "intermediate" for r in plan)  # noqa: E731
    assert count(paper) == 3 and count(clean) == 1


def test_frozen_augmentation_repeats_across_epochs():
    """The paper's frozen augmentation draws one flip/jitter per image; clean draws afresh."""
    g0 = torch.Generator().manual_seed(0)
    frozen = stages._flip_contrast(16, 0.3, torch.Generator().manual_seed(5))
    again = stages._flip_contrast(16, 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(frozen["flip"], again["flip"]) and torch.equal(frozen["contrast"], again["contrast"])
    e1, e2 = stages._flip_contrast(16, 0.3, g0), stages._flip_contrast(16, 0.3, g0)
    assert not torch.equal(e1["contrast"], e2["contrast"])
    assert ((frozen["contrast"] >= 0.7) & (frozen["contrast"] <= 1.3)).all()
