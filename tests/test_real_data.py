"""The real-data samples in ../shared/data (skipped where that folder is absent), the data check,
unreadable-file skipping, and the checksummed download."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studylib import cli
from studylib.analysis.tables import collect
from studylib.data import decoded as DD
from studylib.data import readers as D
from studylib.data.check import check
from studylib.data.download import get_archive
from studylib.study import config, grid, runner

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the project")


@needs_shared
def test_check_pets_sample():
    r = check("pets", SHARED / "oxford_pet_sample")
    assert r["splits"]["trainval"]["samples"] == 150 and r["splits"]["test"]["samples"] == 151
    assert r["breeds"] == 3 and r["trimap_values"] == [1, 2, 3]
    assert r["images_in_no_split"] == ["Abyssinian_34"]
    odd = {m["file"]: m["format"] for m in r["format_not_matching_extension"]}
    assert odd == {"images/Abyssinian_34.jpg": "GIF", "images/Abyssinian_5.jpg": "PNG"}
    assert r["colour_modes"] == {"P": 1, "RGB": 300, "RGBA": 1} and r["unreadable"] == []


@needs_shared
def test_check_intel_sample():
    r = check("intel", SHARED / "intel_sample")
    assert r["splits"]["train"]["samples"] == 450 and r["splits"]["test"]["samples"] == 150
    assert r["classes"] == list(D.INTEL_CLASSES)
    assert r["image_size_range"]["height"][0] < 150  # the short images are there


@needs_shared
def test_check_imagenet_sample():
    r = check("images", SHARED / "imagenet_sample")
    assert r["samples"] == 400 and r["colour_modes"] == {"L": 17, "RGB": 383}


@needs_shared
def test_loaders_read_the_samples(tmp_path):
    tv = D.load_pets(SHARED / "oxford_pet_sample", "test", 32, cache_dir=tmp_path)
    assert tv.images.shape == (151, 3, 32, 32) and set(np.unique(tv.masks.numpy())) == {0, 1, 2}
    assert "Abyssinian_5" in tv.names  # the RGBA PNG named .jpg decodes
    intel = D.load_intel(SHARED / "intel_sample", "train", 32, cache_dir=tmp_path)
    assert len(intel) == 450 and intel.labels.bincount().tolist() == [75] * 6
    grey = DD.load_image_set(SHARED / "imagenet_sample", 400, 32, seed=0, cache_dir=tmp_path).images
    assert grey.shape == (400, 3, 32, 32)


@needs_shared
def test_real_sample_study_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the file's paths are relative to the repo
    cfg = config.load(ROOT / "params" / "real-sample.yaml")
    plan = grid.plan(cfg)
    summary = runner.execute(plan, tmp_path, device="cpu", workers=2, echo=lambda *_: None)
    assert summary.ok, summary
    df = collect(tmp_path, plan)
    assert len(df) == 4 and df.miou.between(1, 100).all() and df.miou_dataset.between(1, 100).all()


def _tiny_pets(root: Path, broken: bool) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    lines = []
    for i in range(4):
        name = f"Cat_{i}"
        Image.new("RGB", (20, 16), (i * 40, 10, 10)).save(root / "images" / f"{name}.jpg")
        tri = np.full((16, 20), 2, np.uint8)
        tri[4:12, 5:15] = 1
        tri[4, 5:15] = 3
        Image.fromarray(tri).save(root / "annotations" / "trimaps" / f"{name}.png")
        lines.append(f"{name} 1 1 1")
    if broken:
        (root / "images" / "Cat_2.jpg").write_bytes(b"not an image at all")
    for split in ("trainval", "test"):
        (root / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_unreadable_file_stops_with_the_fix_named(tmp_path):
    root = _tiny_pets(tmp_path / "pets", broken=True)
    with pytest.raises(D.DataError, match=r"Cat_2\.jpg.*skip_unreadable"):
        D.load_pets(root, "trainval", 16, cache_dir=tmp_path / "cache")
    report = check("pets", root)
    assert [u["file"] for u in report["unreadable"]] == ["images/Cat_2.jpg"]


def test_skipping_unreadable_files_drops_and_lists_them(tmp_path):
    root = _tiny_pets(tmp_path / "pets", broken=True)
    seg = D.load_pets(root, "trainval", 16, cache_dir=tmp_path / "cache", skip=True)
    assert seg.names == ["Cat_0", "Cat_1", "Cat_3"] and len(seg.images) == 3
    assert seg.skipped == [str(root / "images" / "Cat_2.jpg")]
    assert int(seg.images[2].float().mean()) != 0  # rows stay aligned with their names
    again = D.load_pets(root, "trainval", 16, cache_dir=tmp_path / "cache", skip=True)  # from the cache
    assert again.names == seg.names and again.skipped == seg.skipped


def test_segment_stage_records_skipped_files(tmp_path):
    from studylib.study import stages

    root = _tiny_pets(tmp_path / "pets", broken=True)
    data = {"kind": "real", "pets": str(root), "cache": str(tmp_path / "cache"), "skip_unreadable": True}
    m = stages.segment(
        str(tmp_path / "run"), data=data, settings={"epochs": 1, "batch_size": 2, "test_size": 2}, size=2, device="cpu"
    ).metrics
    assert m["skipped"] == [str(root / "images" / "Cat_2.jpg")]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped"] == m["skipped"]


def test_download_checks_the_checksum_and_unpacks(tmp_path):
    archive = tmp_path / "intel.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("seg_train/seg_train/sea/1.jpg", b"x")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="checksum mismatch"):
        get_archive(archive.as_uri(), tmp_path / "bad", "0" * 64)
    assert not (tmp_path / "bad").exists()
    out = get_archive(archive.as_uri(), tmp_path / "intel", digest)
    assert (out / "seg_train" / "seg_train" / "sea" / "1.jpg").read_bytes() == b"x"
    assert D.intel_split_dir(out, "train").name == "seg_train"


def test_cli_data_check_prints_json(tmp_path, capsys):
    root = _tiny_pets(tmp_path / "pets", broken=False)
    assert cli.main(["data", "check", "pets", str(root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["splits"]["trainval"]["samples"] == 4 and out["trimap_values"] == [1, 2, 3]


def test_get_pets_asks_torchvision_for_images_and_trimaps(tmp_path, monkeypatch):
    import torchvision.datasets

    from studylib.data import download

    calls = []

    class FakePets:
        def __init__(self, root, **kw):
            calls.append((root, kw))

    monkeypatch.setattr(torchvision.datasets, "OxfordIIITPet", FakePets)
    out = download.get_pets(tmp_path)
    assert out == tmp_path / "oxford-iiit-pet"
    assert calls == [(str(tmp_path), {"split": "trainval", "target_types": "segmentation", "download": True})]
