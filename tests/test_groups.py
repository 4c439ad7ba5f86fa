"""Groups: runs of one shape executed in one kernel, one after another or fused into one stacked model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from studylib.study import config, grid, groups, runner, stages
from studylib.study.store import RunFolder

ROOT = Path(__file__).resolve().parent.parent
SMOKE = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())


def _cfg(tmp_path, **grid_values):
    values = json.loads(json.dumps(SMOKE))
    values["grid"].update(grid_values)
    values["data"]["cache"] = str(tmp_path / "cache")
    return values


# ------------------------------------------------------------------------------------------ the planner


def test_groups_hold_runs_of_one_shape_within_the_cap(tmp_path):
    plan = grid.plan(config.resolve(_cfg(tmp_path, seeds=[0, 1, 2], finetune_sizes=[8, 16])))
    seg = [r for r in plan if r.stage == "segment"]
    assert len(seg) == 2 * 4 * 3  # sizes x (scratch, mim, mim + intel, mim + spatial) x seeds
    for cap, per_size in ((8, [6, 6]), (4, [4, 4, 4]), (100, [12])):
        groups = grid.groups(plan, cap)
        assert sorted(r.id for g in groups for r in g.runs) == sorted(r.id for r in plan)  # each run once
        for g in groups:
            assert len(g.runs) <= cap and len({grid.shape_key(r) for r in g.runs}) == 1
            assert {r.stage for r in g.runs} == {g.stage}
        for size in (8, 16):
            sizes = sorted(len(g.runs) for g in groups if g.stage == "segment" and g.runs[0].params["size"] == size)
            assert sizes == per_size  # split evenly
    # one group per pre-training size and per intermediate arm: the seeds differ, the shapes do not
    assert [len(g.runs) for g in grid.groups(plan, 8) if g.stage != "segment"] == [3, 3, 3]


def test_sequential_groups_share_kernels_across_sizes_and_balance_the_workers(tmp_path):
    plan = grid.plan(config.resolve(_cfg(tmp_path, seeds=[0, 1, 2], finetune_sizes=[8, 16])))
    seg = [r for r in plan if r.stage == "segment"]
    # one after another, runs that wait for the same kind of parent share a kernel whatever their size:
    # 4 segmentation arms (scratch, mim, mim + intel, mim + spatial), each one group of 2 sizes x 3 seeds
    gs = grid.groups(plan, 100, spread=2, max_steps=10**9)
    seg_groups = [g for g in gs if g.stage == "segment"]
    assert sorted(len(g.runs) for g in seg_groups) == [6, 6, 6, 6]
    for g in seg_groups:
        assert len({grid.wait_key(r) for r in g.runs}) == 1 and {r.params["size"] for r in g.runs} == {8, 16}
        assert len({(r.labels["pretrain_size"], r.labels["intermediate"]) for r in g.runs}) == 1
    # a stage with one kind of parent is still split over the 2 workers (here the one pre-training size)
    assert sorted(len(g.runs) for g in gs if g.stage == "pretrain") == [1, 2]
    assert sorted(r.id for g in gs for r in g.runs) == sorted(r.id for r in plan)  # each run once
    # as few groups as hold at most max_steps image-steps each, balanced: 3 + 3 runs of 8 and 16 labels
    per_arm = sum(grid.image_steps(r) for r in seg) // 4
    capped = [g for g in grid.groups(plan, 100, spread=2, max_steps=per_arm // 2) if g.stage == "segment"]
    work = [sum(grid.image_steps(r) for r in g.runs) for g in capped]
    # no two bins of 16, 16, 16, 8, 8, 8 (x epochs) stay within half the work: three per arm, 16 + 8 each
    assert len(capped) == 12 and max(work) == min(work) == per_arm // 3
    assert work == sorted(work, reverse=True) and sorted(r.id for g in capped for r in g.runs) == sorted(
        r.id for r in seg
    )
    # an explicit group size caps the members; 1 runs each in its own kernel
    assert max(len(g.runs) for g in grid.groups(plan, 4, spread=2, max_steps=10**9)) <= 4
    assert {len(g.runs) for g in grid.groups(plan, 1, spread=2, max_steps=10**9)} == {1}


def test_engine_settings_are_checked_and_resolved_per_device():
    e = config.EngineConfig()
    assert (e.fused("cpu"), e.compile_mode("cpu"), e.members("cpu")) == (False, "", 8)
    assert (e.fused("cuda:1"), e.compile_mode("cuda"), e.members("cuda")) == (True, "reduce-overhead", 32)
    assert config.EngineConfig(compile="on", cuda_graphs="off").compile_mode("cuda") == "default"
    assert config.EngineConfig(compile="on").compile_mode("cpu") == "default"  # no CUDA graphs on a CPU
    with pytest.raises(config.ParamError, match="engine.fuse: must be one of auto, on, off"):
        config.EngineConfig(fuse="yes")
    with pytest.raises(config.ParamError, match="unknown parameter 'engine.groups'"):
        config.resolve({**SMOKE, "engine": {"groups": 2}})


# ------------------------------------------------------------------------------------------ one kernel, many runs


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A pre-trained encoder to start members from (a group's members have different parents)."""
    root = tmp_path_factory.mktemp("parent")
    data = {**SMOKE["data"], "cache": str(root / "cache")}
    stages.pretrain(str(root / "pre"), model="viny-tiny", data=data, settings={"epochs": 1}, size=32, device="cpu")
    return root / "pre", data


def _segment_group(root: Path, parents: list[str], data: dict, fuse: str):
    members = [{"run_dir": str(root / str(i)), "parent_dir": p, "size": 16, "seed": i} for i, p in enumerate(parents)]
    settings = {**SMOKE["segment"], "epochs": 3, "batch_size": 8}
    return groups.run_group(
        "segment", members, engine={"fuse": fuse}, model="viny-tiny", data=data, settings=settings, device="cpu"
    )


def test_fused_and_separate_groups_give_the_same_metrics(tmp_path, parent):
    """The same three runs (different seeds and parents) trained fused and one after another. Tolerance:
    losses 1e-5 relative (float32; vmap's batched matmuls and the math attention kernel round differently
    from the single model's kernels: 1e-7 measured over 6 steps), metrics 1e-3 (a few of 65,536 test
    pixels may flip class on such rounding)."""
    pre, data = parent
    parents = ["", str(pre), ""]
    fused = _segment_group(tmp_path / "fused", parents, data, "on")
    apart = _segment_group(tmp_path / "apart", parents, data, "off")
    for a, b in zip(fused.results.values(), apart.results.values()):
        assert isinstance(a, stages.StageResult) and isinstance(b, stages.StageResult)
        assert [h["epoch"] for h in a.history] == [1, 2, 3]
        for ha, hb in zip(a.history, b.history):
            assert ha["loss"] == pytest.approx(hb["loss"], rel=1e-5)
        for key in ("miou_per_image", "pixel_acc", "miou_dataset"):
            assert a.metrics[key] == pytest.approx(b.metrics[key], abs=1e-3)
    assert len({round(r.metrics["final_train_loss"], 6) for r in fused.results.values()}) == 3  # really 3 runs
    assert list(fused.table()["status"]) == ["done"] * 3


@pytest.mark.parametrize("fuse", ["on", "off"])
def test_a_failing_member_is_recorded_and_the_others_finish(tmp_path, parent, fuse):
    pre, data = parent
    bad = tmp_path / "nan-parent"  # a parent encoder with NaN weights: its child's loss is NaN from the start
    bad.mkdir()
    for name in ("metrics.json", "head.safetensors"):
        (bad / name).write_bytes((pre / name).read_bytes())
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in load_file(pre / "encoder.safetensors").items()},
        bad / "encoder.safetensors",
        metadata=_metadata(pre / "encoder.safetensors"),
    )
    group = _segment_group(tmp_path / "g", [str(pre), str(bad), ""], data, fuse)
    statuses = list(group.table()["status"])
    assert statuses == ["done", "failed: NonFiniteLoss", "done"]
    failure = RunFolder(tmp_path / "g" / "1").failure
    assert "NonFiniteLoss" in failure and "nan" in failure and "Lower the learning rate" in failure
    assert RunFolder(tmp_path / "g" / "0").is_done and RunFolder(tmp_path / "g" / "2").is_done
    assert not RunFolder(tmp_path / "g" / "1").is_done


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata()


# ------------------------------------------------------------------------------------------ the runner


def test_study_run_executes_one_notebook_per_group(tmp_path):
    values = _cfg(tmp_path, pretrain_sizes=[0, 32], intermediate=["none"], finetune_sizes=[16], seeds=[0, 1])
    cfg = config.resolve(values)
    plan = grid.plan(cfg)
    lines: list[str] = []
    summary = runner.execute(plan, tmp_path / "runs", device="cpu", echo=lines.append)
    assert summary.ok and len(summary.ran) == len(plan) == 2 + 4
    notebooks = {RunFolder.of(r, tmp_path / "runs").notebook for r in plan}
    # pretrain x2 in one kernel; segment by the parent it waits for: scratch x2, mim x2
    assert len(notebooks) == 3 and all(n.is_file() for n in notebooks)
    for size in (0, 32):
        seg = [r for r in plan if r.stage == "segment" and r.labels["pretrain_size"] == size]
        (nb,) = {RunFolder.of(r, tmp_path / "runs").notebook for r in seg}
        params = json.loads(nb.read_text())["metadata"]["papermill"]["parameters"]
        assert sorted(params["run_dirs"]) == sorted(str(r.dir(tmp_path / "runs")) for r in seg)
        assert set(params) == {"run_dirs", "device", "engine"}  # the settings live in each run's params.json only
    assert all((r.dir(tmp_path / "runs") / "provenance.json").exists() for r in plan)
    assert lines[-1].startswith(f"[{len(plan)}/{len(plan)} runs,") and "min left]" in lines[-1]


def test_sigkill_of_a_fused_group_resumes_to_the_same_metrics(tmp_path):
    """kill -9 in the middle of a fused group (two pre-training seeds); `study run` again finishes it from the
    members' epoch checkpoints, and each member's metrics equal those of an uninterrupted fused group."""
    values = _cfg(tmp_path, pretrain_sizes=[64], intermediate=["none"], finetune_sizes=[8], seeds=[0, 1])
    values["pretrain"].update(epochs=30)
    values["engine"] = {"fuse": "on", "checkpoint_seconds": 0}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(values))
    plan = grid.plan(config.load(params))
    pre = [r for r in plan if r.stage == "pretrain"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "studylib.cli", "run", str(params), "--runs", str(killed), "--no-notebook"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, "CI": "true"},
        start_new_session=True,
    )
    log = pre[1].dir(killed) / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.05)
    os.killpg(proc.pid, 9)
    proc.wait()
    for run in pre:
        assert not (run.dir(killed) / "metrics.json").exists(), "the group finished before it could be killed"
        assert (run.dir(killed) / "checkpoint.safetensors").exists()
    engine = values["engine"]
    assert runner.execute(plan, killed, device="cpu", echo=lambda *_: None, engine=engine).ok
    assert runner.execute(plan, tmp_path / "whole", device="cpu", echo=lambda *_: None, engine=engine).ok
    for run in plan:
        a = json.loads((run.dir(killed) / "metrics.json").read_text())
        b = json.loads((run.dir(tmp_path / "whole") / "metrics.json").read_text())
        for key in ("final_train_loss", "eval_masked_l1", "miou_per_image", "pixel_acc"):
            assert a.get(key) == b.get(key), (run.stage, key)
    for run in pre:
        epochs = [json.loads(x)["epoch"] for x in (run.dir(killed) / "train_log.jsonl").read_text().splitlines()]
        assert epochs == list(range(1, 31))


@pytest.mark.parametrize("stage", ["pretrain", "intermediate", "segment"])
def test_the_fused_path_prepares_with_the_arguments_the_sequential_path_trains_with(stage):
    """run_group calls STAGE[stage](**common, **member, engine=...) one after another and PREPARE[stage](**common,
    **member) fused, with members that carry only the keys their run has (an intel arm has no pets_split, a
    shared intermediate no downstream): every argument STAGE defaults, PREPARE must default too (a fused intel
    group failed with 'missing 2 required positional arguments')."""
    import inspect

    train = inspect.signature(stages.STAGE[stage]).parameters
    prepare = inspect.signature(stages.PREPARE[stage]).parameters
    assert set(prepare) == set(train) - {"engine"}
    may_be_absent = {n for n in groups.MEMBER[stage] if train[n].default is None}  # keys a run's params may lack
    assert all(prepare[n].default is None for n in may_be_absent), may_be_absent
