"""Run a study in rounds of seeds until its findings are decided (`study run PARAMS --until-decided`).

The first look is at the parameter file's seeds; each round adds `step` seeds (the next integers after the
file's largest seed) until `max_seeds`, and after each round every part of every finding is tested against
the group-sequential boundary of studylib.analysis.sequential, which keeps each part's false-"supported"
rate at 2.5% however many looks are taken (stopping at the first significant result without it reached
11-13.5% per part). It stops when every part is decided, at `max_seeds`, or when the next round would not
fit the time budget. The looks are a fixed schedule of seed counts, so an interrupted study, resumed with
the same options, replays its finished looks from the store and continues with the next round.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from studylib.core.files import atomic_write_json, atomic_write_text
from studylib.study.config import ParamError, StudyConfig


def look_schedule(first: int, step: int, max_seeds: int) -> list[int]:
    """The seed counts at which the study looks: first, first + step, ..., and max_seeds last."""
    if first < 2:
        raise ParamError(f"grid.seeds: --until-decided needs at least 2 seeds in the first round, got {first}")
    if max_seeds < first:
        raise ParamError(f"--max-seeds {max_seeds} is below the file's {first} seeds; raise it")
    if step < 1:
        raise ParamError(f"--round-seeds must be at least 1, got {step}")
    return list(range(first, max_seeds, step)) + [max_seeds]


def seeds(cfg: StudyConfig, n: int) -> list[int]:
    """The study's first n seeds: the file's, then the integers after its largest."""
    own = list(cfg.grid.seeds)
    return own[:n] + list(range(max(own) + 1, max(own) + 1 + max(0, n - len(own))))


def with_seeds(cfg: StudyConfig, n: int) -> StudyConfig:
    return dataclasses.replace(cfg, grid=dataclasses.replace(cfg.grid, seeds=seeds(cfg, n)))


def write_params(source: str | Path, cfg: StudyConfig, n: int, runs: str | Path) -> Path:
    """The parameter file with the seeds the study reached, in the run store (<runs>/params-<name>.yaml), so
    `study results`, `study geometry` and `study report` read every seed the rounds added."""
    values = yaml.safe_load(Path(source).read_text()) or {}
    values.setdefault("grid", {})["seeds"] = seeds(cfg, n)
    out = Path(runs) / f"params-{cfg.name}.yaml"
    head = f"# {source} with the seeds `study run --until-decided` reached ({n})\n"
    atomic_write_text(out, head + yaml.safe_dump(values, sort_keys=False))
    return out


@dataclasses.dataclass
class Outcome:
    """How the rounds ended: the last decision (None if no look was taken), the seeds reached, why it
    stopped ('decided', 'max seeds', 'budget', 'interrupted', 'failed') and the last round's summary."""

    decision: object
    n: int
    reason: str
    summary: object = None


def until_decided(
    cfg: StudyConfig,
    run_round: Callable[[StudyConfig], object],
    look: Callable[[StudyConfig, list[int]], object],
    max_seeds: int,
    step: int,
    budget_s: float,
    echo=print,
) -> Outcome:
    """Rounds of seeds with a look after each. run_round(cfg) executes that config's unfinished runs and
    returns the runner's Summary; look(cfg, looks) returns the verdicts after the looks so far (the caller
    binds studylib.analysis.sequential.decide to the store: the study wing does not import the analysis).
    A round is started only when the time it is expected to take (the last round's per-seed time, this
    call) fits what is left of budget_s (0: no budget); before any round of this call has trained (a resumed
    study replays its finished rounds in seconds), when any of the budget is left."""
    looks = look_schedule(len(cfg.grid.seeds), step, max_seeds)
    t0, per_seed, decision, summary = time.monotonic(), None, None, None
    for k, n in enumerate(looks):
        added = n - (looks[k - 1] if k else 0)
        elapsed = time.monotonic() - t0
        expected = per_seed * added if per_seed is not None else 0.0  # unknown until a round of this call ran
        if budget_s and (elapsed >= budget_s or elapsed + expected > budget_s):
            about = f", about {expected / 60:.1f} min" if per_seed is not None else ""
            echo(f"budget: {elapsed / 60:.1f} of {budget_s / 60:.1f} min spent; the next round ({added} seeds{about}) "
                 f"does not fit: stopping before look {k + 1}")  # fmt: skip
            return Outcome(decision, looks[k - 1] if k else 0, "budget", summary)
        start = time.monotonic()
        summary = run_round(with_seeds(cfg, n))
        if summary.interrupted or summary.not_started:
            return Outcome(decision, n, "interrupted", summary)
        if not summary.ok:
            return Outcome(decision, n, "failed", summary)
        if summary.ran:  # a round replayed from the store took no time and says nothing of the rate
            per_seed = (time.monotonic() - start) / added
        decision = look(with_seeds(cfg, n), looks[: k + 1])
        echo(decision.line())
        if decision.done:
            return Outcome(decision, n, "decided" if n < max_seeds else "max seeds", summary)
    return Outcome(decision, looks[-1], "max seeds", summary)


def write_report(runs: str | Path, name: str, outcome: Outcome) -> Path:
    """<runs>/decided-<name>.json: the looks taken, the boundary and every part's verdict."""
    d = outcome.decision
    record = {
        "reason": outcome.reason,
        "seeds": outcome.n,
        "looks": list(d.looks) if d else [],
        "max_seeds": d.max_seeds if d else None,
        "boundary": d.boundary if d else "",
        "parts": [{"part": p.name, "verdict": p.verdict, "look": p.look, "seeds": p.n} for p in d.parts] if d else [],
    }
    out = Path(runs) / f"decided-{name}.json"
    atomic_write_json(out, record)
    return out
