"""Execute a notebook through papermill so that the execution always ends.

Every cell has a time limit: cells tagged `training` (the stage notebooks' training call) get the
run's training budget, every other cell a short one, and papermill's closing kernel_info request the
short one too. When a limit passes the kernel is killed, not interrupted (a kernel that never answers
ignores interrupts too), and NotebookTimeout says which cell, how long, and what to do. The kernel talks
to papermill over IPC sockets in a private temporary folder: no TCP ports, and no warning about
unencrypted TCP in every run's output.

Every kernel started here is registered while it lives, so that `stop_kernels` (the runner's Ctrl-C)
can kill each one's process tree at once: kernels run in their own session, so a terminal's SIGINT
never reaches them.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from pathlib import Path

from traitlets import default

TRAINING_TAG = "training"
CELL_TIMEOUT = 600  # seconds for any cell that does not train: loading, tables, figures


class NotebookTimeout(RuntimeError):
    """A notebook cell ran past its time limit; its kernel was killed."""


_kernels: set[int] = set()  # pids of the live kernels started by run_notebook
_guard = threading.Lock()
_stopping = threading.Event()


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)


def stop_kernels() -> int:
    """Kill every live kernel's process tree, and every kernel that starts from now on (until
    `resume_kernels`) as soon as it starts -> how many were running."""
    _stopping.set()
    logging.getLogger("papermill").disabled = True  # "Kernel died ...": killed on purpose, not an error to log
    with _guard:
        pids = list(_kernels)
    for pid in pids:
        _kill_tree(pid)
    return len(pids)


def resume_kernels() -> None:
    """Let kernels start again (after stop_kernels)."""
    _stopping.clear()
    logging.getLogger("papermill").disabled = False


def stopping() -> bool:
    return _stopping.is_set()


def _ipc_kernel_manager(folder: Path):
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        """A kernel manager that talks over IPC sockets under `folder` instead of TCP, and registers its
        kernel's pid while the kernel lives."""

        @default("transport")
        def _transport_default(self):
            return "ipc"

        @default("ip")
        def _ip_default(self):
            return str(folder / "kernel")

        pids: list[int] = []  # of this class's kernels (one class per run_notebook call)

        async def _async_launch_kernel(self, kernel_cmd, **kw):
            await super()._async_launch_kernel(kernel_cmd, **kw)
            pid = self.provisioner.pid
            with _guard:
                _kernels.add(pid)
                type(self).pids.append(pid)
            if _stopping.is_set():  # started while the runner stops: it never runs a cell
                _kill_tree(pid)

    return IPCKernelManager


def _cell_name(cell) -> str:
    first = next((ln for ln in cell.source.splitlines() if ln.strip() and not ln.startswith("#")), "")
    return first.strip()[:60]


def run_notebook(
    source: str | Path,
    out: str | Path,
    parameters: dict,
    cell_timeout: float = CELL_TIMEOUT,
    training_timeout: float | None = None,
    start_timeout: float = 120,
) -> None:
    """Execute `source` with `parameters` into `out` (written as it goes). Raises NotebookTimeout when a
    cell runs past its limit (`training_timeout` for cells tagged `training`, default cell_timeout)."""
    import papermill as pm

    limits = {"training": training_timeout or cell_timeout, "other": cell_timeout}
    running: dict = {}

    def limit(cell) -> float:
        running["cell"] = cell
        return limits["training" if TRAINING_TAG in cell.metadata.get("tags", []) else "other"]

    folder = Path(tempfile.mkdtemp(prefix="studylib-kernel-"))
    manager = _ipc_kernel_manager(folder)
    try:
        pm.execute_notebook(
            str(source),
            str(out),
            parameters=parameters,
            kernel_name="python3",
            progress_bar=False,
            start_timeout=start_timeout,
            execution_timeout=cell_timeout,
            timeout_func=limit,
            kernel_manager_class=manager,
            shutdown_kernel="immediate",
        )  # nbclient owns the kernel: killed on any exit
    except TimeoutError as e:  # nbclient's CellTimeoutError and its reply timeouts are TimeoutErrors
        cell = running.get("cell")
        what = f"cell {_cell_name(cell)!r}" if cell is not None else "the kernel"
        seconds = limit(cell) if cell is not None else cell_timeout
        raise NotebookTimeout(
            f"{Path(source).name}: {what} did not finish within {seconds:.0f} s, so its kernel was killed "
            f"({type(e).__name__}). If the work is just slow, raise `timeouts.training` or `timeouts.cell` in "
            f"the parameter file; otherwise run the same command again: finished work is kept."
        ) from None
    finally:
        with _guard:  # the kernel is gone (nbclient kills it on any exit): its pid may be reused
            _kernels.difference_update(manager.pids)
        shutil.rmtree(folder, ignore_errors=True)
