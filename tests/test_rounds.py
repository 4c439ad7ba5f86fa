"""`study run --until-decided`: rounds of seeds on a fixed look schedule, a look after each, stopping when every
part is decided, at max_seeds or when the budget ends; a resumed study replays its finished looks."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from studylib.analysis.power import design_keys
from studylib.analysis.sequential import decide
from studylib.study import config as C
from studylib.study import rounds

GRID = {"pretrain_sizes": [0, 100, 400], "intermediate": ["none", "intel"], "finetune_sizes": [10, 30, 90]}


def _cfg(seeds=(0, 1)):
    return C.resolve({"model": "viny-tiny", "grid": {**GRID, "seeds": list(seeds)}})


def _truth(p, arm, f) -> float:
    """A world where every finding holds by a wide margin: pre-training helps, most with few labels, with
    diminishing returns; the intermediate stage hurts, most where pre-training helps most."""
    base = 60 - 400 / f
    gain = (p > 0) * (8 + p / 100) * 10 / f
    return base + gain - (arm == "intel") * (1 + gain)


@dataclass
class World:
    """A stand-in for the runner and the store: which seeds ran, per-seed noise of 0.3 points."""

    done: set = field(default_factory=set)
    rounds: list = field(default_factory=list)
    max_seeds: int = 12

    def run_round(self, cfg):
        new = [s for s in cfg.grid.seeds if s not in self.done]
        self.rounds.append(new)
        self.done |= set(cfg.grid.seeds)
        return _Summary(ran=new)

    def look(self, cfg, looks):
        return decide(self.collect(cfg), looks, self.max_seeds, keys=design_keys(cfg.grid))

    def collect(self, cfg):
        rows = []
        for s in cfg.grid.seeds:
            rng = np.random.default_rng(s)
            for p in GRID["pretrain_sizes"]:
                for arm in GRID["intermediate"]:
                    if arm != "none" and not p:
                        continue
                    for f in GRID["finetune_sizes"]:
                        v = _truth(p, arm, f) + rng.normal(0, 0.3)
                        rows.append({"protocol": "clean", "pretrain_size": p, "intermediate": arm,
                                     "finetune_size": f, "seed": s, "miou": v})  # fmt: skip
        return pd.DataFrame(rows)


@dataclass
class _Summary:
    ran: list
    interrupted: list = field(default_factory=list)
    not_started: int = 0

    @property
    def ok(self) -> bool:
        return True


def test_the_look_schedule_is_fixed_by_the_options():
    assert rounds.look_schedule(2, 2, 8) == [2, 4, 6, 8]
    assert rounds.look_schedule(3, 2, 8) == [3, 5, 7, 8]
    with pytest.raises(C.ParamError, match="at least 2 seeds"):
        rounds.look_schedule(1, 2, 8)
    with pytest.raises(C.ParamError, match="--max-seeds 2 is below"):
        rounds.look_schedule(3, 2, 2)


def test_added_seeds_follow_the_files_largest():
    assert rounds.seeds(_cfg((3, 7)), 5) == [3, 7, 8, 9, 10]
    assert rounds.seeds(_cfg((3, 7)), 1) == [3]


def test_rounds_add_seeds_until_every_part_is_decided():
    world, lines = World(), []
    out = rounds.until_decided(_cfg(), world.run_round, world.look, 12, 2, 0, lines.append)
    assert out.reason == "decided" and out.decision.done
    assert all(p.verdict == "supported" for p in out.decision.parts), out.decision.report()
    # the O'Brien-Fleming-like boundary spends almost nothing at 2 of 12 seeds: it takes more than one look
    assert world.rounds[0] == [0, 1] and len(world.rounds) >= 2 and out.n < 12
    assert len(lines) == len(world.rounds) and lines[-1].startswith(f"look {len(world.rounds)} ({out.n} of")


def test_a_resumed_study_replays_its_looks_and_runs_only_new_seeds():
    first = World()
    out = rounds.until_decided(_cfg(), first.run_round, first.look, 12, 2, 0, lambda _: None)
    again = World(done=set(first.done))
    out2 = rounds.until_decided(_cfg(), again.run_round, again.look, 12, 2, 0, lambda _: None)
    assert all(r == [] for r in again.rounds)  # nothing re-run
    assert [p.verdict for p in out2.decision.parts] == [p.verdict for p in out.decision.parts]
    assert out2.decision.looks == out.decision.looks


def test_the_budget_stops_before_a_round_that_would_not_fit(monkeypatch):
    clock = iter(range(0, 10_000, 100))  # every call to the clock: 100 s later
    monkeypatch.setattr(rounds.time, "monotonic", lambda: next(clock))
    world, lines = World(), []
    out = rounds.until_decided(_cfg(), world.run_round, world.look, 12, 2, 250, lines.append)
    assert out.reason == "budget" and len(world.rounds) == 1 and out.n == 2
    assert lines[-1].startswith("budget:") and "does not fit: stopping before look 2" in lines[-1]


def test_a_spent_budget_stops_a_resumed_study_after_its_replayed_looks(monkeypatch):
    # resumed with every round of 4 seeds already in the store: the looks replay (no rate is measured, nothing
    # runs); the budget, spent meanwhile, stops it before the first round that would train
    first = World(max_seeds=4)
    rounds.until_decided(_cfg(), first.run_round, first.look, 4, 2, 0, lambda _: None)
    clock = iter(range(0, 10_000, 50))  # every call to the clock: 50 s later
    monkeypatch.setattr(rounds.time, "monotonic", lambda: next(clock))
    again, lines = World(done=set(first.done), max_seeds=100), []  # a far horizon: nothing decided at 4 seeds
    out = rounds.until_decided(_cfg(), again.run_round, again.look, 100, 2, 250, lines.append)
    assert out.reason == "budget" and out.n == 4 and all(r == [] for r in again.rounds)
    assert [ln.split(" (")[0].split(":")[0] for ln in lines] == ["look 1", "look 2", "budget"]


def test_the_parameters_with_the_reached_seeds_are_written_to_the_store(tmp_path):
    src = tmp_path / "p.yaml"
    src.write_text("name: x\nmodel: viny-tiny\ngrid: {seeds: [0, 1]}\n")
    out = rounds.write_params(src, C.load(src), 5, tmp_path / "runs")
    assert C.load(out).grid.seeds == [0, 1, 2, 3, 4]
