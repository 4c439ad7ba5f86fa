"""The run store decides a run's state and reads its results; nothing else does."""

from __future__ import annotations

import subprocess
import sys

import pytest

from studylib.core.files import atomic_write_json
from studylib.study.grid import Run
from studylib.study.store import RUNNER_LOCK, RunFolder, collect, states


def _run(seed: int = 0, size: int = 16) -> Run:
    return Run(
        "segment",
        {"size": size, "seed": seed, "settings": {"epochs": 1}},
        labels={"protocol": "clean", "pretrain_size": 0, "intermediate": "none", "finetune_size": size, "seed": seed},
    )


def _finish(folder: RunFolder, run: Run, miou: float) -> None:
    folder.write_record(run, run.params)
    for name in ("encoder.safetensors", "head.safetensors"):
        (folder / name).write_bytes(b"x")
    atomic_write_json(folder / "metrics.json", {"miou_per_image": miou, "pixel_acc": 0.5, "miou_dataset": 0.25})


def test_states_todo_failed_done(tmp_path):
    a, b, c = _run(0), _run(1), _run(2)
    fa, fb, fc = (RunFolder.of(r, tmp_path) for r in (a, b, c))
    fb.path.mkdir(parents=True)
    fb.record_failure("RuntimeError: boom", "traceback")
    _finish(fc, c, 0.4)
    assert states([a, b, c], tmp_path) == {a.id: "todo", b.id: "failed", c.id: "done"}
    # metrics alone is not done: the encoder and head must be there too
    (fc / "head.safetensors").unlink()
    assert fc.state == "todo" and not fc.is_done
    fb.clear_failure()
    assert fb.state == "todo"


def test_running_while_another_process_holds_the_runner_lock(tmp_path):
    run = _run()
    folder = RunFolder.of(run, tmp_path)
    folder.path.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from studylib.study.locks import RunLock; "
                f"l = RunLock({str(folder.path)!r}, {RUNNER_LOCK!r}); l.acquire(); "
                "print('held', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert folder.state == "running"
    finally:
        holder.kill()
        holder.wait()
    assert folder.state == "todo"


def test_collect_reads_finished_runs_in_percent(tmp_path):
    runs = [_run(0), _run(1), _run(0, size=32)]
    for r, miou in zip(runs, (0.4, 0.5, 0.6)):
        _finish(RunFolder.of(r, tmp_path), r, miou)
    (RunFolder.of(_run(5), tmp_path).path).mkdir(parents=True)  # unfinished: left out
    df = collect(tmp_path)
    assert sorted(df.miou.round(6)) == [40.0, 50.0, 60.0]
    assert set(df.columns) >= {"protocol", "pretrain_size", "intermediate", "finetune_size", "seed", "id", "dir"}
    assert (df.pixel_acc == 50.0).all() and (df.miou_dataset == 25.0).all()
    only = collect(tmp_path, plan=runs[:1])
    assert list(only.id) == [runs[0].id]


def test_collect_of_an_empty_store_is_an_empty_table(tmp_path):
    df = collect(tmp_path)
    assert df.empty and "miou" in df.columns


@pytest.mark.parametrize("stage", ["pretrain", "segment"])
def test_folder_of_a_run_is_stage_and_id(tmp_path, stage):
    run = Run(stage, {"seed": 0})
    assert RunFolder.of(run, tmp_path).path == tmp_path / stage / run.id
