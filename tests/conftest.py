"""Fixtures shared by several test files. The finished smoke study is built once per session (smoke_store)
and its encoders' geometry measured once (smoke_geometry); both are read-only: a test that changes a store
works on its own copy (copy_store)."""

from __future__ import annotations

import io
import shutil
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from studylib.core.model import build_encoder

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "smoke.yaml"


def _tiny_encoder_images():
    torch.manual_seed(0)
    enc = build_encoder("viny-tiny")
    images = torch.randint(0, 256, (16, 3, 64, 64), generator=torch.Generator().manual_seed(34), dtype=torch.uint8)
    masks = torch.randint(0, 3, (16, 64, 64), generator=torch.Generator().manual_seed(35))
    return enc, images, masks


@pytest.fixture(scope="module")
def tiny_encoder_images():
    """A seeded fresh viny-tiny encoder with 16 random uint8 images and random trimaps (the geometry tests)."""
    return _tiny_encoder_images()


@pytest.fixture(scope="session")
def tiny_report():
    """The geometry report (default settings: protocol clean) of that encoder's layers 0 and output, computed
    once: test_geometry.py reads its contents, test_geometry_paper.py recomputes it function by function."""
    from studylib.analysis import geometry

    enc, images, masks = _tiny_encoder_images()
    return geometry.geometry_report(enc, images, masks, layers=[0, -1])


@dataclass(frozen=True)
class Store:
    """A finished run store: its folder, the plan of params/smoke.yaml, and what `study run` printed."""

    runs: Path
    plan: list
    output: str


def copy_store(store: Store, dest: Path) -> Store:
    """The store copied to `dest`, for a test that adds to or changes it (the session's store stays as built)."""
    shutil.copytree(store.runs, dest)
    return Store(dest, store.plan, store.output)


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory) -> Store:
    """The smoke study as a user runs it, once per session: `study run params/smoke.yaml` (every stage run
    through the runner and papermill, then the tables and the batch results notebook, results-smoke.ipynb)."""
    from studylib import cli
    from studylib.study import config, grid

    runs = tmp_path_factory.mktemp("smoke") / "runs"
    out = io.StringIO()
    with redirect_stdout(out):
        rc = cli.main(["run", str(SMOKE), "--runs", str(runs), "--device", "cpu", "--workers", "2"])
    assert rc == 0, f"study run params/smoke.yaml failed (rc {rc}):\n{out.getvalue()}"
    return Store(runs, grid.plan(config.load(SMOKE)), out.getvalue())


@pytest.fixture(scope="session")
def smoke_geometry(smoke_store, tmp_path_factory) -> Store:
    """A copy of the smoke store with every encoder's patch-token geometry measured (`study geometry`'s work),
    for the report and the geometry notebook. The smoke test split has 16 images: all are measured."""
    from studylib.analysis import encoders

    store = copy_store(smoke_store, tmp_path_factory.mktemp("smoke-geometry") / "runs")
    encoders.compute(store.runs, store.plan, n_images=32, echo=lambda *_: None)
    return store


@pytest.fixture
def one_thread():
    """Steps too small to share out: two threads only spin against other load on a 2-core box (10x slower in a
    busy moment); one thread keeps each test to a second or two. Use: pytestmark = usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
