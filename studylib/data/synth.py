"""Seeded synthetic stand-ins for Oxford-IIIT Pet, Intel scenes and ImageNet, written in their real on-disk layouts.

The images are designed so the study's questions stay meaningful for a tiny ViT trained for minutes on a CPU:

* Pets: a compound blob (body, head, ears, legs, tail) whose proportions are drawn per image, wearing a coat from
  a continuous texture space: every image draws its own family (warped stripes, spots, fur, curls, rosettes,
  patches), frequency, orientation, spot size, sharpness, polarity, contrast and colours, sometimes two-tone.
  Breeds are only tendencies over this space (favoured families and fineness), so a few labelled images cover a
  small corner of all the coats a pet can wear. Backgrounds come from the same generator but favour geometric,
  man-made or smooth families (gratings, tiles, cross-hatch, rings, grain, blotches, gradients) at overlapping
  frequencies, and a few wear animal-like textures, so colour says nothing and texture energy little: the
  kind of texture, the outline and the contrast with the surroundings do. Distractor blobs mean "any blob" is not a
  pet either.
* Unlabeled images are drawn from the same rich distribution (mostly pet-like animals, plus textured objects and
  scenes), so inpainting masked patches over thousands of them covers the coat and background variety that a few
  labelled images do not, which is where pre-training can pay off.
* Intel scenes are told apart by global statistics (hue/brightness distribution, dominant orientation and
  frequency, horizon/vanishing-point layout), with deliberate overlap (glacier/mountain/sea, buildings/street), so a
  pooled CLS classifier does well while being pushed toward global rather than spatial features.

Every image draws from its own generator seeded by (seed, dataset, index), so files are byte-identical across runs
and a dataset's first N images do not depend on any count in the spec.

The textures, coats, silhouettes, compositing and scene elements come from `studylib.data.textures`; this module
renders whole images (pets, scenes, unlabeled) and writes the three layouts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image, ImageFilter

from studylib.core.schema import at_least, check_types, require
from studylib.data.scenes import facade, ridge, road, rows_below, sky, water
from studylib.data.textures import (  # noqa: F401  (breed_texture re-exported: synth.breed_texture)
    add_distractors,
    animal_mask,
    blob_mask,
    breed_texture,
    colourise,
    curls,
    grating,
    hsv,
    linear_ramp,
    normalise,
    oriented_noise,
    paste,
    pet_coat,
    smooth_noise,
    spots,
    textured_background,
    trimap_from_mask,
)

# Bump when the images change, so an old SYNTH.json no longer matches and stale data is not reused.
FORMAT_VERSION = 6

# Capitalised names are cats and lowercase names dogs, as in the real dataset.
BREEDS = ("Tigrine", "Leopardine", "Smokey", "brindle_hound", "patched_pointer", "curly_poodle")
INTEL_CLASSES = ("buildings", "forest", "glacier", "mountain", "sea", "street")
N_WNIDS = 32
_DATASET_CODES = {"pets": 1, "intel_train": 2, "intel_test": 3, "images": 4}


@dataclass(frozen=True)
class SynthSpec:
    seed: int = 0
    pets: int = 400  # total Pets-like images; half in trainval.txt, half in test.txt
    intel_train_per_class: int = 60
    intel_test_per_class: int = 20
    unlabeled: int = 1000  # unlabeled pre-training images
    min_size: int = 72  # side lengths vary (and images are not square) so loaders must resize
    max_size: int = 112
    section: ClassVar[str] = "data.synth"

    def __post_init__(self):
        check_types(self)
        for name in ("pets", "intel_train_per_class", "intel_test_per_class", "unlabeled"):
            at_least(self, name, 0)
        at_least(self, "min_size", 8)
        require(self, "max_size", self.max_size >= self.min_size, f"at least min_size ({self.min_size})")


# ----------------------------------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------------------------------


def image_rng(seed: int, dataset: str, *index: int) -> np.random.Generator:
    """One generator per image, so an image never depends on how many others are generated."""
    return np.random.default_rng([seed, _DATASET_CODES[dataset], *index])


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def render_pet(rng: np.random.Generator, breed: str, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A Pets-like image (uint8 [h, w, 3]) and its trimap (uint8 [h, w] in {1, 2, 3})."""
    rgb = textured_background(rng, h, w)
    rgb = add_distractors(rng, rgb, int(rng.choice([0, 1, 2], p=[0.4, 0.4, 0.2])), (0.06, 0.14))
    mask, axis = animal_mask(rng, h, w, dog=breed[0].islower())
    rgb = paste(rgb, mask, pet_coat(rng, breed, h, w, axis))
    return finish(rng, rgb), trimap_from_mask(mask)


def _scene_buildings(rng, h, w):
    rgb = facade(rng, h, w, rng.normal(0, 0.06))
    u = (np.arange(w) + 0.5) / w
    if rng.uniform() < 0.6:  # skyline: building tops at a few heights
        blocks = rng.uniform(0.05, 0.35, int(rng.integers(2, 6)))
        top = blocks[np.minimum((u * len(blocks)).astype(int), len(blocks) - 1)]
        v = (np.arange(h) + 0.5)[:, None] / h
        rgb = paste(rgb, v < top[None, :], sky(rng, h, w))
    if rng.uniform() < 0.2:  # a street in front, overlapping with street scenes
        rgb = paste(rgb, rows_below(h, w, rng.uniform(0.7, 0.9)), road(rng, h, w, rng.uniform(0.3, 0.7), 0.6, 3.0))
    return rgb


def _scene_street(rng, h, w):
    u, v = (np.arange(w) + 0.5)[None, :] / w, (np.arange(h) + 0.5)[:, None] / h
    vx, vy, slope = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.5), rng.uniform(1.0, 2.5)
    rgb = paste(facade(rng, h, w, 0.0), ~rows_below(h, w, vy - rng.uniform(0.05, 0.25)), sky(rng, h, w))
    # The road is a wedge opening from the vanishing point.
    wedge = (v > vy) & (np.abs(u - vx) < (v - vy) * slope)
    return paste(rgb, wedge, road(rng, h, w, vx, vy, slope))


def _scene_forest(rng, h, w):
    hue = rng.uniform(0.2, 0.4) if rng.uniform() < 0.75 else rng.uniform(0.05, 0.14)
    dark, light = (
        hsv(hue, rng.uniform(0.4, 0.9), rng.uniform(0.08, 0.3)),
        hsv(hue + 0.03, rng.uniform(0.3, 0.8), rng.uniform(0.4, 0.75)),
    )
    warp = 0.3 * smooth_noise(rng, h, w, 2)
    trunks = grating(h, w, rng.uniform(3, 8), rng.normal(0, 0.08), rng.uniform(), warp, sharp=3)
    leaves = spots(rng, h, w, rng.uniform(14, 24), 0.5, softness=0.08)
    rgb = colourise(0.35 * trunks + 0.65 * leaves, dark, light)
    if rng.uniform() < 0.3:  # light through the canopy
        rgb = paste(rgb, spots(rng, h, w, 8, 0.08) > 0.5, sky(rng, h, w))
    return rgb


def _scene_mountain(rng, h, w):
    rgb = sky(rng, h, w)
    rock = hsv(rng.choice([0.08, 0.6, 0.3]) + rng.normal(0, 0.03), rng.uniform(0.05, 0.4), rng.uniform(0.2, 0.55))
    rock2 = rock + rng.uniform(0.15, 0.35)
    slope = oriented_noise(rng, h, w, rng.uniform(3, 7), rng.choice([-0.7, 0.7]) + np.pi / 2, spread=0.3)
    below = ridge(rng, h, w, rng.uniform(0.35, 0.55), rng.uniform(0.1, 0.25))
    rgb = paste(rgb, below, colourise(slope, rock, np.clip(rock2, 0, 1)))
    if rng.uniform() < 0.4:  # snow caps: white near the ridge, overlapping with glaciers
        snow = below & ~np.roll(below, int(h * rng.uniform(0.05, 0.15)), axis=0)
        rgb = paste(rgb, snow, np.full(3, rng.uniform(0.8, 1.0), np.float32))
    return rgb


def _scene_glacier(rng, h, w):
    ice0 = hsv(rng.uniform(0.5, 0.62), rng.uniform(0.1, 0.45), rng.uniform(0.5, 0.8))
    ice1 = hsv(rng.uniform(0.5, 0.62), rng.uniform(0.0, 0.15), rng.uniform(0.85, 1.0))
    t = 0.6 * smooth_noise(rng, h, w, rng.uniform(2, 4)) + 0.4 * curls(rng, h, w, rng.uniform(2, 4), 2) ** 6
    rgb = colourise(normalise(t), ice0, ice1)
    if rng.uniform() < 0.5:  # a sky above an icy ridge, overlapping with mountains
        rgb = paste(sky(rng, h, w), ridge(rng, h, w, rng.uniform(0.25, 0.5), rng.uniform(0.05, 0.2)), rgb)
    if rng.uniform() < 0.25:  # a lake in front, overlapping with sea
        rgb = paste(rgb, rows_below(h, w, rng.uniform(0.6, 0.85), rng.normal(0, 0.1)), water(rng, h, w))
    return rgb


def _scene_sea(rng, h, w):
    rgb = paste(sky(rng, h, w), rows_below(h, w, rng.uniform(0.2, 0.55), rng.normal(0, 0.04)), water(rng, h, w))
    if rng.uniform() < 0.35:  # a beach in the foreground
        sand = colourise(smooth_noise(rng, h, w, 20), hsv(0.1, 0.35, 0.6), hsv(0.11, 0.25, 0.85))
        rgb = paste(rgb, rows_below(h, w, rng.uniform(0.7, 0.92), rng.normal(0, 0.2)), sand)
    return rgb


_SCENES: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "buildings": _scene_buildings,
    "forest": _scene_forest,
    "glacier": _scene_glacier,
    "mountain": _scene_mountain,
    "sea": _scene_sea,
    "street": _scene_street,
}


def render_scene(rng: np.random.Generator, cls: str, h: int, w: int) -> np.ndarray:
    """An Intel-like scene (uint8 [h, w, 3]) whose class shows in its global statistics."""
    rgb = _SCENES[cls](rng, h, w)
    if rng.uniform() < 0.3:  # clutter shared by all classes, so no single local patch decides the class
        rgb = add_distractors(rng, rgb, 1, (0.08, 0.18))
    return finish(rng, rgb, hue_jitter=0.03)


def render_unlabeled(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Pre-training image: pet-like animals, textured objects, or a scene, from the same visual vocabulary and
    the same rich appearance distribution as the Pets images (many coats, backgrounds and silhouettes)."""
    kind = rng.choice(["animal", "objects", "scene"], p=[0.7, 0.2, 0.1])
    if kind == "animal":
        return render_pet(rng, str(rng.choice(BREEDS)), h, w)[0]
    if kind == "scene":
        return render_scene(rng, str(rng.choice(INTEL_CLASSES)), h, w)
    rgb = textured_background(rng, h, w)
    for _ in range(int(rng.integers(1, 5))):
        m = blob_mask(rng, h, w, rng.uniform(0.1, 0.3))
        fill = (
            pet_coat(rng, str(rng.choice(BREEDS)), h, w, rng.uniform(0, np.pi))
            if rng.uniform() < 0.5
            else textured_background(rng, h, w)
        )
        rgb = paste(rgb, m, fill)
    return finish(rng, rgb)


def finish(rng: np.random.Generator, rgb: np.ndarray, hue_jitter: float = 0.0) -> np.ndarray:
    """Camera-like nuisances: uneven lighting, a colour cast, mild blur and sensor noise."""
    h, w = rgb.shape[:2]
    light = 1 + rng.uniform(0, 0.35) * (linear_ramp(h, w, rng.uniform(0, 2 * np.pi)) - 0.5)
    cast = 1 + rng.normal(0, 0.04 + hue_jitter, 3).astype(np.float32)
    rgb = rgb * light[..., None] * cast * rng.uniform(0.85, 1.15)
    img = Image.fromarray(np.clip(rgb * 255, 0, 255).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    noisy = np.asarray(img, np.float32) + rng.uniform(1, 6) * rng.standard_normal((h, w, 3), np.float32)
    return np.clip(noisy, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Writing the three layouts
# ----------------------------------------------------------------------------------------------------------------


def _size(rng: np.random.Generator, spec: SynthSpec) -> tuple[int, int]:
    h, w = rng.integers(spec.min_size, spec.max_size + 1, 2)
    return int(h), int(w)


def _save_jpeg(rgb: np.ndarray, path: Path) -> None:
    Image.fromarray(rgb, "RGB").save(path, "JPEG", quality=90)


def pet_name(i: int) -> tuple[str, str]:
    """Image i belongs to breed i % 6 and is that breed's (i // 6 + 1)-th image, as in `Bengal_1`."""
    breed = BREEDS[i % len(BREEDS)]
    return breed, f"{breed}_{i // len(BREEDS) + 1}"


def pet_ids() -> dict[str, tuple[int, int, int]]:
    """(class id, species, breed id) per breed, numbered as the real list: class ids alphabetical ignoring case,
    breed ids alphabetical within a species."""
    order = sorted(BREEDS, key=str.lower)
    ids = {}
    for b in order:
        species = 1 if b[0].isupper() else 2
        same = [o for o in order if (o[0].isupper()) == (species == 1)]
        ids[b] = (order.index(b) + 1, species, same.index(b) + 1)
    return ids


_SPLIT_HEADER = (
    "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:{k} Class ids\n#SPECIES: 1:Cat 2:Dog\n"
    "#BREED ID: 1-{c}:Cat 1-{d}:Dog\n#All images with 1st letter as captial are cat images\n"
    "#images with small first letter are dog images\n"
)


def _write_pets(root: Path, spec: SynthSpec, tick: Callable[[], None]) -> None:
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    ids, lines = pet_ids(), {"trainval": [], "test": []}
    for i in range(spec.pets):
        breed, name = pet_name(i)
        rng = image_rng(spec.seed, "pets", i)
        rgb, trimap = render_pet(rng, breed, *_size(rng, spec))
        _save_jpeg(rgb, root / "images" / f"{name}.jpg")
        Image.fromarray(trimap, "L").save(root / "annotations" / "trimaps" / f"{name}.png")
        split = "trainval" if (i // len(BREEDS)) % 2 == 0 else "test"  # alternate per breed: balanced halves
        lines[split].append(f"{name} {' '.join(map(str, ids[breed]))}\n")
        tick()
    cats = sum(b[0].isupper() for b in BREEDS)
    header = _SPLIT_HEADER.format(k=len(BREEDS), c=cats, d=len(BREEDS) - cats)
    for split, ls in lines.items():
        (root / "annotations" / f"{split}.txt").write_text(header + "".join(ls))


def _write_intel(root: Path, spec: SynthSpec, tick: Callable[[], None]) -> None:
    for split, per_class, parity in (
        ("seg_train", spec.intel_train_per_class, 0),
        ("seg_test", spec.intel_test_per_class, 1),
    ):
        for c, cls in enumerate(INTEL_CLASSES):
            (root / split / cls).mkdir(parents=True)
            for k in range(per_class):
                rng = image_rng(spec.seed, "intel_train" if parity == 0 else "intel_test", c, k)
                image_id = 2 * (k * len(INTEL_CLASSES) + c) + parity  # unique across both splits, like the real ids
                _save_jpeg(render_scene(rng, cls, *_size(rng, spec)), root / split / cls / f"{image_id}.jpg")
                tick()


def wnid(i: int) -> str:
    return f"n{i + 1:07d}"


def _write_images(root: Path, spec: SynthSpec, tick: Callable[[], None]) -> None:
    for i in range(spec.unlabeled):
        folder = root / "train" / wnid(i % N_WNIDS)
        folder.mkdir(parents=True, exist_ok=True)
        rng = image_rng(spec.seed, "images", i)
        _save_jpeg(render_unlabeled(rng, *_size(rng, spec)), folder / f"{wnid(i % N_WNIDS)}_{i}.JPEG")
        tick()


def _ticker(total: int, progress: bool) -> tuple[Callable[[], None], Callable[[], None]]:
    if not progress:
        return (lambda: None), (lambda: None)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety, not a dependency
        return (lambda: None), (lambda: None)
    bar = tqdm(total=total, desc="synthetic data", unit="img")
    return (lambda: bar.update(1)), bar.close


def _manifest(spec: SynthSpec) -> dict:
    return {"format": FORMAT_VERSION, "spec": asdict(spec)}


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / "SYNTH.json").read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):  # absent or unreadable: not ours
        return None


def _layout(root: Path) -> dict[str, Path]:
    return {"pets": root / "pets", "intel": root / "intel", "images": root / "images"}


def _check_root(root: Path, spec: SynthSpec) -> bool:
    """True when root already holds this spec's data; an error when it holds anything else."""
    if not root.exists():
        return False
    found = _read_manifest(root)
    if found == _manifest(spec):
        return True
    if found is None and root.is_dir() and not any(root.iterdir()):
        return False  # an empty folder is fine to fill
    held = "other synthetic data " + json.dumps(found) if found else "files that are not synthetic data"
    raise ValueError(
        f"{root} already holds {held}, not {json.dumps(_manifest(spec))}; choose another root or delete {root} first"
    )


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_synthetic(root: str | Path, spec: SynthSpec = SynthSpec(), progress: bool = False) -> dict[str, Path]:
    """Write the three datasets under root and return {"pets": root/"pets", "intel": root/"intel",
    "images": root/"images"}.

    Idempotent: a root whose SYNTH.json holds the same spec is returned as is. Atomic: everything is generated in
    a temporary sibling folder that is renamed into place only when complete (SYNTH.json included), so a crash never
    leaves a half-written root that looks finished.
    """
    root = Path(root)
    if _check_root(root, spec):
        return _layout(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        tick, close = _ticker(
            spec.pets + 6 * (spec.intel_train_per_class + spec.intel_test_per_class) + spec.unlabeled, progress
        )
        _write_pets(tmp / "pets", spec, tick)
        _write_intel(tmp / "intel", spec, tick)
        _write_images(tmp / "images", spec, tick)
        close()
        _write_json_atomic(tmp / "SYNTH.json", _manifest(spec))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the data should read like any other folder
        _move_into_place(tmp, root, spec)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return _layout(root)


def _move_into_place(tmp: Path, root: Path, spec: SynthSpec) -> None:
    try:
        os.replace(tmp, root)  # also replaces an empty folder
    except OSError:
        # Someone else finished first: fine if they wrote the same spec, otherwise report theirs.
        if not _check_root(root, spec):
            raise


def iter_files(root: str | Path) -> Iterable[Path]:
    """Every data file under root, sorted (handy for comparing two roots)."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file())
