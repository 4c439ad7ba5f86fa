"""The run store: one folder per stage run, and everything known about it. This module alone decides
what a run's files are called, what state it is in and how its results are read; the runner, the
stages, the CLI, the analysis and the views ask it.

    <runs>/groups/<stage>/<group id>/notebook.ipynb   one executed notebook for a group of runs

    <runs>/<stage>/<id>/
        params.json              stage, id, labels (where the run sits in the grid), parent, parameters
        notebook.ipynb           the executed stage notebook (notebook-failed.ipynb when it failed)
        group.json               instead, for a run executed in a group: the group's notebook
        train_log.jsonl          one line per epoch
        checkpoint.safetensors   while training: the epoch checkpoint to resume from
        encoder.safetensors      the trained encoder; head.safetensors, the task head
        metrics.json             written last: the run is finished
        error.json               why the last attempt failed
        provenance.json          code, packages, machine, seed and wall time (written with metrics.json)
        geometry.json            the encoder's patch-token geometry (`study geometry`)

States: done (metrics, encoder and head all written), running (a runner holds the run's lock),
failed (error.json, and not done), todo (anything else).

A runner killed mid-group (kill -9, a machine that went down) can leave a partial notebook
(.notebook.partial.ipynb), an empty group folder and group.json files that point at a notebook that
was never written: `tidy` cleans them on the next run, where no live runner holds the lock.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from studylib.core.files import atomic_write_bytes, atomic_write_json, read_json
from studylib.study.locks import RunLock

RUNNER_LOCK, STAGE_LOCK = ".runner.lock", ".stage.lock"
FINISHED_FILES = ("metrics.json", "encoder.safetensors", "head.safetensors")
CHECKPOINT = "checkpoint.safetensors"
PARTIAL = ".notebook.partial.ipynb"  # papermill writes here as it goes; published whole as notebook.ipynb
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # provenance records this checkout's commit


class StoreError(Exception):
    """The run store cannot be used (not writable); the message names the folder and the fix."""


# metrics.json key of each segmentation metric, reported in % by collect()
SEGMENT_METRICS = {"miou": "miou_per_image", "pixel_acc": "pixel_acc", "miou_dataset": "miou_dataset"}


class RunFolder:
    """One run's folder in the store."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def of(cls, run, runs: str | Path) -> RunFolder:
        """The folder of a planned run (grid.Run) in the store `runs`."""
        return cls(Path(runs) / run.stage / run.id)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ state

    @property
    def is_done(self) -> bool:
        return all((self.path / f).exists() for f in FINISHED_FILES)

    @property
    def state(self) -> str:
        if self.is_done:
            return "done"
        if (self.path / RUNNER_LOCK).exists():
            lock = RunLock(self.path, RUNNER_LOCK)
            if not lock.acquire(blocking=False):
                return "running"
            lock.release()
        return "failed" if (self.path / "error.json").exists() else "todo"

    # ------------------------------------------------------------------ records

    @property
    def record(self) -> dict:
        """params.json: stage, id, labels, parent, parameters."""
        return read_json(self.path / "params.json", {})

    @property
    def labels(self) -> dict:
        return self.record.get("labels", {})

    @property
    def parameters(self) -> dict:
        return self.record.get("parameters", {})

    @property
    def metrics(self) -> dict:
        return read_json(self.path / "metrics.json", {})

    def write_record(self, run, parameters: dict) -> None:
        atomic_write_json(
            self.path / "params.json",
            {
                "stage": run.stage,
                "id": run.id,
                "labels": run.labels,
                "parent": run.parent.id if run.parent else None,
                "recipe": run.recipe,  # the stage's code recipe (study.identity.RECIPES): tables warn on a mix
                "parameters": parameters,
            },
        )

    def record_failure(self, error: str, traceback: str) -> None:
        atomic_write_json(self.path / "error.json", {"error": error[:4000], "traceback": traceback})

    def clear_failure(self) -> None:
        (self.path / "error.json").unlink(missing_ok=True)

    @property
    def failure(self) -> str | None:
        """Why the last attempt failed (error.json), or None."""
        return read_json(self.path / "error.json", {}).get("error")

    def write_group(self, group_id: str, notebook: Path) -> None:
        """Point the run at the notebook of the group it was executed in (relative: the store can move)."""
        rel = os.path.relpath(Path(notebook).resolve(), self.path.resolve())
        atomic_write_json(self.path / "group.json", {"group": group_id, "notebook": rel})

    def settle_notebooks(self) -> str | None:
        """After an attempt: a group.json that points at a missing notebook (its group failed, was stopped or
        killed) is pointed at the group's failed notebook when there is one, else removed; a failed notebook
        of an earlier attempt goes once the run's own notebook is there -> what was done, or None."""
        if (self.path / "notebook.ipynb").exists() and (self.path / "notebook-failed.ipynb").exists():
            (self.path / "notebook-failed.ipynb").unlink()
            return "removed the failed notebook of an earlier attempt"
        pointer = read_json(self.path / "group.json", {})
        rel = pointer.get("notebook")
        if not rel or (self.path / rel).exists():
            return None
        failed = (self.path / rel).parent / "notebook-failed.ipynb"
        if failed.exists():
            self.write_group(pointer.get("group", ""), failed)
            return "group.json pointed at its group's failed notebook"
        (self.path / "group.json").unlink()
        return "group.json removed (its notebook was never written)"

    @property
    def notebook(self) -> Path | None:
        """The executed notebook of this run: its own, or the one of the group it ran in; None if neither."""
        own = self.path / "notebook.ipynb"
        if own.exists():
            return own
        rel = read_json(self.path / "group.json", {}).get("notebook")
        return (self.path / rel).resolve() if rel and (self.path / rel).exists() else None

    # ------------------------------------------------------------------ weights

    def finish(self, task, metrics: dict, meta: dict) -> None:
        """Write the encoder and the head, then metrics.json last (the 'finished' marker), then drop the
        optimizer state."""
        from safetensors.torch import save

        from studylib.core.model import save_encoder

        save_encoder(self.path / "encoder.safetensors", task.encoder, meta)
        head = {k: v.detach().cpu().contiguous() for k, v in task.state_dict().items() if not k.startswith("encoder.")}
        atomic_write_bytes(self.path / "head.safetensors", save(head))
        self.write_provenance(metrics, _started(metrics), time.time(), **_kernel())
        atomic_write_json(self.path / "metrics.json", metrics)
        (self.path / CHECKPOINT).unlink(missing_ok=True)

    def write_provenance(self, metrics: dict, started: float, ended: float, **extra) -> None:
        """provenance.json: written by the kernel just before metrics.json, so a finished run always has it."""
        from studylib.study import provenance

        seed = self.parameters.get("seed")
        device, precision = metrics.get("device", "unknown"), metrics.get("precision")
        record = provenance.record(PACKAGE_DIR, seed, device, started, ended, precision)
        atomic_write_json(self.path / "provenance.json", {**record, **extra})

    def restore(self, task) -> None:
        """Load the finished run's weights into `task` (a model with .encoder and its head)."""
        from safetensors.torch import load_file

        task.encoder.load_state_dict(self.load_encoder().state_dict())
        task.load_state_dict(load_file(self.path / "head.safetensors"), strict=False)

    def load_encoder(self):
        from studylib.core.model import load_encoder

        return load_encoder(self.path / "encoder.safetensors")

    def load_segmenter(self):
        """A finished segmentation run's model (encoder and per-patch head), in eval mode."""
        from safetensors.torch import load_file

        from studylib.core.model import Segmenter

        enc = self.load_encoder()
        head = load_file(self.path / "head.safetensors")
        model = Segmenter(enc, head["head.weight"].shape[0] // enc.cfg.patch_size**2)
        model.load_state_dict(head, strict=False)
        return model.eval()


def _in_kernel() -> bool:
    kernel_app = sys.modules.get("ipykernel.kernelapp")
    return kernel_app is not None and kernel_app.IPKernelApp.initialized()


def _kernel() -> dict:
    """{'kernel': 'new' | 'reused'} in a stage kernel (reused: it ran another notebook before this run's, see
    execution.KernelSession), else nothing."""
    if not _in_kernel():
        return {}
    from studylib.study.execution import NOTEBOOK_STARTED

    return {"kernel": "reused" if os.environ.get(NOTEBOOK_STARTED) else "new"}


def _started(metrics: dict) -> float:
    """When the work of a finishing run began: in a stage kernel, when its notebook began (the kernel's start, or
    in a reused kernel the moment it was cleared for this notebook: members of a group share it), else the run's
    own training start."""
    if _in_kernel():
        import psutil

        from studylib.study.execution import NOTEBOOK_STARTED

        return float(os.environ.get(NOTEBOOK_STARTED) or psutil.Process().create_time())
    return time.time() - float(metrics.get("train_seconds") or 0.0)


def check_writable(runs: str | Path) -> None:
    """Raise StoreError (one line: the folder and the fix) unless files can be created in the run store."""
    path = Path(runs)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise StoreError(
            f"run store {runs}/ is not writable ({type(e).__name__}: {e.strerror or e}): "
            "choose another --runs or fix its permissions"
        ) from None


def _unlocked(folder: Path):
    """The folder's runner lock, taken, when no live runner holds it; else None."""
    lock = RunLock(folder, RUNNER_LOCK)
    return lock if lock.acquire(blocking=False) else None


def tidy(runs: str | Path) -> list[str]:
    """Clean what a runner killed mid-group left, where no live runner holds the lock -> what was done,
    one phrase each: stale partial notebooks removed, group folders left with no notebook removed, a
    finished run's missing provenance.json written (marked recovered), and group.json files that point at
    a missing notebook pointed at the group's failed notebook or removed."""
    runs, done = Path(runs), []
    for folder in sorted(runs.glob("groups/*/*")):
        if folder.is_dir() and (lock := _unlocked(folder)):
            try:
                if (folder / PARTIAL).exists():
                    (folder / PARTIAL).unlink()
                    done.append(f"removed the partial notebook of {folder.relative_to(runs)}")
                if (folder / "notebook.ipynb").exists() and (folder / "notebook-failed.ipynb").exists():
                    (folder / "notebook-failed.ipynb").unlink()
                    done.append(f"removed the failed notebook of an earlier attempt in {folder.relative_to(runs)}")
                if not list(folder.glob("*.ipynb")):
                    shutil.rmtree(folder, ignore_errors=True)
                    done.append(f"removed {folder.relative_to(runs)} (no notebook)")
            finally:
                lock.release()
    for record in sorted(runs.glob("*/*/params.json")):
        if lock := _unlocked(record.parent):
            try:
                done += _tidy_run(RunFolder(record.parent), runs)
            finally:
                lock.release()
    return done


def _tidy_run(run: RunFolder, runs: Path) -> list[str]:
    name, done = run.path.relative_to(runs), []
    if (run / PARTIAL).exists():
        (run / PARTIAL).unlink()
        done.append(f"removed the partial notebook of {name}")
    if run.is_done and not (run / "provenance.json").exists():
        m, ended = run.metrics, (run / "metrics.json").stat().st_mtime
        run.write_provenance(m, ended - float(m.get("train_seconds") or 0.0), ended, recovered=True)
        done.append(f"wrote the missing provenance.json of {name} (recovered: machine and code as of now)")
    if what := run.settle_notebooks():
        done.append(f"{name}: {what}")
    return done


def states(plan: list, runs: str | Path) -> dict[str, str]:
    """{run id: state} for every run of a plan."""
    return {r.id: RunFolder.of(r, runs).state for r in plan}


def collect(runs: str | Path, plan: list | None = None):
    """One row per finished segmentation run (optionally only the plan's): its grid labels, id, folder
    and metrics in %."""
    wanted = None if plan is None else {r.id for r in plan if r.stage == "segment"}
    rows = []
    for folder in sorted(Path(runs).glob("segment/*")):
        run = RunFolder(folder)
        if (wanted is not None and folder.name not in wanted) or not run.is_done:
            continue
        m = run.metrics
        rows.append(
            {
                **run.labels,
                "id": folder.name,
                "dir": str(folder),
                "recipe": run.record.get("recipe", 1),  # runs from before recipe versions were recorded: 1
                **{k: 100 * m[key] for k, key in SEGMENT_METRICS.items()},
            }
        )
    cols = ["protocol", "pretrain_size", "intermediate", "finetune_size", "seed", "id", "dir", "recipe"]
    cols += list(SEGMENT_METRICS)
    import pandas as pd  # imported when needed: a stage kernel never needs it

    return pd.DataFrame(rows, columns=cols)
