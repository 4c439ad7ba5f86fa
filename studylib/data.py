"""Readers for the three datasets in their published layouts, decoded once into a uint8 cache.

- pets:   Oxford-IIIT Pet  images/*.jpg, annotations/trimaps/*.png, annotations/{trainval,test}.txt
          (also torchvision's <root>/oxford-iiit-pet/ folder)
- intel:  Intel Image Classification  seg_train/<class>/*.jpg, seg_test/<class>/*.jpg (Kaggle nests seg_train/seg_train)
- images: any folder tree of images (ImageNet train/<wnid>/*.JPEG, or flat)

Images are decoded by content (a GIF or PNG named .jpg is fine), converted to RGB and resized to the
study resolution. Arrays are channel-first uint8 tensors: images [N, 3, S, S], trimaps [N, S, S]
with classes 0 pet, 1 background, 2 boundary (the trimap values 1, 2, 3 minus one).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .store import atomic_save_npy

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
INTEL_CLASSES = ("buildings", "forest", "glacier", "mountain", "sea", "street")
PET_CLASSES = ("pet", "background", "boundary")
RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


class DataError(ValueError):
    """A dataset folder or file is missing or unreadable; the message names it and the fix."""


@dataclass
class SegData:
    images: torch.Tensor      # [N, 3, S, S] uint8
    masks: torch.Tensor       # [N, S, S] uint8, classes 0..2
    names: list[str]
    labels: torch.Tensor      # [N] breed class 0..36

    def subset(self, idx) -> "SegData":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return SegData(self.images[idx], self.masks[idx], [self.names[i] for i in idx.tolist()], self.labels[idx])

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class ClassData:
    images: torch.Tensor      # [N, 3, S, S] uint8
    labels: torch.Tensor      # [N] long
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------- decoding and the cache

def decode_image(path: Path, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Decode any image file by content to RGB [S, S, 3] uint8."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            return np.asarray(im.resize((size, size), RESAMPLE[interpolation]), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}. Replace or delete the file.") from None


def decode_trimap(path: Path, size: int) -> np.ndarray:
    """Decode a trimap PNG (1 pet, 2 background, 3 boundary) to classes 0..2 at [S, S]."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.resize((size, size), Image.NEAREST))
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read trimap {path}: {e}. Replace or delete the file.") from None
    if arr.ndim != 2 or arr.min() < 1 or arr.max() > 3:
        raise DataError(f"trimap {path} must be single-channel with values 1, 2, 3; "
                        f"got shape {arr.shape} and values {np.unique(arr)[:8].tolist()}")
    return (arr - 1).astype(np.uint8)


def default_cache_dir() -> Path:
    return Path(os.environ.get("STUDYLIB_CACHE", Path.home() / ".cache" / "studylib"))


def _cache_key(paths: list[Path], what: str) -> str:
    """Hash of the source files (path, size, mtime) and what was done to them."""
    h = hashlib.sha256(what.encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cached_stack(paths: list[Path], what: str, decode, cache_dir: str | Path | None,
                 empty_shape: tuple = (0,)) -> np.ndarray:
    """Decode every path with `decode` and stack; reuse the cached array when the sources and `what`
    (resolution, interpolation, kind) are unchanged."""
    if not paths:
        return np.zeros(empty_shape, np.uint8)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    file = cache_dir / f"{what.split('|')[0]}-{_cache_key(paths, what)}.npy"
    if file.exists():
        return np.load(file)
    arr = np.stack([decode(p) for p in paths])
    atomic_save_npy(file, arr)
    return arr


def _chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


# ---------------------------------------------------------------- Oxford-IIIT Pet

def pets_root(root: str | Path) -> Path:
    root = Path(root)
    for cand in (root, root / "oxford-iiit-pet"):
        if (cand / "images").is_dir() and (cand / "annotations" / "trimaps").is_dir():
            return cand
    raise DataError(f"no Oxford-IIIT Pet layout under {root}: expected images/ and annotations/trimaps/ "
                    f"(or oxford-iiit-pet/images/). Set data.pets to the dataset folder.")


def read_pets_list(root: Path, split: str) -> list[tuple[str, int]]:
    """Lines '<name> <class id 1..37> <species> <breed id>' -> [(name, class id - 1)]."""
    file = root / "annotations" / f"{split}.txt"
    if not file.is_file():
        raise DataError(f"missing split list {file}; the official release has trainval.txt and test.txt")
    out = []
    for line in file.read_text().splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        out.append((parts[0], int(parts[1]) - 1))
    return out


def load_pets(root: str | Path, split: str, size: int, interpolation: str = "bilinear",
              cache_dir: str | Path | None = None) -> SegData:
    """One official split ('trainval' or 'test') at size x size."""
    root = pets_root(root)
    entries = read_pets_list(root, split)
    imgs = [_find_image(root / "images", name) for name, _ in entries]
    tris = [root / "annotations" / "trimaps" / f"{name}.png" for name, _ in entries]
    for t in tris:
        if not t.is_file():
            raise DataError(f"missing trimap {t} for an image listed in {split}.txt")
    images = cached_stack(imgs, f"pets-img|{size}|{interpolation}",
                          lambda p: decode_image(p, size, interpolation), cache_dir,
                          (0, size, size, 3))
    masks = cached_stack(tris, f"pets-trimap|{size}", lambda p: decode_trimap(p, size), cache_dir, (0, size, size))
    labels = torch.tensor([c for _, c in entries], dtype=torch.long)
    return SegData(_chw(images), torch.from_numpy(masks), [n for n, _ in entries], labels)


def _find_image(folder: Path, name: str) -> Path:
    p = folder / f"{name}.jpg"
    if p.is_file():
        return p
    for ext in IMAGE_EXTENSIONS:
        if (folder / f"{name}{ext}").is_file():
            return folder / f"{name}{ext}"
    raise DataError(f"image {name} listed in the split file is missing from {folder}")


# ---------------------------------------------------------------- Intel scenes

def intel_split_dir(root: str | Path, split: str) -> Path:
    """seg_train/ or Kaggle's doubly nested seg_train/seg_train/."""
    base = Path(root) / f"seg_{split}"
    if (base / f"seg_{split}").is_dir():
        base = base / f"seg_{split}"
    if not base.is_dir():
        raise DataError(f"no Intel layout under {root}: expected seg_{split}/<class>/*.jpg. "
                        f"Set data.intel to the dataset folder.")
    return base


def load_intel(root: str | Path, split: str, size: int, cache_dir: str | Path | None = None) -> ClassData:
    base = intel_split_dir(root, split)
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{base} holds no class folders")
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = sorted(p for p in (base / c).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [k] * len(files)
    images = cached_stack(paths, f"intel-img|{size}|bilinear", lambda p: decode_image(p, size), cache_dir,
                          (0, size, size, 3))
    return ClassData(_chw(images), torch.tensor(labels, dtype=torch.long), classes)


# ---------------------------------------------------------------- unlabeled images

def list_images(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; set data.images to a folder of images")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def nested_subset(n_total: int, n: int, seed: int) -> np.ndarray:
    """The first n of one seeded permutation: the subset of size n lies inside every larger one."""
    return np.random.default_rng(seed).permutation(n_total)[:n]


def load_images(root: str | Path, n: int, size: int, seed: int, cache_dir: str | Path | None = None) -> torch.Tensor:
    """A seeded, nested subset of n unlabeled images -> [n, 3, S, S] uint8."""
    paths = list_images(root)
    if n > len(paths):
        raise DataError(f"{n} pre-training images requested but {root} holds {len(paths)}; "
                        f"lower grid.pretrain_sizes or point data.images at a larger folder")
    chosen = [paths[i] for i in sorted(nested_subset(len(paths), n, seed))]
    return _chw(cached_stack(chosen, f"images|{size}|bilinear", lambda p: decode_image(p, size), cache_dir,
                            (0, size, size, 3)))
