"""The GPU figures of BENCHMARKS.md in one Python script: torch, timm and this project only (no Jupyter).

    python benchmarks/gpu_check.py                       # on a CUDA machine: <= 4 min on an H100/H200
    python benchmarks/gpu_check.py --device cpu          # the same measurements, short, on a CPU (<= 2 min)
    python benchmarks/gpu_check.py --out gpu-check.jsonl

One JSON line per measurement is appended to --out (and printed) as soon as it is taken, so a crash or a
timeout keeps everything measured before it; a measurement that fails is written as {"ok": false, "error"}
and the script goes on. What it measures, on synthetic data:
    versions        torch, timm, CUDA, the device
    reference       the authors-style loop (fp32, eager, per-image augmentation on the host, loss.item())
    single          one run's step as the project trains it (the stage's real Job, compiled as the engine says)
    fused           pre-training M=3 and segmentation M=21, batch 64, in bf16 and in fp32 with TF32
                    -- each with images/s, achieved TFLOP/s (counted matmul FLOPs), and from torch.profiler over
                    a few steps: the GPU-busy fraction, host-to-device copies and synchronisations per step, and
                    the attention kernels that ran; `setup_s` is the warm-up beyond steady steps (a compile)
    fused_compiled  the same groups with the stacked forward and loss compiled as fused_fit compiles them
                    (one fullgraph graph, CUDA graphs under 'reduce-overhead'): `setup_s` is the compile time.
                    On a CPU only the segmentation group, once (fp32: a CPU trains without autocast), to stay short
    deterministic   one segmentation step taken twice from the same state in deterministic mode: equal bits?
    decode          JPEG decoding into the store's layout: nvJPEG on CUDA (libjpeg on a CPU), images/s
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

# deterministic cuBLAS needs its workspace fixed before CUDA starts; it costs nothing measurable elsewhere
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

from studylib.core import train as T  # noqa: E402
from studylib.core.fused import Fused, compile_losses, fused_step, make_fused_optimizer, takes_weight  # noqa: E402
from studylib.study import bench as B  # noqa: E402
from studylib.study import rates as R  # noqa: E402
from studylib.study.config import EngineConfig  # noqa: E402

GPU = B.Box(batch=64, members=(3, 21), warmup=3, min_steps=10, min_seconds=2.0, max_seconds=8.0)
CPU = B.Box(batch=4, members=(2, 3), warmup=1, min_steps=2, min_seconds=0.0, max_seconds=1.0)
TINY = B.Box(batch=2, members=(2, 2), warmup=1, min_steps=1, min_seconds=0.0, max_seconds=0.0)  # the test's
PROFILED_STEPS = 3
PLAN = ("versions", "reference", "single", "fused", "fused_compiled", "deterministic", "decode")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", type=Path, default=Path("gpu-check.jsonl"), help="JSON lines, appended")
    p.add_argument("--model", help="default: viny on CUDA, viny-tiny on a CPU")
    p.add_argument("--decode-n", type=int, help="JPEGs to decode (default 2000 on CUDA, 64 on a CPU)")
    p.add_argument("--tiny", action="store_true", help="batch 2, one step each: that everything runs (tests)")
    p.add_argument("--only", help=f"comma-separated measurements of {', '.join(PLAN)} (default: all)")
    return p.parse_args(argv)


class Recorder:
    """Appends one JSON line per measurement to `out` as it comes; a failed measurement is a line too."""

    def __init__(self, out: Path, device: str, only: set[str]):
        self.out, self.device, self.only = out, device, only
        out.parent.mkdir(parents=True, exist_ok=True)

    def wants(self, *names: str) -> bool:
        return bool(self.only.intersection(names))

    def __call__(self, name: str, measure, **labels) -> dict | None:
        if not self.wants(name):
            return None
        t0 = time.perf_counter()
        try:
            row = {"name": name, **labels, "ok": True, **measure()}
        except Exception as e:  # a check must finish: note it and go on
            row = {"name": name, **labels, "ok": False, "error": f"{type(e).__name__}: {e}"}
            traceback.print_exc(file=sys.stderr)
        finally:
            if self.device == "cuda":
                torch.cuda.empty_cache()
        row["wall_s"] = round(time.perf_counter() - t0, 3)
        line = json.dumps(row, default=str)
        with open(self.out, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)
        return row


def versions(dev: torch.device) -> dict:
    import timm

    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else R.device_name(dev),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- profiling a step


def profile(step, dev: torch.device, steps: int = PROFILED_STEPS) -> dict:
    """Per step, from torch.profiler: host-to-device copies, synchronisations, the GPU-busy fraction of the
    wall time, and the attention kernels that ran (their names; on a CPU the SDPA op's)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    step()  # outside the window: a first call may compile or allocate
    B._now(dev)
    with torch_profile(activities=activities) as prof:
        t0 = B._now(dev)
        for _ in range(steps):
            step()
        wall = B._now(dev) - t0
    events = prof.events()
    names = [e.name for e in events]
    out: dict = {"h2d_copies_per_step": None, "syncs_per_step": None, "gpu_busy": None}  # a CPU has none
    if dev.type == "cuda":
        syncs = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
        out["h2d_copies_per_step"] = sum("HtoD" in n for n in names) / steps
        out["syncs_per_step"] = sum(n in syncs for n in names) / steps
        busy = sum(e.device_time for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
        out["gpu_busy"] = min(1.0, busy / 1e6 / wall) if wall > 0 else None
    attention = sorted({n for n in names if any(k in n.lower() for k in ("flash", "fmha", "attention", "cudnn_sdp"))})
    out["attention_kernels"] = attention[:8]
    return out


# ---------------------------------------------------------------- the measurements


def rate(out: dict, members: int, batch: int, flops: int) -> dict:
    images = members * batch * out["steps"] / out["seconds"]
    return {**out, "images_per_s": images, "tflops": images * flops / 1e12}


def measure_fused(prepared: list, dev, box: B.Box, precision: str, tf32: bool, flops: int) -> dict:
    """bench.fused on these members at `precision`, TF32 as asked, then profiled."""
    sched = dataclasses.replace(prepared[0].sched, precision=precision, tf32=tf32)
    members = [dataclasses.replace(p, sched=sched) for p in prepared]
    steps: list = []
    with T.tf32(dev, tf32):
        out = B.fused(members, dev, box, on_step=steps.append, mode="")
        out = rate(out, len(members), box.batch, flops)
        return {**out, **profile(steps[-1], dev)}


def measure_fused_compiled(prepared: list, dev, box: B.Box, precision: str, tf32: bool, flops: int) -> dict:
    """measure_fused with the group's forward and loss compiled in the engine's mode for this device (compile
    forced on a CPU, where the engine leaves it off), then profiled."""
    sched = dataclasses.replace(prepared[0].sched, precision=precision, tf32=tf32)
    steps: list = []
    with T.tf32(dev, tf32):
        out = rate(compiled_group(prepared, sched, dev, box, on_step=steps.append), len(prepared), box.batch, flops)
        return {**out, **profile(steps[-1], dev)}


def compiled_group(prepared: list, sched: T.Schedule, dev, box: B.Box, on_step=None) -> dict:
    """bench.fused's step (full batches drawn per member, the losses summed on the device) with the stacked
    forward and loss from fused.compile_losses, as fused_fit trains a group with compile on."""
    jobs = [p.job for p in prepared]
    mode = EngineConfig(compile="on").compile_mode(dev)
    group = Fused([j.task.to(dev).train() for j in jobs], dev)
    opt, amp = make_fused_optimizer(group, sched, dev), T.autocast(dev, sched.precision)
    forward = compile_losses(group, jobs[0].loss, mode)
    # every batch here is full: a loss that takes weights gets all ones, as fused_fit passes them
    weight = torch.ones(sched.batch_size, device=dev) if takes_weight(jobs[0].loss) else None
    gens = [torch.Generator().manual_seed(j.seed) for j in jobs]
    total = torch.zeros(len(jobs), device=dev, dtype=torch.float64)

    def step():
        nonlocal total
        drawn = [j.batch(torch.randperm(j.n_train, generator=g)[: sched.batch_size], g) for j, g in zip(jobs, gens)]
        batches = tuple(torch.stack(parts) for parts in zip(*drawn))
        total += fused_step(group, opt, jobs[0].loss, batches, amp, weight, forward).double() * sched.batch_size

    if on_step is not None:
        on_step(step)
    out = B.timed(step, dev, box)
    return {**out, "compile_mode": mode, "precision": B._precision(dev, sched.precision)}


def measure_single(prepared, dev, box: B.Box, flops: int) -> dict:
    steps: list = []
    with T.tf32(dev, prepared.sched.tf32):
        out = rate(B.single(prepared, dev, box, on_step=steps.append), 1, box.batch, flops)
        return {**out, **profile(steps[-1], dev)}


def measure_reference(task: str, model: str, dev, box: B.Box, flops: int) -> dict:
    return rate(B.reference(task, model, dev, box), 1, box.batch, flops)


def deterministic_twice(prepared, dev) -> dict:
    """One step of a segmentation run from the same weights and generator, twice, under deterministic
    algorithms: the weights' sha256 after each, and whether they are equal."""
    job, sched = prepared.job, prepared.sched
    start = {k: v.detach().clone() for k, v in job.task.state_dict().items()}
    before = torch.are_deterministic_algorithms_enabled()
    digests = []
    try:
        T.deterministic_setup()
        for _ in range(2):
            torch.manual_seed(0)  # what a step may draw from the global generator (drop path) is part of its state
            job.task.load_state_dict(start)
            job.task.zero_grad(set_to_none=True)  # the first step's gradients would add to the second's
            job.task.to(dev).train()
            opt, g = T.make_optimizer(job.task, sched, dev), torch.Generator().manual_seed(0)
            with T.autocast(dev, sched.precision):
                loss = job.step(torch.arange(min(job.n_train, sched.batch_size)), g)
            loss.backward()
            opt.step()
            digests.append(_digest(job.task))
    finally:
        torch.use_deterministic_algorithms(before)
    return {"equal_bits": digests[0] == digests[1], "sha256": digests}


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for _, p in sorted(module.state_dict().items()):
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def decode_rate(dev: torch.device, n: int) -> dict:
    """Synthetic ImageNet-like JPEGs (benchmarks/decode.py's) decoded in batches into the store's aspect-kept
    layout: nvJPEG on CUDA, torchvision's libjpeg on a CPU; the first batch untimed."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import decode as D

    from studylib.data.decoders import GPU_BATCH, Geometry, decode_jpegs

    with tempfile.TemporaryDirectory(prefix="gpu-check-jpegs-") as folder:
        D.make_jpegs(Path(folder), n, min(8, os.cpu_count() or 1))
        files = sorted(Path(folder).rglob("*.JPEG"))
        geometry, batch = Geometry(144, 2.0), GPU_BATCH
        decode_jpegs(files[:batch], geometry, dev.type)  # warm-up: nvJPEG's handles, allocations
        t0 = B._now(dev)
        got = sum(
            x is not None
            for i in range(0, len(files), batch)
            for x in decode_jpegs(files[i : i + batch], geometry, dev.type)
        )
        seconds = B._now(dev) - t0
    return {"images": n, "decoded": got, "seconds": seconds, "images_per_s": n / seconds, "decoder": dev.type}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; run with --device cpu for the CPU version", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    box = TINY if args.tiny else GPU if dev.type == "cuda" else CPU
    model = args.model or ("viny" if dev.type == "cuda" else "viny-tiny")
    only = set(args.only.split(",")) if args.only else set(PLAN)
    record = Recorder(args.out, dev.type, only)
    record("versions", partial(versions, dev))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        data = B._data(Path(folder) / "cache", box.batch)
        for task, members in zip(("pretrain", "segment"), box.members):
            _stage(record, task, members, model, dev, box, data, Path(folder))
    n = args.decode_n or (8 if args.tiny else 2000 if dev.type == "cuda" else 64)
    record("decode", partial(decode_rate, dev, n))
    return 0


def _stage(record: Recorder, task: str, members: int, model: str, dev, box: B.Box, data: dict, folder: Path) -> None:
    """The measurements of one stage: the authors' loop, the single step, fused in bf16 and fp32+TF32."""
    flops = B.train_flops_per_image(B.model_config(model), task)
    labels = {"stage": task, "model": model, "batch": box.batch}
    record("reference", partial(measure_reference, task, model, dev, box, flops), members=1, **labels)
    if not record.wants("single", "fused", "fused_compiled", "deterministic"):
        return
    prepared = B.prepare_jobs(task, model, dev, data, folder, members, box.batch)
    record("single", partial(measure_single, prepared[0], dev, box, flops), members=1, **labels)
    for precision in ("bf16", "fp32"):
        measure = partial(measure_fused, prepared, dev, box, precision, True, flops)
        record("fused", measure, members=members, asked_precision=precision, tf32=True, **labels)
        if dev.type == "cuda" or (task == "segment" and precision == "fp32"):
            measure = partial(measure_fused_compiled, prepared, dev, box, precision, True, flops)
            record("fused_compiled", measure, members=members, asked_precision=precision, tf32=True, **labels)
    if task == "segment":
        record("deterministic", partial(deterministic_twice, prepared[0], dev), **labels)


if __name__ == "__main__":
    sys.exit(main())
