"""The decoders (studylib.data.decoders) and the device path of the study's data loading: a CUDA device decodes
with nvJPEG into a store of the same format (its own, named so), anything else with PIL as before. No GPU here:
nvJPEG is mocked by a PIL-exact stand-in, so the stores must come out equal, bit for bit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from studylib.data import decoded as DD
from studylib.data import decoders as DEC
from studylib.data import readers as R
from studylib.data import resident
from studylib.data.sources import resolve_data
from studylib.data.splits import segmentation_split
from studylib.study import groups
from studylib.study.config import SegmentConfig

DATA = {"kind": "synthetic", "synth": {"pets": 40, "unlabeled": 12, "intel_train_per_class": 2}}
S = 32


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return resolve_data({**DATA, "cache": str(tmp_path_factory.mktemp("cache"))})


@pytest.fixture
def mock_gpu(monkeypatch):
    """CUDA 'available' and nvJPEG replaced by PIL's own decode (exact): -> the devices it was called with."""
    calls = []

    def decode_jpegs(files, geometry, device):
        calls.append(device)
        return [(img, np.broadcast_to(hw, (2,)).astype(np.int32)) for img, hw, _ in map(_pil(geometry), files)]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(DEC, "decode_jpegs", decode_jpegs)
    return calls


def _pil(geometry):
    return lambda f: DEC.decode_pil(Path(f), geometry)


def _never(*args, **kw):
    raise AssertionError("the nvJPEG path was taken on the CPU")


def test_the_decoder_follows_the_device(monkeypatch):
    assert DEC.decoder_for("cpu") == "pil" and DEC.decoder_for(torch.device("cpu")) == "pil"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="available 'cuda'"):
            DEC.decoder_for("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert DEC.decoder_for("cuda:1") == "nvjpeg" and DEC.gpu_of("cuda:1") == "cuda:1"
    assert DEC.study_device() == "cpu"
    with DEC.using_device(torch.device("cuda", 0)):
        assert DEC.study_device() == "cuda:0" and DEC.study_device("cpu") == "cpu"
    assert DEC.study_device() == "cpu"


def test_pets_on_cuda_decode_with_nvjpeg_into_an_equal_store_of_their_own(paths, tmp_path, mock_gpu):
    cpu = R.load_pets(paths.pets, "trainval", S, cache_dir=tmp_path, device="cpu")
    assert not mock_gpu, "the CPU decodes with PIL"
    gpu = R.load_pets(paths.pets, "trainval", S, cache_dir=tmp_path, device="cuda:0")
    assert mock_gpu and set(mock_gpu) == {"cuda:0"}, "decoded on the study's CUDA device"
    names = sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.glob("*.npy"))
    assert names == ["pets-img", "pets-img-nvjpeg", "pets-trimap"], "the file says which decoder wrote it"
    assert torch.equal(cpu.images, gpu.images) and torch.equal(cpu.masks, gpu.masks) and cpu.names == gpu.names
    again = R.load_pets(paths.pets, "trainval", S, cache_dir=tmp_path, device="cuda:0")  # from its own cache
    assert len(mock_gpu) == 1 and torch.equal(again.images, gpu.images)


def test_the_split_and_the_image_store_take_the_groups_device(paths, tmp_path, mock_gpu, monkeypatch):
    with DEC.using_device("cuda"):  # what run_group sets for a CUDA group
        train, test = segmentation_split(replace(paths, cache=tmp_path), SegmentConfig(test_size=8), 6, 0, S)
        found = DD.load_image_set(paths.images, 6, S, seed=0, cache_dir=tmp_path, max_aspect=2.0)
    assert mock_gpu.count("cuda") >= 3, "trainval, test and the unlabeled images by nvJPEG"
    key = DD.read_index(DD.Store(paths.images, DEC.Geometry(S, 2.0), "nvjpeg", tmp_path)).get("key")
    assert key["decoder"] == "nvjpeg", "the store's index records its decoder"
    monkeypatch.setattr(DEC, "decode_jpegs", _never)
    pil = DD.load_image_set(paths.images, 6, S, seed=0, cache_dir=tmp_path, max_aspect=2.0)  # outside: PIL
    assert torch.equal(pil.images, found.images) and torch.equal(pil.sizes, found.sizes)


def test_the_cpu_path_never_touches_nvjpeg(paths, tmp_path, monkeypatch):
    monkeypatch.setattr(DEC, "decode_jpegs", _never)
    R.load_pets(paths.pets, "test", S, cache_dir=tmp_path)
    R.load_intel(paths.intel, "train", S, cache_dir=tmp_path)
    DD.load_image_set(paths.images, 4, S, seed=1, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*nvjpeg*"))


def test_run_group_sets_the_decode_device_and_frees_the_pools(monkeypatch):
    """Each member of a group loads its data for the group's device, and the pools it made go with the group."""
    seen, held = [], []

    def stage(**kw):
        seen.append((DEC.study_device(), resident.pools()))
        held.append(resident.share(resident.Origin.of("f", np.zeros((2, 1, 1, 3), np.uint8), [1]), None, "cpu"))

    monkeypatch.setitem(groups.stages.STAGE, "segment", stage)
    groups.run_group("segment", [{"run_dir": ""}, {"run_dir": ""}], device="cpu")
    assert seen == [("cpu", 0), ("cpu", 1)], "the second member finds the first one's pool"
    assert resident.pools() == 0 and DEC.study_device() == "cpu"
    monkeypatch.setattr(groups, "resolve_device", lambda device: torch.device("cuda", 0))
    groups.run_group("segment", [{"run_dir": ""}], device="cuda")  # one member: no fused path
    assert seen[-1] == ("cuda:0", 0)
