"""How fast this project trains, measured on one device, and what a study's plan will cost there.

`bench` times, in one process on one device, the training throughput (images per second, steady state:
warm-up steps excluded, the device synchronised before each clock read) of
    reference  a loop in the authors' style: fp32, eager, one model, augmentation per image on the CPU,
               a host-to-device copy of each batch, `loss.item()` every step, a plain (unfused) AdamW;
    single     one run as this project trains it: the stage's real Job (uint8 images on the device,
               augmentation drawn there), `job_step` compiled as EngineConfig decides, bf16 on a GPU;
    single-busy  (a CPU with room for two or more copies) the single step timed in as many processes at once as
               the cores hold at this thread count: the rate per copy with every core busy, as when a study's
               workers train side by side (they share the caches and the memory bandwidth);
    fused      M runs as one stacked model (studylib.core.fused), batch per member, as a group trains;
for pre-training (masked image modelling) and segmentation, on synthetic data (no download), and the
start-up of a Jupyter kernel that imports the stage and plot modules (what every local worker pays once, every
group on a cluster or with engine.reuse_kernels off).
On a CPU `single` is measured under bf16 autocast too (single-bf16): the evidence `precision: auto` decides
by, per model, CPU, kernel ISA and threads (precision_record, precision_pick). Each entry's achieved FLOP/s
is given as a share of a square matmul's rate on the device (fp32, and bf16 where the entry trained in bf16).

`save_rates` keeps a result per device in the run store (<runs>/bench/<device>.json); studylib.study.estimate
turns a plan into predicted wall time per stage from them.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from studylib.core import train as T
from studylib.core.fused import Fused, compile_losses, fused_step, make_fused_optimizer, takes_weight
from studylib.core.fused_fit import job_step
from studylib.core.masking import mim_loss, random_masks
from studylib.core.model import MODELS, MaskedImageModel, Segmenter, ViTConfig, build_encoder, model_config
from studylib.study.config import EngineConfig, ParamError
from studylib.study.provenance import trained_precision
from studylib.study.rates import _key_text, device_name, precision_record

TASKS = ("pretrain", "segment")  # what is measured; the intermediate stage borrows segmentation's rates
KERNEL_CODE = "from studylib.study import stages; from studylib.views import plots"
KERNEL_INCLUDES = (
    "start a Jupyter kernel (jupyter_client KernelManager, IPC sockets), wait until it answers, and execute "
    f"`{KERNEL_CODE}` in it (torch, timm, pandas, plotly imports); not papermill's notebook reading and writing"
)
SEG_CLASSES = 3


@dataclass(frozen=True)
class Box:
    """How long one measurement runs: `warmup` untimed steps, then at least `min_steps` and `min_seconds`,
    stopping at `max_seconds` (a time box: a slow configuration still finishes, with fewer steps)."""

    batch: int
    members: tuple[int, ...]
    warmup: int
    min_steps: int
    min_seconds: float
    max_seconds: float


# smoke: that every entry runs (CI, tests), in seconds on a CPU; its numbers are not measurements
SMOKE = Box(batch=8, members=(1, 4), warmup=1, min_steps=2, min_seconds=0.0, max_seconds=1.0)


def full_box(device: torch.device) -> Box:
    """Batch 64; groups up to 64 on a GPU; three warm-up steps there (a compile, CUDA graphs recorded on the
    second call), one on a CPU (nothing is compiled there by default)."""
    if device.type == "cuda":
        return Box(batch=64, members=(1, 4, 16, 64), warmup=3, min_steps=20, min_seconds=2.0, max_seconds=15.0)
    return Box(batch=64, members=(1, 4, 16), warmup=1, min_steps=20, min_seconds=2.0, max_seconds=15.0)


# ---------------------------------------------------------------- FLOPs


def forward_macs(cfg: ViTConfig, task: str) -> int:
    """Multiply-accumulates of one image's forward pass through the matmuls: the patch embedding, per block
    the qkv, projection and MLP linears over the N patch tokens (the dense path has no CLS token) and the
    two attention matmuls (QK^T and AV, N x N per head), then the task head. Norms, softmax, GELU and the
    loss are left out (a few % at these widths)."""
    n, inner, hidden = cfg.num_patches, cfg.heads * cfg.head_dim, int(cfg.dim * cfg.mlp_ratio)
    linears = cfg.dim * 3 * inner + inner * cfg.dim + 2 * cfg.dim * hidden
    block = n * linears + 2 * n * n * inner
    outputs = {"pretrain": cfg.patch_dim, "segment": cfg.patch_size**2 * SEG_CLASSES}
    if task not in outputs:
        raise ValueError(f"task {task!r}: FLOPs are counted for {', '.join(outputs)}")
    return n * cfg.patch_dim * cfg.dim + cfg.depth * block + n * cfg.dim * outputs[task]


def train_flops_per_image(cfg: ViTConfig, task: str) -> int:
    """FLOPs of one image's training step: 2 per MAC, and backward ~ twice the forward."""
    return 3 * 2 * forward_macs(cfg, task)


# ---------------------------------------------------------------- the device and the clock


def _now(device: torch.device) -> float:
    """The clock once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _say(text: str) -> None:
    if T.progress_enabled():
        print(text, file=sys.stderr, flush=True)


def _note(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def timed(step: Callable[[], None], device: torch.device, box: Box) -> dict:
    """Run `step` box.warmup times, then until the box is full -> steps, seconds and setup_s (the warm-up's
    time beyond that many steady steps: a compile, the first allocations). The stop test reads the host clock
    without waiting for the device (a GPU may lag a little behind); the time reported is read after it."""
    t0 = _now(device)
    for _ in range(box.warmup):
        step()
    warm = _now(device) - t0
    steps, t0 = 0, _now(device)
    while True:
        step()
        steps += 1
        elapsed = time.perf_counter() - t0
        if (steps >= box.min_steps and elapsed >= box.min_seconds) or elapsed >= box.max_seconds:
            break
    seconds = _now(device) - t0
    return {"steps": steps, "seconds": seconds, "setup_s": max(0.0, warm - box.warmup * seconds / steps)}


# ---------------------------------------------------------------- the device's matmul rate


def matmul_box(device: torch.device, smoke: bool) -> Box:
    """A square matmul's side (Box.batch) and time box: 1024 on a CPU (about half a second per precision),
    8192 on a GPU (big enough to fill it); 256 and a few steps in a smoke run."""
    if smoke:
        return Box(batch=256, members=(1,), warmup=1, min_steps=2, min_seconds=0.0, max_seconds=0.2)
    if device.type == "cuda":
        return Box(batch=8192, members=(1,), warmup=3, min_steps=20, min_seconds=0.5, max_seconds=3.0)
    return Box(batch=1024, members=(1,), warmup=1, min_steps=5, min_seconds=0.5, max_seconds=1.0)


def matmul_rate(device: torch.device, dtype: torch.dtype, box: Box) -> float:
    """FLOP/s of a square box.batch-sided matmul in `dtype` (2 n^3 FLOPs each), timed as the entries are;
    fp32 as plain fp32 (no TF32 on a GPU)."""
    n, g = box.batch, torch.Generator().manual_seed(0)
    a, b = (torch.rand(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    with T.tf32(device, False):
        t = timed(lambda: torch.mm(a, b, out=out), device, box)
    return 2 * n**3 * t["steps"] / t["seconds"]


def machine_matmul(device: torch.device, smoke: bool) -> dict:
    """{size, fp32_tflops, bf16_tflops}: the matmul rates each training entry's share is of (None where one
    failed, say a device without bf16)."""
    box = matmul_box(device, smoke)
    out: dict = {"size": box.batch}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        _say(f"matmul {box.batch}x{box.batch} {name}")
        try:
            out[f"{name}_tflops"] = matmul_rate(device, dtype, box) / 1e12
        except Exception as e:
            _note(f"{name} matmul not measured ({type(e).__name__}: {e})")
            out[f"{name}_tflops"] = None
    return out


def add_shares(result: dict) -> None:
    """Each entry's share of the fp32 matmul rate (share_fp32: its achieved TFLOP/s over the matmul's) and, where
    it trained in bf16, of the bf16 rate (share_bf16; else None)."""
    mm = result["matmul"]
    for e in result["entries"]:
        e["share_fp32"] = e["tflops"] / mm["fp32_tflops"] if mm["fp32_tflops"] else None
        bf16 = e.get("precision") == "bf16" and mm["bf16_tflops"]
        e["share_bf16"] = e["tflops"] / mm["bf16_tflops"] if bf16 else None


# ---------------------------------------------------------------- (a) the authors' loop


def _reference_batch(task: str, data: tuple, cfg: ViTConfig, g: torch.Generator, batch: int):
    """One batch augmented image by image on float CPU tensors, as a per-sample Dataset transform would:
    pre-training a random square crop box (area 0.67-1) resized to the model input and a flip, plus masks;
    segmentation a flip of image and trimap and a contrast jitter (its stage's augmentation)."""
    idx = torch.randint(len(data[0]), (batch,), generator=g).tolist()
    if task == "pretrain":
        (images,) = data
        xs = []
        for i in idx:
            side = images.shape[-1]
            crop = max(1, round(side * math.sqrt(0.67 + 0.33 * float(torch.rand(1, generator=g)))))
            top, left = torch.randint(side - crop + 1, (2,), generator=g).tolist()
            x = images[i : i + 1, :, top : top + crop, left : left + crop]
            x = F.interpolate(x, size=cfg.img_size, mode="bilinear", align_corners=False)
            xs.append(x.flip(-1) if float(torch.rand(1, generator=g)) < 0.5 else x)
        return torch.cat(xs), random_masks(batch, cfg.grid, 1, 0.5, g)
    images, masks = data
    xs, ys = [], []
    for i in idx:
        x, y = images[i], masks[i]
        if float(torch.rand(1, generator=g)) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        f = 0.7 + 0.6 * float(torch.rand(1, generator=g))
        xs.append((f * x + (1 - f) * x.mean()).clamp(0, 1))
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def reference(task: str, model: str, device: torch.device, box: Box) -> dict:
    """(a): fp32, eager, one model, the batch augmented on the CPU and copied to the device, the loss read
    back every step, torch.optim.AdamW without its fused kernel (all as the authors' code does)."""
    cfg, g = model_config(model), torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    side = round(cfg.img_size * 1.125) if task == "pretrain" else cfg.img_size
    images = torch.rand(2 * box.batch, 3, side, side, generator=g)
    data = (images,) if task == "pretrain" else (images, torch.randint(SEG_CLASSES, (len(images), side, side)))
    net = (MaskedImageModel if task == "pretrain" else Segmenter)(build_encoder(model, "torch")).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)  # the defaults: no fused kernel

    def step():
        x, y = (t.to(device) for t in _reference_batch(task, data, cfg, g, box.batch))
        out = net(x, y) if task == "pretrain" else net(x)
        loss = mim_loss(out, x, y, cfg.patch_size) if task == "pretrain" else F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()

    return {**timed(step, device, box), "compile_mode": "eager", "precision": "fp32"}


# ---------------------------------------------------------------- (b) and (c): the project's training


def _data(cache: str | Path | None, batch: int) -> dict:
    """A synthetic data section with `batch` training images for each measured stage (and a few test images)."""
    synth = {"seed": 0, "pets": batch + 8, "unlabeled": batch, "intel_train_per_class": 0, "intel_test_per_class": 0}
    return {"kind": "synthetic", "synth": synth, **({"cache": str(cache)} if cache else {})}


def prepare_jobs(task: str, model: str, device: torch.device, data: dict, folder: Path, n: int, batch: int) -> list:
    """n real Prepared runs of the stage (seeds 0..n-1) with `batch` training images each."""
    from studylib.study import stages  # the stages import the data readers: only once a bench runs

    settings = {"epochs": 1, "batch_size": batch}
    out = []
    for seed in range(n):
        run_dir = str(folder / f"{task}-{seed}")
        if task == "pretrain":
            out.append(stages.prepare_pretrain(run_dir, model, data, settings, batch, seed, str(device)))
        else:
            seg = {**settings, "test_size": 8}
            out.append(stages.prepare_segment(run_dir, model, data, seg, "", batch, seed, str(device)))
    return out


def single(
    prepared, device: torch.device, box: Box, on_step: Callable | None = None, precision: str | None = None
) -> dict:
    """(b): one run's training step as train.fit takes it (losses summed on the device, no read-back), compiled
    as the engine's defaults say for this device; a compile that fails falls back to eager, with a note.
    `precision` (train.autocast's values): instead of the stage's (the bf16 step on a CPU, for precision auto)."""
    job, sched = prepared.job, prepared.sched
    precision = precision or sched.precision
    job.task.to(device).train()
    opt, amp = T.make_optimizer(job.task, sched, device), T.autocast(device, precision)
    mode, g = EngineConfig().compile_mode(device), torch.Generator().manual_seed(job.seed)
    total = torch.zeros((), device=device, dtype=torch.float64)

    def step_with(fn):
        def step():
            nonlocal total
            idx = torch.randperm(job.n_train, generator=g)[: sched.batch_size]
            with amp:
                loss = fn(idx, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)

        return step

    try:
        out = timed(_seen(step_with(job_step(job, mode)), on_step), device, box)
    except Exception as e:  # a benchmark must finish: measure eager instead
        if not mode:
            raise
        _note(f"torch.compile (mode {mode!r}) failed ({type(e).__name__}: {e}); measuring eager instead")
        mode = ""
        out = timed(_seen(step_with(job.step), on_step), device, box)
    return {**out, "compile_mode": mode or "eager", "precision": _precision(device, precision)}


def fused(
    prepared: list, device: torch.device, box: Box, on_step: Callable | None = None, mode: str | None = None
) -> dict:
    """(c): the members as one stacked model, stepped as fused_fit trains a group: bf16 on a GPU, the stacked
    forward and loss compiled (fused.compile_losses; every batch is full, so a loss that takes sample weights
    gets ones) in torch.compile's `mode`, by default as the engine's defaults say for this device ('': eager);
    a compile that fails falls back to eager, with a note."""
    jobs, sched = [p.job for p in prepared], prepared[0].sched
    group = Fused([j.task.to(device).train() for j in jobs], device)
    opt, amp = make_fused_optimizer(group, sched, device), T.autocast(device, sched.precision)
    mode = EngineConfig().compile_mode(device) if mode is None else mode
    gens = [torch.Generator().manual_seed(j.seed) for j in jobs]
    total = torch.zeros(len(jobs), device=device, dtype=torch.float64)

    def step_with(forward, weight):
        def step():
            nonlocal total
            n = sched.batch_size
            drawn = [j.batch(torch.randperm(j.n_train, generator=g)[:n], g) for j, g in zip(jobs, gens)]
            batches = tuple(torch.stack(parts) for parts in zip(*drawn))
            losses = fused_step(group, opt, jobs[0].loss, batches, amp, weight, forward)
            total += losses.double() * sched.batch_size

        return step

    try:
        forward = compile_losses(group, jobs[0].loss, mode) if mode else None
        ones = forward is not None and takes_weight(jobs[0].loss)
        weight = torch.ones(sched.batch_size, device=device) if ones else None
        out = timed(_seen(step_with(forward, weight), on_step), device, box)
    except Exception as e:  # a benchmark must finish: measure eager instead
        if not mode:
            raise
        _note(f"fused torch.compile (mode {mode!r}) failed ({type(e).__name__}: {e}); measuring eager instead")
        mode = ""
        out = timed(_seen(step_with(None, None), on_step), device, box)
    return {**out, "compile_mode": mode or "eager", "precision": _precision(device, sched.precision)}


def _seen(step: Callable[[], None], on_step: Callable | None) -> Callable[[], None]:
    """`step`, first handed to `on_step` (gpu_check profiles the very step it timed)."""
    if on_step is not None:
        on_step(step)
    return step


def _precision(device: torch.device, precision: str) -> str:
    return trained_precision(device, precision)


# ---------------------------------------------------------------- (b) with every core busy (a CPU)


def busy_copies(device: torch.device) -> int:
    """Copies of the single step that fill this CPU at this process's thread count (1 on a GPU: nothing to fill)."""
    if device.type != "cpu":
        return 1
    return max(1, (os.cpu_count() or 1) // torch.get_num_threads())


def single_busy(task: str, model: str, data: dict, folder: Path, box: Box, copies: int, timeout: float = 600) -> dict:
    """The single step timed in `copies` spawned processes at once (each with this process's threads, released
    together once all are prepared) -> images_per_s: the mean copy's rate, per_copy: each one's; steps and seconds
    of the slowest copy."""
    ctx = multiprocessing.get_context("spawn")  # not fork: a forked child inherits torch's thread pools
    start, results = ctx.Barrier(copies), ctx.Queue()
    args = (task, model, data, str(folder), box, torch.get_num_threads(), start, results)
    procs = [ctx.Process(target=_busy_copy, args=(*args, i), daemon=True) for i in range(copies)]
    for proc in procs:
        proc.start()
    try:
        outs = [results.get(timeout=timeout) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    failed = [o for o in outs if "error" in o]
    if failed:
        raise RuntimeError(f"a busy copy failed: {failed[0]['error']}")
    rates = [box.batch * o["steps"] / o["seconds"] for o in outs]
    slowest = max(outs, key=lambda o: o["seconds"])
    return {**slowest, "images_per_s": sum(rates) / len(rates), "per_copy": rates, "copies": copies}


def _busy_copy(task, model, data, folder, box, threads, start, results, i) -> None:
    """One copy of single_busy (in its own process): prepare its job, wait for the others, time the step."""
    try:
        torch.set_num_threads(threads)
        cpu = torch.device("cpu")
        prepared = prepare_jobs(task, model, cpu, data, Path(folder) / f"busy-{i}", 1, box.batch)[0]
        start.wait()
        results.put(single(prepared, cpu, box))
    except Exception as e:  # the parent raises it; a copy that dies silently would hang the bench
        start.abort()
        results.put({"error": f"{type(e).__name__}: {e}"})


# ---------------------------------------------------------------- kernel start-up


def kernel_startup(timeout: float = 300) -> float:
    """Seconds from starting a Jupyter kernel to the reply of KERNEL_CODE executed in it (see KERNEL_INCLUDES)."""
    from jupyter_client.manager import KernelManager

    folder = Path(tempfile.mkdtemp(prefix="studylib-bench-kernel-"))
    km = KernelManager(kernel_name="python3", transport="ipc", ip=str(folder / "kernel"))
    try:
        t0 = time.perf_counter()
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=timeout)
            reply = kc.execute_interactive(KERNEL_CODE, timeout=timeout, output_hook=lambda msg: None)
            seconds = time.perf_counter() - t0
        finally:
            kc.stop_channels()
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"the kernel could not run {KERNEL_CODE!r}: {reply['content'].get('evalue')}")
        return seconds
    finally:
        km.shutdown_kernel(now=True)
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- the bench


def bench(device: str = "auto", smoke: bool = False, model: str | None = None, cache: str | Path | None = None) -> dict:
    """Measure every entry on one device -> {device, device_type, model, smoke, batch, note, matmul: {size,
    fp32_tflops, bf16_tflops}, kernel_startup_s, kernel_includes, precision_auto (precision_record), entries:
    [{stage, what, members, batch, images_per_s, x_reference, tflops, share_fp32, share_bf16, steps, seconds,
    setup_s, compile_mode, precision}]}. `smoke`: viny-tiny, batch 8, M 1 and 4, a few steps (seconds on a CPU);
    otherwise the study's model (viny on a GPU; viny-tiny on a CPU unless `model` says otherwise), batch 64.
    `cache`: where the synthetic data is written (default: the user's cache folder)."""
    dev = T.resolve_device(device)
    box = SMOKE if smoke else full_box(dev)
    default = "viny-tiny" if smoke or dev.type == "cpu" else "viny"
    name = model or default
    if name not in MODELS:  # before any work
        raise ParamError(f"model {name!r}: not one of {', '.join(MODELS)}")
    result = {
        "device": device_name(dev),
        "device_type": dev.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": name,
        "smoke": smoke,
        "batch": box.batch,
        "note": _model_note(name, dev, smoke, model),
        "matmul": machine_matmul(dev, smoke),
        "entries": [],
    }
    with tempfile.TemporaryDirectory(prefix="studylib-bench-") as folder:
        data = _data(cache, box.batch)
        for task in TASKS:
            result["entries"] += _measure_task(task, name, dev, data, Path(folder), box)
    add_shares(result)
    result["precision_auto"] = precision_record(result)
    _say("kernel start-up")
    try:
        result["kernel_startup_s"] = kernel_startup()
    except Exception as e:  # a machine without Jupyter (a bare GPU box) still gets its training rates
        _note(f"kernel start-up not measured ({type(e).__name__}: {e})")
        result["kernel_startup_s"] = None
    result["kernel_includes"] = KERNEL_INCLUDES
    return result


def _model_note(name: str, dev: torch.device, smoke: bool, asked: str | None) -> str:
    if asked:
        return f"model {name} as asked"
    if smoke:
        return (
            "smoke: viny-tiny, batch 8, groups of 1 and 4, a few steps: a check that everything runs, not a measurement"
        )
    if dev.type == "cpu":
        return "on a CPU the bench measures viny-tiny, not the study's viny (~16x the compute per image): --model viny"
    return "the study's model"


def _measure_task(task: str, model: str, dev: torch.device, data: dict, folder: Path, box: Box) -> list[dict]:
    """The reference, single and fused entries of one stage; one that fails (say, out of memory) is noted
    and left out, so the bench always finishes."""
    flops = train_flops_per_image(model_config(model), task)
    prepared = prepare_jobs(task, model, dev, data, folder, max(box.members), box.batch)
    plans = [
        ("reference", 1, lambda: reference(task, model, dev, box)),
        ("single", 1, lambda: single(prepared[0], dev, box)),
    ]
    if dev.type == "cpu":  # precision auto's evidence: the same step under bf16 autocast (a GPU's single is bf16)
        plans.append(("single-bf16", 1, lambda: single(prepared[0], dev, box, precision=T.BF16_CPU_TOO)))
    if busy_copies(dev) > 1:
        plans.append(("single-busy", 1, lambda: single_busy(task, model, data, folder, box, busy_copies(dev))))
    plans += [("fused", m, lambda m=m: fused(prepared[:m], dev, box)) for m in box.members]
    entries: list[dict] = []
    for what, members, measure in plans:
        _say(f"{task} {what} M={members}")
        try:
            out = measure()
        except Exception as e:
            _note(f"{task} {what} M={members} failed ({type(e).__name__}: {e}); left out")
            continue
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        rate = out.pop("images_per_s", None) or members * box.batch * out["steps"] / out["seconds"]
        ref = entries[0]["images_per_s"] if entries and entries[0]["what"] == "reference" else None
        entries.append(
            {
                "stage": task,
                "what": what,
                "members": members,
                "batch": box.batch,
                "images_per_s": rate,
                "x_reference": rate / ref if ref else (1.0 if what == "reference" else None),
                "tflops": rate * flops / 1e12,
                **out,
            }
        )
    return entries


def table(result: dict) -> str:
    """The result as a plain-text table, with the device, the model and the kernel start-up."""
    head = f"{'what':<21}{'M':>4}{'batch':>7}{'img/s':>11}{'x reference':>13}{'TFLOP/s':>10}{'% fp32 mm':>11}"
    head += f"{'% bf16 mm':>11}"
    lines = [
        f"bench on {result['device']} ({result['threads']} threads), torch {result['torch']}, model {result['model']}",
        f"note: {result['note']}",
        _matmul_line(result.get("matmul")),
        "",
        head,
        "-" * len(head),
    ]
    for e in result["entries"]:
        what = f"{e['stage']} {e['what']}"
        ratio = f"{e['x_reference']:.2f}" if e["x_reference"] is not None else "-"
        shares = "".join(f"{_percent(e.get(k)):>11}" for k in ("share_fp32", "share_bf16"))
        lines.append(
            f"{what:<21}{e['members']:>4}{e['batch']:>7}{e['images_per_s']:>11.1f}{ratio:>13}{e['tflops']:>10.3f}"
            + shares
        )
    startup = result["kernel_startup_s"]
    startup = "not measured" if startup is None else f"{startup:.1f} s"
    lines += ["", f"kernel start-up: {startup} ({result['kernel_includes']})"]
    lines += _precision_lines(result.get("precision_auto") or {})
    return "\n".join(lines)


def _matmul_line(mm: dict | None) -> str:
    if not mm:
        return "matmul: not measured"
    rates = ", ".join(
        f"{p} {mm[f'{p}_tflops']:.3f} TFLOP/s" if mm[f"{p}_tflops"] else f"{p} not measured" for p in ("fp32", "bf16")
    )
    return f"matmul {mm['size']}x{mm['size']}: {rates} (each entry's share below: its TFLOP/s over these)"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def _precision_lines(record: dict) -> list[str]:
    """What precision auto picks per stage from this bench (a CPU's; the intermediate stage by segmentation's)."""
    lines = []
    for found in record.values():
        for stage, rate in sorted(found["stages"].items()):
            if "fp32" in rate and "bf16" in rate:
                pick = "bf16" if rate["bf16"] > rate["fp32"] else "fp32"
                ratio = rate["bf16"] / rate["fp32"]
                lines.append(f"precision auto, {stage}: {pick} (bf16 {ratio:.2f}x fp32 for {_key_text(found)})")
    return [""] + lines if lines else []
