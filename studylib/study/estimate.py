"""What a study's plan will cost on a device: predicted wall time per stage, from the device's bench result
(studylib.study.bench measures and stores it), for the groups the runner will make (grid.schedule).
"""

from __future__ import annotations

import math

from studylib.core.model import model_config
from studylib.study.bench import train_flops_per_image
from studylib.study.config import EngineConfig, build
from studylib.study.grid import STAGES, Run, image_steps, schedule
from studylib.study.stages import EVAL_BATCH

INTEL_TEST_SHARE = 3_000 / 14_034  # Intel scenes: test images per training image (the real dataset)


def count(n: int, word: str) -> str:
    """'1 worker', '2 workers'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def human_duration(seconds: float) -> str:
    """A duration as a person says it: 'about 40 s', 'about 12 min', 'about 3.2 hours', 'about 56 days'
    (seconds under a minute, minutes under an hour, hours under two days, then days)."""
    if seconds < 59.5:
        return f"about {round(seconds)} s"
    if seconds < 59.5 * 60:
        return f"about {round(seconds / 60)} min"
    hours = seconds / 3600
    if hours < 47.95:
        return f"about {_one_decimal(hours)} {'hour' if _one_decimal(hours) == '1' else 'hours'}"
    days = hours / 24
    return f"about {_one_decimal(days) if days < 9.95 else round(days)} days"


def _one_decimal(x: float) -> str:
    return f"{x:.1f}".removesuffix(".0")


def _interpolate(points: dict[int, float], m: int) -> float:
    """Linear in the group size between the measured sizes; the nearest measured one outside them."""
    ms = sorted(points)
    if m <= ms[0]:
        return points[ms[0]]
    if m >= ms[-1]:
        return points[ms[-1]]
    hi = next(k for k in ms if k >= m)
    lo = max(k for k in ms if k <= m)
    if hi == lo:
        return points[lo]
    return points[lo] + (points[hi] - points[lo]) * (m - lo) / (hi - lo)


def _entries(rates: dict, stage: str, what: str) -> dict[int, dict]:
    task = "segment" if stage == "intermediate" else stage
    return {e["members"]: e for e in rates["entries"] if e["stage"] == task and e["what"] == what}


def _scale(rates: dict, run: Run, stage: str) -> float:
    """Measured rates are of rates['model']: another model's runs go slower in proportion to their FLOPs."""
    task = "segment" if stage == "intermediate" else stage
    measured = train_flops_per_image(model_config(rates["model"]), task)
    return measured / train_flops_per_image(model_config(run.params["model"]), task)


def eval_images(run: Run) -> int:
    """Images the run's finish evaluates (forward only): pre-training its first 256, segmentation its test set,
    an intermediate Pets arm the segmentation test set, an Intel arm the Intel test set (as a share of train)."""
    if run.stage == "pretrain":
        return 0 if run.params["settings"].get("from_encoder") else min(run.params["size"], EVAL_BATCH)
    if run.stage == "segment":
        return run.params["settings"]["test_size"]
    if run.params.get("pets_split"):
        return run.params["pets_split"]["test_size"]
    return round(image_steps(run) / run.params["settings"]["epochs"] * INTEL_TEST_SHARE)


def _single(rates: dict, stage: str) -> dict:
    entry = _entries(rates, stage, "single").get(1)
    if entry is None:
        raise ValueError(f"the bench result of {rates['device']} has no single-run rate for {stage}: run `study bench`")
    return entry


def group_seconds(group, rates: dict, fuse: bool) -> dict:
    """One group's predicted seconds: training (image-steps at the fused rate for its size, or one run after
    another at the single rate), setup (the measured warm-up excess, compiles: once per group fused, once per
    run otherwise; not scaled by FLOPs) and finish (evaluation, a forward ~ a third of a training step)."""
    stage, runs = group.stage, group.runs
    scale, one = _scale(rates, runs[0], stage), _single(rates, stage)
    steps = sum(image_steps(r) for r in runs)
    by_m = _entries(rates, stage, "fused")
    if fuse and len(runs) > 1 and by_m:  # fused_fit trains a group of one alone
        train = steps / (_interpolate({m: e["images_per_s"] for m, e in by_m.items()}, len(runs)) * scale)
        setup = _interpolate({m: e["setup_s"] for m, e in by_m.items()}, len(runs))
    else:
        train, setup = steps / (one["images_per_s"] * scale), len(runs) * one["setup_s"]
    finish = sum(eval_images(r) for r in runs) / (3 * one["images_per_s"] * scale)
    return {"image_steps": steps, "train_s": train, "setup_s": setup, "finish_s": finish}


def estimate(
    plan: list[Run], rates: dict, engine: EngineConfig | dict | None = None, workers: int = 1, executor: str = "local"
):
    """Predicted wall seconds per stage and in all, for the runs of `plan` (pass only those left to do), from
    one device's bench result `rates`. The runs go in the groups the runner makes (grid.schedule: the same
    group size, spread over the workers and image-step cap); each group pays one kernel start-up; training
    is the image-steps at the measured steady-state rate for the group's size (fused when engine.fused on
    this device, interpolated between the measured sizes; else the single-run rate, run after run); plus the
    measured warm-up excess (compiles) and an evaluation per run at a third of the single training rate per
    image.

    Modelled: steady-state training, kernel start-up, compile and warm-up, evaluation as forward passes.
    Approximated: the intermediate stage at the segmentation rates (it has no bench of its own; the same
    encoder, a lighter head); another model than the measured one by the ratio of their FLOPs per image.
    Not modelled: reading and decoding the data into the cache (first use), data loading in the finish,
    checkpoint writes, the results notebook, other jobs sharing the device. `workers` overlap only the
    kernel start-ups: concurrent groups share the one device, so their compute adds up."""
    import pandas as pd

    engine = engine if isinstance(engine, EngineConfig) else build(EngineConfig, engine or {}, "engine")
    device = rates["device_type"]
    fuse, scheduled = engine.fused(device), schedule(plan, engine, device, workers, executor)
    rows = []
    for stage in STAGES:
        gs = [g for g in scheduled if g.stage == stage]
        parts = [group_seconds(g, rates, fuse) for g in gs]
        row = {"stage": stage, "runs": sum(len(g.runs) for g in gs), "groups": len(gs)}
        for key in ("image_steps", "train_s", "setup_s", "finish_s"):
            row[key] = sum(p[key] for p in parts)
        # a bench on a machine without Jupyter has no start-up figure: its groups then start for free here
        row["startup_s"] = math.ceil(len(gs) / max(1, workers)) * (rates["kernel_startup_s"] or 0.0)
        rows.append(row)
    df = pd.DataFrame(rows)
    df.loc[len(df)] = {"stage": "all", **df.drop(columns="stage").sum().to_dict()}
    df["seconds"] = df[["startup_s", "setup_s", "train_s", "finish_s"]].sum(axis=1)
    df["minutes"] = df["seconds"] / 60
    return df.astype({"runs": int, "groups": int, "image_steps": int})


def format_estimate(df, rates: dict, plan: list[Run]) -> str:
    """The estimate as a table, the total in a person's units, and what it stands on."""
    shown = df[["stage", "runs", "groups", "image_steps", "startup_s", "setup_s", "train_s", "finish_s", "minutes"]]
    lines = [shown.round(1).to_string(index=False), "", f"total: {human_duration(df['seconds'].iloc[-1])}"]
    lines.append(f"from the bench of {rates['device']} (model {rates['model']}, batch {rates['batch']})")
    if rates.get("smoke"):
        lines.append("warning: these are smoke rates (a check, not a measurement): run `study bench --runs ...`")
    others = sorted({r.params["model"] for r in plan} - {rates["model"]})
    if others:
        lines.append(f"{', '.join(others)}: scaled from {rates['model']} by the ratio of training FLOPs per image")
    if any(r.stage == "intermediate" for r in plan):
        lines.append("intermediate: at the segmentation rates (a stand-in: the same encoder, another head)")
    lines.append("not included: decoding the data on first use, checkpoint writes, the results notebook")
    return "\n".join(lines)
