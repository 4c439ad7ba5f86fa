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
"""
from __future__ import annotations

import colorsys
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageFilter

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


# ----------------------------------------------------------------------------------------------------------------
# Seeds, coordinates, colours
# ----------------------------------------------------------------------------------------------------------------

def image_rng(seed: int, dataset: str, *index: int) -> np.random.Generator:
    """One generator per image, so an image never depends on how many others are generated."""
    return np.random.default_rng([seed, _DATASET_CODES[dataset], *index])


@lru_cache(maxsize=8)
def _base_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    # Coordinates in units of the mean side, so texture frequencies mean "cycles per image" whatever the size.
    # Cached because every texture and shape of an image asks for the same grid; read-only so no caller edits it.
    s = (h + w) / 2
    x = np.broadcast_to((np.arange(w, dtype=np.float32) + 0.5) / s, (h, w))
    y = np.broadcast_to((np.arange(h, dtype=np.float32)[:, None] + 0.5) / s, (h, w))
    return x, y


def _grid(h: int, w: int, cx: float = 0.0, cy: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    x, y = _base_grid(h, w)
    return (x - np.float32(cx), y - np.float32(cy)) if (cx or cy) else (x, y)


def _rotate(x: np.ndarray, y: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = float(np.cos(theta)), float(np.sin(theta))  # python floats keep float32 arrays float32
    return x * c + y * s, -x * s + y * c


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))), np.float32)


def palette_pair(rng: np.random.Generator, hue: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Two colours (dark, light) from the palette that pets, backgrounds and objects all share."""
    h = rng.uniform() if hue is None else hue + rng.normal(0, 0.04)
    s = rng.uniform(0.05, 0.75)
    v_dark, gap = rng.uniform(0.1, 0.6), rng.uniform(0.15, 0.55)
    light = _hsv(h + rng.normal(0, 0.05), s * rng.uniform(0.5, 1.2), v_dark + gap)
    return _hsv(h, s, v_dark), light


def colourise(t: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    """Map a texture in [0, 1] to RGB by blending two colours."""
    return c0 + (c1 - c0) * t[..., None]


# ----------------------------------------------------------------------------------------------------------------
# Textures: each returns a float32 [h, w] array in [0, 1]
# ----------------------------------------------------------------------------------------------------------------

def _normalise(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return ((a - lo) / (hi - lo + 1e-8)).astype(np.float32)


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: float) -> np.ndarray:
    """Value noise with about `cells` blobs across the image (bicubic upsampling of a coarse random grid)."""
    gh, gw = max(2, round(cells * h / ((h + w) / 2)) + 2), max(2, round(cells * w / ((h + w) / 2)) + 2)
    coarse = Image.fromarray(rng.standard_normal((gh, gw)).astype(np.float32))
    return _normalise(np.asarray(coarse.resize((w, h), Image.BICUBIC)))


def grating(h: int, w: int, freq: float, theta: float, phase: float = 0.0, warp: np.ndarray | None = None,
            sharp: float = 1.0) -> np.ndarray:
    """Sinusoidal stripes; `warp` (in cycles) bends them, `sharp` > 1 squares them off."""
    x, _ = _rotate(*_grid(h, w), theta)
    arg = 2 * np.pi * (freq * x + phase + (0 if warp is None else warp))
    return (0.5 + 0.5 * np.tanh(sharp * np.sin(arg)) / np.tanh(sharp)).astype(np.float32)


def oriented_noise(rng: np.random.Generator, h: int, w: int, freq: float, theta: float, spread: float = 0.25,
                   k: int = 8) -> np.ndarray:
    """Fur-like band-limited noise: a sum of sinusoids around one frequency and orientation."""
    x, y = _grid(h, w)
    acc = np.zeros((h, w), np.float32)
    for f, th, ph in zip(freq * rng.uniform(0.75, 1.25, k), theta + rng.normal(0, spread, k), rng.uniform(0, 1, k)):
        acc += np.sin(2 * np.pi * (f * (x * np.cos(th) + y * np.sin(th)) + ph))
    return (0.5 + 0.5 * np.tanh(1.2 * acc / np.sqrt(k))).astype(np.float32)


def spots(rng: np.random.Generator, h: int, w: int, cells: float, frac: float, softness: float = 0.04) -> np.ndarray:
    """Blobs covering about `frac` of the image (thresholded value noise)."""
    n = smooth_noise(rng, h, w, cells)
    q = np.quantile(n, 1 - frac)
    return (1 / (1 + np.exp(-(n - q) / softness))).astype(np.float32)


def curls(rng: np.random.Generator, h: int, w: int, cells: float, rings: float) -> np.ndarray:
    """Curly, wool-like lines: contour lines of value noise."""
    return (0.5 + 0.5 * np.sin(2 * np.pi * rings * smooth_noise(rng, h, w, cells))).astype(np.float32)


def checker(h: int, w: int, freq: float, theta: float, brick: bool = False) -> np.ndarray:
    """Alternating tiles, or bricks: mortar lines with every other row shifted by half a brick."""
    x, y = _rotate(*_grid(h, w), theta)
    row = np.floor(freq * y)
    if brick:
        fx, fy = (freq * x + 0.5 * (row % 2)) % 1, (freq * y) % 1
        return (np.minimum(fx, fy) > 0.12).astype(np.float32)
    return ((row + np.floor(freq * x)) % 2).astype(np.float32)


def linear_ramp(h: int, w: int, theta: float) -> np.ndarray:
    x, _ = _rotate(*_grid(h, w), theta)
    return _normalise(x)


# Texture families: one shared, continuous space. Each family draws its own frequencies, orientations, spot sizes,
# sharpness and warp per image, so no two coats (or backgrounds) are alike; breeds and backgrounds are tendencies
# over this space (which families they favour, and how fine) rather than fixed textures.
TEXTURE_FAMILIES = ("stripes", "grating", "spots", "fur", "curls", "patches", "rosettes", "crosshatch", "tiles", "gradient",
                    "blotches", "grain", "rings")


def _freq(rng: np.random.Generator, fine: float, lo: float = 2.0, hi: float = 16.0) -> float:
    # Frequencies drawn on a log scale; `fine` in [0, 1] shifts the draw toward the high end.
    u = np.clip(rng.beta(1 + 3 * fine, 1 + 3 * (1 - fine)), 0, 1)
    return float(lo * (hi / lo) ** u)


def random_texture(rng: np.random.Generator, h: int, w: int, family: str, axis: float | None = None,
                   fine: float = 0.5, contrast: tuple[float, float] = (0.45, 1.0)) -> np.ndarray:
    """One texture of `family` with random parameters; `axis` (if given) is what oriented textures follow."""
    theta = rng.uniform(0, np.pi) if axis is None else axis + np.pi / 2 + rng.normal(0, 0.35)
    if family == "stripes":
        warp = rng.uniform(0.3, 1.0) * smooth_noise(rng, h, w, rng.uniform(1, 4))
        t = grating(h, w, _freq(rng, fine), theta, rng.uniform(), warp, sharp=rng.uniform(0.5, 4))
    elif family == "grating":  # regular, straight, man-made stripes
        t = grating(h, w, _freq(rng, fine), theta, rng.uniform(), 0.1 * smooth_noise(rng, h, w, 1),
                    sharp=rng.uniform(0.5, 6))
    elif family == "spots":
        t = spots(rng, h, w, _freq(rng, fine, 3, 18), rng.uniform(0.15, 0.5), softness=rng.uniform(0.02, 0.12))
    elif family == "fur":
        t = oriented_noise(rng, h, w, _freq(rng, fine, 4, 16), theta, spread=rng.uniform(0.08, 0.6))
    elif family == "curls":
        t = curls(rng, h, w, _freq(rng, fine, 2, 9), rng.uniform(2, 7))
    elif family == "patches":  # big patches with something finer on top
        big = spots(rng, h, w, rng.uniform(2, 6), rng.uniform(0.25, 0.55), softness=rng.uniform(0.01, 0.08))
        a = rng.uniform(0.5, 0.85)
        t = a * big + (1 - a) * random_texture(rng, h, w, str(rng.choice(["fur", "spots"])), axis, fine)
    elif family == "rosettes":  # rings of spots: contour bands of noise around thresholds
        n = smooth_noise(rng, h, w, _freq(rng, fine, 4, 14))
        q = rng.uniform(0.55, 0.75)
        t = np.exp(-((n - q) / rng.uniform(0.03, 0.08)) ** 2) + 0.6 * (n > q + 0.1)
    elif family == "crosshatch":
        f, d = _freq(rng, fine, 3, 12), rng.uniform(0.5, np.pi / 2)
        t = 0.5 * (grating(h, w, f, theta) + grating(h, w, f * rng.uniform(0.7, 1.3), theta + d))
        t = t + rng.uniform(0, 1) * smooth_noise(rng, h, w, 2)
    elif family == "tiles":
        t = 0.85 * checker(h, w, _freq(rng, fine, 1.5, 7), theta, brick=rng.uniform() < 0.5) \
            + 0.15 * smooth_noise(rng, h, w, 3)
    elif family == "gradient":
        t = rng.uniform(0.5, 0.9) * linear_ramp(h, w, rng.uniform(0, 2 * np.pi)) + 0.3 * smooth_noise(rng, h, w, 2)
    elif family == "blotches":
        t = spots(rng, h, w, rng.uniform(1.5, 5), rng.uniform(0.3, 0.6), softness=rng.uniform(0.03, 0.15))
    elif family == "grain":
        t = rng.uniform(0.3, 0.7) * smooth_noise(rng, h, w, 3) + smooth_noise(rng, h, w, _freq(rng, fine, 12, 40))
    elif family == "rings":
        x, y = _grid(h, w, rng.uniform(-0.3, 1.3), rng.uniform(-0.3, 1.3))
        r = np.sqrt(x * x + y * y) + 0.1 * smooth_noise(rng, h, w, 2)
        t = 0.5 + 0.5 * np.tanh(rng.uniform(0.5, 3) * np.sin(2 * np.pi * _freq(rng, fine, 2, 12) * r))
    else:
        raise ValueError(f"unknown texture family {family!r}")
    t = _normalise(np.asarray(t, np.float32))
    if rng.uniform() < 0.5:  # either polarity: dark marks on light or light on dark
        t = 1 - t
    c = rng.uniform(*contrast)  # contrast of the pattern itself
    return (0.5 + c * (t - 0.5)).astype(np.float32)


# Backgrounds wear geometric, man-made or smooth families (gratings, tiles, cross-hatch, rings, grain, blotches,
# gradients) at the same frequencies and contrasts as the coats, so texture *energy* no longer finds the pet; the
# *kind* of texture does (organic: warped stripes, spots, fur, curls, rosettes, patches), and that kind comes in far
# more variants than a few labelled images show. A few backgrounds wear animal-like textures too.
_BACKGROUND_FAMILY_P = {"gradient": 0.08, "blotches": 0.1, "tiles": 0.16, "grain": 0.1, "crosshatch": 0.16,
                        "grating": 0.16, "rings": 0.14, "spots": 0.03, "fur": 0.04, "curls": 0.03}


def background_texture(rng: np.random.Generator, h: int, w: int, family: str | None = None) -> np.ndarray:
    family = family or str(rng.choice(list(_BACKGROUND_FAMILY_P), p=list(_BACKGROUND_FAMILY_P.values())))
    return random_texture(rng, h, w, family, fine=rng.uniform(0.3, 1.0), contrast=(0.6, 1.0))


# Each breed favours a few families and a fineness; any breed sometimes wears any animal-like texture.
_BREED_STYLE = {
    "Tigrine": ({"stripes": 0.7, "fur": 0.15, "rosettes": 0.15}, 0.7),
    "Leopardine": ({"spots": 0.55, "rosettes": 0.35, "patches": 0.1}, 0.75),
    "Smokey": ({"fur": 0.8, "stripes": 0.2}, 0.8),
    "brindle_hound": ({"fur": 0.5, "stripes": 0.5}, 0.6),
    "patched_pointer": ({"patches": 0.7, "spots": 0.15, "fur": 0.15}, 0.65),
    "curly_poodle": ({"curls": 0.8, "spots": 0.2}, 0.6),
}
_ANIMAL_FAMILIES = ("stripes", "spots", "fur", "curls", "patches", "rosettes")


def breed_texture(rng: np.random.Generator, breed: str, h: int, w: int, axis: float) -> np.ndarray:
    """The coat of one breed; `axis` is the body's orientation, so stripes and fur follow the body."""
    if breed not in _BREED_STYLE:
        raise ValueError(f"unknown breed {breed!r}")
    families, fine = _BREED_STYLE[breed]
    if rng.uniform() < 0.75:
        family = str(rng.choice(list(families), p=list(families.values())))
    else:
        family = str(rng.choice(_ANIMAL_FAMILIES))
    return random_texture(rng, h, w, family, axis, fine=float(np.clip(fine + rng.normal(0, 0.15), 0, 1)),
                          contrast=(0.75, 1.0))


# Breeds lean toward a hue half of the time (the other half they take any palette colour, like the background).
# The hues are spread around the wheel so that, pooled over breeds, pets are no redder or bluer than backgrounds.
_BREED_HUES = {"Tigrine": 0.08, "Leopardine": 0.25, "Smokey": 0.58, "brindle_hound": 0.0,
               "patched_pointer": 0.75, "curly_poodle": 0.42}


# ----------------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------------

def ellipse(h: int, w: int, cx: float, cy: float, rx: float, ry: float, theta: float) -> np.ndarray:
    """Boolean mask of a rotated ellipse (centre and radii in mean-side units)."""
    x, y = _rotate(*_grid(h, w, cx, cy), theta)
    return (x / rx) ** 2 + (y / ry) ** 2 <= 1.0


def _at(cx: float, cy: float, theta: float, along: float, across: float) -> tuple[float, float]:
    # A point given in the body's frame (along its axis, across it) in image units.
    return cx + along * np.cos(theta) - across * np.sin(theta), cy + along * np.sin(theta) + across * np.cos(theta)


def animal_mask(rng: np.random.Generator, h: int, w: int, dog: bool) -> tuple[np.ndarray, float]:
    """A pet silhouette as a union of ellipses; returns the mask and the body's axis angle.

    Every proportion is drawn per image (body size and girth, head size and offset, ear shape, leg count, length
    and thickness, tail length and curl), so silhouettes vary continuously; dogs lean bigger with floppy ears."""
    aspect_w, aspect_h = w / ((h + w) / 2), h / ((h + w) / 2)
    cx, cy = aspect_w * rng.uniform(0.35, 0.65), aspect_h * rng.uniform(0.35, 0.65)
    theta = rng.uniform(0, 2 * np.pi)
    rx = rng.uniform(0.2, 0.36) * (1.1 if dog else 1.0)
    ry = rx * rng.uniform(0.4, 0.75)
    up = rng.choice([-1.0, 1.0])  # mirror: which side of the body the legs hang from
    mask = ellipse(h, w, cx, cy, rx, ry, theta)
    hr = ry * rng.uniform(0.7, 1.2)
    hx, hy = _at(cx, cy, theta, rx * rng.uniform(0.8, 1.1), -up * ry * rng.uniform(0.2, 0.8))
    head_tilt = theta + rng.normal(0, 0.3)
    mask |= ellipse(h, w, hx, hy, hr * rng.uniform(1.0, 1.35 if dog else 1.15), hr, head_tilt)
    floppy = rng.uniform() < (0.8 if dog else 0.15)
    ear_len, ear_w = rng.uniform(0.4, 0.7), rng.uniform(0.14, 0.3)
    for side in (-1, 1):  # ears: pointed for most cats, floppy for most dogs
        ex, ey = _at(hx, hy, head_tilt, side * hr * rng.uniform(0.35, 0.6), -up * hr * (0.45 if floppy else 0.75))
        mask |= ellipse(h, w, ex, ey, hr * ear_w, hr * ear_len, head_tilt + side * (0.3 if floppy else 0.35))
    leg_len, leg_w = rng.uniform(0.4, 0.9), rng.uniform(0.12, 0.22)
    for along in rng.choice([-0.75, -0.4, 0.4, 0.75], size=int(rng.integers(2, 5)), replace=False):
        lx, ly = _at(cx, cy, theta, along * rx, up * ry * (0.5 + leg_len))
        mask |= ellipse(h, w, lx, ly, ry * leg_w, ry * leg_len, theta + rng.normal(0, 0.15))
    tail_angle = theta + np.pi - up * rng.uniform(0.1, 1.1)
    tail_len = rx * rng.uniform(0.3, 0.75)
    tx, ty = _at(cx, cy, theta, -rx * 1.0, 0)
    tx, ty = tx + tail_len * np.cos(tail_angle), ty + tail_len * np.sin(tail_angle)
    mask |= ellipse(h, w, tx, ty, tail_len, ry * rng.uniform(0.1, 0.25), tail_angle)
    return mask, float(theta)


def blob_mask(rng: np.random.Generator, h: int, w: int, size: float) -> np.ndarray:
    """A plain object: one to three overlapping ellipses, `size` in mean-side units."""
    aspect_w, aspect_h = w / ((h + w) / 2), h / ((h + w) / 2)
    cx, cy = rng.uniform(0.1, 0.9) * aspect_w, rng.uniform(0.1, 0.9) * aspect_h
    mask = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, 4))):
        mask |= ellipse(h, w, cx + rng.normal(0, size / 2), cy + rng.normal(0, size / 2),
                        size * rng.uniform(0.4, 1), size * rng.uniform(0.3, 0.8), rng.uniform(0, np.pi))
    return mask


def _dilate(mask: np.ndarray) -> np.ndarray:
    # 3x3 dilation by OR-ing shifted copies (no scipy); the image border is not a neighbour.
    out = mask.copy()
    p = np.pad(mask, 1)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= p[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return out


def trimap_from_mask(mask: np.ndarray) -> np.ndarray:
    """Oxford-style trimap: 1 pet, 2 background, 3 a ~2 px band on the outline (one pixel either side)."""
    band = _dilate(mask) & _dilate(~mask)
    return np.where(band, 3, np.where(mask, 1, 2)).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------------------

def textured_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c0, c1 = palette_pair(rng)
    return colourise(background_texture(rng, h, w), c0, c1)


def add_distractors(rng: np.random.Generator, rgb: np.ndarray, n: int, size: tuple[float, float]) -> np.ndarray:
    """Blobs filled with background textures: objects that are not pets."""
    h, w = rgb.shape[:2]
    for _ in range(n):
        m = blob_mask(rng, h, w, rng.uniform(*size))
        rgb = np.where(m[..., None], textured_background(rng, h, w), rgb)
    return rgb


def paste(rgb: np.ndarray, mask: np.ndarray, fill: np.ndarray) -> np.ndarray:
    return np.where(mask[..., None], fill, rgb)


def pet_coat(rng: np.random.Generator, breed: str, h: int, w: int, axis: float) -> np.ndarray:
    hue = _BREED_HUES[breed] if rng.uniform() < 0.5 else None
    c0, c1 = palette_pair(rng, hue)
    coat = colourise(breed_texture(rng, breed, h, w, axis), c0, c1)
    if rng.uniform() < 0.3:  # two-tone: a second colouring of the same kind of coat over large patches
        d0, d1 = palette_pair(rng)
        region = spots(rng, h, w, rng.uniform(1.5, 4), rng.uniform(0.2, 0.5), softness=0.03)
        coat = coat + (colourise(breed_texture(rng, breed, h, w, axis), d0, d1) - coat) * region[..., None]
    return coat


def render_pet(rng: np.random.Generator, breed: str, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A Pets-like image (uint8 [h, w, 3]) and its trimap (uint8 [h, w] in {1, 2, 3})."""
    rgb = textured_background(rng, h, w)
    rgb = add_distractors(rng, rgb, int(rng.choice([0, 1, 2], p=[0.4, 0.4, 0.2])), (0.06, 0.14))
    mask, axis = animal_mask(rng, h, w, dog=breed[0].islower())
    rgb = paste(rgb, mask, pet_coat(rng, breed, h, w, axis))
    return finish(rng, rgb), trimap_from_mask(mask)


def _sky(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    _, y = _grid(h, w)
    if rng.uniform() < 0.7:  # blue, lighter toward the horizon
        top, low = _hsv(rng.uniform(0.55, 0.63), rng.uniform(0.3, 0.7), rng.uniform(0.55, 0.85)), None
        low = _hsv(rng.uniform(0.55, 0.63), rng.uniform(0.05, 0.3), rng.uniform(0.8, 1.0))
    else:  # overcast
        v = rng.uniform(0.55, 0.9)
        top, low = _hsv(0.6, 0.05, v - 0.1), _hsv(0.6, 0.03, v)
    t = np.clip(y / (y.max() + 1e-6), 0, 1) * 0.8 + 0.2 * smooth_noise(rng, h, w, 3)
    return colourise(t, top, low)


def _facade(rng: np.random.Generator, h: int, w: int, theta: float) -> np.ndarray:
    wall = _hsv(rng.uniform(0.04, 0.13), rng.uniform(0.0, 0.45), rng.uniform(0.35, 0.8))
    window = _hsv(rng.uniform(0.5, 0.65), rng.uniform(0.0, 0.3), rng.uniform(0.1, 0.45))
    x, y = _rotate(*_grid(h, w), theta)
    fx, fy, duty = rng.uniform(4, 10), rng.uniform(4, 10), rng.uniform(0.35, 0.6)
    win = (((fx * x) % 1) < duty) & (((fy * y) % 1) < duty)
    t = win * 1.0 + 0.15 * smooth_noise(rng, h, w, 20)
    return colourise(np.clip(t, 0, 1).astype(np.float32), wall, window)


def _scene_buildings(rng, h, w):
    rgb = _facade(rng, h, w, rng.normal(0, 0.06))
    u = (np.arange(w) + 0.5) / w
    if rng.uniform() < 0.6:  # skyline: building tops at a few heights
        blocks = rng.uniform(0.05, 0.35, int(rng.integers(2, 6)))
        top = blocks[np.minimum((u * len(blocks)).astype(int), len(blocks) - 1)]
        v = (np.arange(h) + 0.5)[:, None] / h
        rgb = paste(rgb, v < top[None, :], _sky(rng, h, w))
    if rng.uniform() < 0.2:  # a street in front, overlapping with street scenes
        rgb = paste(rgb, _rows_below(h, w, rng.uniform(0.7, 0.9)), _road(rng, h, w, rng.uniform(0.3, 0.7), 0.6, 3.0))
    return rgb


def _road(rng: np.random.Generator, h: int, w: int, vx: float, vy: float, slope: float) -> np.ndarray:
    """Grey asphalt with lines converging on the vanishing point (vx, vy), in image fractions."""
    u, v = (np.arange(w) + 0.5)[None, :] / w, (np.arange(h) + 0.5)[:, None] / h
    angle = np.arctan2(v - vy + 1e-3, (u - vx) / slope)
    lines = (0.5 + 0.5 * np.sin(angle * rng.uniform(6, 14) + rng.uniform(0, 6.3))) ** 4
    t = rng.uniform(0.2, 0.7) * lines + 0.4 * smooth_noise(rng, h, w, 15)
    grey = rng.uniform(0.2, 0.55)
    return colourise(t.astype(np.float32), _hsv(0.6, rng.uniform(0, 0.1), grey), _hsv(0.12, 0.1, grey + 0.35))


def _scene_street(rng, h, w):
    u, v = (np.arange(w) + 0.5)[None, :] / w, (np.arange(h) + 0.5)[:, None] / h
    vx, vy, slope = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.5), rng.uniform(1.0, 2.5)
    rgb = paste(_facade(rng, h, w, 0.0), ~_rows_below(h, w, vy - rng.uniform(0.05, 0.25)), _sky(rng, h, w))
    # The road is a wedge opening from the vanishing point.
    road = (v > vy) & (np.abs(u - vx) < (v - vy) * slope)
    return paste(rgb, road, _road(rng, h, w, vx, vy, slope))


def _scene_forest(rng, h, w):
    hue = rng.uniform(0.2, 0.4) if rng.uniform() < 0.75 else rng.uniform(0.05, 0.14)
    dark, light = _hsv(hue, rng.uniform(0.4, 0.9), rng.uniform(0.08, 0.3)), _hsv(hue + 0.03, rng.uniform(0.3, 0.8),
                                                                              rng.uniform(0.4, 0.75))
    warp = 0.3 * smooth_noise(rng, h, w, 2)
    trunks = grating(h, w, rng.uniform(3, 8), rng.normal(0, 0.08), rng.uniform(), warp, sharp=3)
    leaves = spots(rng, h, w, rng.uniform(14, 24), 0.5, softness=0.08)
    rgb = colourise(0.35 * trunks + 0.65 * leaves, dark, light)
    if rng.uniform() < 0.3:  # light through the canopy
        rgb = paste(rgb, spots(rng, h, w, 8, 0.08) > 0.5, _sky(rng, h, w))
    return rgb


def _ridge(rng: np.random.Generator, h: int, w: int, base: float, amp: float) -> np.ndarray:
    # A jagged horizon: a few straight slopes plus noise, as a mask of everything below it.
    knots = rng.uniform(-1, 1, int(rng.integers(3, 7)))
    u = (np.arange(w) + 0.5) / w
    profile = base - amp * np.interp(u, np.linspace(0, 1, len(knots)), knots)
    profile = profile + 0.02 * (smooth_noise(rng, 1, w, 30)[0] - 0.5)
    v = (np.arange(h) + 0.5)[:, None] / h
    return v > profile[None, :]


def _scene_mountain(rng, h, w):
    rgb = _sky(rng, h, w)
    rock = _hsv(rng.choice([0.08, 0.6, 0.3]) + rng.normal(0, 0.03), rng.uniform(0.05, 0.4), rng.uniform(0.2, 0.55))
    rock2 = rock + rng.uniform(0.15, 0.35)
    slope = oriented_noise(rng, h, w, rng.uniform(3, 7), rng.choice([-0.7, 0.7]) + np.pi / 2, spread=0.3)
    below = _ridge(rng, h, w, rng.uniform(0.35, 0.55), rng.uniform(0.1, 0.25))
    rgb = paste(rgb, below, colourise(slope, rock, np.clip(rock2, 0, 1)))
    if rng.uniform() < 0.4:  # snow caps: white near the ridge, overlapping with glaciers
        snow = below & ~np.roll(below, int(h * rng.uniform(0.05, 0.15)), axis=0)
        rgb = paste(rgb, snow, np.full(3, rng.uniform(0.8, 1.0), np.float32))
    return rgb


def _scene_glacier(rng, h, w):
    ice0 = _hsv(rng.uniform(0.5, 0.62), rng.uniform(0.1, 0.45), rng.uniform(0.5, 0.8))
    ice1 = _hsv(rng.uniform(0.5, 0.62), rng.uniform(0.0, 0.15), rng.uniform(0.85, 1.0))
    t = 0.6 * smooth_noise(rng, h, w, rng.uniform(2, 4)) + 0.4 * curls(rng, h, w, rng.uniform(2, 4), 2) ** 6
    rgb = colourise(_normalise(t), ice0, ice1)
    if rng.uniform() < 0.5:  # a sky above an icy ridge, overlapping with mountains
        rgb = paste(_sky(rng, h, w), _ridge(rng, h, w, rng.uniform(0.25, 0.5), rng.uniform(0.05, 0.2)), rgb)
    if rng.uniform() < 0.25:  # a lake in front, overlapping with sea
        rgb = paste(rgb, _rows_below(h, w, rng.uniform(0.6, 0.85), rng.normal(0, 0.1)), _water(rng, h, w))
    return rgb


def _water(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Blue-green water with roughly horizontal waves, from calm to choppy."""
    water0 = _hsv(rng.uniform(0.45, 0.62), rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.5))
    water1 = _hsv(rng.uniform(0.45, 0.62), rng.uniform(0.1, 0.4), rng.uniform(0.5, 0.9))
    waves = oriented_noise(rng, h, w, rng.uniform(7, 14), np.pi / 2 + rng.normal(0, 0.1), spread=0.2)
    calm = rng.uniform(0.2, 1.0)
    return colourise(0.5 + calm * (waves - 0.5) + (1 - calm) * (smooth_noise(rng, h, w, 3) - 0.5) * 0.6,
                     water0, water1)


def _rows_below(h: int, w: int, level: float, tilt: float = 0.0) -> np.ndarray:
    u, v = (np.arange(w) + 0.5)[None, :] / w, (np.arange(h) + 0.5)[:, None] / h
    return v > level + tilt * (u - 0.5)


def _scene_sea(rng, h, w):
    rgb = paste(_sky(rng, h, w), _rows_below(h, w, rng.uniform(0.2, 0.55), rng.normal(0, 0.04)), _water(rng, h, w))
    if rng.uniform() < 0.35:  # a beach in the foreground
        sand = colourise(smooth_noise(rng, h, w, 20), _hsv(0.1, 0.35, 0.6), _hsv(0.11, 0.25, 0.85))
        rgb = paste(rgb, _rows_below(h, w, rng.uniform(0.7, 0.92), rng.normal(0, 0.2)), sand)
    return rgb


_SCENES: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "buildings": _scene_buildings, "forest": _scene_forest, "glacier": _scene_glacier,
    "mountain": _scene_mountain, "sea": _scene_sea, "street": _scene_street,
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
        fill = (pet_coat(rng, str(rng.choice(BREEDS)), h, w, rng.uniform(0, np.pi)) if rng.uniform() < 0.5
                else textured_background(rng, h, w))
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


_SPLIT_HEADER = ("#Image CLASS-ID SPECIES BREED ID\n#ID: 1:{k} Class ids\n#SPECIES: 1:Cat 2:Dog\n"
                 "#BREED ID: 1-{c}:Cat 1-{d}:Dog\n#All images with 1st letter as captial are cat images\n"
                 "#images with small first letter are dog images\n")


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
    for split, per_class, parity in (("seg_train", spec.intel_train_per_class, 0),
                                     ("seg_test", spec.intel_test_per_class, 1)):
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
    raise ValueError(
        f"{root} already holds {'other synthetic data ' + json.dumps(found) if found else 'files that are not synthetic data'}"
        f", not {json.dumps(_manifest(spec))}; choose another root or delete {root} first")


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
        tick, close = _ticker(spec.pets + 6 * (spec.intel_train_per_class + spec.intel_test_per_class)
                              + spec.unlabeled, progress)
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
