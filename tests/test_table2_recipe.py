"""Table 2 as published: the pre-training stage imports an encoder file (`pretrain.from_encoder`), and each
intermediate arm trains with its own recipe (`intermediate.arms`); `params/table2.yaml` holds the paper's."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from studylib.core import augment as A
from studylib.core import train
from studylib.core.model import build_encoder, load_encoder, save_encoder
from studylib.study import config as C
from studylib.study import grid, runner, stages
from studylib.study.store import RunFolder

ROOT = Path(__file__).resolve().parent.parent
TABLE2 = ROOT / "params" / "table2.yaml"
SMOKE = ROOT / "params" / "smoke.yaml"
ARMS = ["none", "intel", "pets-breeds", "spatial"]
RECIPES = {
    "intel": {"lr": 8.0e-4, "mixup_alpha": 0.0, "milestones": []},
    "pets-breeds": {"lr": 1.0e-3, "weight_decay": 0.01},
    "spatial": {"lr": 5.0e-4, "normalize": False},
}


def _encoder_file(path: Path, model: str = "viny-tiny", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_encoder(path, build_encoder(model), {"note": "trained elsewhere"})
    return path


def _tensors(enc) -> dict:
    return {k: v.detach().clone() for k, v in enc.state_dict().items()}


def _smoke_values() -> dict:
    return yaml.safe_load(SMOKE.read_text())


def _cfg(**sections) -> C.StudyConfig:
    values = {"model": "viny-tiny", "grid": {"pretrain_sizes": [0, 10], "intermediate": ARMS, "finetune_sizes": [4]}}
    values.update(sections)
    return C.resolve(values)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "arms, message",
    [
        ({"spatial": {"lrr": 1.0}}, "unknown parameter 'intermediate.arms.spatial.lrr'"),
        ({"intel": {"lr": -1.0}}, "intermediate.arms.intel.lr: must be positive"),
        ({"intel": {"normalize": "no"}}, "intermediate.arms.intel.normalize: expected true or false"),
        ({"pets": {"lr": 1.0}}, "intermediate.arms.pets: unknown arm"),
        ({"none": {"lr": 1.0}}, "intermediate.arms.none: unknown arm"),
        ({"intel": 0.1}, "intermediate.arms.intel: expected a mapping"),
        ({"intel": {"arms": {}}}, "intermediate.arms.intel.arms"),
        ([], "intermediate.arms: expected a mapping"),
    ],
)
def test_per_arm_recipes_are_checked_key_by_key(arms, message):
    with pytest.raises(C.ParamError, match=message.replace(".", r"\.").replace("(", r"\(")):
        C.resolve({"intermediate": {"arms": arms}})
    if isinstance(arms, dict):  # the section checks itself wherever it is made
        with pytest.raises(C.ParamError, match="intermediate.arms"):
            C.IntermediateConfig(arms=arms)


def test_per_arm_recipes_apply_over_the_section_and_the_protocol():
    cfg = C.resolve({"protocol": "paper", "intermediate": {"epochs": 20, "arms": RECIPES}})
    spatial = cfg.intermediate.for_arm("spatial")
    assert (spatial.lr, spatial.normalize, spatial.epochs, spatial.interpolation) == (5e-4, False, 20, "nearest")
    assert cfg.intermediate.for_arm("pets-breeds").weight_decay == 0.01
    assert cfg.intermediate.for_arm("intel").mixup_alpha == 0.0 and cfg.intermediate.for_arm("intel").normalize
    assert cfg.intermediate.for_arm("intel").arms == {}
    assert C.resolve({"intermediate": {"arms": {"intel": {"lr": "1e-3"}}}}).intermediate.arms == {"intel": {"lr": 1e-3}}


def test_a_missing_encoder_file_names_the_key(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(C.ParamError, match="pretrain.from_encoder: must be empty or an existing encoder file"):
        C.resolve({"pretrain": {"from_encoder": missing}})
    with pytest.raises(C.ParamError, match="pretrain.from_encoder"):
        C.PretrainConfig(from_encoder=missing)


def test_an_imported_encoder_is_checked_against_the_study(tmp_path):
    tiny = str(_encoder_file(tmp_path / "tiny.safetensors"))
    grid_ = {"pretrain_sizes": [0, 200000]}
    cfg = C.resolve({"model": "viny-tiny", "grid": grid_, "pretrain": {"from_encoder": tiny}})
    assert cfg.pretrain.from_encoder == tiny
    with pytest.raises(C.ParamError, match="pretrain.from_encoder: .* another encoder than model 'viny'"):
        C.resolve({"model": "viny", "grid": grid_, "pretrain": {"from_encoder": tiny}})
    not_an_encoder = tmp_path / "notes.safetensors"
    not_an_encoder.write_text("hello")
    with pytest.raises(C.ParamError, match="pretrain.from_encoder: .* not an encoder file"):
        C.resolve({"model": "viny-tiny", "grid": grid_, "pretrain": {"from_encoder": str(not_an_encoder)}})
    with pytest.raises(C.ParamError, match="grid.pretrain_sizes: with pretrain.from_encoder, exactly one"):
        C.resolve({"model": "viny-tiny", "grid": {"pretrain_sizes": [10, 20]}, "pretrain": {"from_encoder": tiny}})
    with pytest.raises(C.ParamError, match="pretrain.from_encoder_sha256: .* not the expected"):
        C.resolve(
            {"model": "viny-tiny", "grid": grid_, "pretrain": {"from_encoder": tiny, "from_encoder_sha256": "0" * 64}}
        )
    pinned = C.resolve(
        {
            "model": "viny-tiny",
            "grid": grid_,
            "pretrain": {"from_encoder": tiny, "from_encoder_sha256": C.file_sha256(tiny)},
        }
    )
    assert pinned.pretrain.from_encoder_sha256 == C.file_sha256(tiny)
    with pytest.raises(C.ParamError, match="pretrain.from_encoder_sha256: must be empty"):
        C.resolve({"pretrain": {"from_encoder_sha256": C.file_sha256(tiny)}})  # without a file
    # a real-data study that imports its encoder needs no unlabeled images: tests/test_plan_checks.py


def test_the_table2_parameter_file_is_the_papers_recipe(tmp_path):
    with pytest.raises(C.ParamError, match="table2.yaml: pretrain.from_encoder: must be .* got 'path/to/your/200k"):
        C.load(TABLE2)
    values = yaml.safe_load(TABLE2.read_text())
    values["pretrain"]["from_encoder"] = str(_encoder_file(tmp_path / "200k.safetensors", "viny"))
    cfg = C.resolve(values)
    assert (cfg.model, cfg.protocol, cfg.data.kind) == ("viny", "paper", "real")
    assert cfg.grid.pretrain_sizes == [200000] and cfg.grid.intermediate == ARMS
    assert cfg.grid.finetune_sizes == [250] and cfg.grid.seeds == [0]
    runs = grid.plan(cfg)
    assert [r.stage for r in runs].count("pretrain") == 1 and len(runs) == 1 + 3 + 4
    settings = {r.params["arm"]: r.params["settings"] for r in runs if r.stage == "intermediate"}
    for arm, s in settings.items():
        assert (s["epochs"], s["batch_size"], s["milestones"], s["mixup_alpha"]) == (20, 64, [], 0.0), arm
        assert (s["contrast"], s["interpolation"], s["precision"]) == (0.3, "bilinear", "fp32"), arm
        assert s.get("normalize", True) is (arm != "spatial"), arm
    assert (settings["intel"]["lr"], settings["intel"]["weight_decay"]) == (8e-4, 0.0)
    assert (settings["pets-breeds"]["lr"], settings["pets-breeds"]["weight_decay"]) == (1e-3, 0.01)
    assert (settings["spatial"]["lr"], settings["spatial"]["weight_decay"]) == (5e-4, 0.0)
    pre = next(r for r in runs if r.stage == "pretrain")
    assert pre.labels["pretrain_size"] == 200000 and grid.image_steps(pre) == 0


# ------------------------------------------------------------------ the grid


def _ids(runs) -> dict:
    return {(r.stage, *sorted(r.labels.items())): r.id for r in runs}


def test_an_arms_recipe_lands_only_in_that_arms_runs():
    base = grid.plan(_cfg())
    other = grid.plan(_cfg(intermediate={"arms": {"spatial": {"lr": 5e-4, "normalize": False}}}))
    a, b = _ids(base), _ids(other)
    assert a.keys() == b.keys()
    changed = {k for k in a if a[k] != b[k]}
    assert changed == {k for k in a if ("arm", "spatial") in k or ("intermediate", "spatial") in k}
    assert len(changed) == 2  # the spatial intermediate run and its segmentation run
    inter = {r.params["arm"]: r.params["settings"] for r in other if r.stage == "intermediate"}
    assert (inter["spatial"]["lr"], inter["spatial"]["normalize"]) == (5e-4, False)
    for arm in ("intel", "pets-breeds"):
        assert inter[arm]["lr"] == 8e-4 and "normalize" not in inter[arm]


def test_the_defaults_keep_the_existing_ids():
    """The new settings stay out of a run's parameters (and id) while they hold their defaults."""
    cfg = _cfg()
    for r in grid.plan(cfg):
        s = r.params["settings"]
        if r.stage == "pretrain":
            later = ("from_encoder", "from_encoder_sha256", "tf32")
            assert s == {k: v for k, v in asdict(cfg.pretrain).items() if k not in later}
        elif r.stage == "intermediate":
            old = {k: v for k, v in asdict(cfg.intermediate).items() if k not in ("normalize", "arms", "tf32")}
            assert s == old
    same = _cfg(intermediate={"arms": {"spatial": {"normalize": True, "lr": 8e-4}}})
    assert _ids(grid.plan(same)) == _ids(grid.plan(cfg))  # a recipe that changes nothing changes no id


def test_the_imported_file_is_part_of_the_id(tmp_path):
    first = str(_encoder_file(tmp_path / "a.safetensors", seed=0))
    second = str(_encoder_file(tmp_path / "b.safetensors", seed=1))

    def ids(path):
        return _ids(grid.plan(_cfg(pretrain={"from_encoder": path})))

    trained, a, b = _ids(grid.plan(_cfg())), ids(first), ids(second)
    downstream = {k for k in a if k[0] != "segment" or ("pretrain_size", 10) in k}
    for other in (trained, b):
        assert {k for k in a if a[k] != other[k]} == downstream
    pre = next(r for r in grid.plan(_cfg(pretrain={"from_encoder": first})) if r.stage == "pretrain")
    assert pre.params["settings"] == {
        "from_encoder": str(Path(first).resolve()),
        "from_encoder_sha256": C.file_sha256(first),
    }
    _encoder_file(tmp_path / "a.safetensors", seed=2)  # new content under the same name: a new run
    assert ids(first) != a


# ------------------------------------------------------------------ the stages


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return {**_smoke_values()["data"], "cache": str(tmp_path_factory.mktemp("cache"))}


def test_the_pretrain_stage_imports_the_file_and_trains_nothing(tmp_path, data, monkeypatch):
    source = _encoder_file(tmp_path / "elsewhere.safetensors")
    settings = {"from_encoder": str(source), "from_encoder_sha256": C.file_sha256(source)}
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("an imported encoder is not trained"))
    kwargs = dict(model="viny-tiny", data=data, settings=settings, size=200000, seed=0, device="cpu")
    result = stages.pretrain(str(tmp_path / "run"), **kwargs)
    assert result.metrics["from_encoder"] == str(source.resolve())
    assert result.metrics["from_encoder_sha256"] == C.file_sha256(source) and result.metrics["epochs"] == 0
    want, got = _tensors(load_encoder(source)), _tensors(RunFolder(tmp_path / "run").load_encoder())
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert RunFolder(tmp_path / "run").is_done
    assert result.examples["images"].shape[0] == result.examples["mask"].shape[0] > 0  # the notebook's picture
    again = stages.pretrain(str(tmp_path / "run"), **kwargs)  # finished: re-read
    assert again.metrics == result.metrics
    with pytest.raises(C.ParamError, match="changed since the run was planned"):
        stages.pretrain(
            str(tmp_path / "other"), **{**kwargs, "settings": {**settings, "from_encoder_sha256": "0" * 64}}
        )
    with pytest.raises(C.ParamError, match="not model 'viny'"):
        stages.pretrain(str(tmp_path / "viny"), **{**kwargs, "model": "viny"})


@pytest.mark.parametrize("normalize", [True, False])
def test_the_intermediate_stage_normalises_only_when_asked(tmp_path, data, monkeypatch, normalize):
    calls = []
    real = A.normalize
    monkeypatch.setattr(A, "normalize", lambda x: calls.append(1) or real(x))
    settings = {"epochs": 1, "batch_size": 16, "normalize": normalize, "contrast": 0.0}
    seg = {"split": "fixed", "test_size": 16, "interpolation": "bilinear", "split_seed": 0}
    r = stages.intermediate(
        str(tmp_path / "run"), "viny-tiny", data, settings, seed=0, device="cpu", arm="spatial", pets_split=seg
    )
    assert bool(calls) is normalize
    assert 0 <= r.metrics["top1"] <= 1


def test_table2_end_to_end_from_an_encoder_file(tmp_path):
    """The whole Table-2 plan at tiny size: the imported encoder is the pretrain run's, and the arms train
    from it with their own recipes."""
    source = _encoder_file(tmp_path / "elsewhere" / "encoder.safetensors", seed=3)
    values = _smoke_values()
    values["grid"] = {"pretrain_sizes": [200000], "intermediate": ["none", "intel", "spatial"], "finetune_sizes": [16]}
    values["pretrain"] = {"from_encoder": str(source)}
    values["intermediate"] = {
        "epochs": 1,
        "batch_size": 16,
        "milestones": [],
        "arms": {"intel": {"lr": 8.0e-4, "mixup_alpha": 0.0}, "spatial": {"lr": 5.0e-4, "normalize": False}},
    }
    values["segment"] = {"epochs": 1, "batch_size": 8, "test_size": 16}
    whole = grid.plan(C.resolve(values))
    assert len(whole) == 1 + 2 + 3
    # every run but the segmentations after an arm (the stage notebooks are slow to start on a busy CPU)
    plan = [r for r in whole if r.stage != "segment" or r.labels["intermediate"] == "none"]
    runs = tmp_path / "runs"
    summary = runner.execute(plan, runs, device="cpu", workers=1, echo=lambda *_: None)
    assert summary.ok and len(summary.ran) == len(plan) == 4
    pre = next(r for r in plan if r.stage == "pretrain")
    folder = RunFolder.of(pre, runs)
    assert folder.metrics["from_encoder"] == str(source.resolve()) and folder.metrics["epochs"] == 0
    want = _tensors(load_encoder(source))
    got = _tensors(folder.load_encoder())
    assert all(torch.equal(want[k], got[k]) for k in want)
    torch.manual_seed(0)
    fresh = _tensors(build_encoder("viny-tiny"))

    def distance(a, b):
        return sum((a[k].float() - b[k].float()).norm() ** 2 for k in a) ** 0.5

    for run in (r for r in plan if r.stage == "intermediate"):
        f = RunFolder.of(run, runs)
        assert f.parameters["parent_dir"] == str(folder.path.resolve())
        trained = _tensors(f.load_encoder())
        assert 0 < distance(trained, want) < distance(fresh, want) / 10, run.params["arm"]
        recorded = json.loads((f / "params.json").read_text())["parameters"]["settings"]
        lr, normalize = {"intel": (8e-4, True), "spatial": (5e-4, False)}[run.params["arm"]]
        assert recorded["lr"] == lr and recorded.get("normalize", True) is normalize
    seg = next(r for r in plan if r.stage == "segment")
    assert RunFolder.of(seg, runs).parameters["parent_dir"] == str(folder.path.resolve())
    assert 0 < RunFolder.of(seg, runs).metrics["miou_per_image"] <= 1
