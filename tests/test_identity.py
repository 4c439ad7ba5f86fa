"""Run identities: pinned ids of every run of params/smoke.yaml and params/demo.yaml, and the rules that keep
them from drifting (every settings field declared, settings added later left out at their default, recipe
versions). A change to any id shows up here as a reviewed diff of literals."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from studylib.data.sources import DataConfig
from studylib.study import config as C
from studylib.study import identity
from studylib.study.grid import image_steps, plan

PARAMS = Path(__file__).resolve().parent.parent / "params"

# The ids as of identity version 1 (written by hand from a plan of each file; never regenerate them to make
# a test pass: a changed id means every store re-trains that run)
GOLDEN_SMOKE = {
    "pretrain pretrain_size=32 seed=0": "2bd1198edcc8",
    "intermediate pretrain_size=32 arm=intel seed=0": "fc1dda43f078",
    "intermediate pretrain_size=32 arm=spatial seed=0": "a7d37d84eb37",
    "segment pretrain_size=0 intermediate=none finetune_size=16 seed=0": "5c7352f07fa3",
    "segment pretrain_size=32 intermediate=none finetune_size=16 seed=0": "242ed98a0e4e",
    "segment pretrain_size=32 intermediate=intel finetune_size=16 seed=0": "b96f879a1515",
    "segment pretrain_size=32 intermediate=spatial finetune_size=16 seed=0": "101a34603b5f",
}

GOLDEN_DEMO = {
    "pretrain pretrain_size=500 seed=0": "c1ae59e88930",
    "pretrain pretrain_size=2000 seed=0": "a9f72c588d42",
    "pretrain pretrain_size=500 seed=1": "4a96c99eb4ff",
    "pretrain pretrain_size=2000 seed=1": "cc1233985dbc",
    "intermediate pretrain_size=500 arm=intel seed=0": "2305f2a683eb",
    "intermediate pretrain_size=500 arm=spatial seed=0": "222ad0fa70ec",
    "intermediate pretrain_size=2000 arm=intel seed=0": "b9c42677f109",
    "intermediate pretrain_size=2000 arm=spatial seed=0": "78a758b86b34",
    "intermediate pretrain_size=500 arm=intel seed=1": "1546a0194285",
    "intermediate pretrain_size=500 arm=spatial seed=1": "b7461dfaf016",
    "intermediate pretrain_size=2000 arm=intel seed=1": "cd6f0da13432",
    "intermediate pretrain_size=2000 arm=spatial seed=1": "e164960abe03",
    "segment pretrain_size=0 intermediate=none finetune_size=20 seed=0": "466509d294de",
    "segment pretrain_size=0 intermediate=none finetune_size=60 seed=0": "f021476bda7f",
    "segment pretrain_size=0 intermediate=none finetune_size=180 seed=0": "8f494d5c3aa8",
    "segment pretrain_size=500 intermediate=none finetune_size=20 seed=0": "98fb2e385484",
    "segment pretrain_size=500 intermediate=none finetune_size=60 seed=0": "e1938fa04967",
    "segment pretrain_size=500 intermediate=none finetune_size=180 seed=0": "a121c1b258bf",
    "segment pretrain_size=500 intermediate=intel finetune_size=20 seed=0": "7892386516a6",
    "segment pretrain_size=500 intermediate=intel finetune_size=60 seed=0": "3823aa7ce91e",
    "segment pretrain_size=500 intermediate=intel finetune_size=180 seed=0": "63a9b61a7c9a",
    "segment pretrain_size=500 intermediate=spatial finetune_size=20 seed=0": "36dc3b2a57f1",
    "segment pretrain_size=500 intermediate=spatial finetune_size=60 seed=0": "2682f81258f4",
    "segment pretrain_size=500 intermediate=spatial finetune_size=180 seed=0": "294b62a3e37b",
    "segment pretrain_size=2000 intermediate=none finetune_size=20 seed=0": "42ea75c2e320",
    "segment pretrain_size=2000 intermediate=none finetune_size=60 seed=0": "eeb282bc2b61",
    "segment pretrain_size=2000 intermediate=none finetune_size=180 seed=0": "70ff6add034f",
    "segment pretrain_size=2000 intermediate=intel finetune_size=20 seed=0": "d0efbb6d3ee5",
    "segment pretrain_size=2000 intermediate=intel finetune_size=60 seed=0": "9056e3dad9e4",
    "segment pretrain_size=2000 intermediate=intel finetune_size=180 seed=0": "24736a62dd1d",
    "segment pretrain_size=2000 intermediate=spatial finetune_size=20 seed=0": "cc1db1b36a24",
    "segment pretrain_size=2000 intermediate=spatial finetune_size=60 seed=0": "dd05c25ea80b",
    "segment pretrain_size=2000 intermediate=spatial finetune_size=180 seed=0": "54ec5059f145",
    "segment pretrain_size=0 intermediate=none finetune_size=20 seed=1": "5fdf425d18e4",
    "segment pretrain_size=0 intermediate=none finetune_size=60 seed=1": "c875d8f42ee3",
    "segment pretrain_size=0 intermediate=none finetune_size=180 seed=1": "461571c4e7cd",
    "segment pretrain_size=500 intermediate=none finetune_size=20 seed=1": "376650cac5eb",
    "segment pretrain_size=500 intermediate=none finetune_size=60 seed=1": "36aad7270247",
    "segment pretrain_size=500 intermediate=none finetune_size=180 seed=1": "edaaec1f346c",
    "segment pretrain_size=500 intermediate=intel finetune_size=20 seed=1": "c84617b0bf17",
    "segment pretrain_size=500 intermediate=intel finetune_size=60 seed=1": "54e52db7b282",
    "segment pretrain_size=500 intermediate=intel finetune_size=180 seed=1": "99a5a62d3cf5",
    "segment pretrain_size=500 intermediate=spatial finetune_size=20 seed=1": "54f05d987dd4",
    "segment pretrain_size=500 intermediate=spatial finetune_size=60 seed=1": "6af063c3492f",
    "segment pretrain_size=500 intermediate=spatial finetune_size=180 seed=1": "023fea9026be",
    "segment pretrain_size=2000 intermediate=none finetune_size=20 seed=1": "43145fd74231",
    "segment pretrain_size=2000 intermediate=none finetune_size=60 seed=1": "d213959bb90c",
    "segment pretrain_size=2000 intermediate=none finetune_size=180 seed=1": "b3df38a3f7a6",
    "segment pretrain_size=2000 intermediate=intel finetune_size=20 seed=1": "ea14e11c143b",
    "segment pretrain_size=2000 intermediate=intel finetune_size=60 seed=1": "b71e4b434e85",
    "segment pretrain_size=2000 intermediate=intel finetune_size=180 seed=1": "3fc2fe302c43",
    "segment pretrain_size=2000 intermediate=spatial finetune_size=20 seed=1": "c69597b118f3",
    "segment pretrain_size=2000 intermediate=spatial finetune_size=60 seed=1": "2c0e790a2341",
    "segment pretrain_size=2000 intermediate=spatial finetune_size=180 seed=1": "f82a65f61039",
}


def _ids(cfg) -> dict[str, str]:
    out = {}
    for r in plan(cfg):
        key = " ".join([r.stage] + [f"{k}={v}" for k, v in r.labels.items() if k != "protocol"])
        out[key] = r.id
    return out


@pytest.mark.parametrize("name,golden", [("smoke", GOLDEN_SMOKE), ("demo", GOLDEN_DEMO)])
def test_pinned_ids(name, golden):
    assert _ids(C.load(PARAMS / f"{name}.yaml")) == golden


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
        for name, value in identity.RULES[cls.section].later.items():
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
    monkeypatch.setitem(identity.RECIPES, "intermediate", 2)
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
