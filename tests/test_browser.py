"""The interactive notebooks in a real JupyterLab: a headless server, the system Chromium driven by
Playwright, each notebook parameterised onto a small finished store and run, then its widgets changed the
way a user does. Every change must redraw the widget's figure in time and show no error; a colour change
in the token explorer must restyle within a second. A widget whose handler is detached fails the check
(test_a_detached_widget_is_caught). Run with -s to see the latencies."""

from __future__ import annotations

import json
import os
import re
import statistics
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api", reason="the playwright package is missing: pip install -e '.[test]'")

import lab  # noqa: E402  (tests/lab.py: the harness, shared with benchmarks/widget_latency.py)

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "smoke.yaml"
NOTEBOOKS = ("geometry.ipynb", "gallery.ipynb", "results.ipynb")
COLOUR_LIMIT_S = 1.0  # the bound for a colour change (a restyle, no refit)
REFIT_TIMEOUT_S = 60  # an encoder, layer or image-count change refits the UMAP
REDRAW_TIMEOUT_S = 30  # the gallery and results redraws
STUCK_WAIT_S = 3  # how long a detached widget is given to (wrongly) change the figure

if lab.chromium() is None:
    pytest.skip(
        "no Chromium here: `make browser` installs Debian's package `chromium` (needs root and apt)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def store(request):
    """The session's smoke store with its geometry, as tests/test_report.py reads it (tests/conftest.py).
    BROWSER_TEST_STORE names one built before (a quicker loop while working on a notebook)."""
    if os.environ.get("BROWSER_TEST_STORE"):
        return Path(os.environ["BROWSER_TEST_STORE"]).resolve()
    return request.getfixturevalue("smoke_geometry").runs  # tests/conftest.py: built once per session


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """One JupyterLab for the three notebooks, parameterised (not run) onto the store."""
    root = tmp_path_factory.mktemp("notebooks")
    for name in NOTEBOOKS:
        extra = {"interactive": True} if name == "results.ipynb" else {}
        lab.prepare(ROOT / "notebooks" / name, root, runs_dir=str(store), params_file=str(SMOKE), **extra)
    server = lab.Lab(root, tmp_path_factory.mktemp("jupyter")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def context():
    with lab.browser() as b:
        ctx = b.new_context(viewport=lab.VIEWPORT)
        yield ctx
        ctx.close()


@pytest.fixture(scope="module")
def latencies():
    """Every interaction's latency, printed at the end of the module (pytest -s)."""
    rows: list[tuple[str, str, float]] = []
    yield rows
    print("\nwidget latencies (ms)")
    for notebook, label, seconds in sorted(rows, key=lambda r: NOTEBOOKS.index(r[0])):
        print(f"  {notebook:16} {label:28} {seconds * 1000:8.0f}")


@pytest.fixture(scope="module")
def notebooks(server, context):
    """The three notebooks open, each in its own page, and run side by side (their kernels start and import
    at once: quicker than one after the other); every one has finished before any widget is touched, so
    no kernel competes with a measured interaction."""
    opened = {name: lab.Notebook.open(server, context, name) for name in NOTEBOOKS}
    for nb in opened.values():
        nb.start_all()
    for nb in opened.values():
        nb.wait_all()
    yield opened
    for nb in opened.values():
        nb.close()


def _ready(notebooks, name: str, control: str, kind: str = "dropdown"):
    """A run notebook in front, with no error output; returns it and the scope (its widget's cell) once
    the figure is drawn."""
    nb = notebooks[name]
    nb.page.bring_to_front()
    _no_errors(nb, "after running it")
    scope = nb.scope(control, kind)
    nb.wait_figure(scope)
    return nb, scope


@pytest.fixture(scope="module")
def geometry(notebooks, latencies):
    nb, scope = _ready(notebooks, "geometry.ipynb", "colour")
    yield nb, scope
    _record(latencies, nb)


@pytest.fixture(scope="module")
def gallery(notebooks, latencies):
    nb, scope = _ready(notebooks, "gallery.ipynb", "arms", "select-multiple")
    yield nb, scope
    _record(latencies, nb)


@pytest.fixture(scope="module")
def results(notebooks, latencies):
    nb, scope = _ready(notebooks, "results.ipynb", "metric")
    yield nb, scope
    _record(latencies, nb)


def _record(latencies, nb: lab.Notebook) -> None:
    latencies.extend((nb.name, label, s) for label, s in nb.latencies)


@contextmanager
def explained(nb: lab.Notebook, tmp_path: Path):
    """On a failure, save a screenshot of the page and name it in the message."""
    try:
        yield
    except AssertionError as e:
        shot = nb.screenshot(tmp_path / f"{nb.name}.png")
        print(f"screenshot: {shot}")
        raise AssertionError(f"{e}\nscreenshot: {shot}") from e


def _change(nb: lab.Notebook, scope: str, label: str, act, timeout: float) -> float:
    """Interact, require a changed figure and no error output; returns the latency in seconds."""
    seconds = nb.changed(label, scope, act, timeout)
    print(f"{nb.name}: {label}: {seconds * 1000:.0f} ms")
    _no_errors(nb, f"after {label}")
    return seconds


def test_geometry_colour_restyles_within_a_second(geometry, tmp_path):
    """Each other colouring in turn; the median of the three must be under a second (one slow redraw on a
    busy machine does not fail it; a colour change that refits is seconds every time)."""
    nb, scope = geometry
    with explained(nb, tmp_path):
        assert {"class", "row", "col", "image"} <= set(nb.options("colour"))
        chosen = nb.chosen("colour")
        targets = [o for o in nb.options("colour") if o not in chosen][:3]
        seconds = [_colour(nb, scope, target) for target in targets]
        median = statistics.median(seconds)
        assert median < COLOUR_LIMIT_S, (
            f"{nb.name}: a colour change took {median:.2f} s (median of {', '.join(f'{s:.2f}' for s in seconds)}; "
            f"limit {COLOUR_LIMIT_S} s)"
        )


def _colour(nb: lab.Notebook, scope: str, target: str) -> float:
    return _change(nb, scope, f"colour -> {target}", lambda: nb.choose("colour", target), REFIT_TIMEOUT_S)


def test_geometry_encoder_refits(geometry, tmp_path):
    nb, scope = geometry
    with explained(nb, tmp_path):
        title = _titles(nb, scope)
        target = nb.other("encoder")
        _change(nb, scope, "encoder", lambda: nb.choose("encoder", target), REFIT_TIMEOUT_S)
        assert _titles(nb, scope) != title, f"{nb.name}: the title should name the new encoder, still {title}"


def test_geometry_images_slider(geometry, tmp_path):
    nb, scope = geometry
    with explained(nb, tmp_path):
        _change(nb, scope, "images", lambda: nb.slide("images"), REFIT_TIMEOUT_S)


def test_gallery_arms_and_image(gallery, tmp_path):
    nb, scope = gallery
    with explained(nb, tmp_path):
        arms = nb.chosen("arms", "select-multiple")
        assert len(arms) >= 2, f"{nb.name}: expected every arm selected at first, got {arms}"
        _change(nb, scope, "arms (one deselected)", lambda: nb.pick_many("arms", arms[:-1]), REDRAW_TIMEOUT_S)
        _change(nb, scope, "test image", lambda: nb.slide("test image"), REDRAW_TIMEOUT_S)


def test_results_metric(results, tmp_path):
    nb, scope = results
    with explained(nb, tmp_path):
        target = nb.other("metric")
        _change(nb, scope, f"metric -> {target}", lambda: nb.choose("metric", target), REDRAW_TIMEOUT_S)


def test_a_detached_widget_is_caught(geometry, tmp_path):
    """The check fails when a widget stops updating: with every observer of the colour dropdown removed in
    the kernel, a colour change must leave the figure as it was and the check must say so. Runs last:
    it leaves the geometry widget broken."""
    nb, scope = geometry
    nb.execute(
        "from ipywidgets import Dropdown\n"
        "from ipywidgets.widgets.widget import _instances\n"
        "_found = [w for w in list(_instances.values()) if isinstance(w, Dropdown) and w.description == 'colour']\n"
        "assert len(_found) == 1, _found\n"
        "_found[0].unobserve_all()\n"
    )
    target = nb.other("colour")
    with pytest.raises(lab.WidgetStuck, match="colour"):
        nb.changed("colour (detached)", scope, lambda: nb.choose("colour", target), STUCK_WAIT_S)


def _no_errors(nb: lab.Notebook, when: str) -> None:
    """No error output; a failure shows each traceback's frames (where) and its last line (what)."""
    errors = [_gist(e) for e in nb.errors()]
    assert not errors, f"{nb.name}: error output {when}:\n" + "\n---\n".join(errors)


def _gist(traceback: str) -> str:
    lines = [x.rstrip() for x in traceback.strip().splitlines() if x.strip()]
    where = [x for x in lines if x.startswith(("Cell In", "File ")) or re.match(r"\s*-+> ", x)]
    return "\n".join(where[-6:] + lines[-1:])


def _titles(nb: lab.Notebook, scope: str) -> list[str]:
    return [f["title"] for f in json.loads(nb.signature(scope))]
