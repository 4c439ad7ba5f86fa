"""The training loop: the step schedule, determinism, exact resume, the JSON-lines log, the NaN stop,
safetensors checkpoints and the optimiser's weight-decay groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

from studylib.core import train as T
from studylib.core.model import MaskedImageModel, build_encoder

torch.set_num_threads(2)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    monkeypatch.setenv("STUDYLIB_PROGRESS", "0")


# ------------------------------------------------------------------------------------------ schedule


def test_segmentation_schedule_from_the_paper():
    s = T.Schedule(epochs=100, batch_size=64, lr=2e-3, weight_decay=1e-4, milestones=[0.7, 0.9, 0.95], gamma=0.5)
    expect = {0: 2e-3, 69: 2e-3, 70: 1e-3, 89: 1e-3, 90: 5e-4, 94: 5e-4, 95: 2.5e-4, 99: 2.5e-4}
    for epoch, lr in expect.items():
        assert s.lr_at(epoch) == pytest.approx(lr, rel=1e-12), epoch


def test_schedule_without_milestones_is_constant():
    s = T.Schedule(epochs=10, batch_size=4, lr=0.1)
    assert [s.lr_at(e) for e in range(10)] == [0.1] * 10


def test_pretrain_schedule_milestones_are_fractions_of_the_epochs():
    s = T.Schedule(epochs=20, batch_size=4, lr=1.0, milestones=[0.5, 0.85], gamma=0.1)  # drops at 10 and 17
    assert [s.lr_at(e) for e in (9, 10, 16, 17, 19)] == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01])


# ------------------------------------------------------------------------------------------ a tiny task

N_TRAIN = 24
SCHED = T.Schedule(epochs=4, batch_size=8, lr=0.05, weight_decay=0.01, milestones=[0.5], gamma=0.5)


class Regressor(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        return self.lin(x)


def _task():
    g = torch.Generator().manual_seed(123)
    X = torch.randn(N_TRAIN, 4, generator=g)
    Y = X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.7
    return X, Y


def _step(model, X, Y, nan_after: int | None = None):
    calls = {"n": 0}

    def step(idx, g):
        calls["n"] += 1
        noise = 0.1 * torch.randn(len(idx), 4, generator=g)  # a random draw from the epoch generator
        loss = ((model(X[idx] + noise) - Y[idx]) ** 2).mean()
        if nan_after is not None and calls["n"] > nan_after:
            loss = loss * float("nan")
        return loss

    return step


def _fit(run_dir, seed_init=0, sched=SCHED, on_epoch_end=None, nan_after=None):
    X, Y = _task()
    model = Regressor(seed_init)
    hist = T.fit(
        model,
        _step(model, X, Y, nan_after),
        N_TRAIN,
        sched,
        seed=5,
        run_dir=run_dir,
        device=CPU,
        on_epoch_end=on_epoch_end,
    )
    return model, hist


def _strip(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / T.LOG).read_text().splitlines()]


def test_fit_learns_and_reports_per_epoch(tmp_path):
    model, hist = _fit(tmp_path / "a")
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4]
    assert [r["lr"] for r in hist] == pytest.approx([0.05, 0.05, 0.025, 0.025])
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert all(r["loss"] > 0 for r in hist)
    assert not model.training
    assert _strip(_log(tmp_path / "a")) == _strip(hist)


def test_fit_is_deterministic(tmp_path):
    m1, h1 = _fit(tmp_path / "one")
    m2, h2 = _fit(tmp_path / "two")
    assert _strip(h1) == _strip(h2)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    # and it depends on the seed: a different data order gives different weights
    X, Y = _task()
    m3 = Regressor(0)
    T.fit(m3, _step(m3, X, Y), N_TRAIN, SCHED, seed=6, run_dir=tmp_path / "three", device=CPU)
    assert not torch.equal(m1.lin.weight, m3.lin.weight)


class Interrupt(Exception):
    pass


def _interrupt_at(epoch_to_stop: int):
    def cb(epoch, record):
        if epoch == epoch_to_stop:
            raise Interrupt(epoch)

    return cb


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    ref_model, ref_hist = _fit(tmp_path / "ref")

    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        _fit(run, on_epoch_end=_interrupt_at(2))
    assert len(_log(run)) == 2
    with safe_open(run / T.CHECKPOINT, "pt") as f:
        assert json.loads(f.metadata()["meta"])["epoch"] == 2

    # the same call again (a fresh process would rebuild the model: a different init must not matter)
    model, hist = _fit(run, seed_init=99, on_epoch_end=_interrupt_at(2))
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4]
    assert _strip(hist) == _strip(ref_hist)
    for (k, a), (_, b) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert torch.equal(a, b), k

    log = _log(run)
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert _strip(log) == _strip(ref_hist)


def test_finished_run_is_not_trained_again(tmp_path):
    m1, h1 = _fit(tmp_path / "r")
    m2, h2 = _fit(tmp_path / "r", seed_init=42)
    assert _strip(h2) == _strip(h1)
    assert torch.equal(m1.lin.weight, m2.lin.weight)
    assert len(_log(tmp_path / "r")) == 4


def test_log_has_one_line_per_epoch_after_a_crash_between_log_and_checkpoint(tmp_path, monkeypatch):
    """A crash after an epoch's log line is written but before its checkpoint is saved (kill, full
    disk) makes the resumed run redo that epoch; the log must still hold each epoch once."""
    real_save = T.save_checkpoint
    calls = {"n": 0}

    def flaky_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupt("crash while saving epoch 2")
        return real_save(*args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(T, "save_checkpoint", flaky_save)
    with pytest.raises(Interrupt):
        _fit(run)
    monkeypatch.setattr(T, "save_checkpoint", real_save)
    _, hist = _fit(run)
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4]
    assert [r["epoch"] for r in _log(run)] == [1, 2, 3, 4]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    steps_per_epoch = N_TRAIN // SCHED.batch_size
    run = tmp_path / "nan"
    with pytest.raises(T.NonFiniteLoss) as e:
        _fit(run, nan_after=steps_per_epoch)  # epoch 1 is fine, the first step of epoch 2 is NaN
    msg = str(e.value)
    assert "epoch 2" in msg and "nan" in msg.lower()
    assert (run / T.CHECKPOINT).is_file()
    with safe_open(run / T.CHECKPOINT, "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    assert meta["epoch"] == 1 and len(meta["history"]) == 1
    assert len(_log(run)) == 1
    # the kept checkpoint holds exactly the weights (and optimiser state) after epoch 1
    ref_run = tmp_path / "one"
    with pytest.raises(Interrupt):
        _fit(ref_run, on_epoch_end=_interrupt_at(1))
    a, b = load_file(run / T.CHECKPOINT), load_file(ref_run / T.CHECKPOINT)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the loss being fixed, rerunning resumes from epoch 1 and reaches the reference result
    _, hist = _fit(run)
    _, ref_hist = _fit(tmp_path / "full")
    assert _strip(hist) == _strip(ref_hist)


def test_checkpoint_is_safetensors_with_optimizer_state(tmp_path):
    _fit(tmp_path / "c")
    path = tmp_path / "c" / T.CHECKPOINT
    assert not path.read_bytes().startswith(b"\x80")
    tensors = load_file(path)
    assert {"model.lin.weight", "model.lin.bias"} <= tensors.keys()
    assert any(k.startswith("opt.") and k.endswith("exp_avg") for k in tensors)


# ------------------------------------------------------------------------------------------ optimiser groups


@pytest.mark.parametrize("prefix", ["", "encoder."])
def test_param_groups_no_decay_on_biases_norms_and_tokens(prefix):
    """The one weight-decay rule, for the bare encoder and for a task wrapping it (the tokens' names differ)."""
    torch.manual_seed(0)
    enc = build_encoder("viny-tiny")
    model = MaskedImageModel(enc) if prefix else enc
    decay, no_decay = T.param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    named = dict(model.named_parameters())
    exempt = ["cls_token", "pos_embed", "norm.weight", "blocks.0.attn.proj.bias", "patch_embed.norm_in.weight"]
    decayed = ["blocks.0.attn.qkv.weight", "patch_embed.proj.weight"]
    if prefix:
        exempt, decayed = ["mask_token"] + [prefix + n for n in exempt], ["head.weight"] + [prefix + n for n in decayed]
    for name in exempt:
        assert id(named[name]) in ids, name
    for name in decayed:
        assert id(named[name]) not in ids, name
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


def test_epoch_generator_is_seeded_by_seed_and_epoch():
    a = torch.rand(3, generator=T.epoch_generator(1, 2))
    assert torch.equal(a, torch.rand(3, generator=T.epoch_generator(1, 2)))
    assert not torch.equal(a, torch.rand(3, generator=T.epoch_generator(1, 3)))
    assert not torch.equal(a, torch.rand(3, generator=T.epoch_generator(2, 2)))
