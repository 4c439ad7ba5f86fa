"""Dataset readers on tiny hand-made folders in the official layouts, and the decoded-image cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studylib.data import decoded as DD
from studylib.data import decoders as DEC
from studylib.data import readers as D
from studylib.data.readers import DataError

S = 8  # study resolution used throughout (sources are 16 px)


def _solid(color, size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), tuple(color))


def _save(img: Image.Image, path: Path, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


# ------------------------------------------------------------------------------------------ Oxford-IIIT Pet

# name, class id (1..37), encoding, colour; the first three are trainval, the last two test
PETS = [
    ("Abyssinian_1", 1, "JPEG", (200, 40, 40)),
    ("Bengal_2", 6, "PNG", (40, 200, 40)),  # PNG bytes under a .jpg name
    ("beagle_3", 13, "GIF", (40, 40, 200)),  # GIF bytes under a .jpg name
    ("boxer_4", 14, "JPEG", (120, 120, 120)),
    ("Persian_5", 24, "PNG", (250, 250, 10)),
]


def _trimap(k: int) -> np.ndarray:
    """16x16: top half pet (1), bottom-left background (2), bottom-right boundary (3); image k shifts rows."""
    t = np.full((16, 16), 1, np.uint8)
    t[8:, :8] = 2
    t[8:, 8:] = 3
    if k % 2:
        t = t[::-1].copy()
    return t


def _expected_mask(k: int) -> np.ndarray:
    return _trimap(k)[::2, ::2] - 1


def make_pets(root: Path) -> Path:
    for k, (name, _, fmt, color) in enumerate(PETS):
        _save(_solid(color), root / "images" / f"{name}.jpg", fmt)
        _save(Image.fromarray(_trimap(k), mode="L"), root / "annotations" / "trimaps" / f"{name}.png", "PNG")
    header = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n"
    lines = [f"{name} {cid} 1 {cid}" for name, cid, _, _ in PETS]
    (root / "annotations" / "trainval.txt").write_text(header + "\n".join(lines[:3]) + "\n")
    (root / "annotations" / "test.txt").write_text(header + "\n".join(lines[3:]) + "\n\n")
    return root


@pytest.fixture
def pets(tmp_path) -> Path:
    return make_pets(tmp_path / "pets")


def _colors(images: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in img[:, S // 2, S // 2]) for img in images]


def _close(a, b, tol=6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def test_load_pets_trainval_and_test(pets, tmp_path):
    cache = tmp_path / "cache"
    tv = D.load_pets(pets, "trainval", S, cache_dir=cache)
    te = D.load_pets(pets, "test", S, cache_dir=cache)
    assert len(tv) == 3 and len(te) == 2
    assert tv.names == ["Abyssinian_1", "Bengal_2", "beagle_3"]
    assert te.names == ["boxer_4", "Persian_5"]
    assert tv.labels.tolist() == [0, 5, 12] and te.labels.tolist() == [13, 23]
    assert tv.labels.dtype == torch.long
    assert tv.images.shape == (3, 3, S, S) and tv.images.dtype == torch.uint8
    assert tv.masks.shape == (3, S, S) and tv.masks.dtype == torch.uint8
    assert te.images.shape == (2, 3, S, S)
    # decoded by content: JPEG approximately, PNG and GIF exactly
    for got, (_, _, fmt, color) in zip(_colors(tv.images) + _colors(te.images), PETS):
        assert _close(got, color, 0 if fmt != "JPEG" else 6), (got, color)
    # trimap values 1, 2, 3 -> classes 0, 1, 2, at the right pixels
    for k in range(3):
        assert np.array_equal(tv.masks[k].numpy(), _expected_mask(k))
    for k in range(2):
        assert np.array_equal(te.masks[k].numpy(), _expected_mask(3 + k))
    assert set(tv.masks.unique().tolist()) == {0, 1, 2}


def test_load_pets_subset(pets, tmp_path):
    tv = D.load_pets(pets, "trainval", S, cache_dir=tmp_path / "cache")
    sub = tv.subset([2, 0])
    assert sub.names == ["beagle_3", "Abyssinian_1"]
    assert sub.labels.tolist() == [12, 0]
    assert torch.equal(sub.images[0], tv.images[2]) and torch.equal(sub.masks[1], tv.masks[0])


def test_load_pets_torchvision_layout(tmp_path):
    make_pets(tmp_path / "tv" / "oxford-iiit-pet")
    tv = D.load_pets(tmp_path / "tv", "trainval", S, cache_dir=tmp_path / "cache")
    assert tv.names == ["Abyssinian_1", "Bengal_2", "beagle_3"]
    assert tv.images.shape == (3, 3, S, S)


def test_load_pets_without_the_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="Oxford-IIIT Pet"):
        D.load_pets(tmp_path / "empty", "trainval", S, cache_dir=tmp_path / "cache")


def test_load_pets_missing_split_file(pets, tmp_path):
    (pets / "annotations" / "test.txt").unlink()
    with pytest.raises(DataError, match="test.txt"):
        D.load_pets(pets, "test", S, cache_dir=tmp_path / "cache")


def test_load_pets_missing_image(pets, tmp_path):
    (pets / "images" / "Bengal_2.jpg").unlink()
    with pytest.raises(DataError, match="Bengal_2"):
        D.load_pets(pets, "trainval", S, cache_dir=tmp_path / "cache")


def test_trimap_with_a_bad_value_is_rejected(pets, tmp_path):
    bad = _trimap(0)
    bad[0, 0] = 7
    _save(Image.fromarray(bad, mode="L"), pets / "annotations" / "trimaps" / "Bengal_2.png", "PNG")
    with pytest.raises(DataError) as e:
        D.load_pets(pets, "trainval", 16, cache_dir=tmp_path / "cache")
    assert "Bengal_2.png" in str(e.value) and "7" in str(e.value)


def test_unreadable_pets_image_names_the_file(pets, tmp_path):
    (pets / "images" / "beagle_3.jpg").write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(DataError, match="beagle_3.jpg"):
        D.load_pets(pets, "trainval", S, cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------------ Intel scenes

INTEL = {"street": (10, 10, 10), "buildings": (90, 90, 90), "forest": (20, 160, 20)}


@pytest.mark.parametrize("kaggle", [True, False])
def test_load_intel_layouts_and_sorted_classes(tmp_path, kaggle):
    root = tmp_path / "intel"
    base = root / "seg_train" / "seg_train" if kaggle else root / "seg_train"
    counts = {"street": 2, "buildings": 1, "forest": 3}
    for cls in ("street", "buildings", "forest"):  # created out of order on purpose
        for i in range(counts[cls]):
            _save(_solid(INTEL[cls]), base / cls / f"{i}.jpg", "PNG")
    (base / "forest" / "notes.txt").write_text("not an image")
    d = D.load_intel(root, "train", S, cache_dir=tmp_path / "cache")
    assert d.classes == ["buildings", "forest", "street"]
    assert d.labels.tolist() == [0, 1, 1, 1, 2, 2]
    assert d.images.shape == (6, 3, S, S) and d.images.dtype == torch.uint8
    for img, label in zip(d.images, d.labels):
        assert tuple(img[:, 0, 0].tolist()) == INTEL[d.classes[label]]


def test_intel_missing_split(tmp_path):
    (tmp_path / "intel" / "seg_train").mkdir(parents=True)
    with pytest.raises(DataError, match="seg_test"):
        D.load_intel(tmp_path / "intel", "test", S, cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------------ unlabeled images

# file (relative), encoding, grey level: upper/mixed-case extensions, nesting, and non-image files
UNLABELED = [
    ("n01/a.JPEG", "PNG", 10),
    ("n01/b.jpeg", "PNG", 40),
    ("n02/deep/c.png", "PNG", 70),
    ("d.PNG", "PNG", 100),
    ("n03/e.Jpg", "PNG", 130),
    ("n03/f.bmp", "BMP", 160),
]


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "imagenet"
    for rel, fmt, v in UNLABELED:
        _save(_solid((v, v, v)), root / rel, fmt)
    (root / "n01" / "labels.csv").write_text("a,1\n")
    (root / "README").write_text("readme")
    return root


def _greys(images: torch.Tensor) -> set[int]:
    return {int(img[0, 0, 0]) for img in images}


def test_list_images_is_recursive_and_case_insensitive(folder):
    found = D.list_images(folder)
    assert [p.relative_to(folder).as_posix() for p in found] == sorted(rel for rel, _, _ in UNLABELED)


def test_load_images_all(folder, tmp_path):
    x = DD.load_image_set(folder, 6, S, seed=0, cache_dir=tmp_path / "cache").images
    assert x.shape == (6, 3, S, S) and x.dtype == torch.uint8
    assert _greys(x) == {v for _, _, v in UNLABELED}


def test_subsets_are_nested(folder, tmp_path):
    cache = tmp_path / "cache"
    for seed in (0, 1, 2):
        three = _greys(DD.load_image_set(folder, 3, S, seed=seed, cache_dir=cache).images)
        five = _greys(DD.load_image_set(folder, 5, S, seed=seed, cache_dir=cache).images)
        assert len(three) == 3 and len(five) == 5
        assert three <= five
    picks = {frozenset(_greys(DD.load_image_set(folder, 3, S, seed=s, cache_dir=cache).images)) for s in range(6)}
    assert len(picks) > 1, "the subset does not depend on the seed"


def test_nested_subset_is_a_prefix():
    big = D.nested_subset(100, 50, seed=3)
    assert np.array_equal(D.nested_subset(100, 20, seed=3), big[:20])
    assert len(set(big.tolist())) == 50


def test_zero_images_is_an_empty_batch(folder, tmp_path):
    x = DD.load_image_set(folder, 0, S, seed=0, cache_dir=tmp_path / "cache").images
    assert x.shape == (0, 3, S, S) and x.dtype == torch.uint8


def test_too_many_images_requested(folder, tmp_path):
    with pytest.raises(DataError) as e:
        DD.load_image_set(folder, 7, S, seed=0, cache_dir=tmp_path / "cache")
    assert "7" in str(e.value) and "6" in str(e.value)


def test_missing_image_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        DD.load_image_set(tmp_path / "nowhere", 1, S, seed=0, cache_dir=tmp_path / "cache")


def test_unreadable_image_names_the_file(folder, tmp_path):
    (folder / "n02" / "x.jpg").write_bytes(b"\x00garbage bytes, not a JPEG\xff" * 20)
    with pytest.raises(DataError) as e:
        DD.load_image_set(folder, 7, S, seed=0, cache_dir=tmp_path / "cache")
    assert "x.jpg" in str(e.value)


def test_aspect_kept_image_set_layout(folder, tmp_path):
    _save(Image.new("RGB", (16, 32), (200, 200, 200)), folder / "n04" / "tall.png", "PNG")  # 1:2 portrait
    s = DD.load_image_set(folder, 7, S, seed=0, cache_dir=tmp_path / "cache", max_aspect=2.0)
    assert s.images.shape == (7, 3, S, 2 * S) and s.sizes.shape == (7, 2) and s.sizes.dtype == torch.int64
    tall = [i for i, img in enumerate(s.images) if int(img[0, 0, 0]) == 200]
    assert len(tall) == 1
    assert s.sizes[tall[0]].tolist() == [2 * S, S]  # (height, width) in the image's own orientation
    others = [i for i in range(7) if i != tall[0]]
    assert (s.sizes[others] == S).all()
    assert _greys(s.images) == {v for _, _, v in UNLABELED} | {200}


def test_aspect_kept_image_set_skips_unreadable_files(folder, tmp_path):
    (folder / "n02" / "x.jpg").write_bytes(b"\x00garbage bytes, not a JPEG\xff" * 20)
    whole = (folder / "n01" / "a.JPEG").read_bytes()
    (folder / "n01" / "a.JPEG").write_bytes(whole[: len(whole) // 2])  # the header reads, the pixels do not
    with pytest.raises(DataError, match="a.JPEG|x.jpg"):
        DD.load_image_set(folder, 7, S, seed=0, cache_dir=tmp_path / "cache", max_aspect=2.0)
    s = DD.load_image_set(folder, 7, S, seed=0, cache_dir=tmp_path / "cache", skip=True, max_aspect=2.0)
    assert sorted(Path(f).name for f in s.skipped) == ["a.JPEG", "x.jpg"]
    assert len(s.images) == len(s.sizes) == len(s.labels) == 5
    assert _greys(s.images) == {v for _, _, v in UNLABELED} - {10}


# ------------------------------------------------------------------------------------------ the cache


@pytest.fixture
def counted(monkeypatch):
    calls = {"image": 0, "trimap": 0}
    real_image, real_trimap = D.decode_image, D.decode_trimap

    def image(*a, **k):
        calls["image"] += 1
        return real_image(*a, **k)

    def trimap(*a, **k):
        calls["trimap"] += 1
        return real_trimap(*a, **k)

    monkeypatch.setattr(D, "decode_image", image)  # the whole-split caches (readers.cached_stack)
    monkeypatch.setattr(DEC, "decode_image", image)  # the decoded image store (decoders.decode_pil)
    monkeypatch.setattr(D, "decode_trimap", trimap)
    return calls


def test_cache_is_reused_and_invalidated(folder, tmp_path, counted):
    cache = tmp_path / "cache"
    first = DD.load_image_set(folder, 6, S, seed=0, cache_dir=cache).images
    assert counted["image"] == 6
    files = list(cache.glob("*.npy"))
    assert len(files) == 1 and files[0].name.startswith("images-")
    mtime = files[0].stat().st_mtime_ns

    again = DD.load_image_set(folder, 6, S, seed=0, cache_dir=cache).images
    assert counted["image"] == 6, "the cached array was not reused"
    assert torch.equal(first, again)
    assert files[0].stat().st_mtime_ns == mtime

    # another resolution is another cache entry
    DD.load_image_set(folder, 6, 4, seed=0, cache_dir=cache)
    assert counted["image"] == 12 and len(list(cache.glob("*.npy"))) == 2

    # replacing a source image (new bytes, new mtime) invalidates the entry
    src = folder / "d.PNG"
    _save(_solid((222, 111, 0), size=24), src, "PNG")
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    fresh = DD.load_image_set(folder, 6, S, seed=0, cache_dir=cache).images
    assert counted["image"] == 18
    colours = {tuple(img[:, 0, 0].tolist()) for img in fresh}
    assert (222, 111, 0) in colours and (100, 100, 100) not in colours


def test_touching_a_source_invalidates_the_cache(folder, tmp_path, counted):
    cache = tmp_path / "cache"
    DD.load_image_set(folder, 6, S, seed=0, cache_dir=cache)
    src = folder / "n03" / "e.Jpg"
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 3_000_000_000))
    DD.load_image_set(folder, 6, S, seed=0, cache_dir=cache)
    assert counted["image"] == 12


def test_pets_cache_is_reused(pets, tmp_path, counted):
    cache = tmp_path / "cache"
    a = D.load_pets(pets, "trainval", S, cache_dir=cache)
    assert counted == {"image": 3, "trimap": 3}
    b = D.load_pets(pets, "trainval", S, cache_dir=cache)
    assert counted == {"image": 3, "trimap": 3}
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    # the interpolation is part of the key for images, not for trimaps
    D.load_pets(pets, "trainval", S, interpolation="nearest", cache_dir=cache)
    assert counted == {"image": 6, "trimap": 3}


# ------------------------------------------------------------------------------------------ where data goes


def test_synthetic_data_goes_into_the_data_sections_cache(tmp_path, monkeypatch):
    from studylib.data.sources import default_cache_dir, default_synth_root, resolve_data, synth_spec

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STUDYLIB_CACHE", str(tmp_path / "env"))  # not a way to pass the cache (any more)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "studylib"
    synth = {"pets": 6, "unlabeled": 0, "intel_train_per_class": 0, "intel_test_per_class": 0}
    store = tmp_path / "runs" / "cache"
    paths = resolve_data({"synth": synth, "cache": str(store)})
    root = default_synth_root(synth_spec(synth), store)
    assert paths.cache == store and root.parent == store and root.name.startswith("synth-")
    assert paths.pets == root / "pets" and len(list((root / "pets" / "images").glob("*.jpg"))) == 6
    assert not (tmp_path / "env").exists() and not (tmp_path / "home").exists()
    # without a cache in the data section: the user's cache
    assert default_synth_root(synth_spec(synth)).parent == default_cache_dir()
