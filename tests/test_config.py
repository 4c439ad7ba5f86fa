"""Parameter files: the shipped files load, unknown keys and wrong types are rejected with useful
messages, protocol presets yield to explicit values, and the cross-field checks."""
from __future__ import annotations

from pathlib import Path

import pytest

from studylib.study import config as C
from studylib.study.config import ParamError

PARAMS = Path(__file__).resolve().parents[1] / "params"
SHIPPED = sorted(PARAMS.glob("*.yaml"))


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------------------ shipped files

def test_smoke_file_exists_and_loads():
    cfg = C.load(PARAMS / "smoke.yaml")
    assert cfg.name == "smoke" and cfg.model == "viny-tiny" and cfg.protocol == "clean"
    assert cfg.grid.pretrain_sizes == [0, 32]
    assert cfg.grid.intermediate == ["none", "intel", "spatial"]
    assert cfg.pretrain.epochs == 2 and cfg.pretrain.batch_size == 16
    assert cfg.segment.test_size == 16
    # untouched keys keep the stage defaults
    assert cfg.segment.lr == pytest.approx(2e-3) and cfg.segment.milestones == [0.7, 0.9, 0.95]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_parameter_file_loads(path):          # smoke.yaml, and demo.yaml once it exists
    cfg = C.load(path)
    assert isinstance(cfg, C.StudyConfig)
    assert cfg.protocol in C.PROTOCOLS


# ------------------------------------------------------------------------------------------ unknown keys

@pytest.mark.parametrize("text, bad, valid", [
    ("modle: viny\n", "modle", ("model", "protocol", "grid", "segment")),
    ("segment: {epoch: 3}\n", "segment.epoch", ("epochs", "batch_size", "lr", "spatial_log_softmax")),
])
def test_unknown_key_lists_the_valid_keys_and_the_file(tmp_path, text, bad, valid):
    with pytest.raises(ParamError) as e:
        C.load(_write(tmp_path, text))
    msg = str(e.value)
    assert bad in msg and all(key in msg for key in valid)
    assert str(tmp_path / "params.yaml") in msg      # load() says which file


def test_unknown_key_via_resolve():
    with pytest.raises(ParamError, match=r"grid\.seed\b.*seeds"):
        C.resolve({"grid": {"seed": [0]}})


# ------------------------------------------------------------------------------------------ wrong types

@pytest.mark.parametrize("values,key", [
    ({"segment": {"epochs": "3"}}, "segment.epochs"),            # string for an int
    ({"segment": {"epochs": 3.5}}, "segment.epochs"),            # float for an int
    ({"segment": {"epochs": True}}, "segment.epochs"),           # bool for an int
    ({"segment": {"lr": True}}, "segment.lr"),                   # bool for a float
    ({"segment": {"normalize": 1}}, "segment.normalize"),        # int for a bool
    ({"grid": {"seeds": 0}}, "grid.seeds"),                      # scalar for a list
    ({"grid": {"seeds": [0, "1"]}}, "grid.seeds[1]"),            # bad list item
    ({"pretrain": {"milestones": 0.5}}, "pretrain.milestones"),
    ({"model": 3}, "model"),
    ({"segment": 3}, "segment"),                                 # scalar for a section
])
def test_wrong_types_name_the_key(values, key):
    with pytest.raises(ParamError) as e:
        C.resolve(values)
    assert key in str(e.value)


def test_int_is_accepted_for_a_float():
    cfg = C.resolve({"segment": {"lr": 1}})
    assert cfg.segment.lr == 1.0 and isinstance(cfg.segment.lr, float)


def test_wrong_type_through_a_file(tmp_path):
    with pytest.raises(ParamError, match="grid.finetune_sizes"):
        C.load(_write(tmp_path, "grid:\n  finetune_sizes: 250\n"))


# ------------------------------------------------------------------------------------------ protocols

QUIRKS = {"spatial_log_softmax": True, "normalize": False, "interpolation": "nearest", "split": "pooled",
          "frozen_augmentation": True}


def test_paper_protocol_sets_the_quirk_flags():
    cfg = C.resolve({"protocol": "paper"})
    for key, value in QUIRKS.items():
        assert getattr(cfg.segment, key) == value, key
    assert cfg.pretrain.loss_per_masked_count is True
    # the rest of the stage settings are untouched
    assert cfg.segment.lr == pytest.approx(2e-3) and cfg.segment.epochs == 100


def test_clean_protocol_has_none_of_the_quirks():
    cfg = C.resolve({})
    assert cfg.protocol == "clean"
    for key, value in QUIRKS.items():
        assert getattr(cfg.segment, key) != value, key
    assert cfg.pretrain.loss_per_masked_count is False


def test_explicit_value_beats_the_protocol(tmp_path):
    cfg = C.load(_write(tmp_path, "protocol: paper\nsegment: {normalize: true, epochs: 7}\n"
                                   "pretrain: {loss_per_masked_count: false}\n"))
    assert cfg.segment.normalize is True
    assert cfg.segment.epochs == 7
    assert cfg.pretrain.loss_per_masked_count is False
    # the other quirks still apply
    assert cfg.segment.spatial_log_softmax is True and cfg.segment.interpolation == "nearest"


def test_protocol_preset_is_not_mutated_by_resolving():
    C.resolve({"protocol": "paper", "segment": {"normalize": True}})
    assert C.resolve({"protocol": "paper"}).segment.normalize is False


def test_unknown_protocol_is_rejected():
    with pytest.raises(ParamError) as e:
        C.resolve({"protocol": "papr"})
    assert "papr" in str(e.value) and "clean" in str(e.value) and "paper" in str(e.value)


def test_protocol_of_the_wrong_type_is_a_param_error(tmp_path):
    with pytest.raises(ParamError, match="protocol"):
        C.load(_write(tmp_path, "protocol: [paper]\n"))


def test_a_file_that_is_not_a_mapping_is_a_param_error(tmp_path):
    with pytest.raises(ParamError):
        C.load(_write(tmp_path, "- model\n- viny\n"))


# ------------------------------------------------------------------------------------------ checks

@pytest.mark.parametrize("unit", [8, 24, 48, 256])
def test_bad_mask_unit_is_rejected(unit):
    with pytest.raises(ParamError, match="mask_unit"):
        C.resolve({"pretrain": {"mask_unit": unit}})      # viny: 16 px patches, 128 px images


@pytest.mark.parametrize("unit", [0, 16, 32, 64])
def test_good_mask_units(unit):
    assert C.resolve({"pretrain": {"mask_unit": unit}}).pretrain.mask_unit == unit


def test_mask_unit_follows_the_model():
    assert C.resolve({"model": "viny-tiny", "pretrain": {"mask_unit": 8}}).pretrain.mask_unit == 8
    with pytest.raises(ParamError, match="mask_unit"):
        C.resolve({"model": "viny", "pretrain": {"mask_unit": 8}})


@pytest.mark.parametrize("values,word", [
    ({"model": "vit-b"}, "model"),
    ({"device": "tpu"}, "device"),
    ({"grid": {"finetune_sizes": [0]}}, "finetune_sizes"),
    ({"grid": {"seeds": [1, 1]}}, "seeds"),
    ({"pretrain": {"mask_ratio": 1.0}}, "mask_ratio"),
    ({"segment": {"milestones": [1.5]}}, "milestones"),
    ({"segment": {"split": "random"}}, "split"),
    ({"segment": {"interpolation": "area"}}, "interpolation"),
    ({"data": {"kind": "real"}}, "data.pets"),
])
def test_cross_field_checks(values, word):
    with pytest.raises(ParamError, match=word):
        C.resolve(values)


def test_missing_file_is_a_param_error(tmp_path):
    with pytest.raises(ParamError, match="not found"):
        C.load(tmp_path / "missing.yaml")


def test_invalid_yaml_is_a_param_error(tmp_path):
    with pytest.raises(ParamError, match="YAML"):
        C.load(_write(tmp_path, "grid: [unclosed\n"))


def test_empty_file_gives_the_defaults(tmp_path):
    cfg = C.load(_write(tmp_path, ""))
    assert cfg == C.StudyConfig()
