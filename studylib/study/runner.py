"""Execute a plan: each stage run is its stage notebook, executed by papermill into the run folder.

Finished runs (store.RunFolder.is_done) are skipped; a failed run is recorded in error.json with its
traceback, its dependents are skipped, and the rest go on. An interrupted run resumes from its
epoch checkpoint the next time: Ctrl-C (SIGINT) kills the running kernels, starts no more groups and
records nothing as failed; a second Ctrl-C exits at once. Leftovers of a killed runner are cleaned
first (store.tidy).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from studylib.core.train import progress_enabled
from studylib.study import execution, store
from studylib.study.config import EngineConfig, TimeoutConfig, build, device_type, to_dict
from studylib.study.execution import CELL_TIMEOUT, KernelSession, run_notebook
from studylib.study.grid import NOTEBOOKS, STAGES, Group, Run, image_steps
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
    interrupted: list[str] = field(default_factory=list)  # stopped by Ctrl-C: resumable, not failed
    stopped: int = 0  # groups stopped by Ctrl-C
    not_started: int = 0  # runs left unstarted by Ctrl-C

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked and not self.interrupted and not self.not_started

    @property
    def finished(self) -> int:
        """Runs finished in the store: before this call, by it, or by another runner meanwhile."""
        return len(self.done) + len(self.ran) + len(self.elsewhere)

    def line(self) -> str:
        return (
            f"{len(self.ran)} ran, {len(self.done)} already done, {len(self.elsewhere)} finished by another "
            f"runner, {len(self.failed)} failed, {len(self.blocked)} skipped because a parent failed"
        )


@dataclass(frozen=True)
class Execution:
    """How a plan's groups execute, built once in execute() and handed to every group (under submitit,
    pickled into its job): the run store, the device (a worker's own GPU), the data cache, the stage
    notebooks, the time limits, and the engine with `threads` resolved for each kernel."""

    runs: Path
    device: str
    cache: str
    notebooks: Path = NOTEBOOK_DIR
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def on(self, device: str) -> Execution:
        return dataclasses.replace(self, device=device)


def notebook_parameters(run: Run, runs: Path, device: str, cache: str) -> dict:
    """A run's resolved parameters as its params.json holds them (written once, before its stage notebook runs,
    which reads them there): the planned ones, the data cache, its folder, its parent's folder and the device."""
    params = dict(run.params)
    params["data"] = {**params["data"], "cache": cache}
    return {
        **params,
        "run_dir": str(run.dir(runs).resolve()),
        "device": device,
        "parent_dir": str(run.parent.dir(runs).resolve()) if run.parent else "",
    }


def group_parameters(group: Group, runs: Path, device: str, engine: dict | None) -> dict:
    """The stage notebook's parameters for a group: its runs' folders (each run's settings are in its
    params.json, not repeated here), the device and the engine."""
    return {"run_dirs": [str(r.dir(runs).resolve()) for r in group.runs], "device": device, "engine": engine or {}}


# The slowest training we expect, in image-steps per second, by model and device (several times below
# what was measured): a training cell gets half an hour plus its image-steps at this rate before it
# counts as hung. `timeouts.training` in a parameter file replaces the estimate.
SLOWEST_RATE = {("viny-tiny", "cpu"): 40.0, ("viny", "cpu"): 4.0, ("viny-tiny", "cuda"): 400.0, ("viny", "cuda"): 200.0}


def resolved_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def training_timeout(run: Run | Group, device: str, timeouts: dict | None = None) -> float:
    """Seconds a training cell may take: `timeouts['training']` when set, else estimated (a group: its
    members' image-steps together)."""
    if (timeouts or {}).get("training"):
        return float(timeouts["training"])
    members = run.runs if isinstance(run, Group) else [run]
    rate = SLOWEST_RATE.get((members[0].params["model"], resolved_device(device).split(":")[0]), 4.0)
    return 1800.0 + sum(image_steps(r) for r in members) / rate


def execute_group(group: Group, ex: Execution, kernel: KernelSession | None = None) -> None:
    """Execute the stage notebook once for the group, in a new kernel or in `kernel` (a worker's, reused): in the
    run folder for a group of one, else in the group's folder, each member pointing at it. Raises when the
    notebook fails."""
    runs, device, cache, notebooks = ex.runs, ex.device, ex.cache, ex.notebooks
    timeouts, engine = to_dict(ex.timeouts), to_dict(ex.engine)
    for run in group.runs:
        d = run.dir(runs)
        d.mkdir(parents=True, exist_ok=True)
        RunFolder(d).write_record(run, notebook_parameters(run, runs, device, cache))
    params = group_parameters(group, runs, device, engine)
    if len(group.runs) == 1:
        out = group.runs[0].dir(runs)
    else:
        out = group.dir(runs)
        out.mkdir(parents=True, exist_ok=True)
        for run in group.runs:
            RunFolder(run.dir(runs)).write_group(group.id, out / "notebook.ipynb")
    partial = out / ".notebook.partial.ipynb"  # papermill saves as it goes: publish only whole notebooks
    try:
        run_notebook(
            notebooks / NOTEBOOKS[group.stage],
            partial,
            params,  # no cwd=: papermill's chdir is process-wide
            cell_timeout=(timeouts or {}).get("cell") or CELL_TIMEOUT,
            training_timeout=training_timeout(group, device, timeouts),
            kernel=kernel,
        )
    except BaseException:
        if partial.exists():
            os.replace(partial, out / "notebook-failed.ipynb")
        raise
    os.replace(partial, out / "notebook.ipynb")


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text


def _record_failure(run: Run, runs: Path, e: Exception) -> str:
    RunFolder.of(run, runs).record_failure(f"{type(e).__name__}: {e}", traceback.format_exc())
    return _last_line(str(e)) or type(e).__name__


def attempt_group(group: Group, ex: Execution, kernel: KernelSession | None = None) -> list[tuple]:
    """Execute a group under its members' locks (in `kernel` when given, else a new kernel) -> [(run, status,
    message, seconds)] with status 'ran', 'failed', 'elsewhere' (another runner finished it meanwhile) or
    'interrupted' (Ctrl-C killed its kernel: resumable, nothing recorded as failed). Never raises."""
    os.environ["STUDYLIB_PROGRESS"] = "0"  # kernels inherit this: no bars in executed notebooks
    t0 = time.time()
    with ExitStack() as locks:
        for run in sorted(group.runs, key=lambda r: r.id):  # one lock order for every runner
            locks.enter_context(RunLock(run.dir(ex.runs), RUNNER_LOCK))
        todo = [r for r in group.runs if not RunFolder.of(r, ex.runs).is_done]
        out = [(r, "elsewhere", None, 0.0) for r in group.runs if r not in todo]
        if not todo:
            return out
        if len(todo) > 1:  # the group's folder is live while held: store.tidy leaves it alone
            locks.enter_context(RunLock(Group(group.stage, todo).dir(ex.runs), RUNNER_LOCK))
        for r in todo:
            RunFolder.of(r, ex.runs).clear_failure()
        error = None
        try:
            execute_group(Group(group.stage, todo), ex, kernel)
        except Exception as e:  # recorded on each unfinished member below, never raised
            error = e
        seconds = (time.time() - t0) / len(todo)
        for r in todo:
            RunFolder.of(r, ex.runs).settle_notebooks()
            out.append((r, *_member_outcome(r, ex.runs, error), seconds))
    return out


def _member_outcome(run: Run, runs: Path, error: Exception | None) -> tuple:
    folder = RunFolder.of(run, runs)
    if folder.is_done:  # its provenance.json was written with its metrics, in the kernel
        return "ran", None
    if folder.failure:  # the group recorded this member's own failure
        return "failed", _last_line(folder.failure)
    if error is not None and execution.stopping():  # Ctrl-C killed the kernel: resumable, not failed
        return "interrupted", None
    if error is None:
        error = RuntimeError(f"the {run.stage} notebook finished without writing its results (metrics, encoder, head)")
    try:
        raise error
    except Exception as e:
        return "failed", _record_failure(run, runs, e)


def skipped_line(run: Run, runs: Path) -> str | None:
    """What a finished run left out under data.skip_unreadable (its metrics' `skipped`), or None."""
    m = RunFolder.of(run, runs).metrics
    skipped = m.get("skipped") or []
    if not skipped:
        return None
    n, used = len(skipped), m.get("images", m.get("train_images"))
    names = ", ".join(Path(s).name for s in skipped[:3]) + (", ..." if n > 3 else "")
    trained = f"; trained on {used} images" if used is not None else ""
    what = f"skipped {n} unreadable image{'s' * (n != 1)} ({names}){trained}"
    return f"{run.stage}/{run.id}: {what} (data.skip_unreadable)"


def _schedule(runs: list[Run], ex: Execution, workers: int, executor: str) -> list[Group]:
    """grid.schedule with an automatic group size capped to fit the device's memory (the estimate's groups)."""
    from studylib.study.estimate import fitted_schedule, memory_of

    device = device_type(ex.device)
    return fitted_schedule(runs, ex.engine, device, workers, executor, memory_of(device))


class _Book:
    """Tracks outcomes while a plan executes: which runs are finished, failed, or blocked; prints a
    progress line per finished group with an estimate of the time left."""

    def __init__(self, plan: list[Run], ex: Execution, echo, workers: int, executor: str):
        self.summary = Summary(done=[r.id for r in plan if RunFolder.of(r, ex.runs).is_done])
        done = set(self.summary.done)
        self.pending = _schedule([r for r in plan if r.id not in done], ex, workers, executor)
        self.runs = ex.runs
        self.total = sum(len(g.runs) for g in self.pending)
        self.cost = {r.id: max(1, image_steps(r)) for g in self.pending for r in g.runs}
        self.finished, self.bad, self.echo = set(done), set(), echo
        self.t0, self.spent = time.time(), 0  # image-steps of the runs finished so far
        self.stopped = False
        self.bar = tqdm(total=self.total, desc="runs", disable=not progress_enabled())

    def ready(self, group: Group) -> Group | None | bool:
        """The group's runnable members (a Group); None: nothing left to run (members blocked by a failed
        parent are recorded); False: wait for a parent."""
        members = []
        for run in group.runs:
            parent = run.parent.id if run.parent else None
            if parent in self.bad:
                if run.id not in self.bad:  # a group is tried again while other members wait: count each run once
                    self.bad.add(run.id)
                    self.summary.blocked.append(run.id)
                    self._tick(run)
            elif parent is None or parent in self.finished:
                members.append(run)
            else:
                return False
        return Group(group.stage, members) if members else None

    def _tick(self, run: Run) -> None:
        self.bar.update(1)
        self.spent += self.cost.get(run.id, 1)

    def outcome(self, run: Run, status: str, message: str | None, seconds: float) -> None:
        self._tick(run)
        if status == "interrupted":
            self.summary.interrupted.append(run.id)
            return
        if status == "failed":
            self.bad.add(run.id)
            self.summary.failed.append(run.id)
            self.echo(f"FAILED {run.describe()}: {message}")
            return
        self.finished.add(run.id)
        (self.summary.ran if status == "ran" else self.summary.elsewhere).append(run.id)
        if status == "ran" and (line := skipped_line(run, self.runs)):
            self.echo(line)

    def group_done(self, group: Group, outcomes: list[tuple]) -> None:
        for outcome in outcomes:
            self.outcome(*outcome)
        if any(status == "interrupted" for _, status, _, _ in outcomes):
            self.summary.stopped += 1
        else:
            self.progress(group)

    def stop(self) -> None:
        """Ctrl-C (a signal handler: it only sets a flag): no more groups start."""
        self.stopped = True

    def startable(self) -> list[Group]:
        """The pending groups to try now; none once stopped."""
        return [] if self.stopped else list(self.pending)

    def progress(self, group: Group) -> None:
        """One line per finished group when no bar is shown: runs done / total and the time left, estimated
        from the image-steps done so far (plus a fixed start-up share per run)."""
        if progress_enabled():
            return
        n = len(self.summary.ran) + len(self.summary.failed) + len(self.summary.blocked) + len(self.summary.elsewhere)
        left = sum(self.cost.values()) - self.spent
        elapsed = time.time() - self.t0
        eta = elapsed * left / max(1, self.spent)
        self.echo(f"[{n}/{self.total} runs, {elapsed / 60:.1f} min, about {eta / 60:.1f} min left] {group.describe()}")


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
    engine: dict | None = None,
) -> Summary:
    """Run every unfinished run of the plan, each after its parent, in the groups of grid.schedule (one notebook
    per group; a local worker runs its groups in one kernel, see engine.reuse_kernels). `executor`: 'local' (up
    to `workers` groups at once on this machine, spread over the visible GPUs), 'slurm' (a submitit job array per
    stage; `cluster` holds submitit parameters such as slurm_partition, gpus_per_node, timeout_min) or
    'submitit-local' (the same path through submitit's local executor, for testing). `timeouts`: {'cell': s,
    'training': s} (0 or missing: the defaults, see training_timeout); a run past its limit is recorded failed.
    Raises store.StoreError before anything runs when the store is not writable."""
    if executor not in ("local", "slurm", "submitit-local"):
        raise ValueError(f"unknown executor {executor!r}; valid: local, slurm, submitit-local")
    runs = Path(runs).resolve()
    store.check_writable(runs)
    for line in store.tidy(runs):
        echo(f"cleaned: {line}")
    eng = build(EngineConfig, engine or {}, "engine")
    threads = eng.kernel_threads(workers) if executor == "local" else eng.threads  # 0: the node decides
    ex = Execution(
        runs,
        device,
        cache or str(runs / "cache"),
        notebooks,
        build(TimeoutConfig, timeouts or {}, "timeouts"),
        dataclasses.replace(eng, threads=threads, threads_from_env=False),
    )
    book = _Book(plan, ex, echo, workers, executor)
    prepare_data([r for g in book.pending for r in g.runs], ex.cache)
    if executor == "local":
        if book.pending:
            echo(threads_line(eng, workers))
        _execute_local(book, ex, workers)
    else:
        _execute_submitit(book, ex, executor, cluster or {})
    book.bar.close()
    return book.summary


def prepare_data(runs: list[Run], cache: str) -> None:
    """Write the runs' synthetic data sets into the cache once, here, before any kernel starts: the first group of
    every worker would otherwise generate the same data at once (one copy kept). Real data: nothing to do."""
    from studylib.data.sources import resolve_data

    synthetic = [r.params["data"] for r in runs if r.params["data"].get("kind", "synthetic") == "synthetic"]
    for section in sorted({json.dumps(d, sort_keys=True) for d in synthetic}):
        resolve_data({**json.loads(section), "cache": cache})


def threads_line(eng: EngineConfig, workers: int, environ=None) -> str:
    """What each local kernel gets, and from where: engine.threads, the cores shared out, or (only with
    engine.threads_from_env) the shell's OMP_NUM_THREADS."""
    env = os.environ if environ is None else environ
    n, shell = eng.kernel_threads(workers, env), env.get("OMP_NUM_THREADS", "")
    from_env = eng.threads_from_env and shell.isdigit() and int(shell) > 0
    if from_env:
        source = f"OMP_NUM_THREADS={shell} from the shell, as engine.threads_from_env says"
    else:
        source = "engine.threads" if eng.threads else f"{os.cpu_count()} cores shared by {workers}"
        if shell:
            source += f"; OMP_NUM_THREADS={shell} from the shell ignored: set engine.threads_from_env to use it"
    return f"kernels: {workers} worker{'s' * (workers != 1)} x {n} thread{'s' * (n != 1)} ({source})"


@contextmanager
def _kernel_threads(n: int):
    """Kernels started inside inherit n threads for OpenMP and MKL; the caller's environment comes back after."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    before = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: str(n) for k in keys})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _ctrl_c(book: _Book):
    """While groups run: the first SIGINT kills every running kernel (their runs resume from their
    checkpoints) and starts no more groups; a second exits at once. Only the main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    count = 0

    def handler(signum, frame):
        nonlocal count
        count += 1
        execution.stop_kernels()
        book.stop()
        if count > 1:
            sys.stderr.write("study: interrupted twice: stopped at once; run the same command again to resume\n")
            sys.stderr.flush()
            os._exit(130)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        execution.resume_kernels()


def _gpu_slots(device: str, workers: int) -> list[str]:
    """The device of each worker slot: with several visible GPUs, workers take them in turn."""
    if resolved_device(device) != "cuda":
        return [device] * workers
    import torch

    n = torch.cuda.device_count()
    return [f"cuda:{i % n}" if n > 1 else device for i in range(workers)]


@dataclass
class _Worker:
    """A local worker: its device, its one thread (a reused kernel's client lives on that thread's event loop)
    and, with engine.reuse_kernels, the kernel that runs its groups one after another."""

    device: str
    thread: ThreadPoolExecutor
    kernel: KernelSession | None

    def submit(self, group: Group, ex: Execution):
        return self.thread.submit(attempt_group, group, ex.on(self.device), self.kernel)

    def close(self) -> None:
        if self.kernel is not None:
            self.thread.submit(self.kernel.close).result()
        self.thread.shutdown()


def _execute_local(book: _Book, ex: Execution, workers: int) -> None:
    with _kernel_threads(ex.engine.threads), _ctrl_c(book), ExitStack() as stack:
        free = []
        for device in _gpu_slots(ex.device, workers):
            kernel = KernelSession() if ex.engine.reuse_kernels else None
            worker = _Worker(device, ThreadPoolExecutor(max_workers=1), kernel)
            stack.callback(worker.close)
            free.append(worker)
        running: dict = {}
        while (book.pending and not book.stopped) or running:
            for group in book.startable():
                members = book.ready(group)
                if members is None:
                    book.pending.remove(group)
                elif members and free:
                    book.pending.remove(group)
                    worker = free.pop(0)
                    running[worker.submit(members, ex)] = (members, worker)
            if not running:
                # parents always come first in a plan from grid.plan: pending groups then cannot all wait
                if book.pending and not book.stopped:
                    raise RuntimeError(
                        f"runs whose parents are not in the plan: {[g.describe() for g in book.pending]}"
                    )
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                members, worker = running.pop(fut)
                free.append(worker)
                book.group_done(members, fut.result())
    if book.stopped:
        book.summary.not_started = sum(len(g.runs) for g in book.pending)


def _execute_submitit(book: _Book, ex: Execution, executor: str, cluster: dict) -> None:
    """One job array per stage (a stage's runs only depend on earlier stages), one job per group; the run
    store must be on a filesystem the cluster's nodes share."""
    import submitit

    jobs_ex = submitit.AutoExecutor(
        folder=str(ex.runs / "submitit" / "%j"), cluster="local" if executor == "submitit-local" else "slurm"
    )
    jobs_ex.update_parameters(**{"timeout_min": 24 * 60, **cluster})
    for stage in STAGES:
        wave = []
        for group in [g for g in book.pending if g.stage == stage]:
            book.pending.remove(group)
            members = book.ready(group)
            if members:
                wave.append(members)
        if not wave:
            continue
        jobs = jobs_ex.map_array(attempt_group, wave, [ex] * len(wave))
        for group, job in zip(wave, jobs):
            try:
                outcomes = job.result()
            except Exception as e:  # the job itself died (node failure, timeout): record it like a failure
                outcomes = [(run, "failed", _record_failure(run, ex.runs, e), 0.0) for run in group.runs]
            book.group_done(group, outcomes)
