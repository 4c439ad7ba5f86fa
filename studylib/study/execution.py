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

A `KernelSession` is one kernel that executes notebook after notebook (a local worker's): each notebook
still gets its own executed copy, but the kernel's start-up and imports (about 3 s of CPU per notebook on a
laptop core) are paid once. Between notebooks its namespace is cleared as a new kernel's would be; after a
notebook that fails or times out, the kernel is killed and the next notebook starts a new one.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from traitlets import default

TRAINING_TAG = "training"
CELL_TIMEOUT = 600  # seconds for any cell that does not train: loading, tables, figures
# set in a reused kernel when its next notebook begins (a run's provenance times its group from there; a new
# kernel's notebook from the kernel's start)
NOTEBOOK_STARTED = "STUDYLIB_NOTEBOOK_STARTED"


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

        pids: list[int] = []  # of this class's kernels (one class per run_notebook call or KernelSession)
        clients: list = []  # the clients made for this class's kernels (a KernelSession closes them)

        async def _async_launch_kernel(self, kernel_cmd, **kw):
            await super()._async_launch_kernel(kernel_cmd, **kw)
            pid = self.provisioner.pid
            with _guard:
                _kernels.add(pid)
                type(self).pids.append(pid)
            if _stopping.is_set():  # started while the runner stops: it never runs a cell
                _kill_tree(pid)

        def client(self, **kw):
            kc = super().client(**kw)
            type(self).clients.append(kc)
            return kc

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
    kernel: KernelSession | None = None,
) -> None:
    """Execute `source` with `parameters` into `out` (written as it goes), in a new kernel, or in `kernel`'s
    when given (it must be used from one thread: its client lives on that thread's event loop). Raises
    NotebookTimeout when a cell runs past its limit (`training_timeout` for cells tagged `training`, default
    cell_timeout)."""
    if kernel is not None:
        kernel.run(source, out, parameters, cell_timeout, training_timeout, start_timeout)
        return
    folder = Path(tempfile.mkdtemp(prefix="studylib-kernel-"))
    manager = _ipc_kernel_manager(folder)
    try:
        _execute(source, out, parameters, cell_timeout, training_timeout, start_timeout, kernel_manager_class=manager)
    finally:
        with _guard:  # the kernel is gone (nbclient kills it on any exit): its pid may be reused
            _kernels.difference_update(manager.pids)
        shutil.rmtree(folder, ignore_errors=True)


def _execute(source, out, parameters, cell_timeout, training_timeout, start_timeout, **kernel) -> None:
    """papermill's execution with the time limits; `kernel`: kernel_manager_class (nbclient starts a kernel and
    kills it on any exit) or km (a running kernel's manager, left running)."""
    import papermill as pm

    limits = {"training": training_timeout or cell_timeout, "other": cell_timeout}
    running: dict = {}

    def limit(cell) -> float:
        running["cell"] = cell
        return limits["training" if TRAINING_TAG in cell.metadata.get("tags", []) else "other"]

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
            shutdown_kernel="immediate",
            **kernel,
        )  # no cwd=: papermill's chdir is process-wide
    except TimeoutError as e:  # nbclient's CellTimeoutError and its reply timeouts are TimeoutErrors
        cell = running.get("cell")
        what = f"cell {_cell_name(cell)!r}" if cell is not None else "the kernel"
        seconds = limit(cell) if cell is not None else cell_timeout
        raise NotebookTimeout(
            f"{Path(source).name}: {what} did not finish within {seconds:.0f} s, so its kernel was killed "
            f"({type(e).__name__}). If the work is just slow, raise `timeouts.training` or `timeouts.cell` in "
            f"the parameter file; otherwise run the same command again: finished work is kept."
        ) from None


class KernelSession:
    """One kernel that executes notebook after notebook. It starts with the first notebook; before each later
    one its namespace is cleared (`fresh_kernel`: modules stay imported) and, after any notebook that raises
    (a failed cell, a timeout, a dead kernel), it is killed: the next notebook starts a new kernel, so no
    notebook runs in a kernel that has failed. Use it from one thread, and `close` it at the end."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="studylib-kernel-"))
        self.manager = _ipc_kernel_manager(self.folder)
        self.km = None
        self.kernels = 0  # started so far

    def run(self, source, out, parameters, cell_timeout, training_timeout, start_timeout) -> None:
        from jupyter_core.utils import run_sync

        if self.km is not None and not run_sync(self.km.is_alive)():
            self._kill()  # it died between notebooks (killed from outside): the next one starts a new kernel
        ok = False
        try:
            if self.km is None:
                self.km = self.manager(kernel_name="python3")
                self.kernels += 1  # nbclient starts it with the notebook
            else:
                self._fresh(cell_timeout)
            _execute(source, out, parameters, cell_timeout, training_timeout, start_timeout, km=self.km)
            ok = True
        finally:
            self._close_clients()
            if not ok:
                self._kill()

    def _fresh(self, timeout: float) -> None:
        from jupyter_core.utils import run_sync

        kc = self.km.client()
        kc.start_channels()
        run_sync(kc.wait_for_ready)(timeout=timeout)
        code = "__import__('studylib.study.execution', fromlist=['*']).fresh_kernel()"
        reply = run_sync(kc.execute_interactive)(code, silent=True, timeout=timeout, output_hook=lambda msg: None)
        if reply["content"]["status"] != "ok":
            c = reply["content"]
            raise RuntimeError(f"clearing the kernel between notebooks failed: {c.get('ename')}: {c.get('evalue')}")

    def _close_clients(self) -> None:
        clients, self.manager.clients = self.manager.clients, []
        for kc in clients:
            kc.stop_channels()

    def _kill(self) -> None:
        """Kill the kernel's process tree (it may be dead already) and forget it."""
        km, self.km = self.km, None
        pids = list(self.manager.pids)
        for pid in pids:
            _kill_tree(pid)
        with _guard:
            _kernels.difference_update(pids)
        self.manager.pids.clear()
        if km is not None:  # its connection files and sockets
            from jupyter_core.utils import run_sync

            run_sync(km.cleanup_resources)()

    def close(self) -> None:
        self._close_clients()
        self._kill()
        shutil.rmtree(self.folder, ignore_errors=True)


def fresh_kernel() -> None:
    """Run inside a reused kernel before its next notebook: what a new kernel would not have is dropped -
    the namespace (and the execution count, so the notebook counts from 1), compiled graphs (a long-lived
    kernel would otherwise reach torch.compile's recompile limit and fall back to eager), cached GPU memory."""
    from IPython import get_ipython

    get_ipython().reset(new_session=True)  # its display hook's flush collects the garbage
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    os.environ[NOTEBOOK_STARTED] = repr(time.time())
