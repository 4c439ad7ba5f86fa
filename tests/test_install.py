"""A non-editable install carries everything a study needs: the wheel holds every file of the package, its
notebooks (and parameter files, where packaged) unchanged, and from any directory the installed package
(not this checkout) runs a study through its own copy of the stage notebooks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from studylib.study.store import RunFolder

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("studylib", "notebooks", "params", "pyproject.toml", "README.md")  # what the build reads
# the installed copy runs the CLI and says where it looks for the notebooks (the results notebook's too)
CLI = "import sys; from studylib import cli; from studylib.study import runner; print('NOTEBOOKS', runner.NOTEBOOK_DIR)"
CLI += "; sys.exit(cli.main(sys.argv[1:]))"


def _pip(*args: str, cwd: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _package_files() -> dict[str, Path]:
    """Every file the checkout's package is made of, by its path inside the wheel."""
    files = {
        p.relative_to(ROOT).as_posix(): p
        for p in (ROOT / "studylib").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    files.update({f"studylib/notebooks/{p.name}": p for p in (ROOT / "notebooks").glob("*.ipynb")})
    return files


def test_installed_package_runs_a_study_from_another_directory(tmp_path):
    src = tmp_path / "src"  # build from a copy: the build leaves nothing in the checkout
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
        elif (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel"), str(src), cwd=tmp_path)
    wheel = next((tmp_path / "wheel").glob("studylib-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        missing = sorted(set(_package_files()) - set(z.namelist()))
    assert not missing, f"the wheel lacks {missing}: add them to [tool.setuptools] in pyproject.toml"
    site = tmp_path / "site"
    _pip("install", "--no-deps", "-q", "--target", str(site), str(wheel), cwd=tmp_path)
    for inside, source in _package_files().items():
        if source.suffix == ".ipynb":
            assert (site / inside).read_bytes() == source.read_bytes(), inside
    if (site / "studylib" / "params").is_dir():  # packaged: the shipped parameter files, unchanged
        for f in (ROOT / "params").glob("*.yaml"):
            assert (site / "studylib" / "params" / f.name).read_bytes() == f.read_bytes(), f.name

    values = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    values["grid"].update(pretrain_sizes=[0], intermediate=["none"], finetune_sizes=[8])
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "study.yaml").write_text(yaml.safe_dump(values))
    env = {**os.environ, "PYTHONPATH": str(site), "CI": "true"}
    # no results notebook here: the session's smoke store executes it (tests/test_study.py), and where the
    # installed copy finds it is the NOTEBOOKS line
    command = [sys.executable, "-c", CLI, "run", "study.yaml", "--runs", "runs", "--no-notebook"]
    out = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"NOTEBOOKS {site / 'studylib' / 'notebooks'}\n" in out.stdout, out.stdout
    (run,) = (work / "runs" / "segment").iterdir()
    source = json.loads(RunFolder(run).notebook.read_text())["metadata"]["papermill"]["input_path"]
    assert source.startswith(str(site)), source  # the installed copy of the notebook ran
    assert json.loads((run / "metrics.json").read_text())["miou_per_image"] > 0
