"""One training loop for every stage: AdamW with a step schedule, resumable epoch checkpoints,
a JSON-lines log, a quiet-when-batch tqdm bar and a hard stop on a non-finite loss.

A stage supplies `step(idx, g) -> loss` for a batch of dataset indices and the epoch's generator,
or a `Job` (the task, how to draw a batch, the loss) that can also train fused with others (`fit_jobs`).
The data order and every random draw of an epoch come from a generator seeded by (seed, epoch),
so resuming from the checkpoint after epoch e reproduces an uninterrupted run exactly.

The loop never waits for the device inside an epoch: losses accumulate on the device and are read,
and checked for NaN, once at the epoch's end. Checkpoints are written by elapsed time
(`checkpoint_seconds`; 0: after every epoch) and always after the last epoch.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from studylib.core.files import atomic_write_bytes, atomic_write_text

CHECKPOINT = "checkpoint.safetensors"
LOG = "train_log.jsonl"


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good epoch checkpoint is kept."""


@dataclass
class Schedule:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    milestones: list[float] = field(default_factory=list)  # fractions of epochs
    gamma: float = 0.1
    decay_all: bool = False  # weight decay on every parameter (the authors), not only on weight matrices
    precision: str = "bf16"  # "bf16": autocast on a GPU that has bf16; "fp32": never
    tf32: bool = False  # fp32 matmuls and convolutions as TF32 on a CUDA GPU (StageConfig.uses_tf32)

    def lr_at(self, epoch: int) -> float:
        """Step schedule: multiply by gamma at each milestone epoch (round(fraction * epochs))."""
        drops = sum(epoch >= round(m * self.epochs) for m in self.milestones)
        return self.lr * self.gamma**drops


def progress_enabled() -> bool:
    """Bars only for a person watching: off under CI, papermill runs and pipes."""
    if os.environ.get("CI") or os.environ.get("STUDYLIB_PROGRESS") == "0":
        return False
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda requested but no GPU is visible; use device: auto or cpu")
    return torch.device(name)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def param_groups(model: torch.nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """No weight decay on biases, norms and learned tokens (timm / MAE convention), unless `decay_all`
    (the authors' code decays every parameter)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not decay_all and (p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "mask_token"))):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, sched: Schedule, device: torch.device) -> torch.optim.AdamW:
    groups = param_groups(model, sched.weight_decay, sched.decay_all)
    return torch.optim.AdamW(groups, lr=sched.lr, fused=device.type == "cuda")


BF16_CPU_TOO = "bf16+cpu"  # what precision 'auto' becomes on a CPU where the bench measured bf16 faster


def autocast(device: torch.device, precision: str):
    """bf16 autocast on a GPU that supports it when precision is 'bf16' or 'auto' (an 'auto' not resolved
    further: fp32 on a CPU, as without bench rates); BF16_CPU_TOO also on a CPU; otherwise full fp32 (a GPU
    without native bf16 trains in fp32 rather than fp16, which would need a loss scaler)."""
    if precision not in ("bf16", "auto", BF16_CPU_TOO, "fp32"):
        raise ValueError(f"precision {precision!r}: one of bf16, auto, {BF16_CPU_TOO}, fp32")
    if precision == "fp32":
        return nullcontext()
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and precision == BF16_CPU_TOO:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def tf32(device: torch.device, on: bool):
    """TF32 for fp32 matmuls and convolutions on a CUDA GPU while the block runs (the flags restored after);
    nothing on a CPU."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    before = [f.allow_tf32 for f in flags]
    for f in flags:
        f.allow_tf32 = on
    try:
        yield
    finally:
        for f, value in zip(flags, before):
            f.allow_tf32 = value


CUBLAS_WORKSPACE = ":4096:8"  # a fixed cuBLAS workspace: what deterministic cuBLAS needs (CUDA >= 10.2)


def deterministic_setup(environ=None) -> None:
    """Deterministic kernels everywhere, for bit-identical resumes on a GPU too. cuBLAS reads
    CUBLAS_WORKSPACE_CONFIG when CUDA creates its handle, so this must run before anything starts CUDA
    (torch.cuda.is_available() does not); it refuses once CUDA has started without the variable."""
    env = os.environ if environ is None else environ
    if torch.cuda.is_initialized() and env.get("CUBLAS_WORKSPACE_CONFIG") not in (CUBLAS_WORKSPACE, ":16:8"):
        raise RuntimeError(
            "engine.deterministic: CUDA started before CUBLAS_WORKSPACE_CONFIG was set, so cuBLAS is not "
            f"deterministic; set the engine before any GPU work, or export CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE}"
        )
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy over class indices (logits [N, K, ...]), mean. Under deterministic algorithms on CUDA,
    where NLL loss has no deterministic kernel (it refuses), the same loss from elementwise ops and sums:
    equal up to float rounding. Elsewhere F.cross_entropy itself, so CPU numbers do not move."""
    if not _deterministic_cuda(logits):
        return F.cross_entropy(logits, target)
    return _onehot_terms(logits, target).mean()


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """cross_entropy's mean over the samples that `weight` [N] (1 real, 0 padding) keeps: the per-element losses
    [N, ...] weighted per sample, over weight.sum() times the elements of one sample. A batch padded with
    zero-weight samples (core.fused.pad_batch) so gives the unpadded batch's loss and gradients. On
    deterministic CUDA the per-element losses come, as in cross_entropy, from the one-hot formulation (no gather:
    its backward has no deterministic CUDA kernel)."""
    if _deterministic_cuda(logits):
        terms = _onehot_terms(logits, target)
    else:
        terms = F.cross_entropy(logits, target, reduction="none")
    w = weight.to(terms.dtype).view(-1, *[1] * (terms.dim() - 1))
    return (terms * w).sum() / (weight.sum() * terms[0].numel())


def _deterministic_cuda(logits: torch.Tensor) -> bool:
    return logits.is_cuda and torch.are_deterministic_algorithms_enabled()


def _onehot_terms(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The per-element cross-entropy [N, ...] of logits [N, K, ...] from elementwise ops and a sum over K."""
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(logits.dtype)
    return -(F.log_softmax(logits, dim=1) * onehot).sum(1)


@dataclass
class Job:
    """One run's training as the loop sees it. `batch(idx, g)` draws the batch tensors for dataset
    indices idx (random draws from g, in a fixed order); `loss(model, *batch)` is the scalar loss,
    calling `model` like the task. Kept apart so that runs of one shape can train fused (one stacked
    model, studylib.core.fused) with each member's own batches."""

    task: torch.nn.Module
    batch: Callable[[torch.Tensor, torch.Generator], tuple]
    loss: Callable[..., torch.Tensor]
    n_train: int
    seed: int
    run_dir: Path
    desc: str = "train"
    # batch's two halves, where a stage gives them: `draw(idx, g)` the host draws (tensors, or None, or plain
    # numbers), `apply(*draws on the device)` the batch; a fused group sends every member's draws in one copy
    draw: Callable[[torch.Tensor, torch.Generator], tuple] | None = None
    apply: Callable[..., tuple] | None = None

    def step(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.loss(self.task, *self.batch(idx, g))


# ---------------------------------------------------------------- checkpoints (safetensors, no pickle)


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, meta: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    atomic_write_bytes(path, save(tensors, metadata={"meta": json.dumps(meta)}))


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    sd = opt.state_dict()
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)
    return meta


# ---------------------------------------------------------------- the loop


def resume(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    """Load run_dir's checkpoint into model and opt when there is one -> (epochs done, their log);
    the log file is rewritten to hold exactly those epochs (a crash may have logged one more)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    start, history = 0, []
    if (run_dir / CHECKPOINT).exists():
        meta = load_checkpoint(run_dir / CHECKPOINT, model, opt)
        start, history = meta["epoch"], meta["history"]
    atomic_write_text(run_dir / LOG, "".join(json.dumps(r) + "\n" for r in history))
    return start, history


def check_finite(loss: float, desc: str, epoch: int) -> float:
    if not math.isfinite(loss):
        raise NonFiniteLoss(
            f"{desc}: the loss became {loss} during epoch {epoch + 1}; the checkpoint of epoch {epoch} (or the "
            f"last one saved before it) is kept. Lower the learning rate or check the inputs, then rerun to resume."
        )
    return loss


def fit(
    model: torch.nn.Module,
    step: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    n_train: int,
    sched: Schedule,
    seed: int,
    run_dir: str | Path,
    device: torch.device,
    desc: str = "train",
    on_epoch_end: Callable[[int, dict], None] | None = None,
    checkpoint_seconds: float = 0.0,
) -> list[dict]:
    """Train for sched.epochs, resuming from run_dir/checkpoint.safetensors when present.
    Returns the per-epoch log (also appended to run_dir/train_log.jsonl)."""
    run_dir = Path(run_dir)
    model.to(device).train()
    opt = make_optimizer(model, sched, device)
    start, history = resume(run_dir, model, opt)
    amp = autocast(device, sched.precision)
    last_save = time.time()
    steps_per_epoch = -(-n_train // sched.batch_size)
    bar = tqdm(
        total=sched.epochs * steps_per_epoch,
        initial=start * steps_per_epoch,
        desc=desc,
        disable=not progress_enabled(),
        leave=False,
    )
    for epoch in range(start, sched.epochs):
        lr = sched.lr_at(epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        g = epoch_generator(seed, epoch)
        order = torch.randperm(n_train, generator=g)
        t0, total = time.time(), torch.zeros((), device=device, dtype=torch.float64)
        for b in range(steps_per_epoch):
            idx = order[b * sched.batch_size : (b + 1) * sched.batch_size]
            with amp:
                loss = step(idx, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)  # on the device: no wait for it per step
            bar.update(1)
        record = {"epoch": epoch + 1, "loss": check_finite(total.item() / n_train, desc, epoch), "lr": lr}
        record["seconds"] = round(time.time() - t0, 3)
        history.append(record)
        with open(run_dir / LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
        if epoch + 1 == sched.epochs or time.time() - last_save >= checkpoint_seconds:
            save_checkpoint(run_dir / CHECKPOINT, model, opt, {"epoch": epoch + 1, "history": history})
            last_save = time.time()
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    bar.close()
    model.eval()
    return history
