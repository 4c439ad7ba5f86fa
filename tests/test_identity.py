"""Run identities: pinned ids of every run of params/smoke.yaml and params/demo.yaml, and the rules that keep
them from drifting (every settings field declared, settings added later left out at their default, recipe
versions). A change to any id shows up here as a reviewed diff of literals."""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from pathlib import Path

import pytest

from studylib.data.sources import DataConfig
from studylib.study import config as C
from studylib.study import identity
from studylib.study.grid import image_steps, plan

PARAMS = Path(__file__).resolve().parent.parent / "params"

# The ids under recipes pretrain 1, intermediate 2, segment 2 (identity.RECIPES), from a plan of each file;
# never regenerate them to make a test pass: a changed id means every store re-trains that run. History:
# intermediate and segment ids changed once, when each head got its own seeded init (recipe 2)
GOLDEN_SMOKE = {
    "pretrain pretrain_size=32 seed=0": "2bd1198edcc8",
    "intermediate pretrain_size=32 arm=intel seed=0": "c5c4f03107b6",
    "intermediate pretrain_size=32 arm=spatial seed=0": "ba486207e80f",
    "segment pretrain_size=0 intermediate=none finetune_size=16 seed=0": "a9385ec83777",
    "segment pretrain_size=32 intermediate=none finetune_size=16 seed=0": "b80aa93274e9",
    "segment pretrain_size=32 intermediate=intel finetune_size=16 seed=0": "11cf82b68c10",
    "segment pretrain_size=32 intermediate=spatial finetune_size=16 seed=0": "178ccdf75dad",
}

# the demo's seeds 0 and 1 in full; every one of its 133 runs (7 seeds) through one digest of the sorted
# "key id" lines. History: the demo's design changed once (fine-tune sizes 20, 40, 80 instead of 20, 60, 180;
# 7 seeds; no spatial arm): the runs the two designs share kept their ids
GOLDEN_DEMO = {
    "pretrain pretrain_size=500 seed=0": "c1ae59e88930",
    "pretrain pretrain_size=2000 seed=0": "a9f72c588d42",
    "pretrain pretrain_size=500 seed=1": "4a96c99eb4ff",
    "pretrain pretrain_size=2000 seed=1": "cc1233985dbc",
    "intermediate pretrain_size=500 arm=intel seed=0": "74164a82bd2f",
    "intermediate pretrain_size=2000 arm=intel seed=0": "af6e3f69300a",
    "intermediate pretrain_size=500 arm=intel seed=1": "073495b36ef6",
    "intermediate pretrain_size=2000 arm=intel seed=1": "a21216a7aed8",
    "segment pretrain_size=0 intermediate=none finetune_size=20 seed=0": "7918a8dba822",
    "segment pretrain_size=0 intermediate=none finetune_size=40 seed=0": "c0985fa2e0b3",
    "segment pretrain_size=0 intermediate=none finetune_size=80 seed=0": "0ab484343f07",
    "segment pretrain_size=500 intermediate=none finetune_size=20 seed=0": "df1833f4806e",
    "segment pretrain_size=500 intermediate=none finetune_size=40 seed=0": "7687240ee1bb",
    "segment pretrain_size=500 intermediate=none finetune_size=80 seed=0": "0320d6f43a7b",
    "segment pretrain_size=500 intermediate=intel finetune_size=20 seed=0": "8c83d147e42f",
    "segment pretrain_size=500 intermediate=intel finetune_size=40 seed=0": "05e14ad07cc0",
    "segment pretrain_size=500 intermediate=intel finetune_size=80 seed=0": "ee6cddcc9872",
    "segment pretrain_size=2000 intermediate=none finetune_size=20 seed=0": "e4c1d4deb20e",
    "segment pretrain_size=2000 intermediate=none finetune_size=40 seed=0": "b51dbf2156dc",
    "segment pretrain_size=2000 intermediate=none finetune_size=80 seed=0": "3cdd95fa784a",
    "segment pretrain_size=2000 intermediate=intel finetune_size=20 seed=0": "591115abeabc",
    "segment pretrain_size=2000 intermediate=intel finetune_size=40 seed=0": "17767ca6fa14",
    "segment pretrain_size=2000 intermediate=intel finetune_size=80 seed=0": "04f034ddcee1",
    "segment pretrain_size=0 intermediate=none finetune_size=20 seed=1": "10a191de601a",
    "segment pretrain_size=0 intermediate=none finetune_size=40 seed=1": "4f5307e4e16b",
    "segment pretrain_size=0 intermediate=none finetune_size=80 seed=1": "b92de168a3fb",
    "segment pretrain_size=500 intermediate=none finetune_size=20 seed=1": "4dac70dff645",
    "segment pretrain_size=500 intermediate=none finetune_size=40 seed=1": "cbf1a2e3075a",
    "segment pretrain_size=500 intermediate=none finetune_size=80 seed=1": "35b859853414",
    "segment pretrain_size=500 intermediate=intel finetune_size=20 seed=1": "47a80cace7dc",
    "segment pretrain_size=500 intermediate=intel finetune_size=40 seed=1": "ef151147c1ac",
    "segment pretrain_size=500 intermediate=intel finetune_size=80 seed=1": "90a16a7e9267",
    "segment pretrain_size=2000 intermediate=none finetune_size=20 seed=1": "7821c0c54955",
    "segment pretrain_size=2000 intermediate=none finetune_size=40 seed=1": "13339033c944",
    "segment pretrain_size=2000 intermediate=none finetune_size=80 seed=1": "198da09a7891",
    "segment pretrain_size=2000 intermediate=intel finetune_size=20 seed=1": "379744e28c3b",
    "segment pretrain_size=2000 intermediate=intel finetune_size=40 seed=1": "c443fe58420f",
    "segment pretrain_size=2000 intermediate=intel finetune_size=80 seed=1": "96c5806f9bf8",
}
GOLDEN_DEMO_DIGEST = "a2ea59fc8cbdfac1"


def _ids(cfg) -> dict[str, str]:
    out = {}
    for r in plan(cfg):
        key = " ".join([r.stage] + [f"{k}={v}" for k, v in r.labels.items() if k != "protocol"])
        out[key] = r.id
    return out


def test_pinned_ids():
    assert _ids(C.load(PARAMS / "smoke.yaml")) == GOLDEN_SMOKE
    demo = _ids(C.load(PARAMS / "demo.yaml"))
    assert len(demo) == 133 and {k: v for k, v in demo.items() if k.endswith(("seed=0", "seed=1"))} == GOLDEN_DEMO
    assert hashlib.sha256("\n".join(f"{k} {v}" for k, v in sorted(demo.items())).encode()).hexdigest()[:16] == (
        GOLDEN_DEMO_DIGEST
    )


def _sections(cls) -> list[type]:
    """Every settings dataclass reachable from `cls` (the study's top level), `cls` first."""
    nested = [tp for tp in typing.get_type_hints(cls).values() if dataclasses.is_dataclass(tp)]
    return [cls] + [s for tp in nested for s in _sections(tp)]


def test_every_settings_field_has_exactly_one_identity_rule():
    sections = _sections(C.StudyConfig)
    assert len(sections) == 8  # top level, timeouts, engine, data, grid, pretrain, intermediate, segment
    for cls in sections:
        assert identity.undeclared(cls) == [], f"section {cls.section!r}"
        rule = identity.RULES[cls.section]
        names = {f.name for f in dataclasses.fields(cls)}
        assert rule.fields() <= names, f"{cls.section!r}: rules for fields that do not exist"
        declared = list(rule.always) + list(rule.later) + list(rule.never)
        assert len(declared) == len(set(declared)), f"{cls.section!r}: a field under two rules"


def test_later_fields_are_left_out_at_their_default():
    # a default moved away from the recorded value would silently relabel old runs: it must be a new recipe
    for cls in (C.PretrainConfig, C.IntermediateConfig, C.SegmentConfig, DataConfig):
        defaults = cls()
        rule = identity.RULES[cls.section]
        later = {**(rule.base.later if rule.base else {}), **rule.later}  # a stage's own and StageConfig's
        for name, value in later.items():
            assert getattr(defaults, name) == value, f"{cls.section}.{name}"


def _with_new_segment_field(default=0.5):
    """SegmentConfig plus a field added 'later' (a stand-in for the next issue's settings)."""
    return dataclasses.make_dataclass(
        "SegmentConfigPlus", [("new_knob", float, dataclasses.field(default=default))], bases=(C.SegmentConfig,)
    )


def _smoke_with(segment) -> C.StudyConfig:
    cfg = C.load(PARAMS / "smoke.yaml")
    return dataclasses.replace(cfg, segment=segment)


def test_an_added_setting_changes_no_id_at_its_default_and_every_segment_id_otherwise(monkeypatch):
    cls = _with_new_segment_field()
    base = dataclasses.asdict(C.load(PARAMS / "smoke.yaml").segment)
    rules = dict(identity.RULES)
    rules["segment"] = dataclasses.replace(rules["segment"], later={"new_knob": 0.5})
    monkeypatch.setattr(identity, "RULES", rules)
    assert _ids(_smoke_with(cls(**base))) == GOLDEN_SMOKE
    changed = _ids(_smoke_with(cls(**base, new_knob=0.7)))
    differ = {k for k in GOLDEN_SMOKE if changed[k] != GOLDEN_SMOKE[k]}
    assert differ == {k for k in GOLDEN_SMOKE if k.startswith("segment")}


def test_a_setting_without_an_identity_rule_is_an_error():
    cls = _with_new_segment_field()
    cfg = _smoke_with(cls(**dataclasses.asdict(C.load(PARAMS / "smoke.yaml").segment)))
    with pytest.raises(identity.IdentityError, match=r"segment\.new_knob: no identity rule"):
        plan(cfg)


def test_a_new_recipe_changes_its_stage_and_what_descends_from_it(monkeypatch):
    monkeypatch.setitem(identity.RECIPES, "intermediate", identity.RECIPES["intermediate"] + 1)
    ids = _ids(C.load(PARAMS / "smoke.yaml"))
    differ = {k for k in GOLDEN_SMOKE if ids[k] != GOLDEN_SMOKE[k]}
    assert differ == {k for k in GOLDEN_SMOKE if "intermediate pretrain" in k or "intermediate=intel" in k} | {
        k for k in GOLDEN_SMOKE if "intermediate=spatial" in k
    }


def test_a_new_synthetic_generator_changes_every_id(monkeypatch):
    import studylib.data.synth as synth

    monkeypatch.setattr(synth, "FORMAT_VERSION", identity.SYNTH_FORMAT_PINNED + 1)
    ids = _ids(C.load(PARAMS / "smoke.yaml"))
    assert all(ids[k] != GOLDEN_SMOKE[k] for k in GOLDEN_SMOKE)


def test_execution_settings_change_no_id():
    cfg = C.load(PARAMS / "smoke.yaml")
    other = dataclasses.replace(
        cfg,
        name="elsewhere",
        workers=7,
        engine=C.EngineConfig(group_size=3, threads=5, threads_from_env=True, checkpoint_seconds=0),
        timeouts=C.TimeoutConfig(cell=9),
        data=dataclasses.replace(cfg.data, cache="/elsewhere"),
    )
    assert _ids(other) == GOLDEN_SMOKE


def test_image_steps_count_what_each_intermediate_arm_trains_on():
    # synthetic: 80 Pets images pooled, 8 Intel images per class x 6 classes; 3 epochs; test_size 16
    cfg = C.resolve(
        {
            "model": "viny-tiny",
            "data": {"synth": {"pets": 80, "intel_train_per_class": 8}},
            "grid": {
                "pretrain_sizes": [32],
                "intermediate": ["intel", "pets-breeds", "spatial"],
                "finetune_sizes": [8],
            },
            "intermediate": {"epochs": 3},
            "segment": {"test_size": 16},
        }
    )
    steps = {r.params["arm"]: image_steps(r) for r in plan(cfg) if r.stage == "intermediate"}
    assert steps == {"intel": 6 * 8 * 3, "pets-breeds": (80 - 16) * 3, "spatial": (80 - 16) * 3}
    official = C.resolve(
        {
            "model": "viny-tiny",
            "grid": {"pretrain_sizes": [32], "intermediate": ["spatial"]},
            "data": {"synth": {"pets": 80}},
            "segment": {"split": "official", "test_size": 16},
        }
    )
    (run,) = [r for r in plan(official) if r.stage == "intermediate"]
    # official: all of trainval.txt; the generator alternates blocks of 6 images (one per breed) between the
    # lists, so 80 images give trainval 0-5, 12-17, ..., 72-77: 42 images
    assert image_steps(run) == 42 * official.intermediate.epochs
