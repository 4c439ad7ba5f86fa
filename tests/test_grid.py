"""The plan: run counts, dependency order, shared intermediate runs, and content-addressed ids."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from studylib.study import config as C
from studylib.study.grid import STAGES, image_steps, plan

GRID = {"pretrain_sizes": [0, 10, 20], "intermediate": [False, True], "finetune_sizes": [4, 8], "seeds": [0, 1]}


def _cfg(**over):
    values = {"grid": dict(GRID)}
    for section, vals in over.items():
        values[section] = vals
    return C.resolve(values)


def _key(run) -> tuple:
    return (run.stage,) + tuple(sorted(run.labels.items()))


def _ids(runs) -> dict[tuple, str]:
    out = {_key(r): r.id for r in runs}
    assert len(out) == len(runs), "two runs share their grid labels"
    return out


def test_run_counts():
    runs = plan(_cfg())
    counts = Counter(r.stage for r in runs)
    assert counts == {"pretrain": 4, "intermediate": 4, "segment": (1 + 2 + 2) * 2 * 2}
    assert len({r.id for r in runs}) == len(runs) == 28


def test_parents_come_before_children():
    runs = plan(_cfg())
    position = {r.id: i for i, r in enumerate(runs)}
    for r in runs:
        if r.parent is not None:
            assert r.parent.id in position, "parent missing from the plan"
            assert position[r.parent.id] < position[r.id]
    assert [STAGES.index(r.stage) for r in runs] == sorted(STAGES.index(r.stage) for r in runs)


def test_parent_structure():
    runs = plan(_cfg())
    for r in runs:
        if r.stage == "pretrain":
            assert r.parent is None and r.labels["pretrain_size"] in (10, 20)
        elif r.stage == "intermediate":
            assert r.parent.stage == "pretrain"
            assert r.parent.labels == {"pretrain_size": r.labels["pretrain_size"], "seed": r.labels["seed"]}
            assert r.labels["arm"] == r.params["arm"] == "intel"
        else:
            lab = r.labels
            if lab["pretrain_size"] == 0:
                assert r.parent is None and lab["intermediate"] == "none"
            elif lab["intermediate"] != "none":
                assert r.parent.stage == "intermediate"
            else:
                assert r.parent.stage == "pretrain"
            if r.parent is not None:
                assert r.parent.labels["seed"] == lab["seed"]
                assert r.parent.labels["pretrain_size"] == lab["pretrain_size"]
            assert r.params["size"] == lab["finetune_size"] and r.params["seed"] == lab["seed"]


def test_intermediate_runs_are_shared_by_the_finetune_sizes():
    runs = plan(_cfg())
    children = Counter(r.parent.id for r in runs if r.stage == "segment" and r.parent is not None)
    inter = [r for r in runs if r.stage == "intermediate"]
    assert len(inter) == 4
    for r in inter:
        assert children[r.id] == len(GRID["finetune_sizes"])
    # every parent object in the plan is the very run listed in it (no duplicate copies)
    listed = {r.id: r for r in runs}
    assert all(r.parent is listed[r.parent.id] for r in runs if r.parent is not None)


def _diff(a, b) -> set[tuple]:
    ia, ib = _ids(a), _ids(b)
    assert ia.keys() == ib.keys()
    return {k for k in ia if ia[k] != ib[k]}


def test_segment_setting_changes_only_segment_ids():
    base, other = plan(_cfg()), plan(_cfg(segment={"lr": 1e-3}))
    changed = _diff(base, other)
    assert changed == {_key(r) for r in base if r.stage == "segment"}


def test_intermediate_setting_changes_intermediate_and_its_children():
    base, other = plan(_cfg()), plan(_cfg(intermediate={"mixup_alpha": 0.2}))
    changed = _diff(base, other)
    expect = {
        _key(r)
        for r in base
        if r.stage == "intermediate" or (r.stage == "segment" and r.labels["intermediate"] != "none")
    }
    assert changed == expect


def test_pretrain_setting_changes_everything_downstream_of_pretraining():
    base, other = plan(_cfg()), plan(_cfg(pretrain={"mask_ratio": 0.6}))
    changed = _diff(base, other)
    expect = {
        _key(r)
        for r in base
        if r.stage in ("pretrain", "intermediate") or (r.stage == "segment" and r.labels["pretrain_size"] > 0)
    }
    assert changed == expect
    unchanged_segments = [r for r in base if r.stage == "segment" and _key(r) not in changed]
    assert len(unchanged_segments) == 4 and all(r.labels["pretrain_size"] == 0 for r in unchanged_segments)


def test_cache_location_does_not_change_ids():
    assert [r.id for r in plan(_cfg())] == [r.id for r in plan(_cfg(data={"cache": "/somewhere/else"}))]


def test_data_and_model_change_all_ids():
    base = plan(_cfg())
    for over in ({"data": {"synth": {"seed": 7}}}, {"model": "viny-tiny"}):
        assert _diff(base, plan(_cfg(**over))) == {_key(r) for r in base}


def test_a_larger_grid_keeps_the_ids_of_the_smaller_one():
    small = C.resolve(
        {"grid": {"pretrain_sizes": [0, 10], "intermediate": [False], "finetune_sizes": [4], "seeds": [0]}}
    )
    big_ids = {r.id for r in plan(_cfg())}
    assert {r.id for r in plan(small)} <= big_ids


def test_every_intermediate_arm_gets_its_own_runs_and_pets_arms_know_the_split():
    cfg = C.resolve(
        {
            "model": "viny-tiny",
            "grid": {
                "pretrain_sizes": [0, 10],
                "intermediate": ["none", "intel", "pets-breeds", "spatial"],
                "finetune_sizes": [4, 8],
            },
        }
    )
    runs = plan(cfg)
    inter = {r.params["arm"]: r for r in runs if r.stage == "intermediate"}
    assert set(inter) == {"intel", "pets-breeds", "spatial"}
    assert "pets_split" not in inter["intel"].params
    assert inter["spatial"].params["pets_split"] == {
        "split": "fixed",
        "test_size": 1000,
        "interpolation": "bilinear",
        "split_seed": 0,
    }
    segs = [r for r in runs if r.stage == "segment"]
    assert len(segs) == (1 + 4) * 2
    assert {r.labels["intermediate"] for r in segs} == {"none", "intel", "pets-breeds", "spatial"}


def test_booleans_still_name_the_papers_two_arms():
    cfg = C.resolve({"grid": {"intermediate": [False, True]}})
    assert cfg.grid.intermediate == ["none", "intel"]
    with pytest.raises(C.ParamError, match="spatial"):
        C.resolve({"grid": {"intermediate": ["none", "spacial"]}})


def test_paper_grid_image_steps_before_the_data_is_there():
    # the count of the clean grid: 103.5M pre-training, 25.3M intermediate (Intel's published
    # 14,034 training images x 200 epochs x 9 runs) and 28.9M segmentation image-steps
    runs = plan(C.load(Path(__file__).resolve().parent.parent / "params" / "clean.yaml"))
    steps = {s: sum(image_steps(r) for r in runs if r.stage == s) for s in STAGES}
    assert steps == {"pretrain": 103_500_000, "intermediate": 14034 * 200 * 9, "segment": 28_875_000}
