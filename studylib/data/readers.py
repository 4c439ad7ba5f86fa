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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from studylib.core.files import atomic_save_npy, atomic_write_json, read_json
from studylib.data import decoders
from studylib.data.decoders import (  # noqa: F401 (readers.decode_image etc.: the names callers use)
    RESAMPLE,
    aspect_geometry,
    decode_image,
    decode_image_aspect,
    decode_trimap,
    image_valid_size,
)
from studylib.data.resident import Origin
from studylib.data.sources import DataError, default_cache_dir

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
INTEL_CLASSES = ("buildings", "forest", "glacier", "mountain", "sea", "street")
PET_CLASSES = ("pet", "background", "boundary")


@dataclass
class SegData:
    images: torch.Tensor  # [N, 3, S, S] uint8
    masks: torch.Tensor  # [N, S, S] uint8, classes 0..2
    names: list[str]
    labels: torch.Tensor  # [N] breed class 0..36
    skipped: list[str] = field(default_factory=list)  # unreadable files left out
    origin: Origin | None = None  # where images' rows lie in the decoded cache (studylib.data.resident shares them)
    mask_origin: Origin | None = None  # the same for masks

    def subset(self, idx) -> SegData:
        idx = torch.as_tensor(idx, dtype=torch.long)
        origins = [None if o is None else o.subset(idx.numpy()) for o in (self.origin, self.mask_origin)]
        names = [self.names[i] for i in idx.tolist()]
        return SegData(self.images[idx], self.masks[idx], names, self.labels[idx], self.skipped, *origins)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class ClassData:
    images: torch.Tensor  # [N, 3, S, S] uint8
    labels: torch.Tensor  # [N] long
    classes: list[str]
    skipped: list[str] = field(default_factory=list)
    origin: Origin | None = None  # where images' rows lie in the decoded cache (studylib.data.resident shares them)

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------- decoding and the cache


def _cache_key(paths: list[Path], what: str) -> str:
    """Hash of the source files (path, size, mtime) and what was done to them."""
    h = hashlib.sha256(what.encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cached_stack(
    paths: list[Path], what: str, decode, cache_dir: str | Path | None, empty_shape: tuple = (0,), skip: bool = False
) -> tuple[np.ndarray, list[int]]:
    """Decode every path with `decode` and stack; reuse the cached array when the sources and `what`
    (resolution, interpolation, kind) are unchanged. Returns the array and the indices of unreadable
    files: with `skip` their rows are zeros (callers drop them), without it the first one is an error."""
    arr, bad, _ = _cached(paths, what, decode, cache_dir, empty_shape, skip)
    return arr, bad


def _cached(paths: list[Path], what: str, decode, cache_dir, empty_shape: tuple, skip: bool, batch=None):
    """cached_stack, the array memory-mapped from its file, and that file (None for no paths). `batch`, when
    given, decodes a list of paths at once -> [(image or None, None or why unreadable)] instead of `decode`."""
    if not paths:
        return np.zeros(empty_shape, np.uint8), [], None
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    file = cache_dir / f"{what.split('|')[0]}-{_cache_key(paths, what)}.npy"
    unreadable_file = file.with_suffix(".unreadable.json")
    if file.exists():
        bad = [tuple(b) for b in read_json(unreadable_file, [])]
    else:
        arr, bad = _decode_all(paths, decode, what.split("|")[0], skip, batch)
        if bad:
            atomic_write_json(unreadable_file, bad)
        atomic_save_npy(file, arr)
    if bad and not skip:
        raise DataError(bad[0][1])
    # memory-mapped: the same values as a full read, without a host copy of the whole split
    return np.load(file, mmap_mode="r"), [i for i, _ in bad], file


def _decode_all(paths: list[Path], decode, name: str, skip: bool, batch=None):
    from tqdm.auto import tqdm

    from studylib.core.train import progress_enabled

    rows, bad = [], []
    if batch is not None:
        decoded = batch(paths)
    else:
        decoded = (_decode_one(decode, p) for p in paths)
    bar = tqdm(decoded, total=len(paths), desc=f"decoding {name}", disable=not progress_enabled(), leave=False)
    for i, (row, reason) in enumerate(bar):
        if reason is not None:
            if not skip:
                raise DataError(reason)
            bad.append((i, reason))
        rows.append(row)
    shape = next((r.shape for r in rows if r is not None), None)
    if shape is None:
        raise DataError(f"none of the {len(paths)} files could be read (first: {bad[0][1]})")
    return np.stack([np.zeros(shape, np.uint8) if r is None else r for r in rows]), bad


def _decode_one(decode, path: Path):
    try:
        return decode(path), None
    except DataError as e:
        return None, str(e)


def _image_decoding(kind: str, size: int, interpolation: str, device) -> tuple[str, object]:
    """The cache kind and batch decoder of images at size x size for `device` (decoders.study_device when
    None): PIL per file on the CPU (kind unchanged, batch None); nvJPEG on a CUDA device, kind `<kind>-nvjpeg`,
    so that the file's name says which decoder wrote it and the two never meet."""
    device = decoders.study_device(device)
    if decoders.decoder_for(device) == "pil":
        return kind, None
    geometry = decoders.Geometry(size, None, interpolation)
    return f"{kind}-nvjpeg", lambda paths: decoders.decode_files(paths, geometry, device)


def _chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


# ---------------------------------------------------------------- Oxford-IIIT Pet


def pets_root(root: str | Path) -> Path:
    root = Path(root)
    for cand in (root, root / "oxford-iiit-pet"):
        if (cand / "images").is_dir() and (cand / "annotations" / "trimaps").is_dir():
            return cand
    raise DataError(
        f"no Oxford-IIIT Pet layout under {root}: expected images/ and annotations/trimaps/ "
        f"(or oxford-iiit-pet/images/). Set data.pets to the dataset folder."
    )


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


def load_pets(
    root: str | Path,
    split: str,
    size: int,
    interpolation: str = "bilinear",
    cache_dir: str | Path | None = None,
    skip: bool = False,
    device=None,
) -> SegData:
    """One official split ('trainval' or 'test') at size x size; the images decoded for `device` (PIL, or
    nvJPEG on a CUDA device; default decoders.study_device), the trimaps by PIL."""
    root = pets_root(root)
    entries = read_pets_list(root, split)
    imgs = [_find_image(root / "images", name) for name, _ in entries]
    tris = [root / "annotations" / "trimaps" / f"{name}.png" for name, _ in entries]
    for t in tris:
        if not t.is_file():
            raise DataError(f"missing trimap {t} for an image listed in {split}.txt")
    kind, batch = _image_decoding("pets-img", size, interpolation, device)
    images, bad_img, img_file = _cached(
        imgs,
        f"{kind}|{size}|{interpolation}",
        lambda p: decode_image(p, size, interpolation),
        cache_dir,
        (0, size, size, 3),
        skip,
        batch,
    )
    masks, bad_tri, tri_file = _cached(
        tris, f"pets-trimap|{size}", lambda p: decode_trimap(p, size), cache_dir, (0, size, size), skip
    )
    bad = set(bad_img) | set(bad_tri)
    keep = [i for i in range(len(entries)) if i not in bad]
    labels = torch.tensor([entries[i][1] for i in keep], dtype=torch.long)
    return SegData(
        _chw(images[keep]),
        torch.from_numpy(np.asarray(masks[keep])),
        [entries[i][0] for i in keep],
        labels,
        [str(imgs[i]) for i in sorted(bad)],
        _origin(img_file, images, keep, chw=True),
        _origin(tri_file, masks, keep),
    )


def _origin(file, array: np.ndarray, keep: list[int], chw: bool = False) -> Origin | None:
    return None if file is None else Origin.of(file, array, keep, chw)


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
        raise DataError(
            f"no Intel layout under {root}: expected seg_{split}/<class>/*.jpg. Set data.intel to the dataset folder."
        )
    return base


def load_intel(
    root: str | Path,
    split: str,
    size: int,
    cache_dir: str | Path | None = None,
    skip: bool = False,
    interpolation: str = "bilinear",
    device=None,
) -> ClassData:
    """One split ('train' or 'test') at size x size, decoded for `device` as load_pets decodes."""
    base = intel_split_dir(root, split)
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{base} holds no class folders")
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = sorted(p for p in (base / c).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [k] * len(files)
    kind, batch = _image_decoding("intel-img", size, interpolation, device)
    images, bad, file = _cached(
        paths,
        f"{kind}|{size}|{interpolation}",
        lambda p: decode_image(p, size, interpolation),
        cache_dir,
        (0, size, size, 3),
        skip,
        batch,
    )
    keep = [i for i in range(len(paths)) if i not in set(bad)]
    return ClassData(
        _chw(images[keep]),
        torch.tensor(labels, dtype=torch.long)[keep],
        classes,
        [str(paths[i]) for i in bad],
        _origin(file, images, keep, chw=True),
    )


# ---------------------------------------------------------------- unlabeled images


def list_images(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; set data.images to a folder of images")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def nested_subset(n_total: int, n: int, seed: int) -> np.ndarray:
    """The first n of one seeded permutation: the subset of size n lies inside every larger one."""
    return np.random.default_rng(seed).permutation(n_total)[:n]


@dataclass
class ImageSet(ClassData):
    """Unlabeled images (labels: positions in the sorted file list). Aspect-kept sets (max_aspect given)
    hold images [N, 3, C, L]: each image scaled so its short side is C, its long side bounded at L,
    stored from the top-left with the long side along the width (an image taller than wide is stored
    transposed, see studylib.core.augment.stored_transposed) and the rest edge-padded; `sizes` [N, 2]
    holds each image's valid (height, width) in its own orientation. Square sets: [N, 3, S, S], sizes S."""

    sizes: torch.Tensor | None = None
