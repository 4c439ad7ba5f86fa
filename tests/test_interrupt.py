"""Stopping and failing leave a clean store and one readable line: Ctrl-C during `study run`, a closed pipe,
a store that cannot be written, the leftovers of a killed runner, next steps that fit what happened, skipped
unreadable images, and the threads each kernel gets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from studylib import cli
from studylib.study import config, grid, runner, store
from studylib.study.config import EngineConfig
from studylib.study.locks import RunLock

ROOT = Path(__file__).resolve().parent.parent
STUDY = [sys.executable, "-m", "studylib.cli"]


def _params(tmp_path: Path, pretrain_epochs: int = 2, **grid_values) -> Path:
    """The smoke study cut to one pre-training and one segmentation run (or the grid given)."""
    values = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    values["grid"].update({"pretrain_sizes": [32], "intermediate": ["none"], "finetune_sizes": [8], **grid_values})
    values["pretrain"]["epochs"] = pretrain_epochs
    values["engine"] = {"checkpoint_seconds": 0}  # a checkpoint after every epoch
    values["data"]["cache"] = str(tmp_path / "cache")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_stops_the_kernels_at_once_and_the_next_run_resumes(tmp_path):
    params, runs = _params(tmp_path, pretrain_epochs=30), tmp_path / "runs"
    pre = next(r for r in grid.plan(config.load(params)) if r.stage == "pretrain")
    cmd = STUDY + ["run", str(params), "--runs", str(runs), "--workers", "1", "--no-notebook"]
    env = {**os.environ, "CI": "true"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    log = pre.dir(runs) / "train_log.jsonl"
    _wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 2 or proc.poll() is not None, 120, "")
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert tree, "no kernel was running"
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (out, err)
    assert time.time() - t0 < 15
    assert err.strip().splitlines() == [
        "study: interrupted: 1 group stopped (1 run), 1 run not started, 0 finished runs kept; "
        f"resume with `study run {params} --runs {runs} --workers 1`"
    ]
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert not alive, "a kernel outlived the runner"
    folder = store.RunFolder(pre.dir(runs))
    assert not folder.is_done and folder.failure is None and (folder / store.CHECKPOINT).exists()
    assert folder.state == "todo"

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 ran, 0 already done" in again.stdout
    epochs = [json.loads(x)["epoch"] for x in log.read_text().splitlines()]
    assert epochs == list(range(1, 31))  # resumed from its checkpoint: each epoch once
    assert not (folder / "notebook-failed.ipynb").exists() and (folder / "notebook.ipynb").exists()


_SLOW_GROUP = """
import sys, time
from studylib.study import config, grid, runner
runner.attempt_group = lambda group, ex, kernel=None: time.sleep(60) or []
plan = [r for r in grid.plan(config.load({params!r})) if r.stage == "pretrain"]
print("started", flush=True)
runner.execute(plan, {runs!r}, device="cpu", echo=lambda *_: None)
"""


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    script = _SLOW_GROUP.format(params=str(_params(tmp_path)), runs=str(tmp_path / "runs"))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "started"
    time.sleep(1)  # inside execute, the group running
    proc.send_signal(signal.SIGINT)  # the first: stops kernels (none here) and waits for the group
    time.sleep(0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert "study: interrupted twice: stopped at once" in err


# ---------------------------------------------------------------- a closed pipe, a store that cannot be written


def test_a_closed_pipe_ends_study_plan_quietly(tmp_path):
    proc = subprocess.Popen(STUDY + ["plan", str(ROOT / "params" / "demo.yaml"), "--runs", str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # the reader is gone before the plan is printed, as `| head -1` is after its line
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert err == "" and proc.returncode in (0, 141)


def test_a_store_that_cannot_be_written_is_one_line_before_anything_runs(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a store under a regular file cannot be created, even by root
    runs = blocker / "runs"
    assert cli.main(["run", str(_params(tmp_path)), "--runs", str(runs), "--no-notebook"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"study: error: run store {runs}/ is not writable (")
    assert err[0].endswith("): choose another --runs or fix its permissions")


def test_writable_check_names_a_refused_write(tmp_path, monkeypatch):
    def refuse(self, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", refuse)  # what a read-only folder does to a non-root user
    with pytest.raises(store.StoreError, match=r"is not writable \(PermissionError: Permission denied\): choose"):
        store.check_writable(tmp_path)


# ---------------------------------------------------------------- leftovers of a killed runner


def _finished_run(folder: Path, seed: int = 3) -> store.RunFolder:
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps({"parameters": {"seed": seed}}))
    for name in store.FINISHED_FILES:
        (folder / name).write_text(json.dumps({"device": "cpu", "train_seconds": 2.0}))
    return store.RunFolder(folder)


def test_tidy_makes_a_killed_group_consistent(tmp_path):
    runs = tmp_path / "runs"
    group = runs / "groups" / "segment" / "g1"
    group.mkdir(parents=True)
    (group / store.PARTIAL).write_text("{}")
    done = _finished_run(runs / "segment" / "a")  # finished before the kill: no provenance yet
    done.write_group("g1", group / "notebook.ipynb")
    todo = store.RunFolder(runs / "segment" / "b")
    todo.path.mkdir(parents=True)
    (todo / "params.json").write_text("{}")
    todo.write_group("g1", group / "notebook.ipynb")
    alone = store.RunFolder(runs / "pretrain" / "c")  # a group of one: the partial is in its own folder
    alone.path.mkdir(parents=True)
    (alone / "params.json").write_text("{}")
    (alone / store.PARTIAL).write_text("{}")
    live = _finished_run(runs / "pretrain" / "d")  # another runner holds this one: left alone
    (live / store.PARTIAL).write_text("{}")

    with RunLock(live.path, store.RUNNER_LOCK):
        cleaned = store.tidy(runs)
    assert len(cleaned) == 6, cleaned
    assert not group.exists()  # nothing but a partial notebook: removed
    assert not (done / "group.json").exists() and not (todo / "group.json").exists()
    assert not (alone / store.PARTIAL).exists()
    prov = json.loads((done / "provenance.json").read_text())
    assert prov["recovered"] is True and prov["seed"] == 3 and prov["wall_seconds"] == 2.0
    assert (live / store.PARTIAL).exists() and not (live / "provenance.json").exists()
    assert len(store.tidy(runs)) == 2 and not (live / store.PARTIAL).exists()  # its runner gone: cleaned
    assert store.tidy(runs) == []  # consistent: nothing left to clean


def test_kill_9_mid_group_leaves_finished_members_complete_and_the_next_run_cleans_up(tmp_path):
    params = _params(tmp_path, pretrain_sizes=[0], seeds=[0, 1])  # two segmentation runs: one group of two
    values = yaml.safe_load(params.read_text())
    values["segment"]["epochs"] = 30
    params.write_text(yaml.safe_dump(values))
    plan = grid.plan(config.load(params))
    runs = tmp_path / "runs"
    proc = subprocess.Popen(STUDY + ["run", str(params), "--runs", str(runs), "--workers", "1", "--no-notebook"],
                            cwd=ROOT, env={**os.environ, "CI": "true"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    folders = [store.RunFolder(r.dir(runs)) for r in plan]

    def second_training() -> bool:
        first = [f for f in folders if f.is_done]
        logs = [f / "train_log.jsonl" for f in folders if not f.is_done]
        return bool(first) and any(p.exists() and p.read_text().strip() for p in logs) or proc.poll() is not None

    _wait_for(second_training, 180, "the second member to train")
    for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
        p.kill()
    proc.wait()
    finished = [f for f in folders if f.is_done]
    assert len(finished) == 1, "the group finished before it could be killed"
    assert (finished[0] / "provenance.json").exists()  # written with its metrics, in the kernel
    assert list(runs.glob("groups/segment/*/" + store.PARTIAL))

    assert runner.execute(plan, runs, device="cpu", echo=lambda *_: None).ok
    assert not list(runs.rglob(store.PARTIAL))
    for f in folders:
        assert f.is_done and (f / "provenance.json").exists()
        assert not (f / "group.json").exists() or f.notebook is not None  # nothing points at nothing
    assert all(list(g.glob("*.ipynb")) for g in runs.glob("groups/*/*"))


def test_a_group_whose_notebook_failed_keeps_pointing_at_it(tmp_path):
    runs = tmp_path / "runs"
    (runs / "groups" / "segment" / "g1").mkdir(parents=True)
    (runs / "groups" / "segment" / "g1" / "notebook-failed.ipynb").write_text("{}")
    member = _finished_run(runs / "segment" / "a")
    member.write_group("g1", runs / "groups" / "segment" / "g1" / "notebook.ipynb")
    store.tidy(runs)
    assert member.notebook == (runs / "groups" / "segment" / "g1" / "notebook-failed.ipynb").resolve()


def test_study_run_cleans_leftovers_before_it_runs(tmp_path):
    runs = tmp_path / "runs"
    (runs / "groups" / "segment" / "g1").mkdir(parents=True)
    (runs / "groups" / "segment" / "g1" / store.PARTIAL).write_text("{}")
    lines = []
    assert runner.execute([], runs, device="cpu", echo=lines.append).ok
    assert lines == ["cleaned: removed the partial notebook of groups/segment/g1",
                     "cleaned: removed groups/segment/g1 (no notebook)"]  # fmt: skip


def test_a_finished_run_writes_its_provenance_with_its_metrics(tmp_path):
    torch = pytest.importorskip("torch")

    class Task(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = __import__("studylib.core.model", fromlist=["build_encoder"]).build_encoder("viny-tiny")

    folder = store.RunFolder(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({"parameters": {"seed": 5}}))
    folder.finish(Task(), {"device": "cpu", "train_seconds": 1.5}, {"stage": "segment"})
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["seed"] == 5 and prov["device"] == "cpu" and "recovered" not in prov
    assert 1.4 < prov["wall_seconds"] < 60


# ---------------------------------------------------------------- what the runner says


def _summary(**kw) -> runner.Summary:
    return runner.Summary(**kw)


@pytest.mark.parametrize(
    "summary, rc, says, not_says",
    [
        (_summary(failed=["a"], blocked=["b"]), 1, "study: error: no run finished (1 failed, 1 skipped", "next:"),
        (_summary(ran=["c"], failed=["a"]), 1, "next: fix the failed runs", "next: `study geometry"),
        (_summary(ran=["c"]), 0, "next: `study geometry", "next: fix"),
        (_summary(ran=["c"], interrupted=["a"], stopped=1), 130, "study: interrupted: 1 group stopped (1 run), 1 fini",
         "next:"),
    ],
)  # fmt: skip
def test_next_steps_fit_what_happened(tmp_path, monkeypatch, capsys, summary, rc, says, not_says):
    monkeypatch.setattr(runner, "execute", lambda *a, **k: summary)
    assert cli.main(["run", str(_params(tmp_path)), "--runs", str(tmp_path / "runs"), "--no-notebook"]) == rc
    out = capsys.readouterr()
    assert says in out.out + out.err and not_says not in out.out + out.err
    if summary.failed and not summary.ran:
        assert f"resume with `study run {tmp_path / 'params.yaml'} --runs {tmp_path / 'runs'}`" in out.err


def test_skipped_unreadable_images_are_named_after_the_group(tmp_path):
    plan = grid.plan(config.load(_params(tmp_path)))
    run = next(r for r in plan if r.stage == "segment")
    run.dir(tmp_path).mkdir(parents=True)
    metrics = {"train_images": 8, "skipped": ["/data/images/Abyssinian_1.jpg"]}
    (run.dir(tmp_path) / "metrics.json").write_text(json.dumps(metrics))
    lines = []
    book = runner._Book([], runner.Execution(tmp_path, "cpu", ""), lines.append, 1, "local")
    book.group_done(grid.Group("segment", [run]), [(run, "ran", None, 1.0)])
    assert lines[0] == (
        f"segment/{run.id}: skipped 1 unreadable image (Abyssinian_1.jpg); trained on 8 images (data.skip_unreadable)"
    )
    assert runner.skipped_line(plan[0], tmp_path) is None  # nothing skipped (or no metrics): nothing said


# ---------------------------------------------------------------- threads


def test_threads_line_says_what_each_kernel_gets_and_what_was_ignored():
    shell = {"OMP_NUM_THREADS": "4"}
    assert runner.threads_line(EngineConfig(threads=1), 2, shell) == (
        "kernels: 2 workers x 1 thread (engine.threads; OMP_NUM_THREADS=4 from the shell ignored: "
        "set engine.threads_from_env to use it)"
    )
    assert runner.threads_line(EngineConfig(threads=1, threads_from_env=True), 2, shell) == (
        "kernels: 2 workers x 4 threads (OMP_NUM_THREADS=4 from the shell, as engine.threads_from_env says)"
    )
    cores = os.cpu_count()
    assert runner.threads_line(EngineConfig(), 1, {}) == (
        f"kernels: 1 worker x {cores} thread{'s' * (cores != 1)} ({cores} cores shared by 1)"
    )


def test_kernels_get_the_engine_threads_not_the_shell_s(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    seen = {}

    def fake_group(group, ex, kernel=None):  # runs in the worker's thread, where the kernel would start
        seen.update(omp=os.environ["OMP_NUM_THREADS"], mkl=os.environ["MKL_NUM_THREADS"], engine=ex.engine)
        return [(r, "ran", None, 0.0) for r in group.runs]

    monkeypatch.setattr(runner, "attempt_group", fake_group)
    plan = [r for r in grid.plan(config.load(_params(tmp_path))) if r.stage == "pretrain"]
    lines = []
    runner.execute(plan, tmp_path / "runs", device="cpu", workers=2, echo=lines.append, engine={"threads": 1})
    assert seen["omp"] == seen["mkl"] == "1"
    assert seen["engine"].threads == 1 and not seen["engine"].threads_from_env
    assert lines[0].startswith("kernels: 2 workers x 1 thread (engine.threads; OMP_NUM_THREADS=4 from the shell")
    assert os.environ["OMP_NUM_THREADS"] == "4" and "MKL_NUM_THREADS" not in os.environ  # the caller's, back


# ---------------------------------------------------------------- one group planner


def test_the_runner_executes_the_schedule_of_grid(tmp_path):
    values = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())
    values["data"]["cache"] = str(tmp_path / "cache")
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(values))
    plan = grid.plan(config.load(tmp_path / "demo.yaml"))
    eng = EngineConfig()
    book = runner._Book(plan, runner.Execution(tmp_path, "cpu", ""), print, 2, "local")
    assert [g.id for g in book.pending] == [g.id for g in grid.schedule(plan, eng, "cpu", 2)]
    cpu = grid.schedule(plan, eng, "cpu", 2)
    cluster = grid.schedule(plan, eng, "cpu", 2, executor="slurm")
    # sequential on local workers: the sizes of an arm share kernels, capped in image-steps
    assert any(len({r.params["size"] for r in g.runs}) > 1 for g in cpu if g.stage == "segment")
    for g in cpu:
        assert len(g.runs) == 1 or sum(grid.image_steps(r) for r in g.runs) <= grid.SEQUENTIAL_GROUP_STEPS
    assert all(len(g.runs) <= eng.members("cpu") for g in cluster)


def test_a_run_blocked_by_a_failed_parent_is_counted_once_however_often_its_group_is_tried(tmp_path):
    """A fused group mixes members whose parents failed with members still waiting for theirs: each try of the
    group records the blocked ones; counted again, the progress read '27/21 runs'."""
    plan = grid.plan(config.load(_params(tmp_path, intermediate=["none", "intel"])))
    seg = [r for r in plan if r.stage == "segment"]
    blocked = next(r for r in seg if r.parent is not None and r.parent.stage == "intermediate")
    waiting = next(r for r in seg if r.parent is not None and r.parent.id != blocked.parent.id)
    book = runner._Book([], runner.Execution(tmp_path, "cpu", ""), print, 1, "local")
    book.bad.add(blocked.parent.id)
    group = grid.Group("segment", [blocked, waiting])
    assert book.ready(group) is False and book.ready(group) is False  # tried twice while the other waits
    assert book.summary.blocked == [blocked.id]
