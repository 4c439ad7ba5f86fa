"""A stage run's lifecycle, the same for every stage: prepared (its job, schedule and device), trained
under its folder's stage lock unless it has finished, then finished once: evaluated, its weights and
metrics.json written last (the marker that the run is done). A finished run is restored and re-evaluated
instead of trained, so a stage called again on its folder re-reads the results.

The stage recipes (studylib.study.stages) say what a run trains on and how it is evaluated; this module
says what happens around that.
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studylib.core.fused_fit import fit_jobs
from studylib.core.train import Job, Schedule, deterministic_setup, tf32
from studylib.study.config import EngineConfig, build
from studylib.study.locks import RunLock
from studylib.study.provenance import trained_precision
from studylib.study.store import STAGE_LOCK, RunFolder


@dataclass
class StageResult:
    run_dir: Path
    metrics: dict
    history: list[dict] = field(default_factory=list)
    examples: dict = field(default_factory=dict)  # tensors for the stage's picture


@dataclass
class Prepared:
    """A stage run ready to train: its job and schedule, and `finish(history)`, which evaluates the
    trained task and writes the run's results (for a finished run: restores and re-reads them)."""

    job: Job
    sched: Schedule
    device: torch.device
    finished: bool
    finish: Callable[[list[dict]], StageResult]


# A stage's evaluation of its trained (or restored) task, in eval mode on the run's device:
# -> (examples for the stage's picture, the stage's own metric fields)
Evaluation = Callable[[], tuple[dict, dict]]


def prepared(stage: str, job: Job, sched: Schedule, device: torch.device, evaluate: Evaluation, meta=None) -> Prepared:
    """A Prepared run whose finish is the shared one (see `finisher`); started now: train_seconds count from here."""
    folder = RunFolder(job.run_dir)
    finish = finisher(stage, folder, job.task, device, evaluate, meta, trained_precision(device, sched.precision))
    return Prepared(job, sched, device, folder.is_done, finish)


def finisher(
    stage: str,
    folder: RunFolder,
    task,
    device,
    evaluate: Evaluation,
    meta: dict | None = None,
    precision: str | None = None,
):
    """`finish(history)` of a run: restore the weights if the run is done, evaluate, and (unless done) write
    metrics.json as {stage, the stage's fields, final_train_loss, train_seconds, device, precision (what it
    trained in, where given)} with the weights (`meta` goes into the encoder file's metadata, after the stage)."""
    t0 = time.time()

    def finish(history: list[dict]) -> StageResult:
        done = folder.is_done
        if done:
            folder.restore(task)
        task.to(device).eval()
        examples, fields = evaluate()
        if done:
            return StageResult(folder.path, folder.metrics, [], examples)
        metrics = {
            "stage": stage,
            **fields,
            "final_train_loss": history[-1]["loss"],
            "train_seconds": round(time.time() - t0, 2),
            "device": str(device),
            **({"precision": precision} if precision else {}),
        }
        folder.finish(task, metrics, {"stage": stage, **(meta or {})})
        return StageResult(folder.path, metrics, history, examples)

    return finish


def train(p: Prepared, engine: dict | None) -> StageResult:
    """Train one prepared run (unless finished) and finish it."""
    e = build(EngineConfig, engine or {}, "engine")
    if e.deterministic and not torch.are_deterministic_algorithms_enabled():  # a stage called by hand
        deterministic_setup()
    history = []
    with tf32(p.device, p.sched.tf32):
        if not p.finished:
            (history,) = fit_jobs([p.job], p.sched, p.device, False, e.checkpoint_seconds, e.compile_mode(p.device))
            if isinstance(history, Exception):
                raise history
        return p.finish(history)


def run_folder(run_dir: str) -> Path:
    """The run's folder; a fresh temporary one when none is given (a stage called by hand)."""
    return Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="studylib-run-"))


def exclusive(stage):
    """Hold the run folder's stage lock while the stage works: two processes (say, an orphaned
    kernel and a resumed run) never train into the same folder at once."""

    @functools.wraps(stage)
    def locked(run_dir: str = "", *args, **kwargs):
        folder = run_folder(run_dir)
        with RunLock(folder, STAGE_LOCK):
            return stage(str(folder), *args, **kwargs)

    return locked
