"""One device copy of a group's images: the members of a group that train on rows of the same decoded store share
one device tensor, each indexing it with its own rows, and no member keeps a host copy.

A loaded image set (readers.SegData, ClassData, ImageSet) carries an Origin: the memory-mapped store arrays its
rows come from and which rows. `share(origin, device)` registers those rows in the process's pool for that store
and device and returns a Rows view; the pool's device tensor is built on the first read of any view, once every
member of a fused group has registered (they all prepare before the first step), from the memory maps a block at
a time: the device holds the union of the members' rows once, the host never holds a whole set. A member whose
rows a built pool lacks starts a new pool (members run one after another: each gets its own, as before).

Pools are held by their views only (the registry is weak) and `clear()` (studylib.study.groups.run_group, at the
end of a group) forgets them all: a group's device memory is freed with its last member. The images are the same
bytes either way: view[i] equals the member's own set.images[i] (a uint8 gather; no float is touched).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

BLOCK_ROWS = 1024  # rows per host-to-device copy while a pool is built: bounds the host memory it takes


@dataclass(frozen=True)
class Origin:
    """Where the rows of a loaded set lie: `rows` index the concatenation of `arrays` (memory maps of store files,
    named by `key`), laid out [N, H, W, C] and turned channel-first when `chw`."""

    key: tuple
    arrays: tuple
    rows: np.ndarray
    chw: bool = False

    @classmethod
    def of(cls, file, array: np.ndarray, rows, chw: bool = False) -> Origin:
        return cls((str(file),), (array,), np.asarray(rows, np.int64), chw)

    def subset(self, idx) -> Origin:
        return Origin(self.key, self.arrays, self.rows[np.asarray(idx, np.int64)], self.chw)

    def concat(self, other: Origin) -> Origin:
        if self.chw != other.chw:
            raise ValueError("cannot concatenate a channel-first origin with a channel-last one")
        offset = sum(len(a) for a in self.arrays)
        rows = np.concatenate([self.rows, other.rows + offset])
        return Origin(self.key + other.key, self.arrays + other.arrays, rows, self.chw)

    @property
    def row_shape(self) -> tuple:
        shape = tuple(self.arrays[0].shape[1:])
        return (shape[-1], *shape[:-1]) if self.chw else shape

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The given rows of the concatenated arrays, in the set's layout (a host copy of those rows only)."""
        starts = np.cumsum([0] + [len(a) for a in self.arrays])
        if len(rows) and (rows.min() < 0 or rows.max() >= starts[-1]):  # never hand back unfilled memory
            raise IndexError(f"resident: row {int(rows.max())} lies past the {int(starts[-1])} rows these arrays map")
        out = np.empty((len(rows), *self.row_shape), self.arrays[0].dtype)
        part = np.searchsorted(starts, rows, side="right") - 1
        for k, array in enumerate(self.arrays):
            where = np.flatnonzero(part == k)
            if len(where):
                got = array[rows[where] - starts[k]]
                out[where] = got.transpose(0, 3, 1, 2) if self.chw else got
        return out


class _Pool:
    """The device copy of one store's rows: registered rows get positions; the tensor is built on first use."""

    def __init__(self, origin: Origin, device: torch.device):
        self.origin, self.device = Origin(origin.key, origin.arrays, np.zeros(0, np.int64), origin.chw), device
        self.positions: dict[int, int] = {}
        self.tensor: torch.Tensor | None = None

    def map_newer(self, origin: Origin) -> None:
        """A store grows in place (rows appended, earlier rows unchanged): a later member's maps may reach rows
        an earlier member's did not; before the copy is built, read from the longest maps seen."""
        old, new = [len(a) for a in self.origin.arrays], [len(a) for a in origin.arrays]
        if self.tensor is None and len(old) == len(new) and new != old and all(n >= o for n, o in zip(new, old)):
            self.origin = Origin(origin.key, origin.arrays, self.origin.rows, origin.chw)

    def holds(self, rows: np.ndarray) -> bool:
        return all(int(r) in self.positions for r in rows)

    def add(self, rows: np.ndarray) -> np.ndarray:
        """The pool position of each row, registering those it lacks (only before the tensor is built)."""
        for r in rows.tolist():
            if r not in self.positions:
                if self.tensor is not None:
                    raise RuntimeError("resident pool: rows added after the device copy was built")
                self.positions[r] = len(self.positions)
        return np.fromiter((self.positions[r] for r in rows.tolist()), np.int64, len(rows))

    def build(self) -> torch.Tensor:
        if self.tensor is None:
            order = np.fromiter(self.positions, np.int64, len(self.positions))  # dicts keep insertion order
            out = torch.empty((len(order), *self.origin.row_shape), dtype=_torch_dtype(self.origin), device=self.device)
            for b in range(0, len(order), BLOCK_ROWS):
                out[b : b + BLOCK_ROWS].copy_(torch.from_numpy(self.origin.read(order[b : b + BLOCK_ROWS])))
            self.tensor = out
        return self.tensor


def _torch_dtype(origin: Origin) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, origin.arrays[0].dtype)).dtype


class Rows:
    """A member's images: rows of a shared pool. Indexing it as the member's own [N, ...] tensor gives the same
    values (view[i] == set.images[i]); len and shape are the member's."""

    def __init__(self, pool: _Pool, positions: np.ndarray):
        self.pool, self._host_positions, self._positions = pool, positions, None
        self.shape = torch.Size((len(positions), *pool.origin.row_shape))
        self.dtype, self.device = _torch_dtype(pool.origin), pool.device

    def __len__(self) -> int:
        return len(self._host_positions)

    def __getitem__(self, i) -> torch.Tensor:
        if self._positions is None:
            self._positions = torch.from_numpy(self._host_positions).to(self.device)
        return self.pool.build()[self._positions[i]]

    @property
    def shared(self) -> torch.Tensor:
        """The pool's device tensor (built now if it was not)."""
        return self.pool.build()


_POOLS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def share(origin: Origin | None, host: torch.Tensor, device) -> Rows | torch.Tensor:
    """The member's rows in its group's shared device pool of `origin`; a set with no origin (nothing to share
    with) is copied on its own, as host.to(device)."""
    if origin is None:
        return host.to(device)
    device = torch.device(device)
    key = (origin.key, origin.chw, str(device))
    pool = _POOLS.get(key)
    if pool is None or (pool.tensor is not None and not pool.holds(origin.rows)):
        pool = _Pool(origin, device)
        _POOLS[key] = pool
    pool.map_newer(origin)
    return Rows(pool, pool.add(origin.rows))


@contextmanager
def group():
    """A group's block: its members share pools made inside it; every pool is forgotten when it ends."""
    clear()
    try:
        yield
    finally:
        clear()


def clear() -> None:
    """Forget every pool: the next group starts its own; a pool's memory goes with its last view."""
    _POOLS.clear()


def pools() -> int:
    """Pools alive in this process (for tests and the memory report)."""
    return len(_POOLS)
