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
from studylib.study.execution import KernelSession, NotebookTimeout, resume_kernels, run_notebook, stop_kernels

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


# ---------------------------------------------------------------- one kernel for notebook after notebook

# a notebook that says which kernel ran it, whether it saw the last notebook's variable, and when its kernel
# was cleared for it; `fail` makes it raise after that
_REPORT = (
    "import json, os\nprint(json.dumps({'pid': os.getpid(), 'leftover': 'leftover' in globals(), "
    "'started': os.environ.get('STUDYLIB_NOTEBOOK_STARTED')}))\n"
    "leftover = 1\nif fail:\n    raise ValueError('asked to')"
)


def _report_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("fail = False", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(_REPORT),
    ]
    nbformat.write(nb, path)
    return path


def _report(out: Path) -> dict:
    cell = nbformat.read(out, as_version=4).cells[-1]
    return json.loads(next(o["text"] for o in cell.outputs if o.get("name") == "stdout"))


def test_a_kernel_session_runs_each_notebook_in_one_kernel_as_in_a_new_one(tmp_path):
    source, session = _report_notebook(tmp_path / "nb.ipynb"), KernelSession()
    try:
        seen = []
        for i in range(3):
            run_notebook(source, tmp_path / f"out{i}.ipynb", {}, kernel=session)
            seen.append(_report(tmp_path / f"out{i}.ipynb"))
            counts = [c.execution_count for c in nbformat.read(tmp_path / f"out{i}.ipynb", 4).cells]
            assert counts == [1, 2]  # the parameters cell, the cell: counted as in a new kernel
    finally:
        session.close()
    assert len({s["pid"] for s in seen}) == 1 and session.kernels == 1  # started once
    assert not any(s["leftover"] for s in seen)  # each notebook's namespace is new
    started = [s["started"] for s in seen]
    assert started[0] is None and float(started[1]) < float(started[2])  # a reused kernel's notebook is timed
    assert _gone(seen[0]["pid"])  # close() kills it


def _gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_kernel_session_replaces_a_kernel_whose_notebook_failed(tmp_path):
    source, session = _report_notebook(tmp_path / "nb.ipynb"), KernelSession()
    try:
        run_notebook(source, tmp_path / "a.ipynb", {}, kernel=session)
        with pytest.raises(Exception, match="asked to"):
            run_notebook(source, tmp_path / "b.ipynb", {"fail": True}, kernel=session)
        failed = _report(tmp_path / "b.ipynb")["pid"]
        assert _gone(failed)  # not trusted with the next notebook
        run_notebook(source, tmp_path / "c.ipynb", {}, kernel=session)
        after = _report(tmp_path / "c.ipynb")
    finally:
        session.close()
    assert after["pid"] != failed and after["started"] is None and session.kernels == 2


def test_a_kernel_session_kills_a_kernel_that_never_answers_and_goes_on(tmp_path):
    stop, pid_file = _stopping_notebook(tmp_path / "stop.ipynb"), tmp_path / "pid"
    session = KernelSession()
    try:
        with pytest.raises(NotebookTimeout, match=r"did not finish within 4 s, so its kernel was killed"):
            run_notebook(stop, tmp_path / "a.ipynb", {"pid_file": str(pid_file)}, 30, 4, kernel=session)
        assert _kernel_gone(pid_file)
        run_notebook(_report_notebook(tmp_path / "nb.ipynb"), tmp_path / "b.ipynb", {}, kernel=session)
    finally:
        session.close()
    assert _report(tmp_path / "b.ipynb")["pid"] != int(pid_file.read_text())


def test_ctrl_c_kills_a_kernel_session_s_idle_kernel_and_the_next_notebook_starts_one(tmp_path):
    source, session = _report_notebook(tmp_path / "nb.ipynb"), KernelSession()
    try:
        run_notebook(source, tmp_path / "a.ipynb", {}, kernel=session)
        first = _report(tmp_path / "a.ipynb")["pid"]
        assert stop_kernels() == 1  # the idle kernel between two groups is registered too
        resume_kernels()
        assert _gone(first)
        run_notebook(source, tmp_path / "b.ipynb", {}, kernel=session)  # found dead: a new kernel, not an error
    finally:
        resume_kernels()
        session.close()
    assert _report(tmp_path / "b.ipynb")["pid"] != first


def test_a_reused_kernel_compiles_as_a_new_one(tmp_path):
    """torch.compile's caches are dropped between notebooks: a long-lived kernel compiling one group after another
    (the same code, new closures) would otherwise reach the recompile limit and fall back to eager."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    code = (
        "import torch, torch._dynamo.convert_frame as cf\n"
        "torch.compile(lambda x: x + 1, backend='eager')(torch.ones(2))\n"
        "print(cf.FRAME_COUNTER)  # frames dynamo has compiled in this process"
    )
    nb.cells = [nbformat.v4.new_code_cell(code)]
    nbformat.write(nb, tmp_path / "nb.ipynb")
    session, seen = KernelSession(), []
    try:
        for i in range(2):
            run_notebook(tmp_path / "nb.ipynb", tmp_path / f"out{i}.ipynb", {}, kernel=session)
            cell = nbformat.read(tmp_path / f"out{i}.ipynb", as_version=4).cells[0]
            seen.append(int(next(o["text"] for o in cell.outputs if o.get("name") == "stdout")))
    finally:
        session.close()
    assert seen[0] == seen[1] >= 1  # counted from zero again, as in a new kernel
