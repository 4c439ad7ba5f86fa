"""Reproduction loop for notebook executions that never end (issue: `study run` hangs in the results
notebook). Executes one notebook N times through papermill, each with a per-cell timeout, and counts
the executions that ran into it. Variants: the notebook without its widget cell, the kernel on IPC
transport instead of TCP, a different ipykernel for the kernel only (--kernel-path: a folder put first
on the kernel's PYTHONPATH, e.g. from `pip install --target DIR ipykernel==6.31.0`).

    python tools/notebook_hang_loop.py --runs STORE --params params/smoke.yaml -n 20 [--no-widget]
        [--transport ipc] [--kernel-path DIR] [--interactive] [--timeout 60]

Prints one line per execution and a JSON summary (executions, hangs, seconds per finished execution).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import papermill as pm
from jupyter_client.manager import KernelManager
from nbclient.exceptions import CellTimeoutError


def _notebook(source: Path, drop_widget: bool) -> Path:
    nb = nbformat.read(source, as_version=4)
    if drop_widget:
        nb.cells = [c for c in nb.cells if "explore(" not in c.source]
    out = Path(tempfile.mkdtemp(prefix="hang-loop-")) / source.name
    nbformat.write(nb, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notebook", default=str(Path(__file__).resolve().parent.parent / "notebooks" / "results.ipynb"))
    ap.add_argument("--runs", required=True)
    ap.add_argument("--params", required=True)
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--no-widget", action="store_true", help="drop the cell that builds the widget")
    ap.add_argument("--interactive", action="store_true", help="pass interactive=True (build the widget)")
    ap.add_argument("--transport", choices=["tcp", "ipc"], default="tcp")
    ap.add_argument("--kernel-path", default="", help="folder put first on the kernel's PYTHONPATH")
    ap.add_argument("--timeout", type=int, default=60, help="seconds per cell before an execution counts as hung")
    args = ap.parse_args(argv)

    nb = _notebook(Path(args.notebook), args.no_widget)
    if args.kernel_path:
        os.environ["PYTHONPATH"] = os.pathsep.join([args.kernel_path, os.environ.get("PYTHONPATH", "")])
    params = {"runs_dir": str(Path(args.runs).resolve()), "params_file": str(Path(args.params).resolve())}
    if args.interactive:
        params["interactive"] = True
    hangs, seconds = 0, []
    for i in range(args.n):
        extra = {}
        if args.transport == "ipc":  # papermill's default is a TCP kernel manager made by nbclient
            extra["km"] = KernelManager(
                kernel_name="python3", transport="ipc", ip=tempfile.mkdtemp(prefix="ipc-") + "/kernel"
            )
        t0 = time.time()
        try:
            pm.execute_notebook(
                str(nb),
                str(nb.with_suffix(".out.ipynb")),
                parameters=params,
                kernel_name="python3",
                progress_bar=False,
                execution_timeout=args.timeout,
                **extra,
            )
            seconds.append(time.time() - t0)
            status = "ok"
        except (CellTimeoutError, pm.PapermillExecutionError, TimeoutError) as e:
            if "Timeout" not in type(e).__name__ and "timed out" not in str(e).lower() and "TimeoutError" not in str(e):
                raise
            hangs += 1
            status = "HUNG"
        print(f"{i + 1:3d} {status} {time.time() - t0:6.1f}s", flush=True)
    summary = {
        "executions": args.n,
        "hangs": hangs,
        "widget": not args.no_widget,
        "transport": args.transport,
        "kernel_path": args.kernel_path,
        "interactive": args.interactive,
        "seconds_median": round(statistics.median(seconds), 1) if seconds else None,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
