"""The image decoders of the decoded stores (studylib.data.decoded, and readers.cached_stack's whole-split caches):
PIL on the CPU, nvJPEG (torchvision.io.decode_jpeg, batched) on a CUDA device.

`pil` is decode_image, or decode_image_aspect and image_valid_size (below: PIL, one file at a time), run in worker
processes.
`nvjpeg` decodes JPEGs in batches on the GPU and resizes there at the same geometry (resize_like_pil): the
same output size and crop box rounded to whole pixels, torch's antialiased filter and nvJPEG's IDCT instead of
PIL's resampler and libjpeg's. Not bit-identical to PIL: within a few grey levels (mean absolute difference under
3, tested on the CPU with torchvision's libjpeg in nvJPEG's place). Files nvJPEG does not take (not a complete
JPEG, a PNG named .jpg, CMYK) are decoded by PIL on either path, so those rows are equal. Because the bits differ,
the decoder is part of a store's key and its name (decoded: the index's key "decoder"; readers: the file prefix
`<kind>-nvjpeg`): a GPU-decoded store never serves a PIL run, nor the other way.

Which decoder a study's stage uses follows its device (decoder_for): a CUDA device decodes with nvJPEG, anything
else with PIL. Stages that are given no decode device take the one of the group they run in (using_device, set
by studylib.study.groups.run_group), else the CPU.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studylib.data.sources import DataError

MIN_ROWS_PER_PROCESS = 16  # below this many rows per worker the rows are decoded here (no pool to start)
MAX_CHUNK = 256  # rows per task: small enough to balance the workers, large enough to amortise a task
GPU_BATCH = 256  # files per decode_jpeg call
JPEG_SUFFIXES = {".jpg", ".jpeg"}

_DEVICE: ContextVar[str] = ContextVar("studylib_decode_device", default="cpu")


# ---------------------------------------------------------------- PIL, one file at a time

RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def decode_image(path: Path, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Decode any image file by content to RGB [S, S, 3] uint8."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            return np.asarray(im.resize((size, size), RESAMPLE[interpolation]), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(
            f"cannot read image {path}: {e}. Replace or delete the file, or set "
            f"data.skip_unreadable: true to skip unreadable files."
        ) from None


def decode_trimap(path: Path, size: int) -> np.ndarray:
    """Decode a trimap PNG (1 pet, 2 background, 3 boundary) to classes 0..2 at [S, S]."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.resize((size, size), Image.NEAREST))
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(
            f"cannot read trimap {path}: {e}. Replace or delete the file, or set "
            f"data.skip_unreadable: true to skip unreadable files."
        ) from None
    if arr.ndim != 2 or arr.min() < 1 or arr.max() > 3:
        raise DataError(
            f"trimap {path} must be single-channel with values 1, 2, 3; "
            f"got shape {arr.shape} and values {np.unique(arr)[:8].tolist()}"
        )
    return (arr - 1).astype(np.uint8)


def aspect_geometry(width: int, height: int, short: int, max_aspect: float):
    """The aspect-kept resize of a width x height image: the short side becomes `short`, the long side
    round(long * scale) but at most round(short * max_aspect), the excess cut evenly from both ends of
    the long axis (the central part is kept). Returns the output (width, height) and the source box
    (left, top, right, bottom) it is resampled from.

    Why a bound of 2: RandomResizedCrop with area >= 0.67 and aspect <= 4/3 finds no crop that fits an
    image more elongated than (4/3) / 0.67 = 1.99, and falls back to its central crop of aspect 4/3,
    which the central 2:1 part holds; so for the paper's settings the bound drops no possible crop."""
    s = short / min(width, height)
    long_side = max(width, height)
    out_long = min(round(long_side * s), round(short * max_aspect))
    extent = min(float(long_side), out_long / s)  # source length along the long axis
    off = (long_side - extent) / 2
    if width >= height:
        return (out_long, short), (off, 0.0, off + extent, float(height))
    return (short, out_long), (0.0, off, float(width), off + extent)


def decode_image_aspect(path: Path, short: int, max_aspect: float) -> np.ndarray:
    """Decode by content to RGB, aspect kept (aspect_geometry), laid out [short, L, 3] with
    L = round(short * max_aspect): long side along the width (portrait images transposed), from the
    left, padded by repeating the last column (so bilinear sampling at the valid edge sees the edge)."""
    bound = round(short * max_aspect)
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            size, box = aspect_geometry(im.width, im.height, short, max_aspect)
            arr = np.asarray(im.resize(size, RESAMPLE["bilinear"], box=box), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(
            f"cannot read image {path}: {e}. Replace or delete the file, or set "
            f"data.skip_unreadable: true to skip unreadable files."
        ) from None
    if arr.shape[0] > arr.shape[1]:
        arr = arr.transpose(1, 0, 2)
    return np.pad(arr, ((0, 0), (0, bound - arr.shape[1]), (0, 0)), mode="edge")


def image_valid_size(path: Path, short: int, max_aspect: float) -> np.ndarray:
    """The (height, width) decode_image_aspect gives the image, from its header alone."""
    try:
        with Image.open(path) as im:
            (w, h), _ = aspect_geometry(im.width, im.height, short, max_aspect)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(
            f"cannot read image {path}: {e}. Replace or delete the file, or set "
            f"data.skip_unreadable: true to skip unreadable files."
        ) from None
    return np.array([h, w], np.int32)


@dataclass(frozen=True)
class Geometry:
    """What a store holds per image: the square squash to size x size (max_aspect None), or the aspect-kept
    layout of readers.decode_image_aspect (short side `size`, long side at most round(size * max_aspect))."""

    size: int
    max_aspect: float | None = None
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.interpolation not in RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(RESAMPLE)}, got {self.interpolation!r}")
        if self.max_aspect is not None and self.max_aspect < 1:
            raise ValueError(f"max_aspect must be at least 1, got {self.max_aspect}")
        if self.max_aspect is not None and self.interpolation != "bilinear":
            raise ValueError("the aspect-kept layout is resampled bilinear only")

    @property
    def shape(self) -> tuple[int, int, int]:
        if self.max_aspect is None:
            return (self.size, self.size, 3)
        return (self.size, round(self.size * self.max_aspect), 3)


# ---------------------------------------------------------------- which decoder


@contextmanager
def using_device(device) -> None:
    """Within the block, data loading given no device decodes for `device` (a CUDA one: nvJPEG on it)."""
    token = _DEVICE.set(str(device))
    try:
        yield
    finally:
        _DEVICE.reset(token)


def study_device(device=None) -> str:
    """`device` as a string, or (None) the device of the enclosing using_device block, else 'cpu'."""
    return _DEVICE.get() if device is None else str(device)


def decoder_for(device, files: list[Path] = ()) -> str:
    """'pil' for the CPU, 'nvjpeg' for CUDA; "auto" takes CUDA where it is there and the files are JPEGs."""
    device = str(device)
    if device == "auto":
        jpegs = all(Path(f).suffix.lower() in JPEG_SUFFIXES for f in files)
        device = "cuda" if torch.cuda.is_available() and jpegs else "cpu"
    if device == "cpu":
        return "pil"
    if device.startswith("cuda") and torch.cuda.is_available():
        return "nvjpeg"
    raise ValueError(f"device must be 'cpu', 'auto' or an available 'cuda', got {device!r}")


def gpu_of(device) -> str:
    """The CUDA device nvJPEG decodes on: `device` itself when it names one, else the current one."""
    device = str(device)
    return device if device.startswith("cuda") else "cuda"


def cpus() -> int:
    """The CPUs this process may use (a container's or taskset's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------- PIL, one file


def decode_pil(path: Path, geometry: Geometry) -> tuple[np.ndarray | int, np.ndarray | int, str | None]:
    """(image [H, W, 3], valid (h, w), None) exactly as load_image_set decoded it, or (0, 0, the reason)."""
    try:
        if geometry.max_aspect is None:
            return decode_image(path, geometry.size, geometry.interpolation), geometry.size, None
        img = decode_image_aspect(path, geometry.size, geometry.max_aspect)
        return img, image_valid_size(path, geometry.size, geometry.max_aspect), None
    except DataError as e:
        return 0, 0, str(e)


# ---------------------------------------------------------------- into a store's rows


def decode_rows_pil(array: str, sizes: str, start: int, files: list, geometry: Geometry, workers: int, bar) -> list:
    """PIL-decode `files` into rows start.. with up to `workers` processes; [row, reason] per unreadable file."""
    procs = max(1, min(workers, len(files) // MIN_ROWS_PER_PROCESS))
    chunk = max(1, min(MAX_CHUNK, -(-len(files) // (4 * procs))))  # ~4 tasks per worker, to even out the load
    jobs = [(start + i, [str(f) for f in files[i : i + chunk]]) for i in range(0, len(files), chunk)]
    bad = []
    if procs == 1:
        for first, part in jobs:
            bad += _decode_chunk(array, sizes, first, part, geometry)
            bar.update(len(part))
        return bad
    with ProcessPoolExecutor(procs, mp_context=_pool_context()) as pool:
        futures = {pool.submit(_decode_chunk, array, sizes, first, part, geometry): len(part) for first, part in jobs}
        try:
            for fut in as_completed(futures):
                bad += fut.result()
                bar.update(futures[fut])
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a failed build decodes no further
            raise
    return sorted(bad)


def _pool_context():
    """fork on Linux, as torch's DataLoader workers: they start at once with this process's modules (spawn would
    import torch again in each) and run only PIL and numpy. Elsewhere the platform's default."""
    return multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None


def _decode_chunk(array: str, sizes: str, start: int, files: list[str], geometry: Geometry) -> list:
    """Decode `files` into rows start.. of the store's arrays, opened here so that no pixels are pickled back;
    returns [row, reason] for each unreadable file, whose row is left zero."""
    images = np.lib.format.open_memmap(array, mode="r+")
    valid = np.lib.format.open_memmap(sizes, mode="r+") if sizes else None
    bad = []
    for row, file in enumerate(files, start):
        img, hw, reason = decode_pil(Path(file), geometry)
        images[row] = img
        if valid is not None:
            valid[row] = hw
        if reason is not None:
            bad.append([row, reason])
    images.flush()
    if valid is not None:
        valid.flush()
    return bad


def decode_rows_nvjpeg(array: str, sizes: str, start: int, files: list, geometry: Geometry, bar, device) -> list:
    """As decode_rows_pil, with decode_batch on the CUDA `device` (PIL for what nvJPEG does not take), each batch
    written to the memory map in one slice."""
    images = np.lib.format.open_memmap(array, mode="r+")
    valid = np.lib.format.open_memmap(sizes, mode="r+") if sizes else None
    bad = []
    for b in range(0, len(files), GPU_BATCH):
        part = files[b : b + GPU_BATCH]
        imgs, hws, reasons = decode_batch(part, geometry, device)
        bad += [[start + b + k, reason] for k, reason in enumerate(reasons) if reason is not None]
        images[start + b : start + b + len(part)] = imgs
        if valid is not None:
            valid[start + b : start + b + len(part)] = hws
        bar.update(len(part))
    images.flush()
    if valid is not None:
        valid.flush()
    return bad


def decode_batch(files: list, geometry: Geometry, device) -> tuple[np.ndarray, np.ndarray, list]:
    """One batch of files at `geometry`: nvJPEG (decode_jpegs) on `device`, PIL for each file it returns None
    for. -> images [F, H, W, 3] uint8, valid sizes [F, 2] int32, and per file None or why it is unreadable."""
    imgs, hws = np.zeros((len(files), *geometry.shape), np.uint8), np.zeros((len(files), 2), np.int32)
    reasons = []
    for k, (file, got) in enumerate(zip(files, decode_jpegs(files, geometry, gpu_of(device)))):
        imgs[k], hws[k], reason = decode_pil(Path(file), geometry) if got is None else (*got, None)
        reasons.append(reason)
    return imgs, hws, reasons


def decode_files(files: list, geometry: Geometry, device) -> list[tuple[np.ndarray | None, str | None]]:
    """decode_batch over `files` a GPU_BATCH at a time: (image, None) per file, or (None, why unreadable)."""
    out = []
    for b in range(0, len(files), GPU_BATCH):
        imgs, _, reasons = decode_batch(files[b : b + GPU_BATCH], geometry, device)
        out += [(None if reason else img, reason) for img, reason in zip(imgs, reasons)]
    return out


# ---------------------------------------------------------------- nvJPEG (torchvision.io.decode_jpeg)


def decode_jpegs(files: list, geometry: Geometry, device: str = "cuda") -> list:
    """JPEG files decoded in one batch by torchvision.io.decode_jpeg (nvJPEG on cuda, libjpeg on cpu) and laid
    out at `geometry` by resize_like_pil: (image [H, W, 3] uint8, valid (h, w) int32) per file, None for a file
    that is not a complete JPEG (PIL rejects a truncated one, libjpeg would grey its end) or that it rejects."""
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [Path(f).read_bytes() for f in files]
    whole = [i for i, d in enumerate(datas) if d[:3] == b"\xff\xd8\xff" and d.rstrip(b"\0")[-2:] == b"\xff\xd9"]
    tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in whole]
    try:
        decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device) if tensors else []
    except RuntimeError:  # one file it rejects fails the batch: one at a time then
        decoded = [_decode_jpeg_one(t, device) for t in tensors]
    laid = {i: resize_like_pil(img, geometry) for i, img in zip(whole, decoded) if img is not None}
    out = [None] * len(files)
    if laid:
        batch = torch.stack([img for img, _ in laid.values()]).cpu().numpy()  # one copy back per batch
        for k, (i, (_, hw)) in enumerate(laid.items()):
            out[i] = (batch[k], hw)
    return out


def _decode_jpeg_one(data: torch.Tensor, device: str) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def resize_like_pil(img: torch.Tensor, geometry: Geometry) -> tuple[torch.Tensor, np.ndarray]:
    """A decoded [3, h, w] uint8 image laid out, on its own device, as the PIL path lays it out ([H, W, 3] and
    the valid (h, w)): the same output size, the same crop box rounded to whole pixels, torch's antialiased
    filter (close to PIL's, not equal)."""
    h, w = img.shape[-2:]
    if geometry.max_aspect is None:
        s = geometry.size
        return _resample(img, (s, s), geometry.interpolation).permute(1, 2, 0), np.array([s, s], np.int32)
    (ow, oh), (left, top, right, bottom) = aspect_geometry(w, h, geometry.size, geometry.max_aspect)
    out = _resample(img[:, round(top) : round(bottom), round(left) : round(right)], (oh, ow), "bilinear")
    if oh > ow:  # portrait images lie transposed, as in decode_image_aspect
        out = out.transpose(1, 2)
    pad = geometry.shape[1] - out.shape[2]  # repeat the last column, as np.pad(mode="edge")
    out = torch.cat([out, out[:, :, -1:].expand(-1, -1, pad)], dim=2)
    return out.permute(1, 2, 0), np.array([oh, ow], np.int32)


def _resample(img: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    x = img[None].float()
    if interpolation == "nearest":
        y = torch.nn.functional.interpolate(x, size=size, mode="nearest-exact")
    else:
        y = torch.nn.functional.interpolate(x, size=size, mode=interpolation, antialias=True, align_corners=False)
    return y[0].round().clamp(0, 255).to(torch.uint8)
