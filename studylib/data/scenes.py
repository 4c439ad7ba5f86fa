"""Scene elements of the synthetic Intel-like images: skies, facades, roads, ridges and water (float32
RGB, or masks), built from the texture generators."""

from __future__ import annotations

import numpy as np

from studylib.data.textures import colourise, coords, hsv, oriented_noise, rotate, smooth_noise


def sky(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    _, y = coords(h, w)
    if rng.uniform() < 0.7:  # blue, lighter toward the horizon
        top, low = hsv(rng.uniform(0.55, 0.63), rng.uniform(0.3, 0.7), rng.uniform(0.55, 0.85)), None
        low = hsv(rng.uniform(0.55, 0.63), rng.uniform(0.05, 0.3), rng.uniform(0.8, 1.0))
    else:  # overcast
        v = rng.uniform(0.55, 0.9)
        top, low = hsv(0.6, 0.05, v - 0.1), hsv(0.6, 0.03, v)
    t = np.clip(y / (y.max() + 1e-6), 0, 1) * 0.8 + 0.2 * smooth_noise(rng, h, w, 3)
    return colourise(t, top, low)


def facade(rng: np.random.Generator, h: int, w: int, theta: float) -> np.ndarray:
    wall = hsv(rng.uniform(0.04, 0.13), rng.uniform(0.0, 0.45), rng.uniform(0.35, 0.8))
    window = hsv(rng.uniform(0.5, 0.65), rng.uniform(0.0, 0.3), rng.uniform(0.1, 0.45))
    x, y = rotate(*coords(h, w), theta)
    fx, fy, duty = rng.uniform(4, 10), rng.uniform(4, 10), rng.uniform(0.35, 0.6)
    win = (((fx * x) % 1) < duty) & (((fy * y) % 1) < duty)
    t = win * 1.0 + 0.15 * smooth_noise(rng, h, w, 20)
    return colourise(np.clip(t, 0, 1).astype(np.float32), wall, window)


def road(rng: np.random.Generator, h: int, w: int, vx: float, vy: float, slope: float) -> np.ndarray:
    """Grey asphalt with lines converging on the vanishing point (vx, vy), in image fractions."""
    u, v = (np.arange(w) + 0.5)[None, :] / w, (np.arange(h) + 0.5)[:, None] / h
    angle = np.arctan2(v - vy + 1e-3, (u - vx) / slope)
    lines = (0.5 + 0.5 * np.sin(angle * rng.uniform(6, 14) + rng.uniform(0, 6.3))) ** 4
    t = rng.uniform(0.2, 0.7) * lines + 0.4 * smooth_noise(rng, h, w, 15)
    grey = rng.uniform(0.2, 0.55)
    return colourise(t.astype(np.float32), hsv(0.6, rng.uniform(0, 0.1), grey), hsv(0.12, 0.1, grey + 0.35))


def ridge(rng: np.random.Generator, h: int, w: int, base: float, amp: float) -> np.ndarray:
    # A jagged horizon: a few straight slopes plus noise, as a mask of everything below it.
    knots = rng.uniform(-1, 1, int(rng.integers(3, 7)))
    u = (np.arange(w) + 0.5) / w
    profile = base - amp * np.interp(u, np.linspace(0, 1, len(knots)), knots)
    profile = profile + 0.02 * (smooth_noise(rng, 1, w, 30)[0] - 0.5)
    v = (np.arange(h) + 0.5)[:, None] / h
    return v > profile[None, :]


def water(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Blue-green water with roughly horizontal waves, from calm to choppy."""
    water0 = hsv(rng.uniform(0.45, 0.62), rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.5))
    water1 = hsv(rng.uniform(0.45, 0.62), rng.uniform(0.1, 0.4), rng.uniform(0.5, 0.9))
    waves = oriented_noise(rng, h, w, rng.uniform(7, 14), np.pi / 2 + rng.normal(0, 0.1), spread=0.2)
    calm = rng.uniform(0.2, 1.0)
    return colourise(0.5 + calm * (waves - 0.5) + (1 - calm) * (smooth_noise(rng, h, w, 3) - 0.5) * 0.6, water0, water1)


def rows_below(h: int, w: int, level: float, tilt: float = 0.0) -> np.ndarray:
    u, v = (np.arange(w) + 0.5)[None, :] / w, (np.arange(h) + 0.5)[:, None] / h
    return v > level + tilt * (u - 0.5)
