"""Synthetic data: real on-disk layouts, determinism, atomic/idempotent writing, and the statistics the study needs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studylib.data import synth
from studylib.data.synth import INTEL_CLASSES, SynthSpec, write_synthetic

# Enough pets that pooled pixel statistics are stable whatever the seed; still well under a second to write.
SPEC = SynthSpec(seed=3, pets=120, intel_train_per_class=12, intel_test_per_class=6, unlabeled=40)
REAL_PETS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oxford_pet_sample"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_synthetic(tmp_path_factory.mktemp("synth") / "root", SPEC)


def _split_lines(path: Path) -> list[list[str]]:
    return [ln.split() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _trimap(pets: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(pets / "annotations" / "trimaps" / f"{name}.png"))


def _pet_names(pets: Path) -> list[str]:
    return sorted(p.stem for p in (pets / "images").glob("*.jpg"))


# ------------------------------------------------------------------------------------------------ layout


def test_returns_the_three_roots(data):
    root = data["pets"].parent
    assert data == {"pets": root / "pets", "intel": root / "intel", "images": root / "images"}
    assert json.loads((root / "SYNTH.json").read_text())["spec"] == {
        "seed": 3,
        "pets": 120,
        "intel_train_per_class": 12,
        "intel_test_per_class": 6,
        "unlabeled": 40,
        "min_size": 72,
        "max_size": 112,
    }


def test_pets_layout_and_split_files(data):
    pets = data["pets"]
    names = _pet_names(pets)
    assert len(names) == SPEC.pets
    assert sorted(p.stem for p in (pets / "annotations" / "trimaps").glob("*.png")) == names
    header = (pets / "annotations" / "trainval.txt").read_text().splitlines()[0]
    assert header.startswith("#")  # like the real files, loaders must skip comments
    listed = {}
    for split in ("trainval", "test"):
        rows = _split_lines(pets / "annotations" / f"{split}.txt")
        assert abs(len(rows) - SPEC.pets / 2) <= len(synth.BREEDS)
        for name, *ids in rows:
            assert len(ids) == 3 and all(i.isdigit() for i in ids)
            cls, species, breed_id = map(int, ids)
            assert 1 <= cls <= len(synth.BREEDS) and 1 <= breed_id <= len(synth.BREEDS)
            assert species == (1 if name[0].isupper() else 2)  # capitalised names are cats
            assert name not in listed
            listed[name] = cls
    assert sorted(listed) == names
    # One class id per breed, and every breed appears.
    by_breed = {}
    for name, cls in listed.items():
        by_breed.setdefault(name.rsplit("_", 1)[0], set()).add(cls)
    assert sorted(by_breed) == sorted(synth.BREEDS) and all(len(v) == 1 for v in by_breed.values())


def test_split_lines_parse_like_the_real_ones(data):
    if not REAL_PETS.exists():
        pytest.skip("real Pets sample not available")
    real = _split_lines(REAL_PETS / "annotations" / "trainval.txt")[0]
    ours = _split_lines(data["pets"] / "annotations" / "trainval.txt")[0]
    assert len(real) == len(ours) == 4 and real[0].rsplit("_", 1)[1].isdigit() and ours[0].rsplit("_", 1)[1].isdigit()


def test_images_and_trimaps_match(data):
    pets = data["pets"]
    sizes, all_three = set(), 0
    for name in _pet_names(pets):
        img = Image.open(pets / "images" / f"{name}.jpg")
        tri = Image.open(pets / "annotations" / "trimaps" / f"{name}.png")
        assert img.format == "JPEG" and img.mode == "RGB"
        assert tri.format == "PNG" and tri.mode == "L" and tri.size == img.size
        assert set(np.unique(np.asarray(tri))) <= {1, 2, 3}
        all_three += set(np.unique(np.asarray(tri))) == {1, 2, 3}
        assert all(SPEC.min_size <= s <= SPEC.max_size for s in img.size)
        sizes.add(img.size)
    assert all_three >= 0.9 * SPEC.pets
    assert len(sizes) > SPEC.pets // 2 and any(w != h for w, h in sizes)  # loaders must resize


def test_intel_and_unlabeled_layouts(data):
    for split, n in (("seg_train", SPEC.intel_train_per_class), ("seg_test", SPEC.intel_test_per_class)):
        assert sorted(p.name for p in (data["intel"] / split).iterdir()) == sorted(INTEL_CLASSES)
        for cls in INTEL_CLASSES:
            files = list((data["intel"] / split / cls).glob("*.jpg"))
            assert len(files) == n and all(f.stem.isdigit() for f in files)
    ids = [f.stem for f in data["intel"].rglob("*.jpg")]
    assert len(ids) == len(set(ids))  # ids are unique across classes and splits, as in the real data
    files = sorted(data["images"].glob("train/n*/*.JPEG"))
    assert len(files) == SPEC.unlabeled
    for f in files:
        assert f.name.startswith(f.parent.name + "_") and len(f.parent.name) == 8
        im = Image.open(f)
        assert im.format == "JPEG" and im.mode == "RGB"
    assert len({f.parent for f in files}) > 10


def test_boundary_is_a_thin_band_and_pets_are_sizeable(data):
    pets = data["pets"]
    tris = [_trimap(pets, n) for n in _pet_names(pets)]
    boundary = np.array([(t == 3).mean() for t in tris])
    pet = np.array([(t == 1).mean() for t in tris])
    assert boundary.max() < 0.25 and 0.02 < boundary.mean() < 0.15
    assert 0.1 < pet.mean() < 0.6


def test_trimap_band_is_two_pixels_wide():
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    tri = synth.trimap_from_mask(mask)
    assert (tri[10, :] == [2] * 4 + [3, 3] + [1] * 8 + [3, 3] + [2] * 4).all()


# ------------------------------------------------------------------------------------------------ determinism, writing


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in synth.iter_files(root)}


def test_same_spec_gives_identical_bytes(data, tmp_path):
    again = write_synthetic(tmp_path / "again", SPEC)
    assert _snapshot(again["pets"].parent) == _snapshot(data["pets"].parent)


def test_counts_do_not_change_existing_images(data, tmp_path):
    small = SynthSpec(seed=3, pets=12, intel_train_per_class=2, intel_test_per_class=1, unlabeled=10)
    out = write_synthetic(tmp_path / "small", small)
    for key in ("images", "pets", "intel"):
        ours = _snapshot(out[key])
        ref = _snapshot(data[key])
        images = [k for k in ours if not k.endswith(".txt")]
        assert images and all(ours[k] == ref[k] for k in images), key


def test_seed_changes_the_images(tmp_path):
    a = write_synthetic(
        tmp_path / "a", SynthSpec(seed=0, pets=6, intel_train_per_class=0, intel_test_per_class=0, unlabeled=0)
    )
    b = write_synthetic(
        tmp_path / "b", SynthSpec(seed=1, pets=6, intel_train_per_class=0, intel_test_per_class=0, unlabeled=0)
    )
    assert _snapshot(a["pets"] / "images") != _snapshot(b["pets"] / "images")


def test_second_call_does_not_rewrite(data):
    root = data["pets"].parent
    before = {p: p.stat().st_mtime_ns for p in synth.iter_files(root)}
    assert write_synthetic(root, SPEC) == data
    assert {p: p.stat().st_mtime_ns for p in synth.iter_files(root)} == before


def test_different_spec_in_same_root_is_an_error(data):
    root = data["pets"].parent
    with pytest.raises(ValueError, match="delete") as err:
        write_synthetic(root, SynthSpec(seed=4))
    assert str(root) in str(err.value)
    assert (root / "pets").exists()  # nothing was deleted


def test_foreign_folder_is_an_error_but_an_empty_one_is_filled(tmp_path):
    tiny = SynthSpec(pets=6, intel_train_per_class=1, intel_test_per_class=1, unlabeled=2)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="busy"):
        write_synthetic(tmp_path / "busy", tiny)
    (tmp_path / "empty").mkdir()
    out = write_synthetic(tmp_path / "empty", tiny)
    assert len(list(out["pets"].glob("images/*.jpg"))) == 6


def test_a_failed_run_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_write_images", boom)
    with pytest.raises(RuntimeError):
        write_synthetic(tmp_path / "root", SynthSpec(pets=6, intel_train_per_class=1, intel_test_per_class=1))
    assert list(tmp_path.iterdir()) == []  # neither the root nor the temporary folder


# ------------------------------------------------------------------------------------------------ the statistics


def _local_texture_energy(gray: np.ndarray, r: int = 2) -> np.ndarray:
    """|Laplacian| averaged over a (2r+1)^2 window: high on fine texture, low on flat or smooth regions."""
    lap = np.abs(4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:])
    c = np.pad(np.pad(lap, 1), ((r + 1, r), (r + 1, r))).cumsum(0).cumsum(1)
    k = 2 * r + 1
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / k**2


def _separation(a: np.ndarray, b: np.ndarray) -> float:
    return float(abs(a.mean() - b.mean()) / np.sqrt((a.var() + b.var()) / 2))


def test_neither_colour_nor_texture_energy_alone_finds_the_pet(data):
    pets = data["pets"]
    pet_px, bg_px, texture_higher, colour_higher = [], [], 0, np.zeros(3)
    for name in _pet_names(pets):
        rgb = np.asarray(Image.open(pets / "images" / f"{name}.jpg"), np.float32) / 255
        tri = _trimap(pets, name)
        feats = np.concatenate([_local_texture_energy(rgb.mean(2))[..., None], rgb], axis=2)
        pet_px.append(feats[tri == 1])
        bg_px.append(feats[tri == 2])
        texture_higher += pet_px[-1][:, 0].mean() > bg_px[-1][:, 0].mean()
        colour_higher += pet_px[-1][:, 1:].mean(0) > bg_px[-1][:, 1:].mean(0)
    pet, bg = np.concatenate(pet_px), np.concatenate(bg_px)
    texture = _separation(pet[:, 0], bg[:, 0])
    colour = max(_separation(pet[:, c], bg[:, c]) for c in (1, 2, 3))
    # Pooled over images, a colour threshold cannot find the pet. Coats lean finer than backgrounds, so local
    # texture energy is a cue, but a weak one: backgrounds wear textures just as busy (gratings, tiles, cross-hatch).
    assert colour < 0.35
    assert texture > 2 * colour and texture < 1.0
    # Within images: the pet is more often than not the busier region, but far from always, and it is
    # redder/greener/bluer only by chance.
    assert 0.6 * SPEC.pets <= texture_higher <= 0.95 * SPEC.pets
    assert ((colour_higher > 0.3 * SPEC.pets) & (colour_higher < 0.7 * SPEC.pets)).all()


def _global_features(path: Path) -> np.ndarray:
    im = Image.open(path).resize((64, 64))
    rgb = np.asarray(im, np.float32) / 255
    sat = np.asarray(im.convert("HSV"), np.float32)[..., 1] / 255
    gray = rgb.mean(2)
    gx, gy = np.diff(gray, axis=1) ** 2, np.diff(gray, axis=0) ** 2
    return np.r_[
        rgb.mean((0, 1)),
        rgb.std((0, 1)),
        sat.mean(),
        gx.mean(),
        gy.mean(),
        rgb[:21].mean((0, 1)),
        rgb[43:].mean((0, 1)),
    ]


def _load_intel(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    feats, labels = [], []
    for c, cls in enumerate(INTEL_CLASSES):
        for f in sorted((root / split / cls).glob("*.jpg")):
            feats.append(_global_features(f))
            labels.append(c)
    return np.array(feats), np.array(labels)


def _nearest_mean_accuracy(train, test, cols) -> float:
    (xtr, ytr), (xte, yte) = train, test
    mu, sd = xtr[:, cols].mean(0), xtr[:, cols].std(0) + 1e-6
    a, b = (xtr[:, cols] - mu) / sd, (xte[:, cols] - mu) / sd
    centres = np.stack([a[ytr == c].mean(0) for c in range(len(INTEL_CLASSES))])
    return float((((b[:, None] - centres[None]) ** 2).sum(-1).argmin(1) == yte).mean())


def test_scene_classes_show_in_global_statistics(data):
    train, test = _load_intel(data["intel"], "seg_train"), _load_intel(data["intel"], "seg_test")
    x, y = train
    # Class means of the mean colour differ clearly relative to the spread within a class (one-way F statistic).
    means = np.stack([x[y == c, :3].mean(0) for c in range(6)])
    within = np.stack([x[y == c, :3].var(0) for c in range(6)]).mean(0)
    f_stat = means.var(0) * SPEC.intel_train_per_class / within
    assert f_stat.max() > 15
    # Global statistics classify well above chance (1/6), but mean colour alone is far from perfect.
    everything = list(range(x.shape[1]))
    assert _nearest_mean_accuracy(train, test, everything) > 0.4
    assert _nearest_mean_accuracy(train, train, [0, 1, 2]) < 0.9


def test_breeds_are_tendencies_over_a_varied_texture_space():
    # Breeds lean toward their own coats (a simple energy spectrum tells breed groups apart better than random
    # groups of the same size), but every breed's coats vary a lot: two coats of one breed typically differ more
    # than two breeds' average coats, so a few labelled images cannot show every coat a pet may wear.
    def spectrum(breed, i):
        rng = synth.image_rng(9, "pets", i)
        t = synth.breed_texture(rng, breed, 64, 64, axis=0.0)
        p = np.abs(np.fft.rfft2(t - t.mean()))
        f = np.hypot(*np.meshgrid(np.fft.rfftfreq(64), np.fft.fftfreq(64)))
        return np.histogram(f, bins=8, range=(0, 0.5), weights=p)[0] / p.sum()

    k = 24
    x = np.stack([spectrum(b, i) for b in synth.BREEDS for i in range(k)])
    labels = np.repeat(np.arange(len(synth.BREEDS)), k)

    def between(lab):
        centres = np.stack([x[lab == c].mean(0) for c in range(len(synth.BREEDS))])
        return np.abs(centres[:, None] - centres[None]).sum(-1)[np.triu_indices(len(centres), 1)].mean()

    rng = np.random.default_rng(0)
    chance = np.mean([between(rng.permutation(labels)) for _ in range(20)])
    within = np.mean(
        [np.abs(x[labels == c][:, None] - x[labels == c][None]).sum(-1).mean() for c in range(len(synth.BREEDS))]
    )
    assert between(labels) > 1.5 * chance
    assert within > between(labels)
