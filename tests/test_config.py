"""Parameter files: the shipped files load, unknown keys and wrong types are rejected with useful
messages, protocol presets yield to explicit values, and the cross-field checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from studylib.study import config as C
from studylib.study.config import (
    DataConfig,
    GridConfig,
    IntermediateConfig,
    ParamError,
    PretrainConfig,
    SegmentConfig,
    StudyConfig,
    TimeoutConfig,
    build,
)

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
def test_every_shipped_parameter_file_loads(path, tmp_path):  # smoke.yaml, and demo.yaml once it exists
    values = yaml.safe_load(path.read_text())
    placeholder = values.get("pretrain", {}).get("from_encoder", "")
    if placeholder.startswith("path/to/your/"):  # table2.yaml: the encoder file is the user's to name
        with pytest.raises(ParamError, match="pretrain.from_encoder: must be empty or an existing encoder file"):
            C.load(path)
        from studylib.core.model import build_encoder, save_encoder

        values["pretrain"]["from_encoder"] = str(tmp_path / "encoder.safetensors")
        save_encoder(values["pretrain"]["from_encoder"], build_encoder(values["model"]), {})
        cfg = C.resolve(values)
    else:
        cfg = C.load(path)
    assert isinstance(cfg, C.StudyConfig)
    assert cfg.protocol in C.PROTOCOLS


# ------------------------------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize(
    "text, bad, valid",
    [
        ("modle: viny\n", "modle", ("model", "protocol", "grid", "segment")),
        ("segment: {epoch: 3}\n", "segment.epoch", ("epochs", "batch_size", "lr", "spatial_log_softmax")),
    ],
)
def test_unknown_key_lists_the_valid_keys_and_the_file(tmp_path, text, bad, valid):
    with pytest.raises(ParamError) as e:
        C.load(_write(tmp_path, text))
    msg = str(e.value)
    assert bad in msg and all(key in msg for key in valid)
    assert str(tmp_path / "params.yaml") in msg  # load() says which file


def test_unknown_key_via_resolve():
    with pytest.raises(ParamError, match=r"grid\.seed\b.*seeds"):
        C.resolve({"grid": {"seed": [0]}})


# ------------------------------------------------------------------------------------------ wrong types


@pytest.mark.parametrize(
    "values,key",
    [
        ({"segment": {"epochs": "3"}}, "segment.epochs"),  # string for an int
        ({"segment": {"epochs": 3.5}}, "segment.epochs"),  # float for an int
        ({"segment": {"epochs": True}}, "segment.epochs"),  # bool for an int
        ({"segment": {"lr": True}}, "segment.lr"),  # bool for a float
        ({"segment": {"normalize": 1}}, "segment.normalize"),  # int for a bool
        ({"grid": {"seeds": 0}}, "grid.seeds"),  # scalar for a list
        ({"grid": {"seeds": [0, "1"]}}, "grid.seeds[1]"),  # bad list item
        ({"pretrain": {"milestones": 0.5}}, "pretrain.milestones"),
        ({"model": 3}, "model"),
        ({"segment": 3}, "segment"),  # scalar for a section
    ],
)
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

QUIRKS = {
    "spatial_log_softmax": True,
    "normalize": False,
    "interpolation": "nearest",
    "split": "pooled",
    "frozen_augmentation": True,
}


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
    cfg = C.load(
        _write(
            tmp_path,
            "protocol: paper\nsegment: {normalize: true, epochs: 7}\npretrain: {loss_per_masked_count: false}\n",
        )
    )
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
        C.resolve({"pretrain": {"mask_unit": unit}})  # viny: 16 px patches, 128 px images


@pytest.mark.parametrize("unit", [0, 16, 32, 64])
def test_good_mask_units(unit):
    assert C.resolve({"pretrain": {"mask_unit": unit}}).pretrain.mask_unit == unit


def test_mask_unit_follows_the_model():
    assert C.resolve({"model": "viny-tiny", "pretrain": {"mask_unit": 8}}).pretrain.mask_unit == 8
    with pytest.raises(ParamError, match="mask_unit"):
        C.resolve({"model": "viny", "pretrain": {"mask_unit": 8}})


@pytest.mark.parametrize(
    "values,word",
    [
        ({"model": "vit-b"}, "model"),
        ({"device": "tpu"}, "device"),
        ({"grid": {"finetune_sizes": [0]}}, "finetune_sizes"),
        ({"grid": {"seeds": [1, 1]}}, "seeds"),
        ({"pretrain": {"mask_ratio": 1.0}}, "mask_ratio"),
        ({"segment": {"milestones": [1.5]}}, "milestones"),
        ({"segment": {"split": "random"}}, "split"),
        ({"segment": {"interpolation": "area"}}, "interpolation"),
    ],
)
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


# ------------------------------------------------------------------------------------------ sections check themselves


def test_a_section_built_from_a_dict_checks_its_ranges():
    """A stage rebuilds its settings with build(); a bad value there fails as it would in a file."""
    with pytest.raises(ParamError) as e:
        build(PretrainConfig, {"mask_ratio": 1.2}, "pretrain")
    assert "pretrain.mask_ratio" in str(e.value) and "(0, 1)" in str(e.value) and "1.2" in str(e.value)


def test_a_section_made_directly_checks_its_ranges():
    with pytest.raises(ParamError) as e:
        PretrainConfig(mask_ratio=1.2)
    assert str(e.value) == "pretrain.mask_ratio: must be in (0, 1), got 1.2"


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: SegmentConfig(epochs="3"), "segment.epochs"),
        (lambda: SegmentConfig(normalize=1), "segment.normalize"),
        (lambda: IntermediateConfig(milestones=0.5), "intermediate.milestones"),
        (lambda: GridConfig(seeds=[0, "1"]), "grid.seeds[1]"),
        (lambda: TimeoutConfig(cell=1.5), "timeouts.cell"),
        (lambda: DataConfig(skip_unreadable="yes"), "data.skip_unreadable"),
        (lambda: StudyConfig(segment={"epochs": 3}), "segment"),  # a mapping where a section belongs
        (lambda: StudyConfig(workers="2"), "workers"),
    ],
)
def test_a_wrong_type_given_to_a_constructor_is_rejected(make, key):
    with pytest.raises(ParamError) as e:
        make()
    assert str(e.value).startswith(key + ":")


def test_a_constructor_converts_an_int_for_a_float():
    s = SegmentConfig(lr=1)
    assert s.lr == 1.0 and isinstance(s.lr, float)


@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda: SegmentConfig(epochs=0), "segment.epochs: must be at least 1, got 0"),
        (lambda: IntermediateConfig(batch_size=0), "intermediate.batch_size: must be at least 1"),
        (lambda: PretrainConfig(lr=0.0), "pretrain.lr: must be positive, got 0.0"),
        (lambda: SegmentConfig(weight_decay=-1e-4), "segment.weight_decay: must be at least 0"),
        (lambda: SegmentConfig(milestones=[0.5, 1.5]), "segment.milestones: must be fractions of the epochs in (0, 1]"),
        (lambda: PretrainConfig(gamma=2.0), "pretrain.gamma: must be in (0, 1]"),
        (lambda: PretrainConfig(mask_ratio=0.0), "pretrain.mask_ratio: must be in (0, 1), got 0.0"),
        (lambda: PretrainConfig(mask_unit=-16), "pretrain.mask_unit: must be 0"),
        (lambda: PretrainConfig(crop_scale=[0.9, 0.5]), "pretrain.crop_scale: must be [low, high]"),
        (lambda: PretrainConfig(crop_scale=[0.5]), "pretrain.crop_scale: must be [low, high]"),
        (lambda: PretrainConfig(cache_margin=-0.1), "pretrain.cache_margin: must be at least 0"),
        (lambda: IntermediateConfig(mixup_alpha=-1.0), "intermediate.mixup_alpha: must be at least 0"),
        (lambda: IntermediateConfig(contrast=-0.1), "intermediate.contrast: must be at least 0"),
        (lambda: SegmentConfig(test_size=0), "segment.test_size: must be at least 1"),
        (lambda: SegmentConfig(split="random"), "segment.split: must be one of fixed, official, pooled, got 'random'"),
        (
            lambda: SegmentConfig(interpolation="area"),
            "segment.interpolation: must be one of bilinear, nearest, bicubic",
        ),
        (lambda: TimeoutConfig(cell=0), "timeouts.cell: must be at least 1"),
        (lambda: TimeoutConfig(training=-1), "timeouts.training: must be 0"),
        (lambda: GridConfig(seeds=[]), "grid.seeds: must be distinct non-negative values"),
        (lambda: GridConfig(pretrain_sizes=[-1]), "grid.pretrain_sizes: must be distinct non-negative values"),
        (lambda: GridConfig(finetune_sizes=[0, 10]), "grid.finetune_sizes: must be distinct positive values"),
        (lambda: GridConfig(intermediate=["intel", "intel"]), "grid.intermediate: must be distinct arms among"),
        (lambda: GridConfig(intermediate=["cifar"]), "grid.intermediate: must be distinct arms among"),
        (lambda: DataConfig(kind="fake"), "data.kind: must be one of synthetic, real, got 'fake'"),
        (lambda: DataConfig(synth={"petz": 3}), "unknown parameter 'data.synth.petz'"),
        (lambda: DataConfig(synth={"pets": -1}), "data.synth.pets: must be at least 0"),
        (lambda: StudyConfig(device="tpu"), "device: must be one of auto, cpu, cuda, got 'tpu'"),
        (lambda: StudyConfig(executor="k8s"), "executor: must be one of local, slurm, submitit-local"),
        (lambda: StudyConfig(workers=0), "workers: must be at least 1"),
        (lambda: StudyConfig(protocol="papr"), "protocol: must be one of clean, paper"),
        (lambda: StudyConfig(model="vit-b"), "model: must be one of viny, viny-tiny, got 'vit-b'"),
        (lambda: StudyConfig(pretrain=PretrainConfig(mask_unit=8)), "pretrain.mask_unit: 8 px must be a multiple"),
    ],
)
def test_every_range_is_checked_with_the_full_key(make, expect):
    with pytest.raises(ParamError) as e:
        make()
    assert str(e.value).startswith(expect), str(e.value)


def test_a_section_under_another_key_is_reported_under_that_key():
    # the intermediate stage reads the segment split settings as `pets_split`
    with pytest.raises(ParamError, match=r"^pets_split\.test_size: must be at least 1"):
        build(SegmentConfig, {"test_size": 0}, "pets_split")


def test_loading_a_real_data_study_demands_no_folder():
    # which folders a study needs follows from its plan: studylib.study.checks (tests/test_plan_checks.py)
    grid = GridConfig(pretrain_sizes=[0, 100], intermediate=["none", "intel"])
    assert StudyConfig(data=DataConfig(kind="real"), grid=grid).data.pets == ""
