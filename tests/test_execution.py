"""Notebook executions always end: a kernel that never answers is killed and reported within the
time limit, and the run it served is recorded failed with the reason."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from studylib.study import config, grid, runner
from studylib.study.execution import NotebookTimeout, run_notebook

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "smoke.yaml"

# the kernel writes its pid, then stops itself: alive, silent, deaf to interrupts
STOP_KERNEL = "import os, signal\nopen(pid_file, 'w').write(str(os.getpid()))\nos.kill(os.getpid(), signal.SIGSTOP)"


def _stopping_notebook(path: Path, extra_parameters: str = "", prelude: str = "") -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("pid_file = ''\n" + extra_parameters, metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(prelude + STOP_KERNEL, metadata={"tags": ["training"]}),
    ]
    nbformat.write(nb, path)
    return path


def _kernel_gone(pid_file: Path) -> bool:
    pid = int(pid_file.read_text())
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_kernel_that_never_answers_is_killed_and_reported(tmp_path):
    source, pid_file = _stopping_notebook(tmp_path / "stop.ipynb"), tmp_path / "pid"
    t0 = time.time()
    with pytest.raises(NotebookTimeout, match=r"did not finish within 4 s, so its kernel was killed"):
        run_notebook(source, tmp_path / "out.ipynb", {"pid_file": str(pid_file)}, cell_timeout=30, training_timeout=4)
    assert time.time() - t0 < 4 + 30  # the limit, plus the kernel's start-up
    assert _kernel_gone(pid_file)


def test_a_hung_stage_run_is_recorded_failed_with_the_reason(tmp_path):
    """The runner's guard: the stage notebook's kernel hangs, the run fails with the reason, the
    kernel is gone and the runner goes on (its summary says the run failed)."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    plan = [r for r in grid.plan(config.load(SMOKE)) if r.stage == "pretrain"]
    params = runner.group_parameters(grid.Group("pretrain", plan[:1]), tmp_path, "cpu", {})
    declared = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    # as a stage notebook does, the stopping notebook reads its run's parameters from its params.json (through
    # the store, which imports quickly: the pid must be written well within the 4 s limit)
    prelude = "from studylib.study.store import RunFolder\npid_file = RunFolder(run_dirs[0]).parameters['pid_file']\n"
    _stopping_notebook(notebooks / grid.NOTEBOOKS["pretrain"], declared, prelude)
    pid_file = tmp_path / "pid"
    run = grid.Run(plan[0].stage, {**plan[0].params}, labels=plan[0].labels)
    # the stopping notebook reads pid_file from the run's params.json: route it through the run's params
    run.params["pid_file"] = str(pid_file)
    t0 = time.time()
    summary = runner.execute(
        [run],
        tmp_path / "runs",
        device="cpu",
        notebooks=notebooks,
        echo=lambda *_: None,
        timeouts={"cell": 30, "training": 4},
    )
    assert time.time() - t0 < 4 + 30
    assert summary.failed == [run.id] and not summary.ok
    error = json.loads((run.dir(tmp_path / "runs") / "error.json").read_text())
    assert error["error"].startswith("NotebookTimeout:") and "timeouts.training" in error["error"]
    assert _kernel_gone(pid_file)
