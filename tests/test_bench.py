"""`study bench` and `study plan --estimate`: the smoke bench through the CLI, the FLOP count, the estimate
against a hand count, and stored rates used without measuring again."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from studylib import cli
from studylib.core.model import model_config
from studylib.study import bench as B
from studylib.study import estimate as E
from studylib.study.grid import Run

ROOT = Path(__file__).resolve().parent.parent
SMOKE_PARAMS = ROOT / "params" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke bench through the CLI (`study bench --smoke --json --runs RUNS`), shared by the tests below."""
    runs = tmp_path_factory.mktemp("runs")
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["bench", "--smoke", "--json", "--runs", str(runs)]) == 0
    return json.loads(out.getvalue()), runs


def test_smoke_bench_measures_every_entry(smoke):
    result, _ = smoke
    found = {(e["stage"], e["what"], e["members"]) for e in result["entries"]}
    expected = {(t, w, m) for t in B.TASKS for w, m in [("reference", 1), ("single", 1), ("fused", 1), ("fused", 4)]}
    assert found == expected
    for e in result["entries"]:
        assert e["images_per_s"] > 0 and e["tflops"] > 0 and e["x_reference"] > 0 and e["steps"] >= 1, e
        assert e["batch"] == B.SMOKE.batch
    assert all(e["x_reference"] == 1.0 for e in result["entries"] if e["what"] == "reference")
    assert result["kernel_startup_s"] > 0 and result["model"] == "viny-tiny" and result["smoke"]


def test_smoke_table_prints(smoke):
    result, _ = smoke
    text = B.table(result)
    assert all(col in text for col in ("what", "M", "batch", "img/s", "x reference", "TFLOP/s", "kernel start-up"))
    assert sum(line.startswith(("pretrain ", "segment ")) for line in text.splitlines()) == len(result["entries"])


def test_bench_stores_rates_per_device(smoke):
    result, runs = smoke
    assert (runs / "bench" / f"{B.device_name('cpu')}.json").is_file()
    assert B.load_rates(runs, "cpu") == result
    assert B.load_rates(runs / "elsewhere", "cpu") is None


def test_train_flops_of_viny_tiny_by_hand():
    # viny-tiny: 8x8 = 64 tokens of 8x8x3 = 192 values, width 64, 4 blocks, 4 heads x 32 = 128 inner, MLP 256
    patch_embed = 64 * 192 * 64
    linears = 64 * (64 * 384 + 128 * 64 + 64 * 256 + 256 * 64)  # qkv, proj, fc1, fc2 per token
    attention = 2 * 64 * 64 * 128  # QK^T and AV: 64 x 64 per head, 128 inner
    head = 64 * 64 * 192  # both heads: 64 tokens -> 192 values (MIM pixels, or 8x8 pixels x 3 classes)
    macs = patch_embed + 4 * (linears + attention) + head
    assert macs == 22_544_384
    for task in B.TASKS:
        assert B.train_flops_per_image(model_config("viny-tiny"), task) == 3 * 2 * macs
    with pytest.raises(ValueError, match="FLOPs are counted"):
        B.train_flops_per_image(model_config("viny-tiny"), "intermediate")


# ---------------------------------------------------------------- the estimate


def made_up_rates(device: str = "cpu-test", model: str = "viny-tiny") -> dict:
    """Both stages: single 100 img/s (2 s warm-up excess); fused 80, 200, 400 img/s at M = 1, 4, 16 (setup
    1, 4, 16 s); a kernel starts in 10 s."""

    def entry(stage, what, members, rate, setup):
        return {"stage": stage, "what": what, "members": members, "batch": 64, "images_per_s": rate, "setup_s": setup}

    entries = []
    for stage in B.TASKS:
        entries.append(entry(stage, "reference", 1, 50.0, 0.0))
        entries.append(entry(stage, "single", 1, 100.0, 2.0))
        entries += [entry(stage, "fused", m, r, float(m)) for m, r in [(1, 80.0), (4, 200.0), (16, 400.0)]]
    head = {"device": device, "device_type": "cpu", "model": model, "batch": 64, "smoke": False}
    return {**head, "kernel_startup_s": 10.0, "entries": entries}


def tiny_plan(model: str = "viny-tiny") -> list[Run]:
    """One pre-training run (64 images x 5 epochs) and five segmentation runs of one shape (100 x 10, 30 test)."""
    data = {"kind": "synthetic", "synth": {}}
    pre = Run("pretrain", {"model": model, "data": data, "settings": {"epochs": 5}, "size": 64, "seed": 0})
    seg = {"epochs": 10, "test_size": 30}
    segs = [
        Run("segment", {"model": model, "data": data, "settings": seg, "size": 100, "seed": s}, parent=pre)
        for s in range(5)
    ]
    return [pre, *segs]


def test_estimate_equals_a_hand_count():
    engine = {"group_size": 4, "fuse": "on"}
    df = E.estimate(tiny_plan(), made_up_rates(), engine, workers=1).set_index("stage")
    # pretrain: a group of one trains alone at the single rate: 320 image-steps / 100, its 2 s warm-up,
    # 64 evaluated images at a third of the rate, one kernel
    pretrain = 320 / 100 + 2.0 + 64 / 300 + 10.0
    # segment: 5 runs in groups of at most 4, split evenly: 3 and 2 members, fused at rates interpolated
    # between M=1 (80) and M=4 (200): 160 and 120 img/s; setups 3 and 2 s; 5 x 30 test images; two kernels
    segment = 3000 / 160 + 2000 / 120 + (3.0 + 2.0) + 5 * 30 / 300 + 2 * 10.0
    assert df.loc["pretrain", "seconds"] == pytest.approx(pretrain)
    assert df.loc["segment", "seconds"] == pytest.approx(segment)
    assert df.loc["intermediate", "seconds"] == 0 and df.loc["intermediate", "runs"] == 0
    assert df.loc["all", "seconds"] == pytest.approx(pretrain + segment)
    assert df.loc["all", "minutes"] == pytest.approx((pretrain + segment) / 60)
    assert list(df["groups"]) == [1, 0, 2, 3] and df.loc["all", "image_steps"] == 5320
    # two workers start the segment stage's two kernels at once
    two = E.estimate(tiny_plan(), made_up_rates(), engine, workers=2).set_index("stage")
    assert two.loc["segment", "seconds"] == pytest.approx(segment - 10.0)


def test_estimate_unfused_and_of_another_model():
    # fuse off: every run at the single rate, each with its warm-up
    df = E.estimate(tiny_plan(), made_up_rates(), {"group_size": 4, "fuse": "off"}).set_index("stage")
    assert df.loc["segment", "train_s"] == pytest.approx(5000 / 100) and df.loc["segment", "setup_s"] == 10.0
    # viny runs with viny-tiny rates: training slower by the ratio of FLOPs per image
    ratio = B.train_flops_per_image(model_config("viny"), "segment") / B.train_flops_per_image(
        model_config("viny-tiny"), "segment"
    )
    big = E.estimate(tiny_plan("viny"), made_up_rates(), {"group_size": 4, "fuse": "off"}).set_index("stage")
    assert big.loc["segment", "train_s"] == pytest.approx(5000 / 100 * ratio)
    assert "scaled from viny-tiny" in E.format_estimate(big.reset_index(), made_up_rates(), tiny_plan("viny"))


def test_plan_estimate_uses_stored_rates(tmp_path, monkeypatch, capsys):
    B.save_rates(tmp_path, made_up_rates(device=B.device_name("auto")))

    def no_bench(*args, **kwargs):
        raise AssertionError("benchmarked again although rates are stored")

    monkeypatch.setattr(B, "bench", no_bench)
    assert cli.main(["plan", str(SMOKE_PARAMS), "--runs", str(tmp_path), "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "total: about" in out and "intermediate: at the segmentation rates" in out
    for stage in ("pretrain", "intermediate", "segment", "all"):
        assert any(line.split()[:1] == [stage] for line in out.splitlines()), stage


def test_plan_estimate_benchmarks_once_when_none_stored(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_bench(device="auto", smoke=False, model=None, cache=None):
        calls.append(smoke)
        return made_up_rates(device=B.device_name(device))

    monkeypatch.setattr(B, "bench", fake_bench)
    for _ in range(2):
        assert cli.main(["plan", str(SMOKE_PARAMS), "--runs", str(tmp_path), "--estimate"]) == 0
    assert calls == [False]  # the second call read what the first one stored
    assert B.load_rates(tmp_path, "auto")["kernel_startup_s"] == 10.0
    assert "total: about" in capsys.readouterr().out


def test_a_bench_without_jupyter_keeps_its_rates(monkeypatch, tmp_path):
    """A bare GPU machine has torch and timm but no jupyter_client: the start-up is noted as not measured and
    the rates (and an estimate from them) still come."""

    def no_jupyter(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'jupyter_client'")

    monkeypatch.setattr(B, "kernel_startup", no_jupyter)
    result = B.bench("cpu", smoke=True, cache=tmp_path / "cache")
    assert result["kernel_startup_s"] is None and result["entries"]
    assert "kernel start-up: not measured" in B.table(result)
    with_startup = E.estimate(tiny_plan(), made_up_rates(), {}, workers=1).set_index("stage")
    without = E.estimate(tiny_plan(), {**made_up_rates(), "kernel_startup_s": None}, {}, workers=1).set_index("stage")
    assert without.loc["all", "startup_s"] == 0 and without.loc["all", "train_s"] == with_startup.loc["all", "train_s"]
