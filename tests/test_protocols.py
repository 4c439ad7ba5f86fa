"""The split and augmentation semantics of the paper and clean protocols."""

from __future__ import annotations

import pytest

from studylib.core import augment as A
from studylib.core import train
from studylib.data.readers import load_pets
from studylib.data.sources import resolve_data
from studylib.data.splits import segmentation_split
from studylib.study import config, grid, stages
from studylib.study.config import SegmentConfig

DATA = {
    "kind": "synthetic",
    "synth": {"pets": 80, "unlabeled": 8, "intel_train_per_class": 2, "intel_test_per_class": 1},
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return resolve_data({**DATA, "cache": str(tmp_path_factory.mktemp("cache"))})


def split(paths, mode: str, n: int, seed: int):
    train, test = segmentation_split(paths, SegmentConfig(split=mode, test_size=20), n, seed, 32)
    return train.names, test.names


def test_clean_split_keeps_one_test_set_and_nests_train_sets(paths):
    tests = {tuple(split(paths, "fixed", n, seed)[1]) for n in (5, 10, 40) for seed in (0, 1)}
    assert len(tests) == 1
    small, big = split(paths, "fixed", 5, 3)[0], split(paths, "fixed", 40, 3)[0]
    assert set(small) <= set(big)
    assert not set(big) & set(next(iter(tests)))  # never train on a test image


def test_paper_split_moves_the_test_set_with_the_size(paths):
    t5, t10 = split(paths, "pooled", 5, 0)[1], split(paths, "pooled", 10, 0)[1]
    assert t5 != t10 and set(t5) & set(split(paths, "pooled", 10, 0)[0])  # yesterday's test is today's train


def test_official_split_uses_the_lists(paths):
    train, test = split(paths, "official", 10, 0)
    trainval = set(load_pets(paths.pets, "trainval", 32, cache_dir=paths.cache).names)
    assert set(train) <= trainval and not set(test) & trainval


def test_too_many_images_is_a_clear_error(paths):
    with pytest.raises(ValueError, match="fine-tune size 70 is larger"):
        split(paths, "fixed", 70, 0)


def test_paper_protocol_reruns_the_intermediate_stage_per_downstream_run():
    values = {
        "model": "viny-tiny",
        "grid": {"pretrain_sizes": [0, 8], "intermediate": [True], "finetune_sizes": [4, 8, 16], "seeds": [0]},
    }
    paper = grid.plan(config.resolve({**values, "protocol": "paper"}))
    clean = grid.plan(config.resolve({**values, "protocol": "clean"}))
    count = lambda plan: sum(r.stage == "intermediate" for r in plan)  # noqa: E731
    assert count(paper) == 3 and count(clean) == 1


def _train_draws(paths, tmp_path, monkeypatch, frozen: bool) -> list[dict]:
    """Run a 2-epoch segment stage and record, per epoch, each training image's flip and contrast draw."""
    n, batch = 8, 4
    calls, draws = [], [{}, {}]

    def fit(task, step, *args, **kwargs):
        def recording_step(idx, g):
            calls.append(idx)
            return step(idx, g)

        return real_fit(task, recording_step, *args, **kwargs)

    def affine_grid(boxes, flips, *args, **kwargs):
        for i, f in zip(calls[-1].tolist(), flips.tolist()):
            draws[(len(calls) - 1) // (n // batch)][i] = [f]
        return real_grid(boxes, flips, *args, **kwargs)

    def adjust_contrast(x, factors):
        for i, c in zip(calls[-1].tolist(), factors.tolist()):
            draws[(len(calls) - 1) // (n // batch)][i].append(c)
        return real_contrast(x, factors)

    real_fit, real_grid, real_contrast = train.fit, A.affine_grid, A.adjust_contrast
    with monkeypatch.context() as m:
        m.setenv("STUDYLIB_PROGRESS", "0")
        m.setattr(train, "fit", fit)
        m.setattr(A, "affine_grid", affine_grid)
        m.setattr(A, "adjust_contrast", adjust_contrast)
        stages.segment(
            str(tmp_path / f"frozen-{frozen}"),
            "viny-tiny",
            {**DATA, "cache": str(paths.cache)},
            {"epochs": 2, "batch_size": batch, "test_size": 20, "milestones": [], "frozen_augmentation": frozen},
            size=n,
            seed=0,
            device="cpu",
        )
    assert len(calls) == 2 * (n // batch) and all(len(d) == n for d in draws)
    return draws


def test_frozen_augmentation_repeats_each_images_draws_across_epochs(paths, tmp_path, monkeypatch):
    """The paper's frozen augmentation gives every training image one flip/contrast for all epochs;
    clean draws afresh each epoch."""
    epoch1, epoch2 = _train_draws(paths, tmp_path, monkeypatch, frozen=True)
    assert epoch1 == epoch2
    assert len({tuple(v) for v in epoch1.values()}) == len(epoch1)  # still random across images
    epoch1, epoch2 = _train_draws(paths, tmp_path, monkeypatch, frozen=False)
    assert all(epoch1[i][1] != epoch2[i][1] for i in epoch1)  # a new contrast for every image


# ------------------------------------------------------------------ the authors' pipeline, flag by flag


def test_paper_split_is_one_permutation_with_seed_42_for_every_run(paths):
    """Two seeds of one size share train and test sets; the permutation is torch's random_split's."""
    s = SegmentConfig(split="pooled", test_size=20, split_seed=42)
    (tr0, te0), (tr1, te1) = (segmentation_split(paths, s, 10, seed, 32) for seed in (0, 1))
    assert te0.names == te1.names and tr0.names == tr1.names
    import torch

    pool = load_pets(paths.pets, "trainval", 32, "bilinear", paths.cache).names
    pool += load_pets(paths.pets, "test", 32, "bilinear", paths.cache).names
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(42)).tolist()
    assert te0.names == [pool[i] for i in perm[10:30]] and tr0.names == [pool[i] for i in perm[:10]]


def test_stage_runs_record_their_test_images(tmp_path, paths):
    """Under paper two seeds of one fine-tune size test on the same images, named in metrics.json;
    under clean every size and seed tests on the one fixed set."""
    cfg = {"paper": config.resolve({"protocol": "paper"}), "clean": config.resolve({})}

    def names(protocol: str, size: int, seed: int) -> list:
        settings = {**config.to_dict(cfg[protocol].segment), "epochs": 1, "batch_size": 8, "test_size": 12}
        d = tmp_path / f"{protocol}-{size}-{seed}"
        data = {**DATA, "cache": str(paths.cache)}
        r = stages.segment(str(d), model="viny-tiny", data=data, settings=settings, size=size, seed=seed, device="cpu")
        return r.metrics["test_names"]

    assert names("paper", 8, 0) == names("paper", 8, 1)
    assert len(set(map(tuple, [names("clean", n, s) for n in (8, 16) for s in (0, 1)]))) == 1


def test_paper_prediction_is_the_argmax_after_the_pixel_log_softmax():
    import torch

    # two pixels, two classes: class 1 wins pixel 0 on the raw logits, but after normalising each
    # class over the pixels, class 0's pixel 0 stands out more than class 1's does
    logits = torch.tensor([[[[0.0, -10.0]], [[1.0, 0.9]]]])  # [B=1, K=2, H=1, W=2]
    assert stages.predict_classes(logits).tolist() == [[[1, 1]]]
    assert stages.predict_classes(logits, eval_log_softmax=True).tolist() == [[[0, 1]]]


def test_paper_preset_names_every_authors_flag():
    paper, clean = config.resolve({"protocol": "paper"}), config.resolve({})
    for stage in ("pretrain", "intermediate", "segment"):
        p, c = getattr(paper, stage), getattr(clean, stage)
        assert (p.init, p.decay_all, p.precision) == ("torch", True, "fp32")
        assert (c.init, c.decay_all, c.precision) == ("trunc_normal", False, "bf16")
    assert (paper.segment.eval_log_softmax, paper.segment.split_seed, paper.segment.split) == (True, 42, "pooled")
    assert paper.intermediate.interpolation == "nearest" and not paper.intermediate.frozen_augmentation
    assert clean.intermediate.interpolation == "bilinear" and not clean.segment.eval_log_softmax


def test_intel_interpolation_reaches_the_decoded_images(paths):
    from studylib.data.readers import load_intel

    near = load_intel(paths.intel, "train", 32, paths.cache, interpolation="nearest").images
    bil = load_intel(paths.intel, "train", 32, paths.cache, interpolation="bilinear").images
    assert near.shape == bil.shape and not (near == bil).all()
