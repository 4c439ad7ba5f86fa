"""Execute a plan: each stage run is its stage notebook, executed by papermill into the run folder.

Finished runs (metrics.json present) are skipped; a failed run is recorded in error.json with its
traceback, its dependents are skipped, and the rest go on. An interrupted run resumes from its
epoch checkpoint the next time.
"""
from __future__ import annotations

import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .grid import NOTEBOOKS, Run
from .store import atomic_write_json

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


@dataclass
class Summary:
    done: list[str] = field(default_factory=list)      # finished before this call
    ran: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)   # a parent failed

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked

    def line(self) -> str:
        return (f"{len(self.ran)} ran, {len(self.done)} already done, {len(self.failed)} failed, "
                f"{len(self.blocked)} skipped because a parent failed")


def is_done(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").exists()


def notebook_parameters(run: Run, runs: Path, device: str, cache: str) -> dict:
    params = dict(run.params)
    params["data"] = {**params["data"], "cache": cache}
    return {**params, "run_dir": str(run.dir(runs).resolve()), "device": device,
            "parent_dir": str(run.parent.dir(runs).resolve()) if run.parent else ""}


def execute_run(run: Run, runs: Path, device: str, cache: str, notebooks: Path = NOTEBOOK_DIR) -> None:
    import papermill as pm
    d = run.dir(runs)
    d.mkdir(parents=True, exist_ok=True)
    params = notebook_parameters(run, runs, device, cache)
    atomic_write_json(d / "params.json", {"stage": run.stage, "id": run.id, "labels": run.labels,
                                          "parent": run.parent.id if run.parent else None, "parameters": params})
    pm.execute_notebook(str(notebooks / NOTEBOOKS[run.stage]), str(d / "notebook.ipynb"), parameters=params,
                        kernel_name="python3", progress_bar=False)   # no cwd=: papermill's chdir is process-wide
    if not is_done(d):
        raise RuntimeError(f"the {run.stage} notebook finished without writing metrics.json")


def execute(plan: list[Run], runs: str | Path, device: str = "auto", cache: str = "", workers: int = 1,
            notebooks: Path = NOTEBOOK_DIR, echo=print) -> Summary:
    """Run every unfinished run of the plan, up to `workers` at once, each after its parent."""
    runs = Path(runs).resolve()
    cache = cache or str(runs / "cache")
    os.environ["STUDYLIB_PROGRESS"] = "0"   # kernels inherit it: no bars inside executed notebooks
    os.environ["STUDYLIB_CACHE"] = cache    # ...and the store's cache, where synthetic data is written too
    summary = Summary(done=[r.id for r in plan if is_done(r.dir(runs))])
    pending = [r for r in plan if not is_done(r.dir(runs))]
    finished, bad = set(summary.done), set()
    # share the cores between concurrent kernels instead of oversubscribing them
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    bar = tqdm(total=len(pending), desc="runs", disable=not _tty())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        running: dict = {}
        while pending or running:
            for run in list(pending):
                parent = run.parent.id if run.parent else None
                if parent in bad:
                    pending.remove(run)
                    bad.add(run.id)
                    summary.blocked.append(run.id)
                    bar.update(1)
                elif (parent is None or parent in finished) and len(running) < workers:
                    pending.remove(run)
                    running[pool.submit(_attempt, run, runs, device, cache, notebooks)] = run
            if not running:
                if pending:   # cannot happen for a plan from grid.plan: parents always come first
                    raise RuntimeError(f"runs whose parents are not in the plan: {[r.id for r in pending]}")
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                run = running.pop(fut)
                error, seconds = fut.result()
                bar.update(1)
                if error is None:
                    finished.add(run.id)
                    summary.ran.append(run.id)
                    if not _tty():
                        echo(f"done {run.describe()} in {seconds:.1f}s")
                else:
                    bad.add(run.id)
                    summary.failed.append(run.id)
                    echo(f"FAILED {run.describe()}: {error}")
    bar.close()
    return summary


def _attempt(run: Run, runs: Path, device: str, cache: str, notebooks: Path):
    """Execute one run; record a failure in error.json instead of raising. -> (error line or None, seconds)"""
    t0 = time.time()
    try:
        execute_run(run, runs, device, cache, notebooks)
    except Exception as e:  # one bad run must not lose the others
        atomic_write_json(run.dir(runs) / "error.json", {"error": f"{type(e).__name__}: {e}"[:4000],
                                                         "traceback": traceback.format_exc()})
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        return (lines[-1] if lines else type(e).__name__), time.time() - t0
    (run.dir(runs) / "error.json").unlink(missing_ok=True)
    return None, time.time() - t0


def _tty() -> bool:
    from .train import progress_enabled
    return progress_enabled()
