"""The building blocks of the synthetic datasets: coordinates and colours, a continuous space of textures
(noise, gratings, spots, fur, curls, rosettes, tiles, ...), breed coats, silhouettes and masks, compositing,
and the elements of Intel-like scenes (sky, facades, roads, ridges, water).

Every random draw comes from an explicit numpy generator, in a fixed order, so an image rendered from the
same generator is byte-identical; `studylib.data.synth` renders whole images and writes the datasets.
"""

from __future__ import annotations

import colorsys
from functools import lru_cache

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------------------------------------------
# Coordinates, colours
# ----------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _base_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    # Coordinates in units of the mean side, so texture frequencies mean "cycles per image" whatever the size.
    # Cached because every texture and shape of an image asks for the same grid; read-only so no caller edits it.
    s = (h + w) / 2
    x = np.broadcast_to((np.arange(w, dtype=np.float32) + 0.5) / s, (h, w))
    y = np.broadcast_to((np.arange(h, dtype=np.float32)[:, None] + 0.5) / s, (h, w))
    return x, y


def coords(h: int, w: int, cx: float = 0.0, cy: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    x, y = _base_grid(h, w)
    return (x - np.float32(cx), y - np.float32(cy)) if (cx or cy) else (x, y)


def rotate(x: np.ndarray, y: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = float(np.cos(theta)), float(np.sin(theta))  # python floats keep float32 arrays float32
    return x * c + y * s, -x * s + y * c


def hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))), np.float32)


def palette_pair(rng: np.random.Generator, hue: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Two colours (dark, light) from the palette that pets, backgrounds and objects all share."""
    h = rng.uniform() if hue is None else hue + rng.normal(0, 0.04)
    s = rng.uniform(0.05, 0.75)
    v_dark, gap = rng.uniform(0.1, 0.6), rng.uniform(0.15, 0.55)
    light = hsv(h + rng.normal(0, 0.05), s * rng.uniform(0.5, 1.2), v_dark + gap)
    return hsv(h, s, v_dark), light


def colourise(t: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    """Map a texture in [0, 1] to RGB by blending two colours."""
    return c0 + (c1 - c0) * t[..., None]


# ----------------------------------------------------------------------------------------------------------------
# Textures: each returns a float32 [h, w] array in [0, 1]
# ----------------------------------------------------------------------------------------------------------------


def normalise(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return ((a - lo) / (hi - lo + 1e-8)).astype(np.float32)


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: float) -> np.ndarray:
    """Value noise with about `cells` blobs across the image (bicubic upsampling of a coarse random grid)."""
    gh, gw = max(2, round(cells * h / ((h + w) / 2)) + 2), max(2, round(cells * w / ((h + w) / 2)) + 2)
    coarse = Image.fromarray(rng.standard_normal((gh, gw)).astype(np.float32))
    return normalise(np.asarray(coarse.resize((w, h), Image.BICUBIC)))


def grating(
    h: int, w: int, freq: float, theta: float, phase: float = 0.0, warp: np.ndarray | None = None, sharp: float = 1.0
) -> np.ndarray:
    """Sinusoidal stripes; `warp` (in cycles) bends them, `sharp` > 1 squares them off."""
    x, _ = rotate(*coords(h, w), theta)
    arg = 2 * np.pi * (freq * x + phase + (0 if warp is None else warp))
    return (0.5 + 0.5 * np.tanh(sharp * np.sin(arg)) / np.tanh(sharp)).astype(np.float32)


def oriented_noise(
    rng: np.random.Generator, h: int, w: int, freq: float, theta: float, spread: float = 0.25, k: int = 8
) -> np.ndarray:
    """Fur-like band-limited noise: a sum of sinusoids around one frequency and orientation."""
    x, y = coords(h, w)
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
    x, y = rotate(*coords(h, w), theta)
    row = np.floor(freq * y)
    if brick:
        fx, fy = (freq * x + 0.5 * (row % 2)) % 1, (freq * y) % 1
        return (np.minimum(fx, fy) > 0.12).astype(np.float32)
    return ((row + np.floor(freq * x)) % 2).astype(np.float32)


def linear_ramp(h: int, w: int, theta: float) -> np.ndarray:
    x, _ = rotate(*coords(h, w), theta)
    return normalise(x)


# Texture families (the functions below): one shared, continuous space. Each family draws its own frequencies,
# orientations, spot sizes, sharpness and warp per image, so no two coats (or backgrounds) are alike; breeds and
# backgrounds are tendencies over this space (which families they favour, and how fine) rather than fixed textures.


def _freq(rng: np.random.Generator, fine: float, lo: float = 2.0, hi: float = 16.0) -> float:
    # Frequencies drawn on a log scale; `fine` in [0, 1] shifts the draw toward the high end.
    u = np.clip(rng.beta(1 + 3 * fine, 1 + 3 * (1 - fine)), 0, 1)
    return float(lo * (hi / lo) ** u)


def random_texture(
    rng: np.random.Generator,
    h: int,
    w: int,
    family: str,
    axis: float | None = None,
    fine: float = 0.5,
    contrast: tuple[float, float] = (0.45, 1.0),
) -> np.ndarray:
    """One texture of `family` with random parameters; `axis` (if given) is what oriented textures follow."""
    theta = rng.uniform(0, np.pi) if axis is None else axis + np.pi / 2 + rng.normal(0, 0.35)
    if family == "stripes":
        warp = rng.uniform(0.3, 1.0) * smooth_noise(rng, h, w, rng.uniform(1, 4))
        t = grating(h, w, _freq(rng, fine), theta, rng.uniform(), warp, sharp=rng.uniform(0.5, 4))
    elif family == "grating":  # regular, straight, man-made stripes
        t = grating(
            h, w, _freq(rng, fine), theta, rng.uniform(), 0.1 * smooth_noise(rng, h, w, 1), sharp=rng.uniform(0.5, 6)
        )
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
        t = np.exp(-(((n - q) / rng.uniform(0.03, 0.08)) ** 2)) + 0.6 * (n > q + 0.1)
    elif family == "crosshatch":
        f, d = _freq(rng, fine, 3, 12), rng.uniform(0.5, np.pi / 2)
        t = 0.5 * (grating(h, w, f, theta) + grating(h, w, f * rng.uniform(0.7, 1.3), theta + d))
        t = t + rng.uniform(0, 1) * smooth_noise(rng, h, w, 2)
    elif family == "tiles":
        t = 0.85 * checker(h, w, _freq(rng, fine, 1.5, 7), theta, brick=rng.uniform() < 0.5) + 0.15 * smooth_noise(
            rng, h, w, 3
        )
    elif family == "gradient":
        t = rng.uniform(0.5, 0.9) * linear_ramp(h, w, rng.uniform(0, 2 * np.pi)) + 0.3 * smooth_noise(rng, h, w, 2)
    elif family == "blotches":
        t = spots(rng, h, w, rng.uniform(1.5, 5), rng.uniform(0.3, 0.6), softness=rng.uniform(0.03, 0.15))
    elif family == "grain":
        t = rng.uniform(0.3, 0.7) * smooth_noise(rng, h, w, 3) + smooth_noise(rng, h, w, _freq(rng, fine, 12, 40))
    elif family == "rings":
        x, y = coords(h, w, rng.uniform(-0.3, 1.3), rng.uniform(-0.3, 1.3))
        r = np.sqrt(x * x + y * y) + 0.1 * smooth_noise(rng, h, w, 2)
        t = 0.5 + 0.5 * np.tanh(rng.uniform(0.5, 3) * np.sin(2 * np.pi * _freq(rng, fine, 2, 12) * r))
    else:
        raise ValueError(f"unknown texture family {family!r}")
    t = normalise(np.asarray(t, np.float32))
    if rng.uniform() < 0.5:  # either polarity: dark marks on light or light on dark
        t = 1 - t
    c = rng.uniform(*contrast)  # contrast of the pattern itself
    return (0.5 + c * (t - 0.5)).astype(np.float32)


# Backgrounds wear geometric, man-made or smooth families (gratings, tiles, cross-hatch, rings, grain, blotches,
# gradients) at the same frequencies and contrasts as the coats, so texture *energy* no longer finds the pet; the
# *kind* of texture does (organic: warped stripes, spots, fur, curls, rosettes, patches), and that kind comes in far
# more variants than a few labelled images show. A few backgrounds wear animal-like textures too.
_BACKGROUND_FAMILY_P = {
    "gradient": 0.08,
    "blotches": 0.1,
    "tiles": 0.16,
    "grain": 0.1,
    "crosshatch": 0.16,
    "grating": 0.16,
    "rings": 0.14,
    "spots": 0.03,
    "fur": 0.04,
    "curls": 0.03,
}


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
    return random_texture(
        rng, h, w, family, axis, fine=float(np.clip(fine + rng.normal(0, 0.15), 0, 1)), contrast=(0.75, 1.0)
    )


# Breeds lean toward a hue half of the time (the other half they take any palette colour, like the background).
# The hues are spread around the wheel so that, pooled over breeds, pets are no redder or bluer than backgrounds.
_BREED_HUES = {
    "Tigrine": 0.08,
    "Leopardine": 0.25,
    "Smokey": 0.58,
    "brindle_hound": 0.0,
    "patched_pointer": 0.75,
    "curly_poodle": 0.42,
}


def pet_coat(rng: np.random.Generator, breed: str, h: int, w: int, axis: float) -> np.ndarray:
    hue = _BREED_HUES[breed] if rng.uniform() < 0.5 else None
    c0, c1 = palette_pair(rng, hue)
    coat = colourise(breed_texture(rng, breed, h, w, axis), c0, c1)
    if rng.uniform() < 0.3:  # two-tone: a second colouring of the same kind of coat over large patches
        d0, d1 = palette_pair(rng)
        region = spots(rng, h, w, rng.uniform(1.5, 4), rng.uniform(0.2, 0.5), softness=0.03)
        coat = coat + (colourise(breed_texture(rng, breed, h, w, axis), d0, d1) - coat) * region[..., None]
    return coat


# ----------------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------------


def ellipse(h: int, w: int, cx: float, cy: float, rx: float, ry: float, theta: float) -> np.ndarray:
    """Boolean mask of a rotated ellipse (centre and radii in mean-side units)."""
    x, y = rotate(*coords(h, w, cx, cy), theta)
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
        mask |= ellipse(
            h,
            w,
            cx + rng.normal(0, size / 2),
            cy + rng.normal(0, size / 2),
            size * rng.uniform(0.4, 1),
            size * rng.uniform(0.3, 0.8),
            rng.uniform(0, np.pi),
        )
    return mask


def _dilate(mask: np.ndarray) -> np.ndarray:
    # 3x3 dilation by OR-ing shifted copies (no scipy); the image border is not a neighbour.
    out = mask.copy()
    p = np.pad(mask, 1)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= p[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def trimap_from_mask(mask: np.ndarray) -> np.ndarray:
    """Oxford-style trimap: 1 pet, 2 background, 3 a ~2 px band on the outline (one pixel either side)."""
    band = _dilate(mask) & _dilate(~mask)
    return np.where(band, 3, np.where(mask, 1, 2)).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Compositing
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
