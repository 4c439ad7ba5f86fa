"""The HTML report opens offline and renders in a headless Chromium, and the geometry of a study's
encoders lands in the run store."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from studylib.analysis import encoders as analysis
from studylib.analysis import reference
from studylib.views import report

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def study(smoke_geometry):
    """The session's smoke store with its geometry (tests/conftest.py): read, never changed."""
    return smoke_geometry.runs, smoke_geometry.plan


def test_geometry_is_stored_for_every_encoder(study):
    runs, plan = study
    encoders = [r for r in plan if r.stage in ("pretrain", "intermediate")]
    for r in encoders:
        rep = json.loads((r.dir(runs) / "geometry.json").read_text())
        assert rep["num_images"] == 16 and [x["layer"] for x in rep["per_layer"]] == [0, 1, 2, 3, -1]
    assert (runs / "geometry" / "scratch-viny-tiny-0.json").exists()
    table = analysis.table2(analysis.reports(runs, plan))
    assert set(table.index.get_level_values(0)) == {"scratch", "mim", "mim + intel", "mim + spatial"}
    assert table.loc[("mim + spatial", 32), f"{reference.PAPER_GEOMETRY_LABEL}: within-image variance"] == 0.32
    assert analysis.compute(runs, plan, n_images=32) == []  # measured once


def test_report_is_self_contained(study, tmp_path):
    runs, plan = study
    out = report.write(runs, plan, tmp_path / "report.html", "smoke")
    text = out.read_text()
    assert "<script src=" not in text and "<link " not in text  # nothing fetched: plotly.js is inline
    assert text.count('class="figure"') >= 6
    assert "Table 2" in text and "Gallery" in text


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(study, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed here and could not be (Debian package `chromium`)")
    runs, plan = study
    out = report.write(runs, plan, tmp_path / "report.html", "smoke")
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            out.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    errors = dom.split('<pre id="js-errors">', 1)[1].split("</pre>", 1)[0] if 'id="js-errors"' in dom else None
    assert errors == "", f"JavaScript errors: {errors}"
    figures = dom.count('class="figure"')
    assert figures >= 6 and dom.count('class="main-svg"') >= figures  # plotly drew every figure
