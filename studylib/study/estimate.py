"""What a study's plan will cost on a device: predicted wall time per stage, from the device's bench result
(studylib.study.bench measures and stores it), for the groups the runner will make (grid.schedule).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

from studylib.core.model import model_config
from studylib.study.bench import train_flops_per_image
from studylib.study.config import EngineConfig, PretrainConfig, build, device_type
from studylib.study.grid import STAGES, Run, image_steps, pets_list_sizes, schedule, shape_key
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
    plan: list[Run],
    rates: dict,
    engine: EngineConfig | dict | None = None,
    workers: int = 1,
    executor: str = "local",
    memory: int | None = None,
):
    """Predicted wall seconds per stage and in all, for the runs of `plan` (pass only those left to do), from
    one device's bench result `rates`. The runs go in the groups the runner makes (grid.schedule: the same
    group size, spread over the workers and image-step cap); each group pays one kernel start-up, or, where
    local workers reuse their kernels (engine.reuse_kernels), the study pays one; training
    is the image-steps at the measured steady-state rate for the group's size (fused when engine.fused on
    this device, interpolated between the measured sizes; else the single-run rate, run after run); plus the
    measured warm-up excess (compiles) and an evaluation per run at a third of the single training rate per
    image.

    Modelled: steady-state training, kernel start-up, compile and warm-up, evaluation as forward passes.
    Approximated: the intermediate stage at the segmentation rates (it has no bench of its own; the same
    encoder, a lighter head); another model than the measured one by the ratio of their FLOPs per image.
    Not modelled: reading and decoding the data into the cache (first use), data loading in the finish,
    checkpoint writes, the results notebook, other jobs sharing the device. `workers` overlap only the
    kernel start-ups: concurrent groups share the one device, so their compute adds up. With `memory` (bytes,
    memory_of) an automatic group size is capped so that each group fits (fitted_schedule)."""
    import pandas as pd

    engine = engine if isinstance(engine, EngineConfig) else build(EngineConfig, engine or {}, "engine")
    device = rates["device_type"]
    fuse, scheduled = engine.fused(device), fitted_schedule(plan, engine, device, workers, executor, memory)
    # local workers that keep their kernels start them once, together, with the first groups
    reused, started = engine.reuse_kernels and executor == "local", False
    rows = []
    for stage in STAGES:
        gs = [g for g in scheduled if g.stage == stage]
        parts = [group_seconds(g, rates, fuse) for g in gs]
        row = {"stage": stage, "runs": sum(len(g.runs) for g in gs), "groups": len(gs)}
        for key in ("image_steps", "train_s", "setup_s", "finish_s"):
            row[key] = sum(p[key] for p in parts)
        starts = (1 if gs and not started else 0) if reused else math.ceil(len(gs) / max(1, workers))
        started = started or bool(gs)
        # a bench on a machine without Jupyter has no start-up figure: its groups then start for free here
        row["startup_s"] = starts * (rates["kernel_startup_s"] or 0.0)
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


# ---------------------------------------------------------------- memory per group

GiB = 1024**3
HEADROOM = 0.9  # of a device's memory a group may plan to use: the rest for the CUDA context, allocator slack
MASK_BYTES = 1  # a trimap pixel on the device (uint8)


@functools.cache
def parameters(model: str, stage: str) -> int:
    """Trainable parameters of a stage's task model (the intermediate stage: a classification head, as Intel's)."""
    import torch

    from studylib.core.model import Classifier, MaskedImageModel, Segmenter, build_encoder

    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        enc = build_encoder(model)
        task = {"pretrain": lambda: MaskedImageModel(enc), "segment": lambda: Segmenter(enc, 3)}.get(
            stage, lambda: Classifier(enc, 6)
        )()
    return sum(p.numel() for p in task.parameters() if p.requires_grad)


def image_bytes(run: Run) -> int:
    """Device bytes of one training image as the stage holds it: uint8 RGB at the stored geometry (pre-training:
    the aspect-kept cache, short side img_size x (1 + cache_margin), long side twice that), plus its trimap
    (segmentation)."""
    cfg = model_config(run.params["model"])
    if run.stage == "pretrain":
        s = build(PretrainConfig, run.params["settings"], "pretrain")
        short = round(cfg.img_size * (1 + s.cache_margin))
        return 3 * short * round(short * 2.0)
    return (3 + (MASK_BYTES if run.stage == "segment" else 0)) * cfg.img_size**2


def distinct_images(runs: list[Run]) -> int:
    """Images a group holds once on the device (data.resident): the union of its members' training sets.
    Pre-training members of one size are seeded subsets of one folder: at most the sum of their sizes (the
    folder's size is not read here: an upper bound). Segmentation members draw from the Pets pool: at most the
    sum of their sizes and at most the pool less its test set. Intermediate members train on one set (Intel's
    training images, or the Pets images outside the test split): held once."""
    first = runs[0]
    if first.stage == "intermediate":
        return image_steps(first) // max(1, first.params["settings"]["epochs"])
    total = sum(r.params["size"] for r in runs)
    if first.stage == "segment":
        trainval, test = pets_list_sizes(first.params["data"])
        return min(total, trainval + test - first.params["settings"].get("test_size", 0))
    return total


def member_bytes(run: Run, precision_bytes: int = 4) -> int:
    """Device bytes of one member beside the images: 16 per parameter (fp32 weights, gradients and AdamW's two
    moments) plus the activations a training step keeps for backward at the run's batch size B:
        B x [4 x 3 S^2 (the float input and its augmented copies)
             + depth x N x (4 inner + 2 heads N + 4 dim + 2 hidden) (qkv, attention output, the attention scores
               and probabilities, norms and residuals, the MLP hidden before and after GELU)] x precision_bytes
    with N tokens, inner = heads x head_dim, hidden = dim x mlp_ratio: a model of the eager step (a compiled
    or flash-attention step keeps less), not a measurement."""
    cfg = model_config(run.params["model"])
    settings = run.params["settings"]
    batch = settings.get("batch_size") or _default_batch(run.stage)
    n, inner, hidden = cfg.num_patches, cfg.heads * cfg.head_dim, int(cfg.dim * cfg.mlp_ratio)
    per_image = 4 * 3 * cfg.img_size**2 + cfg.depth * n * (4 * inner + 2 * cfg.heads * n + 4 * cfg.dim + 2 * hidden)
    return 16 * parameters(run.params["model"], run.stage) + batch * per_image * precision_bytes


def _default_batch(stage: str) -> int:
    from studylib.study.config import IntermediateConfig, SegmentConfig

    kind = {"pretrain": PretrainConfig, "intermediate": IntermediateConfig, "segment": SegmentConfig}[stage]
    return build(kind, {}, stage).batch_size


def group_memory(runs: list[Run], fused: bool) -> dict:
    """One group's memory in bytes: on its device the images once (the union, data.resident) plus every member
    (fused: all at once; one after another: the largest one, whose images only are held);
    on the host, at most one member's set while it loads (read from the store, then its channel-first copy)."""
    if fused and len(runs) > 1:
        device = distinct_images(runs) * image_bytes(runs[0]) + sum(member_bytes(r) for r in runs)
    else:
        device = max(distinct_images([r]) * image_bytes(r) + member_bytes(r) for r in runs)
    host = 2 * max(distinct_images([r]) * image_bytes(r) for r in runs)
    return {"device_bytes": device, "host_bytes": host}


def memory_of(device_type: str) -> int | None:
    """Bytes a group may use on this machine's device of `device_type`: HEADROOM of the GPU's memory (the current
    CUDA device), or of the host's physical memory for a CPU; None where it cannot be read."""
    if device_type == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        return int(HEADROOM * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    try:
        return int(HEADROOM * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def fitting_size(runs: list[Run], limit: int, fused: bool, memory: int | None) -> int:
    """The largest group size up to `limit` whose groups of these runs (one shape) fit in `memory` bytes; at
    least 1 (a single run that does not fit is the estimate's warning, not a smaller group)."""
    if memory is None:
        return limit
    order = sorted(runs, key=lambda r: -r.params.get("size", 0))
    for m in range(min(limit, len(runs)), 1, -1):
        if group_memory(order[:m], fused)["device_bytes"] <= memory:
            return m
    return 1


def fitted_schedule(
    runs: list[Run], engine: EngineConfig, device: str, workers: int, executor: str = "local", memory=None
):
    """grid.schedule, with an automatic group size (engine.group_size 0) capped per shape so that each group
    fits in `memory` bytes of the device (memory_of: the GPU's, or the host's on a CPU). An explicit
    group_size is kept as given (the estimate says when it does not fit)."""
    device = device_type(device)
    if engine.group_size or memory is None or not engine.fused(device):  # one after another: one member at a time
        return schedule(runs, engine, device, workers, executor)
    shapes: dict[str, list[Run]] = {}
    for r in runs:
        shapes.setdefault(shape_key(r), []).append(r)
    out = []
    for members in shapes.values():
        size = fitting_size(members, engine.members(device), engine.fused(device), memory)
        out += schedule(members, dataclasses.replace(engine, group_size=size), device, workers, executor)
    return sorted(out, key=lambda g: (STAGES.index(g.stage), -sum(image_steps(r) for r in g.runs)))


def memory_table(scheduled: list, fused: bool, memory: int | None):
    """Per stage: its groups' largest device and host memory (GiB), and how many groups exceed `memory`."""
    import pandas as pd

    rows = []
    for stage in STAGES:
        mems = [group_memory(g.runs, fused) for g in scheduled if g.stage == stage]
        if not mems:
            continue
        rows.append(
            {
                "stage": stage,
                "largest group": max(len(g.runs) for g in scheduled if g.stage == stage),
                "device_GiB": max(m["device_bytes"] for m in mems) / GiB,
                "host_GiB": max(m["host_bytes"] for m in mems) / GiB,
                "too_big": sum(memory is not None and m["device_bytes"] > memory for m in mems),
            }
        )
    return pd.DataFrame(rows)


def format_memory(table, memory: int | None, device_type: str) -> str:
    if table.empty:
        return "no groups to run"
    where = "GPU" if device_type == "cuda" else "host (the CPU's device)"
    known = f"{memory / GiB:.1f} GiB usable ({HEADROOM:.0%} of the {where}'s)" if memory else "unknown here"
    lines = [table.round(2).to_string(index=False), f"memory per group (modelled, not measured): {known}"]
    if memory and table["too_big"].sum():
        lines.append("warning: some groups do not fit: lower engine.group_size or the batch size")
    return "\n".join(lines)
