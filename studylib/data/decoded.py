"""The decoded-image store: each image file of a folder decoded once per geometry into one memory-mapped
uint8 array, from which load_image_set (below) takes the rows of any subset size and seed.

One store per (source folder, resolution, interpolation, max_aspect, decoder), as files in the data cache
folder named <prefix>-<hash of that key> (prefix `images` for the square squash, `images-aspect` for the
aspect-kept layout; flat files beside the pets and intel caches, as the cache tests expect):

- <prefix>-<hash>.<g>.npy        uint8 [N, H, W, 3], the decoded rows of generation g (np.load(mmap_mode="r"))
- <prefix>-sizes-<hash>.<g>.npy  int32 [N, 2], each row's valid (height, width) (aspect-kept stores only: in a
                                 square store every size is the resolution)
- <prefix>-<hash>.json           the index: its generation and committed row count; per row the file's name
                                 relative to the folder, its size and mtime; the unreadable rows and why
- <prefix>-<hash>.lock           held by the one process (or thread) that extends the store

What it holds: the files asked for so far, in the order first asked for, not the whole folder. The paper's
grid takes nested subsets of up to 200k of ImageNet's 1.28M files for three seeds, about 510k distinct
files in all: decoding the folder up front would decode 2.5 times that. A smaller subset of a seed seen
before (subsets are nested) decodes nothing; another seed decodes only the files of its subset that no
earlier call decoded; once every file is in, nothing is decoded again.

Extension and atomicity: the index is the commit. New rows are appended past the committed ones (the
array grows in place: the .npy header numpy writes leaves room for a longer first axis), written by the
workers straight into the memory map and synced, and then the index naming them replaces the old one
(written to a temporary name, then os.replace), every COMMIT_ROWS rows. A build interrupted anywhere
leaves the last index, so the rows it was writing are invisible and the next call writes over them.
Committed rows are never written again, so a reader's memory map never changes under it.

A changed folder: files added or removed only extend the store (new files are decoded when a subset
picks them; a removed file's row is never asked for again). A picked file whose size or mtime differs from
its row's record makes the store stale, and it is rebuilt: the rows that call needs are decoded into the
next generation's fresh files, whose first commit retires the old ones (a reader that mapped them keeps
them). Rebuilding rather than re-decoding the row in place keeps committed rows immutable, and replacing
a source file is what the per-subset cache before this one also answered by decoding again; ImageNet's
files never change.

Decoders (studylib.data.decoders): `pil` on the CPU, exactly as readers decodes; `nvjpeg` on a CUDA device,
within a few grey levels of it (not bit-identical). The decoder is part of the key, recorded in the index
("key": {"decoder": ...}), so the two never share a store. load_image_set decodes for the study's device
(decoders.study_device): nvJPEG when it is CUDA, PIL elsewhere.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from studylib.core.files import atomic_write_bytes, atomic_write_text, read_json
from studylib.data import decoders as DEC
from studylib.data import readers as R
from studylib.data.decoders import Geometry
from studylib.data.resident import Origin
from studylib.data.sources import default_cache_dir

FORMAT = 1  # of the index and arrays; part of the key, so a new format never meets an old store
COMMIT_ROWS = 16384  # rows between index commits: an interrupted long build keeps the blocks it finished


@dataclass(frozen=True)
class Store:
    """The files of one store (see the module docstring). The arrays carry a generation number: a rebuild
    writes the next one, so the index and the arrays it names always agree."""

    folder: Path
    geometry: Geometry
    decoder: str  # 'pil' or 'nvjpeg'
    cache: Path
    device: str = "cpu"  # where the decoder runs (not part of the key: every CUDA device decodes alike)

    @property
    def key(self) -> dict:
        g = self.geometry
        return {
            "format": FORMAT,
            "folder": str(self.folder.resolve()),
            "size": int(g.size),
            "max_aspect": None if g.max_aspect is None else float(g.max_aspect),
            "interpolation": g.interpolation,
            "decoder": self.decoder,
        }

    def _name(self, part: str = "") -> str:
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:20]
        return f"images{'' if self.geometry.max_aspect is None else '-aspect'}{part}-{digest}"

    @property
    def index_file(self) -> Path:
        return self.cache / f"{self._name()}.json"

    @property
    def lock_file(self) -> Path:
        return self.cache / f"{self._name()}.lock"

    def array(self, generation: int) -> Path:
        return self.cache / f"{self._name()}.{generation}.npy"

    def sizes(self, generation: int) -> Path | None:
        """None for a square store: every size is the resolution."""
        return None if self.geometry.max_aspect is None else self.cache / f"{self._name('-sizes')}.{generation}.npy"

    def arrays(self, generation: int) -> list[tuple[Path, np.dtype, tuple]]:
        """(path, dtype, row shape) of each array file of a generation."""
        out = [(self.array(generation), np.dtype(np.uint8), self.geometry.shape)]
        if self.sizes(generation) is not None:
            out.append((self.sizes(generation), np.dtype(np.int32), (2,)))
        return out

    def other_generations(self, generation: int) -> list[Path]:
        keep = {path for path, _, _ in self.arrays(generation)}
        found = [*self.cache.glob(f"{self._name()}.*.npy"), *self.cache.glob(f"{self._name('-sizes')}.*.npy")]
        return [p for p in found if p not in keep]


@dataclass
class Decoded:
    """The store's rows for a list of requested files."""

    images: np.ndarray  # [N, H, W, 3] uint8, memory-mapped (N >= the committed rows)
    sizes: np.ndarray | None  # [N, 2] int32 valid (height, width); None: square, every size is the resolution
    rows: np.ndarray  # [F] the row of each requested file
    unreadable: dict[int, str]  # position among the requested files -> why that file cannot be read
    shape: tuple[int, int, int]
    source: str = ""  # the images' array file ("" for no rows)

    def chw(self, keep) -> np.ndarray:
        """The images of the requested files at positions `keep`, channel-first [len(keep), 3, H, W] uint8."""
        rows = self.rows[np.asarray(keep, np.int64)]
        out = np.empty((len(rows), 3, *self.shape[:2]), np.uint8)
        for i in range(0, len(rows), 1024):  # a slice at a time, so no second full-size copy is made
            out[i : i + 1024] = self.images[rows[i : i + 1024]].transpose(0, 3, 1, 2)
        return out

    def valid_sizes(self, keep) -> np.ndarray:
        """The valid (height, width) of the requested files at positions `keep`, [len(keep), 2] int32."""
        if self.sizes is None:
            return np.full((len(keep), 2), self.shape[0], np.int32)
        return np.asarray(self.sizes[self.rows[np.asarray(keep, np.int64)]], np.int32)


def decoded_rows(
    folder: str | Path,
    files: list[Path],
    size: int,
    max_aspect: float | None = None,
    cache_dir: str | Path | None = None,
    skip: bool = False,
    workers: int | None = None,
    device: str = "cpu",
    interpolation: str = "bilinear",
) -> Decoded:
    """The rows of `files` (inside `folder`) in the folder's store for this geometry, decoding first those it
    lacks: on device "cpu" with PIL in `workers` processes (default: every CPU this process may use), exactly
    as readers decodes; on a CUDA device with nvJPEG there; "auto" picks (decoders.decoder_for). Unreadable files are
    recorded in the store either way; without `skip` the first of them is then a DataError naming it and
    the fix."""
    geometry = Geometry(size, max_aspect, interpolation)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    store = Store(Path(folder), geometry, DEC.decoder_for(device, files), cache, str(device))
    if not files:
        return Decoded(np.zeros((0, *geometry.shape), np.uint8), None, np.zeros(0, np.int64), {}, geometry.shape)
    names = [Path(f).relative_to(store.folder).as_posix() for f in files]
    stats = [_stat(f) for f in files]
    for attempt in range(3):
        index = read_index(store)
        rows, changed = _lookup(index, names, stats)
        if changed or (rows < 0).any():
            index = _update(store, files, names, stats, workers or DEC.cpus())
            rows, _ = _lookup(index, names, stats)
        try:
            found = _open(store, index, rows)
            break
        except FileNotFoundError:  # a rebuild by another process removed this generation meanwhile
            if attempt == 2:
                raise
    if found.unreadable and not skip:
        raise R.DataError(found.unreadable[min(found.unreadable)])
    return found


def _stat(path: Path) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_size, st.st_mtime_ns


# ---------------------------------------------------------------- the index


def _empty_index(store: Store, generation: int = 0) -> dict:
    return {
        "key": store.key,
        "generation": generation,
        "rows": 0,
        "names": [],
        "bytes": [],
        "mtimes": [],
        "unreadable": [],
    }


def read_index(store: Store) -> dict:
    """The committed index; an empty one where there is none (or, against a hash collision, another key's)."""
    index = read_json(store.index_file)
    return index if index is not None and index.get("key") == store.key else _empty_index(store)


def _commit(store: Store, index: dict) -> None:
    # compact: half a million rows are ~30 MB this way, several times that indented
    atomic_write_text(store.index_file, json.dumps(index, separators=(",", ":")))


def _lookup(index: dict, names: list[str], stats: list[tuple[int, int]]) -> tuple[np.ndarray, bool]:
    """The row of each file (-1 where the store lacks it) and whether a file differs from its row's record."""
    where = {name: row for row, name in enumerate(index["names"])}
    rows = np.full(len(names), -1, np.int64)
    changed = False
    for k, (name, (nbytes, mtime)) in enumerate(zip(names, stats)):
        row = where.get(name)
        if row is not None:
            rows[k] = row
            changed |= index["bytes"][row] != nbytes or index["mtimes"][row] != mtime
    return rows, changed


def _open(store: Store, index: dict, rows: np.ndarray) -> Decoded:
    images = np.load(store.array(index["generation"]), mmap_mode="r")
    sizes_file = store.sizes(index["generation"])
    sizes = None if sizes_file is None else np.load(sizes_file, mmap_mode="r")
    bad = {row: reason for row, reason in index["unreadable"]}
    unreadable = {k: bad[row] for k, row in enumerate(rows.tolist()) if row in bad}
    return Decoded(images, sizes, rows, unreadable, store.geometry.shape, str(store.array(index["generation"])))


# ---------------------------------------------------------------- building and extending


@contextmanager
def _locked(path: Path):
    """One extender at a time, across processes and threads (flock belongs to the open file, and the kernel
    drops it when its holder dies, however it dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _update(store: Store, files: list[Path], names: list[str], stats: list, workers: int) -> dict:
    """Under the store's lock: decode the files it lacks, into a new generation where it has no rows yet or a
    file changed (the old generation stays whole and in use until the new one's first commit)."""
    with _locked(store.lock_file):
        index = read_index(store)  # another process may have done the work while this one waited
        rows, changed = _lookup(index, names, stats)
        if changed or index["rows"] == 0:
            index = _empty_index(store, index["generation"] + 1)
            rows[:] = -1
        todo = np.flatnonzero(rows < 0).tolist()
        files, names, stats = ([items[k] for k in todo] for items in (files, names, stats))
        return _extend(store, index, files, names, stats, workers)


def _extend(store: Store, index: dict, files: list, names: list, stats: list, workers: int) -> dict:
    """Decode `files` into rows past the committed ones, committing the index every COMMIT_ROWS rows."""
    from tqdm.auto import tqdm

    from studylib.core.train import progress_enabled

    with tqdm(total=len(files), desc="decoding images", disable=not progress_enabled(), leave=False) as bar:
        for b in range(0, len(files), COMMIT_ROWS):
            end = b + COMMIT_ROWS
            index = _add_block(store, index, files[b:end], names[b:end], stats[b:end], workers, bar)
    return index


def _add_block(store: Store, index: dict, files: list, names: list, stats: list, workers: int, bar) -> dict:
    """Decode one block of files into new rows, sync them, then commit the index that names them."""
    start, generation = index["rows"], index["generation"]
    for path, dtype, row_shape in store.arrays(generation):
        if start == 0:  # a new generation starts from fresh files (over any an interrupted build left)
            atomic_write_bytes(path, _npy_header(dtype, (0, *row_shape)))
        _grow(path, start + len(files))
    array, sizes = str(store.array(generation)), str(store.sizes(generation) or "")
    if store.decoder == "nvjpeg":
        bad = DEC.decode_rows_nvjpeg(array, sizes, start, files, store.geometry, bar, store.device)
    else:
        bad = DEC.decode_rows_pil(array, sizes, start, files, store.geometry, workers, bar)
    for path, _, _ in store.arrays(generation):
        _sync(path)
    index = {
        **index,
        "rows": start + len(files),
        "names": index["names"] + names,
        "bytes": index["bytes"] + [s for s, _ in stats],
        "mtimes": index["mtimes"] + [m for _, m in stats],
        "unreadable": index["unreadable"] + bad,
    }
    _commit(store, index)
    if start == 0:
        for old in store.other_generations(generation):  # a reader that mapped one keeps it
            old.unlink(missing_ok=True)
    return index


def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    buf = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def _grow(path: Path, rows: int) -> None:
    """Give the .npy at `path` at least `rows` rows in place: first the file (new rows read as zeros), then the
    header's shape, which numpy pads so that a longer first axis fits in the same bytes."""
    with open(path, "r+b") as f:
        np.lib.format.read_magic(f)
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        offset = f.tell()
        if shape[0] >= rows:  # an interrupted build grew it already
            return
        header = _npy_header(dtype, (rows, *shape[1:]))
        if len(header) != offset:
            raise RuntimeError(f"{path}: the .npy header has no room for {rows} rows; delete the file")
        f.truncate(offset + rows * int(np.prod(shape[1:])) * dtype.itemsize)
        f.seek(0)
        f.write(header)


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- subsets of the store


def load_image_set(
    root: str | Path,
    n: int,
    size: int,
    seed: int,
    cache_dir: str | Path | None = None,
    skip: bool = False,
    max_aspect: float | None = None,
    device=None,
) -> R.ImageSet:
    """A seeded, nested subset of n unlabeled images (m = n less any unreadable files when skipping);
    labels are the subset's positions in the sorted file list. Without `max_aspect` every image is
    squashed to [3, size, size]; with it (>= 1) the aspect is kept: short side `size`, long side at most
    round(size * max_aspect), laid out as readers.ImageSet describes, valid sizes in `sizes`. The images are rows
    of the folder's decoded store (this module), which every n and seed shares: each file is
    decoded once, on every core (PIL), or by nvJPEG where `device` (default: decoders.study_device) is CUDA.
    The set's `origin` names its rows in the store, for studylib.data.resident to share."""
    paths = R.list_images(root)
    if n > len(paths):
        raise R.DataError(
            f"{n} pre-training images requested but {root} holds {len(paths)}; "
            f"lower grid.pretrain_sizes or point data.images at a larger folder"
        )
    if max_aspect is not None and max_aspect < 1:
        raise ValueError(f"max_aspect must be at least 1, got {max_aspect}")
    order = sorted(R.nested_subset(len(paths), n, seed))
    chosen = [paths[i] for i in order]
    found = decoded_rows(root, chosen, size, max_aspect, cache_dir, skip, device=DEC.study_device(device))
    bad = sorted(found.unreadable)
    if chosen and len(bad) == len(chosen):
        raise R.DataError(f"none of the {len(chosen)} files could be read (first: {found.unreadable[bad[0]]})")
    keep = sorted(set(range(len(chosen))) - set(bad))
    return R.ImageSet(
        torch.from_numpy(found.chw(keep)),
        torch.tensor(order, dtype=torch.long)[keep],
        [],
        [str(chosen[i]) for i in bad],
        origin=Origin.of(found.source, found.images, found.rows[keep], chw=True) if found.source else None,
        sizes=torch.from_numpy(found.valid_sizes(keep).astype(np.int64)),
    )
