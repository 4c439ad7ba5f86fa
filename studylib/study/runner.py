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
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from studylib.core.files import atomic_write_json
from studylib.core.train import progress_enabled
from studylib.study import provenance
from studylib.study.config import EngineConfig, build
from studylib.study.execution import CELL_TIMEOUT, run_notebook
from studylib.study.grid import NOTEBOOKS, STAGES, Group, Run, groups, image_steps
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


_SHARED = ("model", "data", "settings", "device")  # a group's common notebook parameters; the rest are per member


def group_parameters(group: Group, runs: Path, device: str, cache: str, engine: dict | None) -> dict:
    """The stage notebook's parameters for a group: the shared ones once, and `members` (one dict each)."""
    each = [notebook_parameters(r, runs, device, cache) for r in group.runs]
    members = [{k: v for k, v in p.items() if k not in _SHARED} for p in each]
    if group.stage == "pretrain":  # pre-training takes no parent
        for m in members:
            m.pop("parent_dir")
    return {**{k: each[0][k] for k in _SHARED}, "members": members, "engine": engine or {}}


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


def execute_group(
    group: Group,
    runs: Path,
    device: str,
    cache: str,
    notebooks: Path = NOTEBOOK_DIR,
    timeouts: dict | None = None,
    engine: dict | None = None,
) -> None:
    """Execute the stage notebook once for the group: in the run folder for a group of one, else in the
    group's folder, each member pointing at it. Raises when the notebook fails."""
    for run in group.runs:
        d = run.dir(runs)
        d.mkdir(parents=True, exist_ok=True)
        RunFolder(d).write_record(run, notebook_parameters(run, runs, device, cache))
    if len(group.runs) == 1:
        params = {**notebook_parameters(group.runs[0], runs, device, cache), "engine": engine or {}}
        out = group.runs[0].dir(runs)
    else:
        params, out = group_parameters(group, runs, device, cache, engine), group.dir(runs)
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
        )
    except BaseException:
        if partial.exists():
            os.replace(partial, out / "notebook-failed.ipynb")
        raise
    os.replace(partial, out / "notebook.ipynb")


def execute_run(
    run: Run, runs: Path, device: str, cache: str, notebooks: Path = NOTEBOOK_DIR, timeouts: dict | None = None
) -> None:
    """One run, its own notebook: a group of one."""
    execute_group(Group(run.stage, [run]), runs, device, cache, notebooks, timeouts)
    if not RunFolder(run.dir(runs)).is_done:
        raise RuntimeError(f"the {run.stage} notebook finished without writing its results (metrics, encoder, head)")


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text


def _record_failure(run: Run, runs: Path, e: Exception) -> str:
    RunFolder.of(run, runs).record_failure(f"{type(e).__name__}: {e}", traceback.format_exc())
    return _last_line(str(e)) or type(e).__name__


def attempt_group(
    group: Group,
    runs: Path,
    device: str,
    cache: str,
    notebooks: Path = NOTEBOOK_DIR,
    timeouts: dict | None = None,
    engine: dict | None = None,
) -> list[tuple]:
    """Execute a group under its members' locks -> [(run, status, message, seconds)] with status 'ran',
    'failed' or 'elsewhere' (another runner finished it meanwhile). Never raises."""
    os.environ["STUDYLIB_PROGRESS"] = "0"  # kernels inherit this: no bars in executed notebooks
    t0 = time.time()
    with ExitStack() as locks:
        for run in sorted(group.runs, key=lambda r: r.id):  # one lock order for every runner
            locks.enter_context(RunLock(run.dir(runs), RUNNER_LOCK))
        todo = [r for r in group.runs if not RunFolder.of(r, runs).is_done]
        out = [(r, "elsewhere", None, 0.0) for r in group.runs if r not in todo]
        if not todo:
            return out
        for r in todo:
            RunFolder.of(r, runs).clear_failure()
        error = None
        try:
            execute_group(Group(group.stage, todo), runs, device, cache, notebooks, timeouts, engine)
        except Exception as e:  # recorded on each unfinished member below, never raised
            error = e
        seconds = (time.time() - t0) / len(todo)
        for r in todo:
            out.append((r, *_member_outcome(r, runs, device, error, t0), seconds))
    return out


def _member_outcome(run: Run, runs: Path, device: str, error: Exception | None, t0: float) -> tuple:
    folder = RunFolder.of(run, runs)
    if folder.is_done:
        record = provenance.record(
            PACKAGE_DIR, run.params.get("seed"), folder.metrics.get("device", device), t0, time.time()
        )
        atomic_write_json(folder.path / "provenance.json", record)
        return "ran", None
    if folder.failure:  # the group recorded this member's own failure
        return "failed", _last_line(folder.failure)
    if error is None:
        error = RuntimeError(f"the {run.stage} notebook finished without writing its results (metrics, encoder, head)")
    try:
        raise error
    except Exception as e:
        return "failed", _record_failure(run, runs, e)


def attempt(
    run: Run, runs: Path, device: str, cache: str, notebooks: Path = NOTEBOOK_DIR, timeouts: dict | None = None
):
    """Execute one run under its lock -> (status, message, seconds). Never raises."""
    ((_, status, message, seconds),) = attempt_group(Group(run.stage, [run]), runs, device, cache, notebooks, timeouts)
    return status, message, seconds


# A sequential group holds at most this many image-steps (about 2.5 min of viny-tiny on one CPU core):
# a kernel start (~8 s) matters for short runs only, and one worker must not queue all the long ones.
SEQUENTIAL_GROUP_STEPS = 30_000


class _Book:
    """Tracks outcomes while a plan executes: which runs are finished, failed, or blocked; prints a
    progress line per finished group with an estimate of the time left."""

    def __init__(self, plan: list[Run], runs: Path, echo, group_size: int, spread: int = 1, sequential=False):
        self.summary = Summary(done=[r.id for r in plan if RunFolder.of(r, runs).is_done])
        done = set(self.summary.done)
        self.pending = [
            g
            for g in groups(
                [r for r in plan if r.id not in done], group_size, spread, SEQUENTIAL_GROUP_STEPS if sequential else 0
            )
            if g.runs
        ]
        self.total = sum(len(g.runs) for g in self.pending)
        self.cost = {r.id: max(1, image_steps(r)) for g in self.pending for r in g.runs}
        self.finished, self.bad, self.echo = set(done), set(), echo
        self.t0, self.spent = time.time(), 0  # image-steps of the runs finished so far
        self.bar = tqdm(total=self.total, desc="runs", disable=not progress_enabled())

    def ready(self, group: Group) -> Group | None | bool:
        """The group's runnable members (a Group); None: nothing left to run (members blocked by a failed
        parent are recorded); False: wait for a parent."""
        members = []
        for run in group.runs:
            parent = run.parent.id if run.parent else None
            if parent in self.bad:
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
        if status == "failed":
            self.bad.add(run.id)
            self.summary.failed.append(run.id)
            self.echo(f"FAILED {run.describe()}: {message}")
            return
        self.finished.add(run.id)
        (self.summary.ran if status == "ran" else self.summary.elsewhere).append(run.id)

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
    """Run every unfinished run of the plan, each after its parent, in groups of one shape (engine.group_size;
    one kernel per group). `executor`: 'local' (up to `workers` groups at once on this machine, spread over
    the visible GPUs), 'slurm' (a submitit job array per stage; `cluster` holds submitit parameters such as
    slurm_partition, gpus_per_node, timeout_min) or 'submitit-local' (the same path through submitit's local
    executor, for testing). `timeouts`: {'cell': s, 'training': s} (0 or missing: the defaults, see
    training_timeout); a run past its limit is recorded failed."""
    runs = Path(runs).resolve()
    cache = cache or str(runs / "cache")
    eng = build(EngineConfig, engine or {}, "engine")
    # members of a sequential group share one worker: split each shape over the workers
    sequential = not eng.fused(resolved_device(device)) and executor == "local"
    book = _Book(plan, runs, echo, eng.members(resolved_device(device)), workers if sequential else 1, sequential)
    if executor == "local":
        _execute_local(book, runs, device, cache, workers, notebooks, timeouts, engine)
    elif executor in ("slurm", "submitit-local"):
        _execute_submitit(book, runs, device, cache, executor, cluster or {}, notebooks, timeouts, engine)
    else:
        raise ValueError(f"unknown executor {executor!r}; valid: local, slurm, submitit-local")
    book.bar.close()
    return book.summary


def _gpu_slots(device: str, workers: int) -> list[str]:
    """The device of each worker slot: with several visible GPUs, workers take them in turn."""
    if resolved_device(device) != "cuda":
        return [device] * workers
    import torch

    n = torch.cuda.device_count()
    return [f"cuda:{i % n}" if n > 1 else device for i in range(workers)]


def _execute_local(
    book: _Book,
    runs: Path,
    device: str,
    cache: str,
    workers: int,
    notebooks: Path,
    timeouts: dict | None,
    engine: dict | None,
) -> None:
    # share the cores between concurrent kernels instead of oversubscribing them
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    free = _gpu_slots(device, workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        running: dict = {}
        while book.pending or running:
            for group in list(book.pending):
                members = book.ready(group)
                if members is None:
                    book.pending.remove(group)
                elif members and free:
                    book.pending.remove(group)
                    slot = free.pop(0)
                    args = (members, runs, slot, cache, notebooks, timeouts, engine)
                    running[pool.submit(attempt_group, *args)] = (members, slot)
            if not running:
                if book.pending:  # cannot happen for a plan from grid.plan: parents always come first
                    raise RuntimeError(
                        f"runs whose parents are not in the plan: {[g.describe() for g in book.pending]}"
                    )
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                members, slot = running.pop(fut)
                free.append(slot)
                for outcome in fut.result():
                    book.outcome(*outcome)
                book.progress(members)


def _execute_submitit(
    book: _Book,
    runs: Path,
    device: str,
    cache: str,
    executor: str,
    cluster: dict,
    notebooks: Path,
    timeouts: dict | None,
    engine: dict | None,
) -> None:
    """One job array per stage (a stage's runs only depend on earlier stages), one job per group; the run
    store must be on a filesystem the cluster's nodes share."""
    import submitit

    ex = submitit.AutoExecutor(
        folder=str(runs / "submitit" / "%j"), cluster="local" if executor == "submitit-local" else "slurm"
    )
    ex.update_parameters(**{"timeout_min": 24 * 60, **cluster})
    for stage in STAGES:
        wave = []
        for group in [g for g in book.pending if g.stage == stage]:
            book.pending.remove(group)
            members = book.ready(group)
            if members:
                wave.append(members)
        if not wave:
            continue
        n = len(wave)
        jobs = ex.map_array(
            attempt_group, wave, [runs] * n, [device] * n, [cache] * n, [notebooks] * n, [timeouts] * n, [engine] * n
        )
        for group, job in zip(wave, jobs):
            try:
                outcomes = job.result()
            except Exception as e:  # the job itself died (node failure, timeout): record it like a failure
                outcomes = [(run, "failed", _record_failure(run, runs, e), 0.0) for run in group.runs]
            for outcome in outcomes:
                book.outcome(*outcome)
            book.progress(group)
