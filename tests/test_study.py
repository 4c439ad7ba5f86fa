"""End to end: the smoke study through the runner and papermill, the notebooks' parameters, the CLI,
and resuming an interrupted stage."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import papermill as pm
import pytest

from studylib import cli
from studylib.analysis.tables import collect, paper_table
from studylib.core import train
from studylib.study import config, grid, runner, stages
from studylib.study.store import RunFolder

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "smoke.yaml"


def test_smoke_study_runs_every_stage(smoke_store):
    """`study run params/smoke.yaml` into an empty store (tests/conftest.py) ran every run, failed none."""
    runs, plan = smoke_store.runs, smoke_store.plan
    assert len(plan) == 1 + 2 + 4
    assert re.search(r"^7 ran, 0 already done, .*\b0 failed, 0 skipped", smoke_store.output, re.M), smoke_store.output
    for run in plan:
        d = run.dir(runs)
        for f in ("params.json", "metrics.json", "encoder.safetensors", "train_log.jsonl"):
            assert (d / f).exists(), f"{run.describe()} lacks {f}"
        assert RunFolder(d).notebook is not None, f"{run.describe()} has no executed notebook, nor a group's"
        assert not (d / train.CHECKPOINT).exists()  # optimizer state dropped once finished
    seg = [r for r in plan if r.stage == "segment"]
    for intermediate in (r for r in plan if r.stage == "intermediate"):
        assert sum(r.parent is intermediate for r in seg) == 1


def test_second_run_does_no_work(smoke_store):
    runs, plan = smoke_store.runs, smoke_store.plan
    again = runner.execute(plan, runs, device="cpu", workers=2, echo=lambda *_: None)
    assert again.ran == [] and len(again.done) == len(plan)


def test_results_table_has_the_papers_layout(smoke_store):
    runs, plan = smoke_store.runs, smoke_store.plan
    df = collect(runs, plan)
    assert len(df) == 4
    assert ((df.miou > 0) & (df.miou <= 100) & (df.pixel_acc > df.miou / 3)).all()
    table = paper_table(df, "miou")
    assert list(table.index) == ["scratch", "mim 32", "mim 32 + intel", "mim 32 + spatial"]
    assert list(table.columns) == [16]
    assert "+-" in table.iloc[0, 0]


def test_batch_results_notebook_is_static(smoke_store):
    """The results notebook `study run` wrote in batch: whole, static figures, and not one widget created.
    Widget messages are what hung batch executions under ipykernel 7 (tools/notebook_hang_loop.py reproduces
    that hang by repetition; this checks its cause, which no repetition is needed to see). The interactive
    notebook, widgets and all, runs in JupyterLab in tests/test_browser.py; its explorer in tests/test_results.py."""
    out = smoke_store.runs / "results-smoke.ipynb"
    assert f"results notebook: {out}" in smoke_store.output, smoke_store.output[-2000:]
    nb = json.loads(out.read_text())
    text = json.dumps(nb)
    assert "4 finished segmentation runs" in text and "Batch run" in text
    assert "application/vnd.jupyter.widget-view+json" not in text and not _widget_state(out)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["execution_count"] for c in code), "a cell of the batch results notebook did not run"
    assert not [o for c in code for o in c["outputs"] if o["output_type"] == "error"]


def _widget_state(notebook: Path) -> dict:
    """The widget models nbclient saved from the kernel's comm messages: empty when no widget was created (an
    interactive execution saves one per widget of the explorer)."""
    state = json.loads(notebook.read_text())["metadata"].get("widgets", {})
    return state.get("application/vnd.jupyter.widget-state+json", {}).get("state", {})


@pytest.mark.parametrize("stage", grid.STAGES)
def test_notebook_parameters_hold_no_copy_of_a_setting(stage):
    """A stage notebook declares what the runner injects (its runs' folders, device, engine) and the study it
    runs when opened by hand: no setting, whose one home is the run's params.json."""
    declared = pm.inspect_notebook(str(ROOT / "notebooks" / grid.NOTEBOOKS[stage]))
    run = next(r for r in grid.plan(config.load(SMOKE)) if r.stage == stage)
    injected = runner.group_parameters(grid.Group(stage, [run]), Path("/tmp/x"), "cpu", {})
    assert set(declared) == set(injected) | {"study"}
    assert ast.literal_eval(declared["study"]["default"]) == "smoke"


def test_failed_run_is_recorded_and_blocks_only_its_dependents(tmp_path):
    values = json.loads(json.dumps(_smoke_values()))
    values["grid"].update(pretrain_sizes=[0], intermediate=[False], finetune_sizes=[8, 500])
    plan = grid.plan(config.resolve(values))
    summary = runner.execute(plan, tmp_path, device="cpu", workers=1, echo=lambda *_: None)
    assert len(summary.ran) == 1 and len(summary.failed) == 1
    failed = next(r for r in plan if r.id == summary.failed[0])
    error = json.loads((failed.dir(tmp_path) / "error.json").read_text())
    assert "fine-tune size 500 is larger than" in error["error"]


def _smoke_values() -> dict:
    import yaml

    return yaml.safe_load(SMOKE.read_text())


def test_interrupted_stage_resumes_to_the_same_metrics(tmp_path, monkeypatch):
    cfg = config.load(SMOKE)
    kwargs = dict(
        model=cfg.model,
        data={**config.to_dict(cfg.data), "cache": str(tmp_path / "cache")},
        settings={**config.to_dict(cfg.segment), "epochs": 3},
        size=16,
        seed=0,
        device="cpu",
        engine={"checkpoint_seconds": 0},  # a checkpoint after every epoch
    )
    whole = stages.segment(str(tmp_path / "whole"), **kwargs).metrics

    real_fit = train.fit

    def interrupted_fit(*args, **kw):
        def stop(epoch, record):
            if epoch == 2:
                raise KeyboardInterrupt

        args = list(args)
        args[8] = stop  # on_epoch_end, passed by position
        return real_fit(*args, **kw)

    monkeypatch.setattr(train, "fit", interrupted_fit)
    with pytest.raises(KeyboardInterrupt):
        stages.segment(str(tmp_path / "resumed"), **kwargs)
    assert (tmp_path / "resumed" / train.CHECKPOINT).exists()
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    monkeypatch.setattr(train, "fit", real_fit)
    resumed = stages.segment(str(tmp_path / "resumed"), **kwargs).metrics
    for key in ("miou_per_image", "miou_dataset", "pixel_acc", "final_train_loss"):
        assert resumed[key] == whole[key], key
    lines = (tmp_path / "resumed" / train.LOG).read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


def test_cli_info_prints_the_exact_count(capsys):
    assert cli.main(["info", "viny"]) == 0
    assert "4,842,880" in capsys.readouterr().out


def test_cli_rejects_a_bad_parameter_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: viny-tiny\nsegment: {epoch: 3}\n")
    assert cli.main(["run", str(bad), "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "segment.epoch" in err and "epochs" in err
    assert not (tmp_path / "runs").exists()


def test_stage_notebook_rejects_an_out_of_range_setting_by_name(tmp_path):
    """A stage notebook run by papermill (or opened by hand) checks every setting where it is built."""
    run = next(r for r in grid.plan(config.load(SMOKE)) if r.stage == "pretrain")
    settings = {**run.params["settings"], "mask_ratio": 1.2}
    folder = tmp_path / "run"
    folder.mkdir()
    RunFolder(folder).write_record(run, {**run.params, "settings": settings, "run_dir": str(folder)})
    with pytest.raises(pm.PapermillExecutionError, match=r"pretrain\.mask_ratio: must be in \(0, 1\), got 1\.2"):
        pm.execute_notebook(
            str(ROOT / "notebooks" / "01_pretrain.ipynb"),
            str(tmp_path / "out.ipynb"),
            parameters={"run_dirs": [str(folder)], "device": "cpu"},
            kernel_name="python3",
            progress_bar=False,
            execution_timeout=300,
        )
    assert not (tmp_path / "run" / "metrics.json").exists()
