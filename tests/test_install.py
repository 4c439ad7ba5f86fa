"""A non-editable install carries everything a study needs: from any directory, the installed package
(not this checkout) runs a study, its stage notebooks included."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from studylib.study.store import RunFolder

ROOT = Path(__file__).resolve().parent.parent


def _pip(*args: str, cwd: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_installed_package_runs_a_study_from_another_directory(tmp_path):
    src = tmp_path / "src"  # build from a copy: the build leaves nothing in the checkout
    for name in ("studylib", "notebooks", "params"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel"), str(src), cwd=tmp_path)
    wheel = next((tmp_path / "wheel").glob("studylib-*.whl"))
    site = tmp_path / "site"
    _pip("install", "--no-deps", "-q", "--target", str(site), str(wheel), cwd=tmp_path)
    assert sorted(p.name for p in (site / "studylib" / "notebooks").glob("*.ipynb")) == sorted(
        p.name for p in (ROOT / "notebooks").glob("*.ipynb")
    )
    assert (site / "studylib" / "params" / "smoke.yaml").is_file()  # a stage notebook opened by hand runs it

    values = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    values["grid"].update(pretrain_sizes=[0], intermediate=["none"], finetune_sizes=[8])
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "study.yaml").write_text(yaml.safe_dump(values))
    env = {**os.environ, "PYTHONPATH": str(site), "CI": "true"}
    out = subprocess.run(
        [sys.executable, "-m", "studylib.cli", "run", "study.yaml", "--runs", "runs"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (notebook,) = {RunFolder(d).notebook for d in (work / "runs" / "segment").iterdir()}  # one group's
    source = json.loads(notebook.read_text())["metadata"]["papermill"]["input_path"]
    assert source.startswith(str(site)), source  # the installed copy of the notebook ran
    assert (work / "runs" / "results-smoke.ipynb").exists()
