"""Group execution: many runs of one stage and shape in one kernel, and the stage notebooks' entry point.

run_notebook(stage, run_dirs, ...)  what a stage notebook's training cell calls: the runs of `run_dirs`,
                                    their settings read from each folder's params.json (written once by
                                    `study run`), or with none the first run of a study (`smoke` by
                                    default) in a temporary folder, from a fresh encoder
run_group(stage, members, ...)      the runs trained fused as one stacked model (engine.fuse, a GPU's
                                    default) or one after another; a member that fails is recorded
                                    failed in its folder and the others go on
"""

from __future__ import annotations

import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from studylib.core.fused_fit import fit_jobs
from studylib.core.train import deterministic_setup, resolve_device, tf32
from studylib.data import resident
from studylib.data.decoders import using_device
from studylib.study import stages
from studylib.study.config import EngineConfig, ParamError, build
from studylib.study.lifecycle import Prepared, StageResult, run_folder
from studylib.study.locks import RunLock
from studylib.study.store import STAGE_LOCK, RunFolder

_HEADLINE = {"pretrain": "eval_masked_l1", "intermediate": "top1", "segment": "miou_per_image"}
# a group's runs share these stage arguments (grid.shape_key groups them so); the rest are each member's
SHARED = ("model", "data", "settings")
MEMBER = {
    "pretrain": ("size", "seed"),
    "intermediate": ("parent_dir", "seed", "arm", "pets_split", "downstream"),
    "segment": ("parent_dir", "size", "seed"),
}

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# the parameter files travel inside the installed package (studylib/params), as the notebooks do; an editable
# install or a source checkout reads the top-level params/ folder
PARAMS_DIR = PACKAGE_DIR / "params" if (PACKAGE_DIR / "params").is_dir() else PACKAGE_DIR.parent / "params"

_HEADLINE = {"pretrain": "eval_masked_l1", "intermediate": "top1", "segment": "miou_per_image"}


@dataclass
class GroupResult:
    """What a group of runs gave: per run folder its StageResult, or the exception that stopped it."""

    stage: str
    results: dict[str, StageResult | Exception]

    def first(self) -> StageResult:
        """The first run that finished (for the stage's pictures); raises when none did."""
        for r in self.results.values():
            if isinstance(r, StageResult):
                return r
        errors = list(self.results.values())
        if len(errors) == 1:
            raise errors[0]
        raise RuntimeError(f"all {len(errors)} runs of the group failed: " + "; ".join(map(str, errors)))

    def table(self):
        """One row per run: its folder, status, headline metric and training seconds."""
        import pandas as pd

        rows = []
        for run_dir, r in self.results.items():
            ok = isinstance(r, StageResult)
            metrics = r.metrics if ok else {}
            rows.append(
                {
                    "run": Path(run_dir).name,
                    "status": "done" if ok else f"failed: {type(r).__name__}",
                    _HEADLINE[self.stage]: metrics.get(_HEADLINE[self.stage]),
                    "train_seconds": metrics.get("train_seconds"),
                }
            )
        return pd.DataFrame(rows).round(4)


def run_group(stage: str, members: list[dict], engine: dict | None = None, **common) -> GroupResult:
    """Run a group of `stage` runs that share `common` arguments (model, data, settings, device) and differ
    in the per-member ones (run_dir and, by stage, parent_dir, size, seed, arm, ...). With engine.fuse on
    (the default on a GPU) the members train as one stacked model, else one after another. A member that
    fails is recorded failed in its run folder (error.json) and the others go on."""
    e = build(EngineConfig, engine or {}, "engine")
    if e.deterministic:  # before anything starts CUDA (cuBLAS reads its workspace setting then)
        deterministic_setup()
    dev = resolve_device(common.get("device", "auto"))
    _set_threads(e.threads, dev)
    imported = stage == "pretrain" and (common.get("settings") or {}).get("from_encoder")
    # the members decode for the group's device (nvJPEG on CUDA) and share one device copy of their images,
    # freed when the group ends
    with using_device(dev), resident.group():
        if e.fused(dev) and len(members) > 1 and not imported:
            return GroupResult(stage, _run_fused(stage, members, e, dev, common))
        results = {}
        for m in members:
            try:
                results[m["run_dir"]] = stages.STAGE[stage](**common, **m, engine=engine)
            except Exception as err:  # recorded, the group goes on
                results[m["run_dir"]] = _failed(m["run_dir"], err)
        return GroupResult(stage, results)


def _failed(run_dir: str, err: Exception) -> Exception:
    if run_dir:  # a run in a temporary folder (no run_dir given) has no record to keep
        RunFolder(run_dir).record_failure(f"{type(err).__name__}: {err}", traceback.format_exc())
    return err


def _run_fused(stage: str, members: list[dict], e: EngineConfig, dev, common: dict) -> dict:
    """Prepare every member, train the unfinished ones fused, finish each; every folder's stage lock held."""
    results: dict = {}
    prepared: dict[str, Prepared] = {}
    with ExitStack() as stack:
        for m in sorted(members, key=lambda m: m["run_dir"]):  # one lock order for every process
            stack.enter_context(RunLock(run_folder(m["run_dir"]), STAGE_LOCK))
        for m in members:
            try:
                prepared[m["run_dir"]] = stages.PREPARE[stage](**common, **m)
            except Exception as err:
                results[m["run_dir"]] = _failed(m["run_dir"], err)
        todo = {d: p for d, p in prepared.items() if not p.finished}
        logs = {}
        if todo:
            first = next(iter(todo.values()))
            jobs = [p.job for p in todo.values()]
            with tf32(dev, first.sched.tf32):
                logs = dict(
                    zip(todo, fit_jobs(jobs, first.sched, dev, True, e.checkpoint_seconds, e.compile_mode(dev)))
                )
        for d, p in prepared.items():
            log = logs.get(d, [])
            try:
                if isinstance(log, Exception):
                    raise log
                with tf32(dev, p.sched.tf32):
                    results[d] = p.finish(log)
            except Exception as err:
                results[d] = _failed(d, err)
    return {m["run_dir"]: results[m["run_dir"]] for m in members}


def _set_threads(threads: int, dev: torch.device) -> None:
    """engine.threads (the runner sets it per kernel): this kernel's CPU threads, said in one line with what
    makes a CPU's numbers differ (its kernel ISA) or the GPU."""
    if threads <= 0:
        return
    torch.set_num_threads(threads)
    where = f"GPU {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ""
    where = where or f"CPU ISA {torch.backends.cpu.get_cpu_capability()}"
    print(f"kernel: {torch.get_num_threads()} threads, {where}", flush=True)


# ---------------------------------------------------------------- the stage notebooks' entry point


def read_run_params(run_dir: str | Path) -> dict:
    """A run's resolved parameters, as `study run` wrote them once into its params.json (the only reader)."""
    params = RunFolder(run_dir).parameters
    if not params:
        raise ParamError(
            f"{run_dir}: no params.json with the run's parameters; `study run` writes it before the stage notebook "
            "runs (to try a stage by hand, leave run_dirs empty and name a study)"
        )
    return params


def run_notebook(
    stage: str, run_dirs: list, study: str = "smoke", device: str = "auto", engine: dict | None = None
) -> GroupResult:
    """The stage's runs of `run_dirs` as one group, each with the parameters in its params.json; with no
    run_dirs, the first `stage` run of the parameter file `study` (a path, or a name in params/), from a
    fresh encoder, in a new temporary folder."""
    run_dirs = [str(d) for d in run_dirs] or [str(study_run(stage, study))]
    params = [read_run_params(d) for d in run_dirs]
    common = {k: params[0][k] for k in SHARED}
    for d, p in zip(run_dirs[1:], params[1:]):
        differ = [k for k in SHARED if p[k] != common[k]]
        if differ:
            raise ParamError(
                f"{d}: its {', '.join(differ)} differ from those of {run_dirs[0]}; the runs of one group share "
                "them: let `study run` make the groups"
            )
    members = [{"run_dir": d, **{k: p[k] for k in MEMBER[stage] if k in p}} for d, p in zip(run_dirs, params)]
    return run_group(stage, members, engine=engine, device=device, **common)


def study_file(study: str | Path) -> Path:
    """A parameter file: the path itself, or the name of one in params/ (e.g. smoke -> params/smoke.yaml)."""
    path = Path(study)
    if path.is_file():
        return path
    named = PARAMS_DIR / f"{study}.yaml"
    if named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in PARAMS_DIR.glob("*.yaml")))
    raise ParamError(f"study {str(study)!r}: neither a parameter file nor one of the names in {PARAMS_DIR}: {known}")


def study_run(stage: str, study: str | Path) -> Path:
    """The first `stage` run of the study, without its parent (a fresh encoder), prepared in a new temporary
    folder: its params.json written as `study run` writes it. -> the folder."""
    from studylib.study import config, grid

    path = study_file(study)
    run = next((r for r in grid.plan(config.load(path)) if r.stage == stage), None)
    if run is None:
        raise ParamError(f"{path}: the study has no {stage} run (its grid skips the stage)")
    folder = run_folder("")
    alone = grid.Run(run.stage, run.params, None, run.labels)
    RunFolder(folder).write_record(alone, {**run.params, "run_dir": str(folder), "parent_dir": ""})
    print(f"{stage}: the first {stage} run of {path.name} ({alone.describe()}), from a fresh encoder, in {folder}")
    return folder
