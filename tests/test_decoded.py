"""The decoded-image store (studylib.data.decoded): the same tensors as decoding the chosen files directly,
one decode per file whatever the subset size and seed, the same store from 1 and 2 workers, interrupted
builds, unreadable files, and the GPU path's geometry (run on the CPU here)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studylib.data import decoded as DD
from studylib.data import decoders as DEC
from studylib.data import readers as D
from studylib.data.decoded import Decoded
from studylib.data.readers import DataError

ROOT = Path(__file__).resolve().parent.parent
IMAGENET = ROOT.parent / "shared" / "data" / "imagenet_sample"
S = 16
# the real decoders, for the independent decode (tests count calls by replacing them in the module)
DECODE_SQUARE, DECODE_ASPECT, VALID_SIZE = DEC.decode_image, DEC.decode_image_aspect, DEC.image_valid_size

# (width, height) of the synthetic images: landscape, portrait, square, 4:1, and smaller than S
SHAPES = [(40, 30), (30, 40), (24, 24), (64, 16), (12, 9), (50, 37), (37, 50), (20, 35)]


def _smooth(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A random smooth image (a JPEG of it decodes much as a photo does)."""
    small = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC).convert(mode)


def _write(root: Path, n: int) -> list[Path]:
    """n images in two sub-folders, as JPEG, PNG and a grey JPEG, of the shapes above in turn."""
    out = []
    for i in range(n):
        w, h = SHAPES[i % len(SHAPES)]
        path = root / f"n{i % 2:02d}" / f"img-{i:03d}.{'png' if i % 5 == 4 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        _smooth(w, h, i, "L" if i % 7 == 6 else "RGB").save(path, quality=90)
        out.append(path)
    return out


@pytest.fixture
def folder(tmp_path) -> Path:
    _write(tmp_path / "images", 12)
    return tmp_path / "images"


@pytest.fixture
def counted(monkeypatch) -> dict:
    """Counts the PIL decodes (those done in this process: few rows are decoded without a pool)."""
    calls = {"aspect": 0, "square": 0}
    aspect, square = DEC.decode_image_aspect, DEC.decode_image

    def count_aspect(*a, **k):
        calls["aspect"] += 1
        return aspect(*a, **k)

    def count_square(*a, **k):
        calls["square"] += 1
        return square(*a, **k)

    monkeypatch.setattr(DEC, "decode_image_aspect", count_aspect)
    monkeypatch.setattr(DEC, "decode_image", count_square)
    return calls


def _independent(folder: Path, n: int, size: int, seed: int, max_aspect: float | None):
    """What load_image_set must return, decoded straight from the files nested_subset picks."""
    paths = D.list_images(folder)
    order = sorted(D.nested_subset(len(paths), n, seed))
    chosen = [paths[i] for i in order]
    if max_aspect is None:
        imgs = [DECODE_SQUARE(p, size) for p in chosen]
        sizes = [np.array([size, size]) for _ in chosen]
    else:
        imgs = [DECODE_ASPECT(p, size, max_aspect) for p in chosen]
        sizes = [VALID_SIZE(p, size, max_aspect) for p in chosen]
    images = torch.from_numpy(np.stack(imgs).transpose(0, 3, 1, 2).copy())
    return images, torch.tensor(order), torch.from_numpy(np.stack(sizes).astype(np.int64))


def _assert_same(got: D.ImageSet, want) -> None:
    images, labels, sizes = want
    assert got.images.dtype == torch.uint8 and got.images.is_contiguous()
    assert torch.equal(got.images, images) and torch.equal(got.labels, labels) and torch.equal(got.sizes, sizes)
    assert got.skipped == [] and got.sizes.dtype == torch.int64


def _index_file(cache: Path) -> Path:
    (file,) = cache.glob("*.json")
    return file


def _index(cache: Path) -> dict:
    return json.loads(_index_file(cache).read_text())


# ------------------------------------------------------------------------------------------ same tensors


@pytest.mark.parametrize("max_aspect", [None, 1.0, 2.0])
@pytest.mark.parametrize("n, seed", [(12, 0), (7, 1), (3, 2)])
def test_the_same_tensors_as_decoding_the_chosen_files(folder, tmp_path, max_aspect, n, seed):
    got = DD.load_image_set(folder, n, S, seed, cache_dir=tmp_path / "cache", max_aspect=max_aspect)
    _assert_same(got, _independent(folder, n, S, seed, max_aspect))


def test_rows_come_from_one_store_in_first_asked_order(folder, tmp_path):
    cache = tmp_path / "cache"
    for n, seed in [(4, 0), (9, 1), (12, 2), (5, 3)]:
        got = DD.load_image_set(folder, n, S, seed, cache_dir=cache, max_aspect=2.0)
        _assert_same(got, _independent(folder, n, S, seed, 2.0))
    npys = sorted(cache.glob("*.npy"))  # the images and their sizes, generation 1
    assert [p.name.rsplit("-", 1)[0] for p in npys] == ["images-aspect", "images-aspect-sizes"]
    assert all(p.name.endswith(".1.npy") for p in npys)
    index = _index(cache)
    assert index["rows"] == 12 and len(set(index["names"])) == 12
    stored = np.load(npys[0], mmap_mode="r")
    assert stored.shape[0] >= 12 and stored.shape[1:] == (S, 2 * S, 3)


@pytest.mark.skipif(not IMAGENET.is_dir(), reason="../shared/data is not beside the project")
def test_the_same_tensors_on_the_real_imagenet_sample(tmp_path):
    cache = tmp_path / "cache"
    for n, seed in [(60, 0), (120, 1)]:
        got = DD.load_image_set(IMAGENET, n, 24, seed, cache_dir=cache, max_aspect=2.0)
        _assert_same(got, _independent(IMAGENET, n, 24, seed, 2.0))


# ------------------------------------------------------------------------------------------ decode once


def test_a_nested_subset_or_another_seed_decodes_nothing_new(folder, tmp_path, counted):
    cache = tmp_path / "cache"
    DD.load_image_set(folder, 12, S, 0, cache_dir=cache, max_aspect=2.0)
    assert counted["aspect"] == 12
    (array,) = cache.glob("images-aspect-[0-9a-f]*.npy")
    before = (array.stat().st_mtime_ns, _index_file(cache).stat().st_mtime_ns)
    for n, seed in [(5, 0), (12, 1), (3, 7)]:
        got = DD.load_image_set(folder, n, S, seed, cache_dir=cache, max_aspect=2.0)
        _assert_same(got, _independent(folder, n, S, seed, 2.0))
    assert counted["aspect"] == 12
    assert (array.stat().st_mtime_ns, _index_file(cache).stat().st_mtime_ns) == before


def test_the_store_is_extended_by_the_files_not_yet_decoded(folder, tmp_path, counted):
    cache = tmp_path / "cache"
    paths = D.list_images(folder)
    seen: set[int] = set()
    for n, seed in [(3, 0), (6, 0), (6, 1), (4, 2), (12, 0)]:
        DD.load_image_set(folder, n, S, seed, cache_dir=cache)
        seen |= set(D.nested_subset(len(paths), n, seed).tolist())
        assert counted["square"] == len(seen) == _index(cache)["rows"]


def test_square_and_aspect_stores_and_resolutions_are_apart(folder, tmp_path, counted):
    cache = tmp_path / "cache"
    DD.load_image_set(folder, 12, S, 0, cache_dir=cache, max_aspect=2.0)
    DD.load_image_set(folder, 12, S, 0, cache_dir=cache)
    DD.load_image_set(folder, 12, 8, 0, cache_dir=cache)
    assert counted == {"aspect": 12, "square": 24}
    assert len(list(cache.glob("*.json"))) == 3 and len(list(cache.glob("*.npy"))) == 4


def test_concurrent_callers_share_one_store(folder, tmp_path):
    cache, errors = tmp_path / "cache", []

    def load(seed):
        try:
            _assert_same(
                DD.load_image_set(folder, 9, S, seed, cache_dir=cache, max_aspect=2.0),
                _independent(folder, 9, S, seed, 2.0),
            )
        except BaseException as e:  # reported below, from the main thread
            errors.append(e)

    threads = [threading.Thread(target=load, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    index = _index(cache)
    assert index["rows"] == len(set(index["names"])) <= 12


# ------------------------------------------------------------------------------------------ workers


def test_one_and_two_workers_build_the_same_store(tmp_path, monkeypatch):
    files = _write(tmp_path / "many", 48)
    files[10].write_bytes(b"not an image at all" * 10)
    pools = []
    real_pool = DEC.ProcessPoolExecutor

    def pool(workers, **kw):
        pools.append(workers)
        return real_pool(workers, **kw)

    monkeypatch.setattr(DEC, "ProcessPoolExecutor", pool)
    stores = {}
    for workers in (1, 2):
        cache = tmp_path / f"cache{workers}"
        found = DD.decoded_rows(tmp_path / "many", files, S, 2.0, cache, skip=True, workers=workers)
        assert list(found.unreadable) == [10] and "img-010" in found.unreadable[10]
        keep = [i for i in range(48) if i != 10]
        stores[workers] = (found.chw(keep), found.valid_sizes(keep), _index(cache))
    assert pools == [2], "the two-worker build did not use a pool of two"
    one, two = stores[1], stores[2]
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1]) and one[2] == two[2]
    for k, i in enumerate(i for i in range(48) if i != 10):
        assert np.array_equal(one[0][k], DECODE_ASPECT(files[i], S, 2.0).transpose(2, 0, 1))


def test_a_failing_worker_fails_the_build_and_commits_nothing(tmp_path, monkeypatch):
    files = _write(tmp_path / "many", 48)
    real = DEC.decode_image_aspect

    def fails(path, *a, **k):
        if Path(path).name == "img-030.jpg":
            raise RuntimeError("disk gone")
        return real(path, *a, **k)

    monkeypatch.setattr(DEC, "decode_image_aspect", fails)  # the forked workers inherit it
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="disk gone"):
        DD.decoded_rows(tmp_path / "many", files, S, 2.0, cache, workers=2)
    assert not list(cache.glob("*.json"))
    monkeypatch.setattr(DEC, "decode_image_aspect", real)
    found = DD.decoded_rows(tmp_path / "many", files, S, 2.0, cache, workers=2)
    assert np.array_equal(found.chw([30])[0], real(files[30], S, 2.0).transpose(2, 0, 1))


# ------------------------------------------------------------------------------------------ interruptions


def _interrupt_after(monkeypatch, calls: int) -> None:
    real, seen = DEC.decode_image_aspect, [0]

    def decode(*a, **k):
        seen[0] += 1
        if seen[0] > calls:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(DEC, "decode_image_aspect", decode)


def test_an_interrupted_build_leaves_no_finished_store(folder, tmp_path, monkeypatch, counted):
    cache = tmp_path / "cache"
    _interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        DD.load_image_set(folder, 12, S, 0, cache_dir=cache, max_aspect=2.0)
    assert counted["aspect"] == 5 and not list(cache.glob("*.json")), "a half store looks finished"
    monkeypatch.undo()
    got = DD.load_image_set(folder, 12, S, 0, cache_dir=cache, max_aspect=2.0)
    _assert_same(got, _independent(folder, 12, S, 0, 2.0))
    assert len(list(cache.glob("*.npy"))) == 2


def test_an_interrupted_extension_keeps_the_committed_rows(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    DD.load_image_set(folder, 4, S, 0, cache_dir=cache, max_aspect=2.0)
    committed = _index(cache)
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        DD.load_image_set(folder, 12, S, 0, cache_dir=cache, max_aspect=2.0)
    assert _index(cache) == committed
    monkeypatch.undo()
    calls = [0]
    real = DEC.decode_image_aspect

    def count(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(DEC, "decode_image_aspect", count)
    got = DD.load_image_set(folder, 12, S, 0, cache_dir=cache, max_aspect=2.0)
    assert calls[0] == 8  # only the rows the interrupted call did not commit
    monkeypatch.undo()
    _assert_same(got, _independent(folder, 12, S, 0, 2.0))


def test_a_changed_file_rebuilds_the_store_as_a_new_generation(folder, tmp_path, counted):
    cache = tmp_path / "cache"
    DD.load_image_set(folder, 12, S, 0, cache_dir=cache, max_aspect=2.0)
    old = DD.load_image_set(folder, 12, S, 0, cache_dir=cache, max_aspect=2.0)
    src = D.list_images(folder)[3]
    _smooth(40, 30, 99).save(src, quality=90, format="PNG" if src.suffix == ".png" else "JPEG")
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    got = DD.load_image_set(folder, 12, S, 0, cache_dir=cache, max_aspect=2.0)
    assert counted["aspect"] == 24
    _assert_same(got, _independent(folder, 12, S, 0, 2.0))
    assert not torch.equal(got.images[3], old.images[3]) and torch.equal(got.images[4], old.images[4])
    npys = list(cache.glob("*.npy"))  # the first generation's files are gone
    assert _index(cache)["generation"] == 2 and len(npys) == 2 and {p.name.split(".")[-2] for p in npys} == {"2"}


# ------------------------------------------------------------------------------------------ unreadable files


def test_an_unreadable_file_is_an_error_naming_it_or_is_recorded(folder, tmp_path, counted):
    cache = tmp_path / "cache"
    (folder / "n01" / "broken.jpg").write_bytes(b"\x00 not a JPEG \xff" * 30)
    with pytest.raises(DataError) as e:
        DD.load_image_set(folder, 13, S, 0, cache_dir=cache, max_aspect=2.0)
    assert "broken.jpg" in str(e.value) and "skip_unreadable" in str(e.value)
    assert counted["aspect"] == 13  # the readable ones are kept in the store all the same
    s = DD.load_image_set(folder, 13, S, 0, cache_dir=cache, skip=True, max_aspect=2.0)
    assert counted["aspect"] == 13
    assert [Path(f).name for f in s.skipped] == ["broken.jpg"] and len(s.images) == len(s.sizes) == 12
    ((row, reason),) = _index(cache)["unreadable"]
    assert "broken.jpg" in reason
    with pytest.raises(DataError, match="broken.jpg"):  # without skip, still an error when read from the store
        DD.load_image_set(folder, 13, S, 0, cache_dir=cache, max_aspect=2.0)


def test_no_readable_file_at_all(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 3 files"):
        DD.load_image_set(root, 3, S, 0, cache_dir=tmp_path / "cache", skip=True)


def test_zero_images_builds_no_store(folder, tmp_path):
    s = DD.load_image_set(folder, 0, S, 0, cache_dir=tmp_path / "cache", max_aspect=2.0)
    assert s.images.shape == (0, 3, S, 2 * S) and s.sizes.shape == (0, 2)
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------ the GPU path


@pytest.mark.parametrize("max_aspect", [None, 2.0])
def test_torch_decode_path_on_the_cpu_is_close_to_pil(tmp_path, max_aspect):
    root = tmp_path / "jpegs"
    root.mkdir()
    files = []
    for i, (w, h) in enumerate([(200, 150), (150, 200), (96, 96), (256, 64), (60, 45)]):
        files.append(root / f"{i}.jpg")
        _smooth(w, h, i).save(files[-1], quality=95)
    geometry = DEC.Geometry(32, max_aspect)
    for file, got in zip(files, DEC.decode_jpegs(files, geometry, device="cpu")):
        img, hw, reason = DEC.decode_pil(file, geometry)
        hw = np.broadcast_to(hw, (2,))
        assert reason is None and got is not None
        assert got[0].shape == img.shape and got[0].dtype == np.uint8
        assert np.array_equal(got[1], hw)
        h, w = (hw[0], hw[1]) if hw[0] <= hw[1] else (hw[1], hw[0])  # stored with the long side along the width
        diff = np.abs(got[0][:h, :w].astype(int) - img[:h, :w].astype(int))
        assert diff.mean() < 3, f"{file.name}: mean abs difference {diff.mean():.2f} grey levels"


def test_torch_decode_path_leaves_non_jpegs_and_truncated_files_to_pil(tmp_path):
    png, cut, good = tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "c.jpg"
    _smooth(40, 30, 0).save(png, format="PNG")
    _smooth(40, 30, 1).save(good, quality=90)
    cut.write_bytes(good.read_bytes()[:300])
    got = DEC.decode_jpegs([png, cut, good], DEC.Geometry(S, 2.0), device="cpu")
    assert got[0] is None and got[1] is None and got[2] is not None


def _photos(root: Path) -> list[Path]:
    """Photo-sized JPEGs (downscaled, as ImageNet's are), one PNG named .jpg and one unreadable file."""
    root.mkdir(parents=True)
    files = []
    for i, (w, h) in enumerate([(200, 150), (150, 200), (96, 96), (256, 64), (120, 90)] * 4):
        files.append(root / f"{i:02d}.jpg")
        _smooth(w, h, i, "L" if i == 7 else "RGB").save(files[-1], format="PNG" if i == 3 else "JPEG", quality=90)
    files[5].write_bytes(b"\xff\xd8\xff not really a JPEG \xff\xd9")
    return files


def _compare_with_pil(tmp_path: Path, files: list[Path], gpu: Decoded) -> None:
    pil = DD.decoded_rows(files[0].parent, files, 32, 2.0, tmp_path / "pil", skip=True, workers=1)
    assert _index(tmp_path / "pil")["key"]["decoder"] == "pil"
    assert list(gpu.unreadable) == list(pil.unreadable) == [5]
    keep = [i for i in range(len(files)) if i != 5]
    assert np.array_equal(pil.valid_sizes(keep), gpu.valid_sizes(keep))
    assert np.array_equal(pil.chw([3]), gpu.chw([3])), "the PNG is PIL's decode on both paths"
    diffs = np.abs(pil.chw(keep).astype(int) - gpu.chw(keep).astype(int)).mean(axis=(1, 2, 3))
    assert diffs.mean() < 3 and diffs.max() < 6, f"mean abs differences per image: {diffs.round(2).tolist()}"


def test_the_gpu_store_path_runs_on_the_cpu(tmp_path, monkeypatch):
    """The nvJPEG build (batches, PIL fallback, unreadable files) with torchvision's CPU decoder in its place."""
    files = _photos(tmp_path / "photos")
    real = DEC.decode_jpegs
    monkeypatch.setattr(DEC, "decoder_for", lambda device, files=(): "nvjpeg")
    monkeypatch.setattr(DEC, "decode_jpegs", lambda files, geometry, device: real(files, geometry, "cpu"))
    gpu = DD.decoded_rows(files[0].parent, files, 32, 2.0, tmp_path / "gpu", skip=True)
    assert _index(tmp_path / "gpu")["key"]["decoder"] == "nvjpeg"
    monkeypatch.undo()  # the PIL store to compare with
    _compare_with_pil(tmp_path, files, gpu)


def test_auto_picks_pil_without_cuda(folder, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    files = D.list_images(folder)
    found = DD.decoded_rows(folder, files, S, 2.0, tmp_path / "cache", skip=True, device="auto")
    assert _index(tmp_path / "cache")["key"]["decoder"] == "pil" and len(found.rows) == 12
    with pytest.raises(ValueError, match="cuda"):
        DD.decoded_rows(folder, files, S, 2.0, tmp_path / "cache", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_nvjpeg_store_is_close_to_the_pil_store(tmp_path):
    files = _photos(tmp_path / "photos")
    gpu = DD.decoded_rows(files[0].parent, files, 32, 2.0, tmp_path / "gpu", skip=True, device="cuda")
    assert _index(tmp_path / "gpu")["key"]["decoder"] == "nvjpeg"
    _compare_with_pil(tmp_path, files, gpu)
