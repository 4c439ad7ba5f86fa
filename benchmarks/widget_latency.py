"""How long the interactive notebooks' widgets take to redraw, in a real JupyterLab and the system Chromium
(the harness of tests/test_browser.py, tests/lab.py). Prints one row per interaction (notebook, interaction,
latency from the input event to a changed figure) and saves a screenshot of each widget state.

    python benchmarks/widget_latency.py --runs RUNS --params params/smoke.yaml --shots shots/

The kernel imports studylib as this interpreter would: set PYTHONPATH to measure another checkout, e.g.
PYTHONPATH=/tmp/old python benchmarks/widget_latency.py --notebooks-dir /tmp/old/notebooks ..."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import lab  # noqa: E402

# Per notebook: the control that marks the widget's cell (description, kind), then the interactions
# (label, how to act given the open notebook: returns the act to time, timeout in seconds).
SCENARIOS = {
    "geometry.ipynb": (
        ("colour", "dropdown"),
        [
            ("colour 1/3", lambda nb: _next(nb, "colour"), 120),
            ("colour 2/3", lambda nb: _next(nb, "colour"), 120),
            ("colour 3/3", lambda nb: _next(nb, "colour"), 120),
            ("encoder", lambda nb: _next(nb, "encoder"), 300),
            # 8: a valid value before and after the rework (the smoke split has 16 test images)
            ("images -> 8", lambda nb: lambda: nb.slide("images", 8), 300),
        ],
    ),
    "gallery.ipynb": (
        ("arms", "select-multiple"),
        [
            ("arms (one deselected)", lambda nb: _deselect_one(nb, "arms"), 120),
            ("test image", lambda nb: lambda: nb.slide("test image"), 120),
        ],
    ),
    "results.ipynb": (("metric", "dropdown"), [("metric", lambda nb: _next(nb, "metric"), 120)]),
}


def _next(nb: lab.Notebook, description: str):
    """The act of choosing the option after the chosen one (read before the clock starts)."""
    options, chosen = nb.options(description), nb.chosen(description)[0]
    target = options[(options.index(chosen) + 1) % len(options)]
    return lambda: nb.choose(description, target)


def _deselect_one(nb: lab.Notebook, description: str):
    chosen = nb.chosen(description, "select-multiple")
    return lambda: nb.pick_many(description, chosen[:-1])


def measure(server: lab.Lab, context, name: str, shots: Path | None) -> list[tuple[str, str, str]]:
    (control, kind), steps = SCENARIOS[name]
    nb = lab.Notebook.open(server, context, name)
    rows = []
    try:
        origin = nb.execute("import studylib; print(studylib.__file__)").strip()
        print(f"{name}: the kernel imports {origin}", flush=True)
        nb.run_all()
        if nb.errors():
            return [(name, "run all", "error: " + nb.errors()[0].splitlines()[-1])]
        scope = nb.scope(control, kind)
        nb.wait_figure(scope)
        _shot(nb, scope, shots, name, 0, "initial")
        for i, (label, prepare, timeout) in enumerate(steps, 1):
            try:
                ms = f"{nb.changed(label, scope, prepare(nb), timeout) * 1000:.0f}"
            except lab.WidgetStuck:
                ms = f"no change in {timeout} s"
            rows.append((name, label, ms + (" (error output)" if nb.errors() else "")))
            print(f"  {label}: {rows[-1][2]}", flush=True)
            _shot(nb, scope, shots, name, i, label)
    finally:
        nb.close()
    return rows


def _shot(nb: lab.Notebook, scope: str, shots: Path | None, name: str, i: int, label: str) -> None:
    if shots is not None:
        nb.screenshot(shots / f"{Path(name).stem}-{i}-{label.split(' ')[0]}.png", scope)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True, help="a finished run store (with its geometry)")
    ap.add_argument("--params", type=Path, required=True, help="the study's params file")
    ap.add_argument("--notebooks-dir", type=Path, default=ROOT / "notebooks")
    ap.add_argument("--shots", type=Path, default=None, help="where to save a screenshot of each widget state")
    ap.add_argument("--only", nargs="*", default=list(SCENARIOS), help="notebooks to measure")
    args = ap.parse_args(argv)
    if lab.chromium() is None:
        sys.exit("no Chromium: `make browser` installs Debian's package `chromium`")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.only:
            lab.prepare(
                args.notebooks_dir / name,
                tmp,
                runs_dir=str(args.runs.resolve()),
                params_file=str(args.params.resolve()),
                **({"interactive": True} if name == "results.ipynb" else {}),
            )
        server = lab.Lab(tmp, tmp / ".jupyter").start()
        try:
            with lab.browser() as b:
                context = b.new_context(viewport=lab.VIEWPORT)
                for name in args.only:
                    rows += measure(server, context, name, args.shots)
        finally:
            server.stop()
    print(f"\n{'notebook':16} {'interaction':24} latency ms")
    for row in rows:
        print(f"{row[0]:16} {row[1]:24} {row[2]}")


if __name__ == "__main__":
    main()
