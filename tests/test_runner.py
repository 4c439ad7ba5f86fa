"""The runner's guarantees: locks that survive a crashed holder, two runners never running the same
run, SIGKILL then resume, the submitit path, provenance, and the plan listing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import yaml

from studylib import cli
from studylib.study import config, grid, runner
from studylib.study.locks import RunLock

ROOT = Path(__file__).resolve().parent.parent
STUDY = [sys.executable, "-m", "studylib.cli"]


def _params(tmp_path: Path, **grid_values) -> Path:
    values = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    values["grid"].update(grid_values)
    values["data"]["cache"] = str(tmp_path / "cache")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from studylib.study.locks import RunLock; "
            f"l = RunLock({str(tmp_path)!r}); l.acquire(); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    assert not RunLock(tmp_path).acquire(blocking=False)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = RunLock(tmp_path)
    assert lock.acquire(blocking=False)
    lock.release()


def test_two_runners_on_one_store_execute_each_run_once(tmp_path):
    params = _params(tmp_path, pretrain_sizes=[0, 32], intermediate=[False], finetune_sizes=[8, 16])
    runs = tmp_path / "runs"
    cmd = STUDY + ["run", str(params), "--runs", str(runs), "--workers", "1", "--no-notebook"]
    env = {**os.environ, "CI": "true"}
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    ran = [int(re.search(r"(\d+) ran, (\d+) already done, (\d+) finished by another", o).group(1)) for o in outs]
    plan = grid.plan(config.load(params))
    assert sum(ran) == len(plan) == 5
    for run in plan:  # each run's training log was written by one execution: one line per epoch
        lines = (run.dir(runs) / "train_log.jsonl").read_text().splitlines()
        assert [json.loads(x)["epoch"] for x in lines] == list(range(1, len(lines) + 1))


def _kill_tree(proc: subprocess.Popen) -> None:
    parent = psutil.Process(proc.pid)
    for p in parent.children(recursive=True) + [parent]:
        p.kill()
    proc.wait()


def test_sigkill_mid_training_resumes_to_the_same_metrics(tmp_path):
    values = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    values["grid"].update(pretrain_sizes=[64], intermediate=[False], finetune_sizes=[8])
    values["pretrain"].update(epochs=40)
    values["engine"] = {"checkpoint_seconds": 0}  # a checkpoint after every epoch: the kill lands between two
    values["data"]["cache"] = str(tmp_path / "cache")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(values))
    plan = grid.plan(config.load(params))
    pre = next(r for r in plan if r.stage == "pretrain")

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        STUDY + ["run", str(params), "--runs", str(killed), "--workers", "1", "--no-notebook"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, "CI": "true"},
    )
    log = pre.dir(killed) / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.05)
    _kill_tree(proc)
    assert not (pre.dir(killed) / "metrics.json").exists(), "the run finished before it could be killed"
    assert (pre.dir(killed) / "checkpoint.safetensors").exists()

    assert runner.execute(plan, killed, device="cpu", echo=lambda *_: None).ok
    assert runner.execute(plan, tmp_path / "whole", device="cpu", echo=lambda *_: None).ok
    for run in plan:
        a = json.loads((run.dir(killed) / "metrics.json").read_text())
        b = json.loads((run.dir(tmp_path / "whole") / "metrics.json").read_text())
        for key in ("final_train_loss", "eval_masked_l1", "miou_per_image", "pixel_acc"):
            assert a.get(key) == b.get(key), (run.stage, key)
    epochs = [json.loads(x)["epoch"] for x in log.read_text().splitlines()]
    assert epochs == list(range(1, 41))


def test_submitit_executor_runs_a_tiny_grid(tmp_path):
    params = _params(tmp_path, pretrain_sizes=[0, 32], intermediate=[False], finetune_sizes=[8])
    plan = grid.plan(config.load(params))
    summary = runner.execute(
        plan,
        tmp_path / "runs",
        device="cpu",
        executor="submitit-local",
        cluster={"timeout_min": 10},
        echo=lambda *_: None,
    )
    assert summary.ok and len(summary.ran) == 3
    assert all((r.dir(tmp_path / "runs") / "metrics.json").exists() for r in plan)


def test_each_run_records_its_provenance(tmp_path):
    params = _params(tmp_path, pretrain_sizes=[0], intermediate=[False], finetune_sizes=[8])
    plan = grid.plan(config.load(params))
    assert runner.execute(plan, tmp_path / "runs", device="cpu", echo=lambda *_: None).ok
    prov = json.loads((plan[0].dir(tmp_path / "runs") / "provenance.json").read_text())
    assert prov["seed"] == 0 and prov["device"] == "cpu" and prov["wall_seconds"] > 0
    assert prov["packages"]["torch"] and prov["packages"]["timm"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert prov["git"]["commit"] == (head.strip() or None)  # this checkout's commit (None outside git)
    assert (plan[0].dir(tmp_path / "runs") / "notebook.ipynb").exists()
    assert not list(plan[0].dir(tmp_path / "runs").glob(".notebook*"))


def test_plan_lists_states_and_image_steps(tmp_path, capsys):
    params = _params(tmp_path, pretrain_sizes=[0, 32], intermediate=[False, True], finetune_sizes=[8, 16])
    assert cli.main(["plan", str(params), "--runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert out.count("todo") == 1 + 1 + 6
    # pretrain 32 images x 2 epochs; segment (8 + 16) x 2 epochs x 3 arms; intermediate 8 x 6 classes x 1 epoch
    assert "pretrain: 1 runs (1 to do), 64 image-steps to do" in out
    assert "segment: 6 runs (6 to do), 144 image-steps to do" in out
    assert "intermediate: 1 runs (1 to do), 48 image-steps to do" in out


def test_provenance_names_the_commit_and_whether_the_tree_was_dirty(tmp_path):
    from studylib.study import provenance

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    assert provenance.git_commit(tmp_path) == {"commit": None, "dirty": None}  # not a repository
    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert provenance.git_commit(tmp_path) == {"commit": head.stdout.strip(), "dirty": False}
    (tmp_path / "f.txt").write_text("b")
    assert provenance.git_commit(tmp_path)["dirty"] is True


def test_reused_kernels_train_every_run_as_new_kernels_do(smoke_store, tmp_path):
    """The smoke study (its session store: 2 workers, each reusing its kernel) again with a new kernel per group:
    every run's weights and metrics equal bit for bit; and in the reused kernels each group's notebook is timed
    from its own start (one start per group, not per kernel)."""
    from safetensors.torch import load_file

    fresh = tmp_path / "fresh"
    summary = runner.execute(smoke_store.plan, fresh, device="cpu", workers=2, echo=lambda *_: None,
                             engine={"reuse_kernels": False})  # fmt: skip
    assert summary.ok and len(summary.ran) == len(smoke_store.plan)
    for run in smoke_store.plan:
        a, b = run.dir(smoke_store.runs), run.dir(fresh)
        ma, mb = ({k: v for k, v in json.loads((d / "metrics.json").read_text()).items() if k != "train_seconds"}
                  for d in (a, b))  # fmt: skip
        assert ma == mb, run.describe()
        for name in ("encoder.safetensors", "head.safetensors"):
            ta, tb = load_file(a / name), load_file(b / name)
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), (run.describe(), name)
    starts, kernels = {}, {"reused": set(), "fresh": set()}
    for run in smoke_store.plan:
        d = run.dir(smoke_store.runs)
        group = json.loads((d / "group.json").read_text())["group"] if (d / "group.json").exists() else run.id
        prov = json.loads((d / "provenance.json").read_text())
        starts[group] = prov["started"]
        kernels["reused"].add(prov["kernel"])
        kernels["fresh"].add(json.loads((run.dir(fresh) / "provenance.json").read_text())["kernel"])
    assert kernels == {"reused": {"new", "reused"}, "fresh": {"new"}}  # each run says which it ran in
    # each group its own start (the two kernels' first groups may share the moment both kernels started): not one
    # per kernel, which would count the kernel's earlier groups into a later group's wall time
    assert len(set(starts.values())) >= len(starts) - 1 > 2


def test_the_synthetic_data_is_written_once_before_any_kernel_starts(tmp_path, monkeypatch):
    """Two workers' first groups would each generate the same data at once (one copy kept): the runner writes it
    first, where the kernels look for it."""
    from studylib.data import sources

    written, seen = [], []
    real = sources.write_synthetic

    def write(root, spec):  # counts the calls that generate (a finished root is returned as is)
        if not (Path(root) / "SYNTH.json").exists():
            written.append(root)
        return real(root, spec)

    monkeypatch.setattr(sources, "write_synthetic", write)

    def fake_group(group, ex, kernel=None):  # where a kernel would start: the data must be there
        seen.append((len(written), sources.resolve_data({**group.runs[0].params["data"], "cache": ex.cache})))
        return [(r, "ran", None, 0.0) for r in group.runs]

    monkeypatch.setattr(runner, "attempt_group", fake_group)
    plan = grid.plan(config.load(_params(tmp_path)))
    assert runner.execute(plan, tmp_path / "runs", device="cpu", workers=2, echo=lambda *_: None).ok
    assert len(written) == 1 and seen and all(n == 1 for n, _ in seen)  # written once, before the first group
    assert all((paths.pets / "annotations").is_dir() for _, paths in seen)
