"""A stage run's settings have one home: the params.json `study run` writes; the stage notebooks read it
through one function (or, opened by hand, take a study's first run). Also the shared finish of a run's
lifecycle, a kernel's thread count, and the estimate: the runner's groups, a person's units."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from test_bench import made_up_rates  # tests/ is on the path, as for tests/lab.py

from studylib import cli
from studylib.core.model import MaskedImageModel, build_encoder
from studylib.study import config, grid, groups, lifecycle, runner
from studylib.study import estimate as E
from studylib.study.config import EngineConfig, ParamError
from studylib.study.store import RunFolder

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "smoke.yaml"


@pytest.fixture
def captured(monkeypatch):
    """run_group replaced by a recorder: what a stage notebook would train, without training."""
    calls = []

    def record(stage, members, engine=None, **common):
        calls.append({"stage": stage, "members": members, "engine": engine, **common})
        return groups.GroupResult(stage, {})

    monkeypatch.setattr(groups, "run_group", record)
    return calls


def _prepared_runs(runs: Path, stage: str) -> list[grid.Run]:
    """The smoke plan's runs of `stage` with their params.json written as `study run` writes them."""
    members = [r for r in grid.plan(config.load(SMOKE)) if r.stage == stage]
    for run in members:
        run.dir(runs).mkdir(parents=True)
        RunFolder.of(run, runs).write_record(run, runner.notebook_parameters(run, runs, "cpu", str(runs / "cache")))
    return members


# ---------------------------------------------------------------- the stage notebooks' entry point


def test_run_notebook_reads_each_members_parameters_from_its_params_json(tmp_path, captured):
    seg = _prepared_runs(tmp_path, "segment")
    groups.run_notebook("segment", [r.dir(tmp_path) for r in seg], device="cpu", engine={"fuse": "off"})
    (call,) = captured
    assert call["device"] == "cpu" and call["engine"] == {"fuse": "off"}
    assert call["settings"] == seg[0].params["settings"] and call["model"] == "viny-tiny"
    assert call["data"]["cache"] == str(tmp_path / "cache")  # as the runner resolved it, not re-derived
    for member, run in zip(call["members"], seg):
        parent = str(run.parent.dir(tmp_path).resolve()) if run.parent else ""
        assert member == {"run_dir": str(run.dir(tmp_path)), "parent_dir": parent, "size": 16, "seed": 0}


def test_run_notebook_passes_an_intermediate_arms_own_parameters(tmp_path, captured):
    inter = _prepared_runs(tmp_path, "intermediate")
    spatial = next(r for r in inter if r.params["arm"] == "spatial")
    groups.run_notebook("intermediate", [spatial.dir(tmp_path)], device="cpu")
    (member,) = captured[0]["members"]
    assert member["arm"] == "spatial" and member["pets_split"] == spatial.params["pets_split"]
    assert member["parent_dir"] == str(spatial.parent.dir(tmp_path).resolve())


def test_run_notebook_refuses_members_that_do_not_share_their_settings(tmp_path, captured):
    a, b = tmp_path / "a", tmp_path / "b"
    run = next(r for r in grid.plan(config.load(SMOKE)) if r.stage == "segment")
    for folder, epochs in ((a, 2), (b, 3)):
        folder.mkdir()
        settings = {**run.params["settings"], "epochs": epochs}
        RunFolder(folder).write_record(run, {**run.params, "settings": settings, "run_dir": str(folder)})
    with pytest.raises(ParamError, match=r"b: its settings differ from those of .*a; the runs of one group"):
        groups.run_notebook("segment", [a, b])
    assert not captured


def test_a_run_folder_without_params_json_is_named_with_the_fix(tmp_path):
    with pytest.raises(ParamError, match=r"no params\.json .*`study run` writes it"):
        groups.read_run_params(tmp_path)


def test_by_hand_a_stage_runs_its_studys_first_run_from_a_fresh_encoder(captured, capsys):
    first = next(r for r in grid.plan(config.load(SMOKE)) if r.stage == "intermediate")
    assert first.parent is not None  # the planned run has a pre-trained parent; by hand it starts fresh
    groups.run_notebook("intermediate", [], study="smoke")
    (member,) = captured[0]["members"]
    folder = Path(member["run_dir"])
    assert member["parent_dir"] == "" and member["arm"] == first.params["arm"]
    assert groups.read_run_params(folder)["settings"] == first.params["settings"] == captured[0]["settings"]
    assert str(folder) in capsys.readouterr().out  # the notebook says where its temporary run folder is


def test_a_study_is_a_name_in_params_or_a_path(tmp_path):
    assert groups.study_file("smoke") == groups.PARAMS_DIR / "smoke.yaml" == SMOKE
    own = tmp_path / "mine.yaml"
    own.write_text(SMOKE.read_text())
    assert groups.study_file(str(own)) == own
    with pytest.raises(ParamError, match=r"study 'smok': neither a parameter file nor .*: .*smoke"):
        groups.study_file("smok")


def test_a_study_without_the_stage_says_so(tmp_path):
    values = yaml.safe_load(SMOKE.read_text())
    values["grid"].update(pretrain_sizes=[0], intermediate=["none"])
    (tmp_path / "scratch.yaml").write_text(yaml.safe_dump(values))
    with pytest.raises(ParamError, match="has no pretrain run"):
        groups.study_run("pretrain", tmp_path / "scratch.yaml")


def test_engine_threads_set_the_kernels_threads_and_say_so(capsys):
    before = torch.get_num_threads()
    try:
        groups.run_group("segment", [], engine={"threads": 1}, device="cpu")
        assert torch.get_num_threads() == 1
        isa = torch.backends.cpu.get_cpu_capability()
        assert capsys.readouterr().out == f"kernel: 1 threads, CPU ISA {isa}\n"
        groups.run_group("segment", [], engine={}, device="cpu")  # 0: as the kernel found it, silently
        assert capsys.readouterr().out == ""
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- a run's lifecycle: one finish


def test_finish_writes_the_stage_fields_once_then_restores_and_rereads(tmp_path):
    torch.manual_seed(0)
    task = MaskedImageModel(build_encoder("viny-tiny"))
    folder, seen = RunFolder(tmp_path), []

    def evaluate():
        seen.append(task.training)
        return {"picture": 1}, {"images": 3, "eval_masked_l1": 0.25}

    result = lifecycle.finisher("pretrain", folder, task, torch.device("cpu"), evaluate, {"images": 3})([{"loss": 0.5}])
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert set(written) == {"stage", "images", "eval_masked_l1", "final_train_loss", "train_seconds", "device"}
    assert written["stage"] == "pretrain" and written["final_train_loss"] == 0.5 and written["device"] == "cpu"
    assert result.metrics == written and result.examples == {"picture": 1} and seen == [False]  # evaluated in eval mode

    trained = {k: v.clone() for k, v in task.state_dict().items()}
    other = MaskedImageModel(build_encoder("viny-tiny"))  # other weights: a finished run restores its own
    again = lifecycle.finisher("pretrain", folder, other, torch.device("cpu"), evaluate)([])
    assert all(torch.equal(other.state_dict()[k], v) for k, v in trained.items())
    assert again.metrics == written and again.history == []
    assert json.loads((tmp_path / "metrics.json").read_text()) == written  # not written again


# ---------------------------------------------------------------- the estimate


@pytest.mark.parametrize(
    "seconds, said",
    [
        (40, "about 40 s"),
        (12 * 60 + 10, "about 12 min"),
        (3590, "about 1 hour"),
        (3.2 * 3600, "about 3.2 hours"),
        (30 * 3600, "about 30 hours"),
        (2.5 * 86400, "about 2.5 days"),
        (80571.7 * 60, "about 56 days"),
    ],
)
def test_human_duration(seconds, said):
    assert E.human_duration(seconds) == said


def test_count_says_one_worker():
    assert (E.count(1, "worker"), E.count(2, "worker")) == ("1 worker", "2 workers")


def _same_shape(n: int, size: int, epochs: int) -> list[grid.Run]:
    data = {"kind": "synthetic", "synth": {}}
    settings = {"epochs": epochs, "test_size": 10}
    return [
        grid.Run("segment", {"model": "viny-tiny", "data": data, "settings": settings, "size": size, "seed": s})
        for s in range(n)
    ]


@pytest.mark.parametrize(
    "runs, workers, groups_made",
    [
        (_same_shape(4, 16, 2), 2, 2),  # sequential on a CPU: one shape spread over the two workers
        (_same_shape(3, 1000, 20), 1, 3),  # 20,000 image-steps each: at most 30,000 in a sequential group
    ],
)
def test_the_estimate_groups_runs_as_the_runner_does(runs, workers, groups_made):
    engine = EngineConfig(fuse="off")
    df = E.estimate(runs, made_up_rates(), engine, workers).set_index("stage")
    scheduled = grid.schedule(runs, engine, "cpu", workers)
    assert df.loc["segment", "groups"] == len(scheduled) == groups_made


def test_plan_estimate_speaks_a_persons_units(tmp_path, capsys):
    from studylib.study import rates

    values = yaml.safe_load(SMOKE.read_text())
    values["workers"] = 1
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(values))
    rates.save_rates(tmp_path, made_up_rates(device=rates.device_name("auto")))
    assert cli.main(["plan", str(tmp_path / "one.yaml"), "--runs", str(tmp_path), "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "(1 worker):" in out
    assert re.search(r"^total: about \d+(\.\d)? (s|min|hours?|days)$", out, re.M), out
