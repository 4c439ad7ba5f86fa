"""Execute a plan: each stage run is its stage notebook, executed by papermill into the run folder.

Finished runs (store.RunFolder.is_done) are skipped; a failed run is recorded in error.json with its
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

from studylib.core.files import atomic_write_json
from studylib.core.train import progress_enabled
from studylib.study import provenance
from studylib.study.execution import CELL_TIMEOUT, run_notebook
from studylib.study.grid import NOTEBOOKS, STAGES, Run, image_steps
from studylib.study.locks import RunLock
from studylib.study.store import RUNNER_LOCK, RunFolder

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# the notebooks travel inside the installed package (studylib/notebooks); an editable install or a
# source checkout reads the top-level notebooks/ folder, where they are kept
NOTEBOOK_DIR = PACKAGE_DIR / "notebooks" if (PACKAGE_DIR / "notebooks").is_dir() else PACKAGE_DIR.parent / "notebooks"


@dataclass
class Summary:
    done: list[str] = field(default_factory=list)  # finished before this call
    ran: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)  # a parent failed
    elsewhere: list[str] = field(default_factory=list)  # finished by another runner meanwhile

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked

    def line(self) -> str:
        return (
            f"{len(self.ran)} ran, {len(self.done)} already done, {len(self.elsewhere)} finished by another "
            f"runner, {len(self.failed)} failed, {len(self.blocked)} skipped because a parent failed"
        )


def notebook_parameters(run: Run, runs: Path, device: str, cache: str) -> dict:
    params = dict(run.params)
    params["data"] = {**params["data"], "cache": cache}
    return {
        **params,
        "run_dir": str(run.dir(runs).resolve()),
        "device": device,
        "parent_dir": str(run.parent.dir(runs).resolve()) if run.parent else "",
    }


# The slowest training we expect, in image-steps per second, by model and device (several times below
# what was measured): a training cell gets half an hour plus its image-steps at this rate before it
# counts as hung. `timeouts.training` in a parameter file replaces the estimate.
SLOWEST_RATE = {("viny-tiny", "cpu"): 40.0, ("viny", "cpu"): 4.0, ("viny-tiny", "cuda"): 400.0, ("viny", "cuda"): 200.0}


def training_timeout(run: Run, device: str, timeouts: dict | None = None) -> float:
    """Seconds the run's training cell may take: `timeouts['training']` when set, else estimated."""
    if (timeouts or {}).get("training"):
        return float(timeouts["training"])
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    rate = SLOWEST_RATE.get((run.params["model"], device), 4.0)
    return 1800.0 + image_steps(run) / rate


def execute_run(
    run: Run, runs: Path, device: str, cache: str, notebooks: Path = NOTEBOOK_DIR, timeouts: dict | None = None
) -> None:
    d = run.dir(runs)
    d.mkdir(parents=True, exist_ok=True)
    params = notebook_parameters(run, runs, device, cache)
    RunFolder(d).write_record(run, params)
    partial = d / ".notebook.partial.ipynb"  # papermill saves as it goes: publish only whole notebooks
    try:
        run_notebook(
            notebooks / NOTEBOOKS[run.stage],
            partial,
            params,  # no cwd=: papermill's chdir is process-wide
            cell_timeout=(timeouts or {}).get("cell") or CELL_TIMEOUT,
            training_timeout=training_timeout(run, device, timeouts),
        )
    except BaseException:
        if partial.exists():
            os.replace(partial, d / "notebook-failed.ipynb")
        raise
    os.replace(partial, d / "notebook.ipynb")
    if not RunFolder(d).is_done:
        raise RuntimeError(f"the {run.stage} notebook finished without writing its results (metrics, encoder, head)")


def _record_failure(run: Run, runs: Path, e: Exception) -> str:
    RunFolder.of(run, runs).record_failure(f"{type(e).__name__}: {e}", traceback.format_exc())
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def attempt(
    run: Run, runs: Path, device: str, cache: str, notebooks: Path = NOTEBOOK_DIR, timeouts: dict | None = None
):
    """Execute one run under its lock -> (status, message, seconds); status is 'ran', 'failed' or
    'elsewhere' (another runner finished it while this one waited for the lock). Never raises."""
    os.environ["STUDYLIB_PROGRESS"] = "0"  # kernels inherit this: no bars in executed notebooks
    d, t0 = run.dir(runs), time.time()
    folder = RunFolder(d)
    with RunLock(d, RUNNER_LOCK):
        if folder.is_done:
            return "elsewhere", None, 0.0
        try:
            execute_run(run, runs, device, cache, notebooks, timeouts)
        except Exception as e:  # recorded, never raised: one bad run must not lose the others
            return "failed", _record_failure(run, runs, e), time.time() - t0
        atomic_write_json(
            d / "provenance.json",
            provenance.record(
                PACKAGE_DIR, run.params.get("seed"), folder.metrics.get("device", device), t0, time.time()
            ),
        )
        folder.clear_failure()
    return "ran", None, time.time() - t0


class _Book:
    """Tracks outcomes while a plan executes: which runs are finished, failed, or blocked."""

    def __init__(self, plan: list[Run], runs: Path, echo):
        self.summary = Summary(done=[r.id for r in plan if RunFolder.of(r, runs).is_done])
        self.pending = [r for r in plan if r.id not in set(self.summary.done)]
        self.finished, self.bad, self.echo = set(self.summary.done), set(), echo
        self.bar = tqdm(total=len(self.pending), desc="runs", disable=not progress_enabled())

    def ready(self, run: Run) -> bool | None:
        """True: can start; None: blocked by a failed parent (recorded); False: wait."""
        parent = run.parent.id if run.parent else None
        if parent in self.bad:
            self.bad.add(run.id)
            self.summary.blocked.append(run.id)
            self.bar.update(1)
            return None
        return parent is None or parent in self.finished

    def outcome(self, run: Run, status: str, message: str | None, seconds: float) -> None:
        self.bar.update(1)
        if status == "failed":
            self.bad.add(run.id)
            self.summary.failed.append(run.id)
            self.echo(f"FAILED {run.describe()}: {message}")
            return
        self.finished.add(run.id)
        (self.summary.ran if status == "ran" else self.summary.elsewhere).append(run.id)
        if not progress_enabled():
            self.echo(f"{'done' if status == 'ran' else 'finished elsewhere'} {run.describe()} in {seconds:.1f}s")


def execute(
    plan: list[Run],
    runs: str | Path,
    device: str = "auto",
    cache: str = "",
    workers: int = 1,
    executor: str = "local",
    cluster: dict | None = None,
    notebooks: Path = NOTEBOOK_DIR,
    echo=print,
    timeouts: dict | None = None,
) -> Summary:
    """Run every unfinished run of the plan, each after its parent. `executor`: 'local' (up to
    `workers` runs at once on this machine), 'slurm' (a submitit job array per stage; `cluster` holds
    submitit parameters such as slurm_partition, gpus_per_node, timeout_min) or 'submitit-local'
    (the same path through submitit's local executor, for testing). `timeouts`: {'cell': s, 'training': s}
    (0 or missing: the defaults, see training_timeout); a run past its limit is recorded failed."""
    runs = Path(runs).resolve()
    cache = cache or str(runs / "cache")
    book = _Book(plan, runs, echo)
    if executor == "local":
        _execute_local(book, runs, device, cache, workers, notebooks, timeouts)
    elif executor in ("slurm", "submitit-local"):
        _execute_submitit(book, runs, device, cache, executor, cluster or {}, notebooks, timeouts)
    else:
        raise ValueError(f"unknown executor {executor!r}; valid: local, slurm, submitit-local")
    book.bar.close()
    return book.summary


def _execute_local(
    book: _Book, runs: Path, device: str, cache: str, workers: int, notebooks: Path, timeouts: dict | None
) -> None:
    # share the cores between concurrent kernels instead of oversubscribing them
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        running: dict = {}
        while book.pending or running:
            for run in list(book.pending):
                state = book.ready(run)
                if state is None:
                    book.pending.remove(run)
                elif state and len(running) < workers:
                    book.pending.remove(run)
                    running[pool.submit(attempt, run, runs, device, cache, notebooks, timeouts)] = run
            if not running:
                if book.pending:  # cannot happen for a plan from grid.plan: parents always come first
                    raise RuntimeError(f"runs whose parents are not in the plan: {[r.id for r in book.pending]}")
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                book.outcome(running.pop(fut), *fut.result())


def _execute_submitit(
    book: _Book,
    runs: Path,
    device: str,
    cache: str,
    executor: str,
    cluster: dict,
    notebooks: Path,
    timeouts: dict | None,
) -> None:
    """One job array per stage (a stage's runs only depend on earlier stages); the run store must be
    on a filesystem the cluster's nodes share."""
    import submitit

    ex = submitit.AutoExecutor(
        folder=str(runs / "submitit" / "%j"), cluster="local" if executor == "submitit-local" else "slurm"
    )
    ex.update_parameters(**{"timeout_min": 24 * 60, **cluster})
    for stage in STAGES:
        wave = []
        for run in [r for r in book.pending if r.stage == stage]:
            book.pending.remove(run)
            if book.ready(run):
                wave.append(run)
        if not wave:
            continue
        n = len(wave)
        jobs = ex.map_array(attempt, wave, [runs] * n, [device] * n, [cache] * n, [notebooks] * n, [timeouts] * n)
        for run, job in zip(wave, jobs):
            try:
                book.outcome(run, *job.result())
            except Exception as e:  # the job itself died (node failure, timeout): record it like a failure
                book.outcome(run, "failed", _record_failure(run, runs, e), 0.0)
