"""Train a group of same-shaped runs: one after another, or fused into one stacked model.

Fused, the members step together (studylib.core.fused): each still draws its own data order and
augmentations from its own (seed, epoch) generator, in the same order as when trained alone, and
writes its own log and checkpoint, in the same format, so a member can resume alone or in a group.
A member whose loss turns non-finite is stopped and reported; the others go on (their slices of the
stacked weights never mix with its own). With a compile mode, a group's forward and loss are compiled as one
graph (and CUDA graphs under 'reduce-overhead'), the last batch padded when the loss takes sample weights.
"""

from __future__ import annotations

import functools
import json
import time

import torch

from studylib.core import augment as A
from studylib.core import train as T
from studylib.core.fused import Fused, compile_losses, fused_step, make_fused_optimizer, pad_batch, takes_weight


def job_step(job: T.Job, compile_mode: str = ""):
    """The job's step; with `compile_mode` ('default', or 'reduce-overhead' for CUDA graphs) the model
    and loss are compiled, not the batch drawing (its generator calls would split the graph)."""
    if not compile_mode:
        return job.step
    loss = torch.compile(functools.partial(job.loss, job.task), mode=compile_mode, dynamic=False)
    return lambda idx, g: loss(*job.batch(idx, g))


def fit_jobs(
    jobs: list[T.Job],
    sched: T.Schedule,
    device: torch.device,
    fuse: bool = False,
    checkpoint_seconds: float = 0.0,
    compile_mode: str = "",
) -> list:
    """Train every job -> per job its log (list of epoch records) or the exception that stopped it. Fused,
    members resumed at the same epoch step together; one left alone takes the plain path (the fused path ran
    a group of one at 0.43x the plain step), compiled by `compile_mode` either way."""
    if not fuse or len(jobs) < 2:
        return [_fit_one(job, sched, device, checkpoint_seconds, compile_mode) for job in jobs]
    out: dict[int, object] = {}
    resumed = [_resume(job, sched, device) for job in jobs]
    shapes: dict[tuple, list[int]] = {}  # members resumed at different epochs, or of other sizes, cannot step together
    for i, (job, (start, _, _)) in enumerate(zip(jobs, resumed)):
        shapes.setdefault((start, job.n_train), []).append(i)
    for (start, _), members in sorted(shapes.items()):
        if len(members) == 1:  # the plain loop resumes it again from the same checkpoint
            out[members[0]] = _fit_one(jobs[members[0]], sched, device, checkpoint_seconds, compile_mode)
            continue
        group, states = [jobs[i] for i in members], [resumed[i] for i in members]
        trained = _fit_fused(group, states, start, sched, device, checkpoint_seconds, compile_mode)
        out.update(zip(members, trained))
    return [out[i] for i in range(len(jobs))]


def _fit_one(job, sched, device, checkpoint_seconds, compile_mode):
    try:
        step = job_step(job, compile_mode)
        return T.fit(
            job.task, step, job.n_train, sched, job.seed, job.run_dir, device, job.desc, None, checkpoint_seconds
        )
    except Exception as e:  # reported per member: one bad run must not stop the others
        return e


def _resume(job: T.Job, sched: T.Schedule, device) -> tuple[int, list[dict], dict]:
    """Load the member's checkpoint, if any, into its task -> (epochs done, their log, its optimiser state)."""
    job.task.to(device).train()
    opt = T.make_optimizer(job.task, sched, device)
    start, history = T.resume(job.run_dir, job.task, opt)
    return start, history, opt.state_dict()["state"]


def _fit_fused(
    jobs: list[T.Job], resumed: list[tuple], start: int, sched, device, checkpoint_seconds: float, compile_mode=""
) -> list:
    fused = Fused([j.task for j in jobs], device)
    opt = make_fused_optimizer(fused, sched, device)
    forward = compile_losses(fused, jobs[0].loss, compile_mode) if compile_mode else None
    # compiled for one batch shape: a loss that averages over weighted samples gets its last batch padded
    # (else that batch compiles a second graph); eager, nothing is padded, so eager numbers stay as they were
    pad = forward is not None and takes_weight(jobs[0].loss)
    histories = []
    for i, (_, history, state) in enumerate(resumed):
        if state:
            fused.load_member_optimizer_state(opt, i, state)
        histories.append(list(history))
    alive = list(range(len(jobs)))
    failed: dict[int, Exception] = {}
    amp, last_save = T.autocast(device, sched.precision), time.time()
    steps = -(-jobs[0].n_train // sched.batch_size)
    for epoch in range(start, sched.epochs):
        lr = sched.lr_at(epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        gens = [T.epoch_generator(j.seed, epoch) for j in jobs]
        orders = [torch.randperm(j.n_train, generator=g) for j, g in zip(jobs, gens)]
        t0, total = time.time(), torch.zeros(len(jobs), device=device, dtype=torch.float64)
        for b in range(steps):
            sl = slice(b * sched.batch_size, (b + 1) * sched.batch_size)
            drawn = draw_members(jobs, [o[sl] for o in orders], gens, device)
            batches, weight = tuple(torch.stack(parts) for parts in zip(*drawn)), None
            if pad:
                batches, weight = pad_batch(batches, sched.batch_size)
            losses = fused_step(fused, opt, jobs[0].loss, batches, amp, weight, forward)
            total += losses.double() * len(orders[0][sl])
        means = (total / jobs[0].n_train).tolist()  # one read per epoch
        seconds = round(time.time() - t0, 3)
        for i in list(alive):
            try:
                loss = T.check_finite(means[i], jobs[i].desc, epoch)
            except T.NonFiniteLoss as e:
                failed[i] = e
                alive.remove(i)
                continue
            record = {"epoch": epoch + 1, "loss": loss, "lr": lr, "seconds": seconds}
            histories[i].append(record)
            with open(jobs[i].run_dir / T.LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
        if not alive:
            break
        if epoch + 1 == sched.epochs or time.time() - last_save >= checkpoint_seconds:
            _save_members(fused, opt, jobs, alive, histories, epoch + 1, sched, device)
            last_save = time.time()
    fused.write_back([j.task for j in jobs])
    for j in jobs:
        j.task.eval()
    return [failed.get(i, histories[i]) for i in range(len(jobs))]


def draw_members(jobs: list[T.Job], idx: list[torch.Tensor], gens: list[torch.Generator], device) -> list[tuple]:
    """Every member's batch for its indices idx[i], drawn from its own generator in its own order; where the
    stages give the two halves of their batch (Job.draw / Job.apply), all members' host draws go to the device
    in ONE copy per step (A.to_device), not one per member."""
    if any(j.draw is None or j.apply is None for j in jobs):
        return [j.batch(i, g) for j, i, g in zip(jobs, idx, gens)]
    host = [j.draw(i, g) for j, i, g in zip(jobs, idx, gens)]
    moved = iter(A.to_device(device, *(t for d in host for t in d)))
    return [j.apply(*(next(moved) for _ in d)) for j, d in zip(jobs, host)]


def _save_members(fused, opt, jobs, alive, histories, epoch, sched, device) -> None:
    """Each living member's checkpoint, in the format a run trained alone writes."""
    fused.write_back([j.task for j in jobs])
    for i in alive:
        member_opt = T.make_optimizer(jobs[i].task, sched, device)
        sd = member_opt.state_dict()
        sd["state"] = fused.member_optimizer_state(opt, i)
        member_opt.load_state_dict(sd)
        meta = {"epoch": epoch, "history": histories[i]}
        T.save_checkpoint(jobs[i].run_dir / T.CHECKPOINT, jobs[i].task, member_opt, meta)
