"""`study data check`: what is really in a dataset folder, as one JSON-ready dict.

Reads every file's header (and decodes it, to find the unreadable ones): sample counts per split
and class, the trimap value set, image size range, colour modes, formats that disagree with the
file extension, and unreadable files.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from studylib.core.train import progress_enabled
from studylib.data.readers import IMAGE_EXTENSIONS, intel_split_dir, list_images, pets_root, read_pets_list

EXTENSION_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".gif": "GIF",
    ".bmp": "BMP",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


class _Survey:
    """Accumulates per-file facts: modes, formats, sizes, mismatches, unreadable files."""

    def __init__(self, root: Path):
        self.root, self.modes, self.formats = root, Counter(), Counter()
        self.widths, self.heights, self.mismatched, self.unreadable = [], [], [], []

    def add(self, path: Path) -> None:
        try:
            with Image.open(path) as im:
                fmt, mode, (w, h) = im.format, im.mode, im.size
                im.load()
        except Exception as e:  # any decoder failure makes the file unreadable
            self.unreadable.append({"file": self._rel(path), "error": f"{type(e).__name__}: {e}"})
            return
        self.modes[mode] += 1
        self.formats[fmt] += 1
        self.widths.append(w)
        self.heights.append(h)
        expected = EXTENSION_FORMATS.get(path.suffix.lower())
        if expected and fmt != expected:
            self.mismatched.append({"file": self._rel(path), "format": fmt, "mode": mode})

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def report(self) -> dict:
        size = (
            {"width": [min(self.widths), max(self.widths)], "height": [min(self.heights), max(self.heights)]}
            if self.widths
            else None
        )
        return {
            "image_size_range": size,
            "colour_modes": dict(sorted(self.modes.items())),
            "formats": dict(sorted(self.formats.items())),
            "format_not_matching_extension": self.mismatched,
            "unreadable": self.unreadable,
        }


def _bar(items, desc):
    return tqdm(items, desc=desc, disable=not progress_enabled(), leave=False)


def check_pets(root: str | Path) -> dict:
    root = pets_root(root)
    survey, splits, listed = _Survey(root), {}, set()
    trimap_values: set[int] = set()
    for split in ("trainval", "test"):
        entries = read_pets_list(root, split)
        listed |= {n for n, _ in entries}
        breeds = Counter(n.rsplit("_", 1)[0] for n, _ in entries)
        splits[split] = {
            "samples": len(entries),
            "breeds": dict(sorted(breeds.items())),
            "class_ids": sorted({c + 1 for _, c in entries}),
        }
    images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    for p in _bar(images, "pets images"):
        survey.add(p)
    for p in _bar(sorted((root / "annotations" / "trimaps").glob("*.png")), "trimaps"):
        if p.name.startswith("._"):  # macOS resource forks shipped in the official archive
            continue
        try:
            with Image.open(p) as im:
                trimap_values |= set(np.unique(np.asarray(im)).tolist())
        except Exception as e:
            survey.unreadable.append({"file": survey._rel(p), "error": f"{type(e).__name__}: {e}"})
    return {
        "kind": "pets",
        "root": str(root),
        "splits": splits,
        "breeds": len(set().union(*(s["breeds"] for s in splits.values()))),
        "images_in_folder": len(images),
        "images_in_no_split": sorted(p.stem for p in images if p.stem not in listed),
        "trimap_values": sorted(trimap_values),
        **survey.report(),
    }


def check_intel(root: str | Path) -> dict:
    survey, splits = _Survey(Path(root)), {}
    for split in ("train", "test"):
        try:
            base = intel_split_dir(root, split)
        except Exception:
            continue
        counts = {}
        for c in sorted(d.name for d in base.iterdir() if d.is_dir()):
            files = sorted(p for p in (base / c).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            counts[c] = len(files)
            for p in _bar(files, f"intel {split}/{c}"):
                survey.add(p)
        splits[split] = {"samples": sum(counts.values()), "classes": counts}
    return {
        "kind": "intel",
        "root": str(root),
        "splits": splits,
        "classes": sorted(set().union(*(s["classes"] for s in splits.values()))),
        **survey.report(),
    }


def check_images(root: str | Path) -> dict:
    paths = list_images(root)
    survey = _Survey(Path(root))
    for p in _bar(paths, "images"):
        survey.add(p)
    folders = {p.parent for p in paths}
    return {"kind": "images", "root": str(root), "samples": len(paths), "folders": len(folders), **survey.report()}


CHECKS = {"pets": check_pets, "intel": check_intel, "images": check_images}


def check(kind: str, root: str | Path) -> dict:
    if kind not in CHECKS:
        raise ValueError(f"unknown dataset kind {kind!r}; valid: {', '.join(CHECKS)}")
    return CHECKS[kind](root)
