"""precision: auto: bf16 on a GPU; on a CPU bf16 only where the stored `study bench` rates of the model on this
machine (CPU model, ISA, threads) measured the stage's bf16 step faster, else fp32 (said once); the run's id
says "auto", its provenance.json what it trained in. The existing values keep their meaning."""

from __future__ import annotations

import pytest
import torch

from studylib.core import train as T
from studylib.study import config as C
from studylib.study import identity, provenance, rates
from studylib.study import rates as R
from studylib.study.config import ParamError, SegmentConfig, StageConfig
from studylib.study.rates import resolve_precision


def stored_rates(runs, stages: dict, model: str = "viny-tiny", threads: int | None = None) -> None:
    """A CPU bench result in `runs` whose single steps ran at stages[stage] = (fp32, bf16) images/s."""
    entries = []
    for stage, (fp32, bf16) in stages.items():
        entries.append({"stage": stage, "what": "single", "images_per_s": fp32, "precision": "fp32"})
        entries.append({"stage": stage, "what": "single-bf16", "images_per_s": bf16, "precision": "bf16"})
    threads = torch.get_num_threads() if threads is None else threads
    result = {"device": R.device_name("cpu"), "device_type": "cpu", "model": model, "threads": threads}
    result |= {"smoke": False, "entries": entries}
    R.save_rates(runs, result | {"precision_auto": R.precision_record(result)})


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    monkeypatch.setattr(rates, "_SAID", set())


def test_auto_is_a_value_and_the_old_ones_keep_their_meaning():
    assert StageConfig(precision="auto").uses_tf32()  # auto is bf16 on a GPU: TF32 for its fp32 parts, as bf16
    assert not StageConfig(precision="fp32").uses_tf32()
    with pytest.raises(ParamError, match="precision.*bf16, fp32, auto"):
        StageConfig(precision="fp16")
    cpu = torch.device("cpu")
    assert resolve_precision("bf16", cpu, "viny-tiny", "segment", "/nonexistent") == "bf16"
    assert isinstance(T.autocast(cpu, "bf16"), type(T.autocast(cpu, "fp32")))  # bf16 on a CPU: fp32, as always
    assert provenance.trained_precision(cpu, "bf16") == "fp32" and provenance.trained_precision(cpu, "auto") == "fp32"


def test_the_id_says_auto_and_the_default_id_does_not_move():
    default, auto = (identity.settings(SegmentConfig(precision=p)) for p in ("bf16", "auto"))
    assert default["precision"] == "bf16" and auto["precision"] == "auto"
    ids = {
        p: identity.run_id("segment", {"settings": identity.settings(SegmentConfig(precision=p))}, None)
        for p in C.PRECISIONS
    }
    assert len(set(ids.values())) == 3


def test_auto_on_a_gpu_is_bf16_without_reading_rates(tmp_path):
    assert resolve_precision("auto", "cuda", "viny", "pretrain", tmp_path) == "bf16"
    assert resolve_precision("auto", torch.device("cuda", 0), "viny", "segment", tmp_path) == "bf16"


def test_auto_on_a_cpu_without_rates_is_fp32_said_once(tmp_path, capsys):
    for _ in range(2):
        assert resolve_precision("auto", "cpu", "viny-tiny", "segment", tmp_path) == "fp32"
    err = capsys.readouterr().err
    assert err.count("precision auto: no bench rates of segment") == 1 and "training in fp32" in err
    assert f"OMP_NUM_THREADS={torch.get_num_threads()} study bench --device cpu --model viny-tiny" in err


def test_auto_on_a_cpu_follows_the_stored_bench_per_stage(tmp_path, capsys):
    # pre-training measured faster in bf16, segmentation (and so the intermediate stage) slower
    stored_rates(tmp_path, {"pretrain": (300.0, 330.0), "segment": (370.0, 274.0)})
    assert resolve_precision("auto", "cpu", "viny-tiny", "pretrain", tmp_path) == T.BF16_CPU_TOO
    assert resolve_precision("auto", "cpu", "viny-tiny", "segment", tmp_path) == "fp32"
    assert resolve_precision("auto", "cpu", "viny-tiny", "intermediate", tmp_path) == "fp32"
    assert capsys.readouterr().err == ""  # measured: nothing to say
    # another model, or the same model at other threads: no verdict, fp32
    assert resolve_precision("auto", "cpu", "viny", "pretrain", tmp_path) == "fp32"
    stored_rates(tmp_path / "other", {"pretrain": (300.0, 330.0)}, threads=torch.get_num_threads() + 1)
    assert resolve_precision("auto", "cpu", "viny-tiny", "pretrain", tmp_path / "other") == "fp32"


def test_bf16_on_a_cpu_autocasts_the_matmuls():
    cpu, layer, x = torch.device("cpu"), torch.nn.Linear(8, 4), torch.randn(2, 8)
    with T.autocast(cpu, T.BF16_CPU_TOO):
        assert layer(x).dtype == torch.bfloat16
    for precision in ("bf16", "auto", "fp32"):
        with T.autocast(cpu, precision):
            assert layer(x).dtype == torch.float32
    with pytest.raises(ValueError, match="precision 'fp16': one of"):
        T.autocast(cpu, "fp16")
    assert provenance.trained_precision(cpu, T.BF16_CPU_TOO) == "bf16"


def test_provenance_records_the_precision_trained_in(tmp_path):
    m = provenance.machine("cpu", "bf16")
    assert m["precision"] == "bf16" and "precision" not in provenance.machine("cpu")
    rec = provenance.record(tmp_path, 0, "cpu", 0.0, 1.0, precision="fp32")
    assert rec["machine"]["precision"] == "fp32"
    # a CPU run in bf16 (precision auto) reads apart from an fp32 one under a table; fp32 reads as before
    fp32 = provenance.describe({**m, "precision": "fp32"})
    assert fp32 == provenance.describe({k: v for k, v in m.items() if k != "precision"})
    assert provenance.describe(m) == fp32.replace(f"torch {m['torch']}", f"torch {m['torch']}, bf16 autocast")
    assert len(provenance.mixed([m, {**m, "precision": "fp32"}])) == 2


@pytest.mark.parametrize("rates,want", [((300.0, 330.0), "bf16"), ((330.0, 300.0), "fp32"), (None, "fp32")])
def test_a_segment_run_trains_in_the_precision_its_stores_bench_picks(tmp_path, rates, want):
    """A run in <store>/segment/<id> with `precision: auto` reads the store's bench rates (fp32, bf16 step rates
    of segmentation), trains in the faster one on this CPU, and says which in metrics.json and provenance."""
    import json

    from studylib.study import stages

    if rates:
        stored_rates(tmp_path, {"segment": rates})
    run_dir = tmp_path / "segment" / "abc"
    run_dir.mkdir(parents=True)
    synth = {"seed": 0, "pets": 24, "unlabeled": 0, "intel_train_per_class": 0, "intel_test_per_class": 0}
    data = {"kind": "synthetic", "synth": synth, "cache": str(tmp_path / "cache")}
    settings = {"epochs": 1, "batch_size": 8, "test_size": 8, "precision": "auto"}
    p = stages.prepare_segment(str(run_dir), "viny-tiny", data, settings, "", 16, 0, "cpu")
    assert p.sched.precision == ("bf16+cpu" if want == "bf16" else "fp32")
    stages.train(p, {})
    assert json.loads((run_dir / "metrics.json").read_text())["precision"] == want
    assert json.loads((run_dir / "provenance.json").read_text())["machine"]["precision"] == want
