"""Execute a notebook through papermill so that the execution always ends.

Every cell has a time limit: cells tagged `training` (the stage notebooks' training call) get the
run's training budget, every other cell a short one, and papermill's closing kernel_info request the
short one too. When a limit passes the kernel is killed, not interrupted (a kernel that never answers
ignores interrupts too), and NotebookTimeout says which cell, how long, and what to do. The kernel talks
to papermill over IPC sockets in a private temporary folder: no TCP ports, and no warning about
unencrypted TCP in every run's output.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from traitlets import default

TRAINING_TAG = "training"
CELL_TIMEOUT = 600  # seconds for any cell that does not train: loading, tables, figures


class NotebookTimeout(RuntimeError):
    """A notebook cell ran past its time limit; its kernel was killed."""


def _ipc_kernel_manager(folder: Path):
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        """A kernel manager that talks over IPC sockets under `folder` instead of TCP."""

        @default("transport")
        def _transport_default(self):
            return "ipc"

        @default("ip")
        def _ip_default(self):
            return str(folder / "kernel")

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
            kernel_manager_class=_ipc_kernel_manager(folder),
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
        shutil.rmtree(folder, ignore_errors=True)
