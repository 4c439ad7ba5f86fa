"""A plan checked against the data before anything trains (studylib.study.checks): sizes larger than the data,
missing folders (only those the plan needs), every problem at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studylib.core.model import build_encoder, save_encoder
from studylib.data.synth import SynthSpec, write_synthetic
from studylib.study import checks, config, grid
from studylib.study.config import ParamError

ROOT = Path(__file__).resolve().parent.parent
SYNTH = {"pets": 80, "unlabeled": 64, "intel_train_per_class": 2, "intel_test_per_class": 1}


def _study(data: dict, **sections) -> config.StudyConfig:
    values = {"model": "viny-tiny", "data": data, "segment": {"test_size": 4}, **sections}
    values["grid"] = {
        "pretrain_sizes": [0],
        "intermediate": ["none"],
        "finetune_sizes": [2],
        **sections.get("grid", {}),
    }
    return config.resolve(values)


def _problems(cfg: config.StudyConfig) -> list[str]:
    return checks.problems(cfg, grid.plan(cfg))


def _image(path: Path, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (value, 20, 20)).save(path)


def _pets(root: Path, trainval: int = 6, test: int = 4) -> Path:
    """The Pets layout with `trainval` + `test` tiny images and their trimaps."""
    (root / "annotations" / "trimaps").mkdir(parents=True)
    lists = {"trainval": [], "test": []}
    for i in range(trainval + test):
        name = f"Cat_{i + 1}"
        _image(root / "images" / f"{name}.jpg", 10 * i)
        Image.fromarray(np.full((6, 8), 2, np.uint8)).save(root / "annotations" / "trimaps" / f"{name}.png")
        lists["trainval" if i < trainval else "test"].append(f"{name} 1 1 1\n")
    for split, lines in lists.items():
        (root / "annotations" / f"{split}.txt").write_text("".join(lines))
    return root


def _unlabeled(root: Path, n: int) -> Path:
    for i in range(n):
        _image(root / "train" / f"n{i % 2:07d}" / f"img_{i}.JPEG", i)
    return root


def _intel(root: Path, splits=("train", "test")) -> Path:
    for split in splits:
        for c in ("forest", "sea"):
            _image(root / f"seg_{split}" / c / "1.jpg")
    return root


def test_synthetic_sizes_larger_than_the_data_are_each_named_at_once():
    # 80 Pets images less a test set of 4 leave 76; 64 unlabeled images: two bad settings, two lines
    cfg = _study(
        {"kind": "synthetic", "synth": SYNTH}, grid={"pretrain_sizes": [0, 32, 100], "finetune_sizes": [8, 90]}
    )
    found = _problems(cfg)
    assert found == [
        "grid.finetune_sizes: 90 labelled images asked, but the fixed split leaves 76 training images in the "
        "synthetic Pets (data.synth.pets: 80); use at most 76 or lower segment.test_size or raise data.synth.pets",
        "grid.pretrain_sizes: 100 asked, the synthetic data (data.synth.unlabeled) holds 64 images; lower it or "
        "raise data.synth.unlabeled",
    ]
    with pytest.raises(ParamError) as e:
        checks.ensure(cfg, grid.plan(cfg))
    assert str(e.value).splitlines() == found


def test_synthetic_counts_are_those_the_generator_writes(tmp_path):
    # 14 images alternate per breed of 6 between the lists: 8 in trainval, 6 in test (not 7 and 7);
    # the official split trains on trainval alone, so 9 is one too many, both from the spec and from the files
    spec = {"pets": 14, "unlabeled": 0, "intel_train_per_class": 0, "intel_test_per_class": 0}
    written = write_synthetic(tmp_path / "synth", SynthSpec(**spec))
    lines = []
    for data in ({"kind": "synthetic", "synth": spec}, {"kind": "real", "pets": str(written["pets"])}):
        cfg = _study(data, grid={"finetune_sizes": [8, 9]}, segment={"split": "official", "test_size": 6})
        lines += _problems(cfg)
    assert len(lines) == 2 and all("9 labelled images asked" in line and "leaves 8 training" in line for line in lines)


def test_real_sizes_are_checked_against_the_files(tmp_path):
    pets, images = _pets(tmp_path / "pets"), _unlabeled(tmp_path / "images", 5)
    data = {"kind": "real", "pets": str(pets), "images": str(images)}
    assert _problems(_study(data, grid={"pretrain_sizes": [0, 5], "finetune_sizes": [6]})) == []
    found = _problems(_study(data, grid={"pretrain_sizes": [0, 6, 9], "finetune_sizes": [6, 7]}))
    assert found == [
        f"grid.finetune_sizes: 7 labelled images asked, but the fixed split leaves 6 training images in {pets}; "
        "use at most 6 or lower segment.test_size",
        f"grid.pretrain_sizes: 6 and 9 asked, {images} holds 5 image files; lower it or point data.images at a "
        "larger folder",
    ]


def test_the_test_size_and_the_pets_arms_follow_the_split(tmp_path):
    pets = _pets(tmp_path / "pets", trainval=6, test=4)
    data = {"kind": "real", "pets": str(pets), "images": str(_unlabeled(tmp_path / "images", 2))}
    official = _problems(_study(data, segment={"split": "official", "test_size": 5}))
    assert official == [
        f"segment.test_size: 5 asked, but the official split draws it from the 4 images of test.txt in {pets}; "
        "use at most 4"
    ]
    # a pooled test set of all 10 images leaves nothing to fine-tune on, nor for the spatial arm
    found = _problems(
        _study(data, grid={"pretrain_sizes": [2], "intermediate": ["none", "spatial"]}, segment={"test_size": 10})
    )
    assert [line.split(":")[0] for line in found] == ["grid.finetune_sizes", "grid.intermediate"]
    assert "the spatial arm trains on the Pets images outside the test set" in found[1]
    assert found[1].endswith("lower segment.test_size")


def test_a_missing_pets_folder_is_named_with_the_fix(tmp_path):
    missing = tmp_path / "pets"
    found = _problems(_study({"kind": "real", "pets": str(missing)}))
    assert found == [
        f"data.pets: {missing} not found (needed by every segmentation run); download with "
        f"`study data get pets {missing}` or fix the path"
    ]
    assert _problems(_study({"kind": "real"}))[0].startswith("data.pets: not set (needed by every segmentation run)")


def test_a_listed_image_without_its_trimap_is_found(tmp_path):
    pets = _pets(tmp_path / "pets")
    (pets / "annotations" / "trimaps" / "Cat_3.png").unlink()
    found = _problems(_study({"kind": "real", "pets": str(pets)}))
    assert len(found) == 1 and found[0].startswith("data.pets: 1 images listed") and "(first: Cat_3)" in found[0]


def test_only_the_folders_the_plan_reads_are_demanded(tmp_path):
    # no intel arm, no pre-training: Pets alone; loading the config demands nothing either
    data = {"kind": "real", "pets": str(_pets(tmp_path / "pets"))}
    assert _problems(_study(data, grid={"finetune_sizes": [2, 4]})) == []
    with_images = {**data, "images": str(_unlabeled(tmp_path / "images", 3))}
    pets_arms = {"pretrain_sizes": [0, 3], "intermediate": ["none", "spatial", "pets-breeds"]}
    assert _problems(_study(with_images, grid=pets_arms)) == []
    # pre-training without data.images, the intel arm without data.intel: each named
    found = _problems(_study(data, grid={"pretrain_sizes": [0, 3], "intermediate": ["none", "intel"]}))
    assert [line.split(":")[0] for line in found] == ["data.images", "data.intel"]
    assert "(needed by the intel arm)" in found[1] and "study data get intel" in found[1]


def test_an_imported_encoder_reads_no_unlabeled_images(tmp_path):
    torch.manual_seed(0)
    save_encoder(tmp_path / "enc.safetensors", build_encoder("viny-tiny"), {})
    data = {"kind": "real", "pets": str(_pets(tmp_path / "pets"))}
    imported = {"from_encoder": str(tmp_path / "enc.safetensors")}
    assert _problems(_study(data, grid={"pretrain_sizes": [200000]}, pretrain=imported)) == []
    assert _problems(_study(data, grid={"pretrain_sizes": [200000]}))[0].startswith("data.images: not set")


def test_an_intel_folder_without_its_test_split_is_named(tmp_path):
    data = {
        "kind": "real",
        "pets": str(_pets(tmp_path / "pets")),
        "images": str(_unlabeled(tmp_path / "images", 3)),
        "intel": str(_intel(tmp_path / "intel", splits=("train",))),
    }
    found = _problems(_study(data, grid={"pretrain_sizes": [3], "intermediate": ["none", "intel"]}))
    assert len(found) == 1 and found[0].startswith("data.intel: no Intel layout under") and "seg_test" in found[0]
    _intel(tmp_path / "intel", splits=("test",))
    assert _problems(_study(data, grid={"pretrain_sizes": [3], "intermediate": ["none", "intel"]})) == []


def test_a_synthetic_intel_arm_needs_intel_images():
    synth = {**SYNTH, "intel_test_per_class": 0}
    cfg = _study({"kind": "synthetic", "synth": synth}, grid={"pretrain_sizes": [32], "intermediate": ["intel"]})
    assert _problems(cfg) == [
        "data.synth.intel_test_per_class: 0 leaves the intel arm no test images; set it to at least 1 or drop intel "
        "from grid.intermediate"
    ]


@pytest.mark.parametrize("name", ["smoke", "demo"])
def test_the_shipped_synthetic_studies_have_no_problems(name):
    cfg = config.load(ROOT / "params" / f"{name}.yaml")
    checks.ensure(cfg, grid.plan(cfg))
