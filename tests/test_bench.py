"""`study bench` and `study plan --estimate`: the smoke bench through the CLI, the FLOP count, the estimate
against a hand count, and stored rates used without measuring again."""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from studylib import cli
from studylib.core.model import model_config
from studylib.study import bench as B
from studylib.study import estimate as E
from studylib.study import rates as R
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
    kinds = [("reference", 1), ("single", 1), ("fused", 1), ("fused", 4)]
    kinds += [("single-bf16", 1)] if result["device_type"] == "cpu" else []  # precision auto's evidence
    room = result["device_type"] == "cpu" and (os.cpu_count() or 1) // result["threads"] > 1
    kinds += [("single-busy", 1)] if room else []  # a copy per core at once
    assert found == {(t, w, m) for t in B.TASKS for w, m in kinds}
    mm = result["matmul"]
    assert mm["size"] == 256 and mm["fp32_tflops"] > 0 and mm["bf16_tflops"] > 0
    for e in result["entries"]:
        assert e["images_per_s"] > 0 and e["tflops"] > 0 and e["x_reference"] > 0 and e["steps"] >= 1, e
        assert e["batch"] == B.SMOKE.batch
        assert e["share_fp32"] == pytest.approx(e["tflops"] / mm["fp32_tflops"])
        assert (e["share_bf16"] is not None) == (e["precision"] == "bf16"), e
    bf16 = [e for e in result["entries"] if e["what"] == "single-bf16"]
    assert all(
        e["precision"] == "bf16" and e["share_bf16"] == pytest.approx(e["tflops"] / mm["bf16_tflops"]) for e in bf16
    )
    assert result["precision_auto"] == {}  # a smoke run decides nothing
    assert all(e["x_reference"] == 1.0 for e in result["entries"] if e["what"] == "reference")
    assert result["kernel_startup_s"] > 0 and result["model"] == "viny-tiny" and result["smoke"]


def test_smoke_table_prints(smoke):
    result, _ = smoke
    text = B.table(result)
    cols = ("what", "M", "batch", "img/s", "x reference", "TFLOP/s", "% fp32 mm", "% bf16 mm", "kernel start-up")
    assert all(col in text for col in cols) and "matmul 256x256: fp32 " in text
    assert sum(line.startswith(("pretrain ", "segment ")) for line in text.splitlines()) == len(result["entries"])


def test_bench_stores_rates_per_device(smoke):
    result, runs = smoke
    assert (runs / "bench" / f"{R.device_name('cpu')}.json").is_file()
    assert R.load_rates(runs, "cpu") == result
    assert R.load_rates(runs / "elsewhere", "cpu") is None


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
    engine = {"group_size": 4, "fuse": "on", "reuse_kernels": False}  # a new kernel for every group
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
    # workers that keep their kernels start them once, with the first stage's groups
    reused = E.estimate(tiny_plan(), made_up_rates(), {**engine, "reuse_kernels": True}, workers=2).set_index("stage")
    assert list(reused["startup_s"]) == [10.0, 0.0, 0.0, 10.0]
    assert reused.loc["all", "seconds"] == pytest.approx(pretrain + segment - 2 * 10.0)
    slurm = E.estimate(tiny_plan(), made_up_rates(), {**engine, "reuse_kernels": True}, 2, "slurm")
    assert slurm.set_index("stage").loc["segment", "startup_s"] == 10.0  # a cluster job is a new kernel


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
    R.save_rates(tmp_path, made_up_rates(device=R.device_name("auto")))

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
        return made_up_rates(device=R.device_name(device))

    monkeypatch.setattr(B, "bench", fake_bench)
    for _ in range(2):
        assert cli.main(["plan", str(SMOKE_PARAMS), "--runs", str(tmp_path), "--estimate"]) == 0
    assert calls == [False]  # the second call read what the first one stored
    assert R.load_rates(tmp_path, "auto")["kernel_startup_s"] == 10.0
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


# ---------------------------------------------------------------- the machine's matmul rate and each entry's share


def test_matmul_rate_counts_2n3_flops_per_timed_step(monkeypatch):
    seen = []

    def fake_timed(step, device, box):
        step()  # one real matmul, so the step is a matmul of the box's side
        seen.append(box.batch)
        return {"steps": 10, "seconds": 0.5, "setup_s": 0.0}

    monkeypatch.setattr(B, "timed", fake_timed)
    # 2 x 256^3 FLOPs x 10 steps / 0.5 s
    assert B.matmul_rate(B.torch.device("cpu"), B.torch.float32, B.matmul_box(B.torch.device("cpu"), True)) == (
        671_088_640
    )
    mm = B.machine_matmul(B.torch.device("cpu"), smoke=False)
    tflops = 2 * 1024**3 * 20 / 1e12  # 10 steps in 0.5 s, fp32 and bf16 alike
    assert seen[1:] == [1024, 1024] and mm == {"size": 1024, "fp32_tflops": tflops, "bf16_tflops": tflops}


def hand_result() -> dict:
    """The issue's CPU: a 91 GFLOP/s fp32 and 204 GFLOP/s bf16 matmul; a step at 50 GFLOP/s in fp32 and one at
    37 GFLOP/s in bf16."""
    entries = [
        {"stage": "segment", "what": "single", "members": 1, "batch": 64, "images_per_s": 370.0, "x_reference": 1.0}
        | {"tflops": 0.050, "precision": "fp32"},
        {"stage": "segment", "what": "single-bf16", "members": 1, "batch": 64, "images_per_s": 274.0}
        | {"x_reference": None, "tflops": 0.037, "precision": "bf16"},
    ]
    head = {"device": "cpu-test", "device_type": "cpu", "threads": 1, "torch": "x", "model": "viny-tiny"}
    return (
        head
        | {"smoke": False, "note": "", "kernel_startup_s": None, "kernel_includes": "", "entries": entries}
        | {"matmul": {"size": 1024, "fp32_tflops": 0.091, "bf16_tflops": 0.204}}
    )


def test_each_entry_gets_its_share_of_the_matmul_rates_by_hand():
    result = hand_result()
    B.add_shares(result)
    fp32, bf16 = result["entries"]
    assert fp32["share_fp32"] == pytest.approx(0.050 / 0.091) and fp32["share_bf16"] is None  # 55%: not bf16
    assert bf16["share_fp32"] == pytest.approx(0.037 / 0.091) and bf16["share_bf16"] == pytest.approx(0.037 / 0.204)
    text = B.table(result)
    assert "matmul 1024x1024: fp32 0.091 TFLOP/s, bf16 0.204 TFLOP/s" in text
    rows = {line.split()[1]: line.split()[-2:] for line in text.splitlines() if line.startswith("segment ")}
    assert rows == {"single": ["55%", "-"], "single-bf16": ["41%", "18%"]}


def test_the_precision_verdict_is_kept_per_model_and_threads(tmp_path):
    result = hand_result()
    B.add_shares(result)
    result["precision_auto"] = R.precision_record(result)
    (found,) = result["precision_auto"].values()
    assert found["stages"] == {"segment": {"fp32": 370.0, "bf16": 274.0}} and found["threads"] == 1
    assert "precision auto, segment: fp32 (bf16 0.74x fp32 for viny-tiny | " in B.table(result)
    R.save_rates(tmp_path, result)
    other = hand_result() | {"model": "viny", "threads": 2}
    other["entries"][1]["images_per_s"] = 400.0
    other["precision_auto"] = R.precision_record(other)
    R.save_rates(tmp_path, other)
    stored = json.loads(R.rates_path(tmp_path, "cpu-test").read_text())
    assert stored["model"] == "viny" and len(stored["precision_auto"]) == 2  # the viny-tiny verdict kept
    assert {v["model"]: v["stages"]["segment"]["bf16"] for v in stored["precision_auto"].values()} == {
        "viny-tiny": 274.0,
        "viny": 400.0,
    }
    assert R.precision_record(hand_result() | {"smoke": True}) == {}


def test_fused_compiles_in_the_engines_mode(monkeypatch, tmp_path):
    """bench.fused follows EngineConfig.compile_mode (as fused_fit trains a group), passes weights of ones to a
    loss that takes them, and measures eager when the compile fails; compile_losses faked (no 30 s compile)."""
    import functools

    cpu, box = B.torch.device("cpu"), B.Box(batch=8, members=(2,), warmup=0, min_steps=1, min_seconds=0, max_seconds=0)
    prepared = B.prepare_jobs("segment", "viny-tiny", cpu, B._data(None, 8), tmp_path, 2, 8)
    calls = []

    def fake_compile(group, loss_fn, mode):
        def forward(*batch, weight=None):
            calls.append((mode, None if weight is None else weight.tolist()))
            return group.losses(loss_fn, *batch, weight=weight)

        return forward

    monkeypatch.setattr(B, "compile_losses", fake_compile)
    assert B.fused(prepared, cpu, box)["compile_mode"] == "eager" and calls == []  # a CPU's default: eager
    monkeypatch.setattr(B.EngineConfig, "compile_mode", lambda self, device: "reduce-overhead")
    out = B.fused(prepared, cpu, box)
    weight = [1.0] * 8 if B.takes_weight(prepared[0].job.loss) else None
    assert out["compile_mode"] == "reduce-overhead" and calls[0] == ("reduce-overhead", weight)
    assert len(calls) == out["steps"] == 1 and B.fused(prepared, cpu, box, mode="")["compile_mode"] == "eager"

    def broken(group, loss_fn, mode):
        return functools.partial(lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no compiler")))

    monkeypatch.setattr(B, "compile_losses", broken)
    assert B.fused(prepared, cpu, box)["compile_mode"] == "eager"


def test_the_busy_step_runs_one_copy_per_core_at_once_and_gives_the_mean_copy_s_rate(tmp_path):
    data = B._data(tmp_path / "cache", B.SMOKE.batch)
    B.prepare_jobs("segment", "viny-tiny", torch.device("cpu"), data, tmp_path, 1, B.SMOKE.batch)  # the cache, once
    out = B.single_busy("segment", "viny-tiny", data, tmp_path, B.SMOKE, copies=2)
    assert out["copies"] == 2 and len(out["per_copy"]) == 2 and all(r > 0 for r in out["per_copy"])
    assert out["images_per_s"] == pytest.approx(sum(out["per_copy"]) / 2)
    assert out["steps"] >= B.SMOKE.min_steps


def test_a_busy_copy_that_fails_is_an_error_not_a_hang(tmp_path):
    data = B._data(tmp_path / "cache", B.SMOKE.batch)
    with pytest.raises(RuntimeError, match=r"a busy copy failed: .*nope"):
        B.single_busy("segment", "nope", data, tmp_path, B.SMOKE, copies=2, timeout=120)


def test_run_overhead_averages_the_benches_before_and_after_a_run():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_overhead", ROOT / "benchmarks" / "run_overhead.py")
    ro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ro)

    def result(single, busy):
        entries = [{"stage": "segment", "what": "single", "members": 1, "images_per_s": single}]
        entries += [{"stage": "segment", "what": "single-busy", "members": 1, "images_per_s": busy}]
        entries += [{"stage": "segment", "what": "fused", "members": 16, "images_per_s": 1.0}]  # not used
        return {"threads": 1, "entries": entries}

    mean = ro.mean_rates([result(400.0, 380.0), result(500.0, 380.0)])
    rates = {e["what"]: e["images_per_s"] for e in mean["entries"]}
    assert rates == {"single": 450.0, "single-busy": 380.0} and mean["benches"] == 2
    assert mean["drift"] == pytest.approx(0.25)  # 500 / 400 - 1: the unused fused entry does not count
    assert ro._ideal_seconds({"segment": 900, "intermediate": 450}, mean, "single") == pytest.approx(3.0)
