"""One device copy of a group's images (studylib.data.resident): members share it, draw the batches they drew
from their own copies, and its memory goes with the group."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from studylib.data import resident
from studylib.data.resident import Origin
from studylib.data.sources import resolve_data
from studylib.study import stages

DATA = {
    "kind": "synthetic",
    "synth": {"pets": 80, "unlabeled": 24, "intel_train_per_class": 2, "intel_test_per_class": 1},
}
SEGMENT = {"epochs": 1, "batch_size": 4, "test_size": 16}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = {**DATA, "cache": str(tmp_path_factory.mktemp("cache"))}
    resolve_data(d)  # the synthetic folders, written once
    return d


def _store(tmp_path, n=10) -> tuple[np.ndarray, np.ndarray]:
    """A channel-last uint8 store file, memory-mapped, and the array it holds."""
    values = np.random.default_rng(0).integers(0, 256, (n, 4, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "store.npy", values)
    return np.load(tmp_path / "store.npy", mmap_mode="r"), values


def test_two_members_index_one_pool_and_read_their_own_rows(tmp_path):
    mapped, values = _store(tmp_path)
    a = Origin.of(tmp_path / "store.npy", mapped, [7, 2, 5], chw=True)
    with resident.group():
        first = resident.share(a, None, "cpu")
        second = resident.share(a.subset([2, 0]), None, "cpu")  # rows 5 and 7: inside the first member's
        assert first.shared.data_ptr() == second.shared.data_ptr() and len(first.shared) == 3
        assert first.shape == (3, 3, 4, 5) and len(second) == 2
        expect = torch.from_numpy(values.transpose(0, 3, 1, 2).copy())
        assert torch.equal(first[torch.arange(3)], expect[[7, 2, 5]])
        assert torch.equal(second[torch.tensor([1, 0])], expect[[7, 5]])
        other = resident.share(Origin.of(tmp_path / "s.npy", mapped, [2]), None, "cpu")  # another key: channel-last
        assert other.shared.data_ptr() != first.shared.data_ptr() and torch.equal(other[0], torch.from_numpy(values[2]))
        late = resident.share(Origin.of(tmp_path / "store.npy", mapped, [7, 9], chw=True), None, "cpu")
        assert late.shared.data_ptr() != first.shared.data_ptr(), "rows the built pool lacks: a pool of their own"
        assert torch.equal(late[torch.tensor([1])], expect[[9]])


def test_a_groups_pool_is_freed_when_the_group_ends(tmp_path):
    mapped, _ = _store(tmp_path)
    with resident.group():
        view = resident.share(Origin.of(tmp_path / "store.npy", mapped, [1, 3]), None, "cpu")
        tensor = weakref.ref(view.shared)
        assert resident.pools() == 1
    assert resident.pools() == 0, "the registry forgets the group's pools"
    del view
    gc.collect()
    assert tensor() is None, "the device copy goes with the last member that reads it"


def test_a_set_with_no_origin_is_copied_on_its_own():
    host = torch.arange(6, dtype=torch.uint8).view(3, 2)
    assert torch.equal(resident.share(None, host, "cpu"), host)


def _prepare_two(data, tmp_path, tag):
    return [
        stages.prepare_segment(str(tmp_path / f"{tag}{seed}"), "viny-tiny", data, SEGMENT, "", 10, seed, "cpu")
        for seed in (0, 1)
    ]


def _batches(prepared) -> list:
    idx = torch.tensor([3, 0, 9, 4])
    return [p.job.batch(idx, torch.Generator().manual_seed(5)) for p in prepared]


def test_segment_members_share_the_pets_pool_and_draw_the_unshared_batches(data, tmp_path, monkeypatch):
    views = []
    real = resident.share

    def spy(origin, host, device):
        views.append(real(origin, host, device))
        return views[-1]

    monkeypatch.setattr(resident, "share", spy)
    with resident.group():
        shared = _batches(_prepare_two(data, tmp_path, "shared"))
        (img0, mask0), (img1, mask1) = views[0:2], views[2:4]
        assert isinstance(img0, resident.Rows) and img0.shared.data_ptr() == img1.shared.data_ptr()
        assert mask0.shared.data_ptr() == mask1.shared.data_ptr()
        assert len(img0.shared) < len(img0) + len(img1), "the union of the two members' rows, held once"
    monkeypatch.setattr(resident, "share", lambda origin, host, device: host.to(device))  # each its own copy
    alone = _batches(_prepare_two(data, tmp_path, "alone"))
    for (x, y), (x0, y0) in zip(shared, alone):
        assert torch.equal(x, x0) and torch.equal(y, y0)


def test_pretrain_members_share_the_decoded_store(data, tmp_path, monkeypatch):
    views = []
    real = resident.share
    monkeypatch.setattr(resident, "share", lambda *a: views.append(real(*a)) or views[-1])
    settings = {"epochs": 1, "batch_size": 4}
    with resident.group():
        runs = [
            stages.prepare_pretrain(str(tmp_path / f"p{s}"), "viny-tiny", data, settings, n, s, "cpu")
            for s, n in ((0, 12), (0, 8))  # nested subsets of one seed: the second lies inside the first
        ]
        assert views[0].shared.data_ptr() == views[1].shared.data_ptr() and len(views[0].shared) == 12
        idx = torch.tensor([0, 5, 7])
        x, mask = runs[1].job.batch(idx, torch.Generator().manual_seed(1))
    monkeypatch.setattr(resident, "share", lambda origin, host, device: host.to(device))
    p = stages.prepare_pretrain(str(tmp_path / "q"), "viny-tiny", data, settings, 8, 0, "cpu")
    x0, mask0 = p.job.batch(idx, torch.Generator().manual_seed(1))
    assert torch.equal(x, x0) and torch.equal(mask, mask0)


def test_members_whose_loads_grow_the_store_read_their_own_images(data, tmp_path, monkeypatch):
    """Two seeds of one pre-training size, in a fresh cache: the second member's load appends rows to the store
    the first one mapped (the store grows in place), so the pool must read from the longer map: each member's
    batch equals its unshared batch. (It did not: rows past the first map came back as unfilled memory.)"""
    root = str(resolve_data(data).images.parent)  # the synthetic folders already written; a new decoded store
    fresh = {**data, "root": root, "cache": str(tmp_path / "cache")}
    settings, idx = {"epochs": 1, "batch_size": 4}, torch.tensor([0, 3, 9, 11])
    with resident.group():
        runs = [
            stages.prepare_pretrain(str(tmp_path / f"p{s}"), "viny-tiny", fresh, settings, 12, s, "cpu") for s in (0, 1)
        ]
        shared = [r.job.batch(idx, torch.Generator().manual_seed(1)) for r in runs]
    monkeypatch.setattr(resident, "share", lambda origin, host, device: host.to(device))
    for s, (x, mask) in zip((0, 1), shared):
        p = stages.prepare_pretrain(str(tmp_path / f"q{s}"), "viny-tiny", fresh, settings, 12, s, "cpu")
        x0, mask0 = p.job.batch(idx, torch.Generator().manual_seed(1))
        assert torch.equal(x, x0) and torch.equal(mask, mask0), f"seed {s}"


def test_a_row_past_the_maps_is_an_error_not_garbage(tmp_path):
    mapped, _ = _store(tmp_path, n=4)
    with pytest.raises(IndexError, match="past the 4 rows"):
        Origin.of(tmp_path / "store.npy", mapped, [1, 6]).read(np.array([1, 6]))


# ---------------------------------------------------------------- memory per group (study plan --estimate)

REAL = {"kind": "real", "pets": "/nonexistent/pets", "intel": "", "images": ""}  # the published list sizes


def _segment_runs(n: int, size: int = 100) -> list:
    from studylib.study.grid import Run

    settings = {"epochs": 10, "test_size": 30, "batch_size": 8}
    return [
        Run("segment", {"model": "viny-tiny", "data": REAL, "settings": settings, "size": size, "seed": s})
        for s in range(n)
    ]


def test_group_memory_equals_a_hand_count():
    from studylib.study import estimate as E

    runs = _segment_runs(3)
    # viny-tiny: S 64, N 64 tokens, dim 64, depth 4, heads 4, inner 128, MLP hidden 256
    per_image = 4 * 3 * 64**2 + 4 * 64 * (4 * 128 + 2 * 4 * 64 + 4 * 64 + 2 * 256)  # 507,904 floats kept
    member = 16 * 294_400 + 8 * per_image * 4  # weights, grads, AdamW moments + batch 8 of fp32 activations
    assert per_image == 507_904 and E.member_bytes(runs[0]) == member == 20_963_328
    assert E.image_bytes(runs[0]) == 4 * 64 * 64  # uint8 RGB and the trimap
    fused = E.group_memory(runs, fused=True)
    assert fused["device_bytes"] == 300 * 16_384 + 3 * member == 67_805_184  # images once, every member
    assert fused["host_bytes"] == 2 * 100 * 16_384
    assert E.group_memory(runs, fused=False)["device_bytes"] == 100 * 16_384 + member  # one member at a time
    pre = _segment_runs(1)[0]
    pre = type(pre)("pretrain", {**pre.params, "settings": {"epochs": 1}})
    assert E.image_bytes(pre) == 3 * 72 * 144  # short side 64 x 1.125, long side twice that


def test_an_automatic_group_size_is_capped_to_fit_the_device():
    from studylib.study import estimate as E
    from studylib.study.config import EngineConfig

    runs = _segment_runs(5)
    # two members: 200 images x 16,384 + 2 x 20,963,328 = 45,203,456 bytes fit in 50 MB; three (67.8 MB) do not
    assert E.fitting_size(runs, 32, True, 50_000_000) == 2
    assert E.fitting_size(runs, 32, True, None) == 32 and E.fitting_size(runs, 32, True, 1) == 1
    groups = E.fitted_schedule(runs, EngineConfig(), "cuda", 1, memory=50_000_000)
    assert sorted(len(g.runs) for g in groups) == [1, 2, 2]
    assert [len(g.runs) for g in E.fitted_schedule(runs, EngineConfig(), "cuda", 1)] == [5], "unknown memory: as before"
    fixed = E.fitted_schedule(runs, EngineConfig(group_size=4), "cuda", 1, memory=50_000_000)
    assert sorted(len(g.runs) for g in fixed) == [2, 3], "an explicit group size is kept"
    table = E.memory_table(fixed, True, 50_000_000)
    assert table["too_big"].tolist() == [1] and "do not fit" in E.format_memory(table, 50_000_000, "cuda")
