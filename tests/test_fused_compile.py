"""Compiled fused groups: the compiled step equals the eager one, a padded last batch gives the unpadded loss and
gradients, and a member left alone in its group takes the plain (compiled) path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from studylib.core import fused_fit
from studylib.core import train as T
from studylib.core.fused import Fused, compile_losses, fused_step, make_fused_optimizer, pad_batch, takes_weight
from studylib.core.model import Segmenter, ViNy, ViTConfig

CPU = torch.device("cpu")
# the smallest encoder that still has every kind of layer (patch conv, attention, MLP, norms): one compile of
# it takes seconds, not the ~40 s of viny-tiny
TINY = ViTConfig("tiny", img_size=16, patch_size=8, dim=16, depth=1, heads=2, head_dim=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for these small steps


def _seg_loss(net, x, y, weight=None):
    """The segmentation loss, with the weighted form a padded batch needs: the per-pixel mean over real samples."""
    logits = net(x).float()
    if weight is None:
        return F.cross_entropy(logits, y)
    per_pixel = F.cross_entropy(logits, y, reduction="none")  # [B, H, W]
    return (per_pixel * weight.view(-1, 1, 1)).sum() / (weight.sum() * per_pixel[0].numel())


def _group(dtype=torch.float32, members: int = 2) -> Fused:
    torch.manual_seed(0)
    return Fused([Segmenter(ViNy(TINY), 3).to(dtype) for _ in range(members)], CPU)


def _batch(b: int, dtype=torch.float32, members: int = 2, seed: int = 1) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(members, b, 3, 16, 16, generator=g, dtype=dtype)
    return x, torch.randint(0, 3, (members, b, 16, 16), generator=g)


def test_a_padded_batch_gives_the_unpadded_loss_and_gradients():
    """Eager, float64: 3 real samples padded to 5 give the 3-sample loss and gradients up to rounding (the sum
    over 5 rows adds exact zeros, in another order); the padding repeats real samples, so nothing is inf."""
    batch = _batch(3, torch.float64)
    padded, weight = pad_batch(batch, 5)
    assert padded[0].shape[:2] == (2, 5) and weight.tolist() == [1, 1, 1, 0, 0]
    assert torch.equal(padded[1][:, 3:], batch[1][:, :2])  # repeated, not zeros
    out = {}
    for name, args, w in [("plain", batch, None), ("padded", padded, weight)]:
        fused = _group(torch.float64)
        losses = fused.losses(_seg_loss, *args, weight=w)
        losses.sum().backward()
        out[name] = losses.detach(), {n: p.grad for n, p in fused.params.items()}
    assert_close(out["padded"][0], out["plain"][0], rtol=1e-12, atol=0)
    assert_close(out["padded"][1], out["plain"][1], rtol=1e-10, atol=1e-14)
    assert pad_batch(batch, 3)[1].tolist() == [1, 1, 1]  # a full batch: same tensors, weight all ones
    assert takes_weight(_seg_loss) and not takes_weight(lambda net, x, y: 0)


def _two_steps(compiled: bool, amp=None) -> tuple[torch.Tensor, dict]:
    """Two steps (a full batch of 4, then a last batch of 3 padded to 4) -> ([2, M] losses, updated leaves)."""
    full, last = _batch(4, seed=1), pad_batch(_batch(3, seed=2), 4)
    fused = _group()
    opt = make_fused_optimizer(fused, T.Schedule(epochs=1, batch_size=4, lr=1e-3), CPU)
    forward = compile_losses(fused, _seg_loss, "default") if compiled else None
    one = fused_step(fused, opt, _seg_loss, full, amp and amp(), torch.ones(4), forward)
    two = fused_step(fused, opt, _seg_loss, last[0], amp and amp(), last[1], forward)
    return torch.stack([one, two]), {n: p.detach().clone() for n, p in fused.params.items()}


def test_the_compiled_fused_step_equals_the_eager_one():
    """fp32, inductor: the same losses and updated weights after two steps, the second padded. Tolerance: measured
    0 in the losses and 4e-7 in the weights (inductor fuses and reorders reductions); AdamW's first steps move a
    weight by about lr = 1e-3 along the sign of its gradient, so a dropped weight, a wrong padding (measured:
    1e-3 in a loss) or a missing update is far above the 1e-5 allowed."""
    eager, compiled = _two_steps(False), _two_steps(True)
    assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-5)
    moved = max((p - q).abs().max() for p, q in zip(eager[1].values(), _group().params.values()))
    assert moved > 1e-4  # the weights did train: the comparison above is not of two untouched copies


def test_the_fused_step_compiles_under_bf16_autocast_as_one_graph():
    """The GPU's default precision: the compiled forward reads the autocast dtype and the matmul leaves inside the
    graph (a cached_property there stopped Dynamo), and a padded last batch reuses the one graph. The losses agree
    with eager bf16 to 1.5e-5 measured; the weights are not compared: bf16 rounding flips the sign of near-zero
    gradients, which AdamW turns into whole lr-sized steps."""
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = _two_steps(True, amp)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
    assert_close(compiled[0], _two_steps(False, amp)[0], rtol=0, atol=1e-4)


def test_a_member_left_alone_takes_the_plain_path(tmp_path, monkeypatch):
    """A fused group whose members resumed at different epochs splits by epoch; one alone at its epoch trains
    through the plain loop (with the compile mode), the others fused (with it too)."""
    calls = []

    def one(job, sched, device, checkpoint_seconds, mode):
        calls.append(("one", job.seed, mode))
        return f"log {job.seed}"

    def fused(jobs, resumed, start, *rest):
        calls.append(("fused", [j.seed for j in jobs], rest))
        return [f"log {j.seed}" for j in jobs]

    monkeypatch.setattr(fused_fit, "_fit_one", one)
    monkeypatch.setattr(fused_fit, "_fit_fused", fused)
    starts = {0: 0, 1: 1, 2: 0}
    monkeypatch.setattr(fused_fit, "_resume", lambda job, sched, device: (starts[job.seed], [], {}))
    jobs = [T.Job(Segmenter(ViNy(TINY), 3), None, _seg_loss, 4, seed, tmp_path / str(seed)) for seed in range(3)]
    sched = T.Schedule(epochs=2, batch_size=4, lr=1e-3)
    assert fused_fit.fit_jobs(jobs, sched, CPU, True, 0.0, "default") == ["log 0", "log 1", "log 2"]
    assert sorted(calls, key=str) == [("fused", [0, 2], (sched, CPU, 0.0, "default")), ("one", 1, "default")]
