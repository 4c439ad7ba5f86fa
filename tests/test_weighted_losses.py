"""The stages' losses take sample weights: a batch padded with zero-weight samples (what a compiled fused group's
last batch becomes, core.fused.pad_batch) gives the unpadded batch's loss and gradients, and with no weight each
loss is, bit for bit, the formula it had before weights (written out below, independently of the stages). The
stages decode on their own device when called by hand (the loaders are given it)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from studylib.core import fused_fit
from studylib.core import train as T
from studylib.core.fused import pad_batch
from studylib.core.model import Segmenter, ViNy, ViTConfig, patchify
from studylib.data import decoders as DEC
from studylib.study import config as C
from studylib.study import stages

MODEL = "viny-tiny"
VARIANTS = {  # name: (stage, settings, arm)
    "pretrain": ("pretrain", {}, ""),
    "pretrain-authors": ("pretrain", {"loss_per_masked_count": True, "norm_pix_loss": True}, ""),
    "segment": ("segment", {}, ""),
    "segment-authors": ("segment", {"spatial_log_softmax": True, "normalize": False}, ""),
    "intel-mixup": ("intermediate", {}, "intel"),
    "spatial": ("intermediate", {"normalize": False}, "spatial"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for these small steps


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    synth = {"seed": 0, "pets": 20, "unlabeled": 10, "intel_train_per_class": 2, "intel_test_per_class": 1}
    return {"kind": "synthetic", "synth": synth, "cache": str(tmp_path_factory.mktemp("weighted") / "cache")}


def _prepare(name: str, data: dict, run_dir, device: str = "cpu"):
    stage, settings, arm = VARIANTS[name]
    settings, run_dir = {"epochs": 1, "batch_size": 4, **settings}, str(run_dir / name)
    if stage == "pretrain":
        return stages.prepare_pretrain(run_dir, MODEL, data, settings, 10, 0, device)
    if stage == "segment":
        return stages.prepare_segment(run_dir, MODEL, data, {**settings, "test_size": 8}, "", 12, 0, device)
    split, downstream = {"test_size": 8}, {"finetune_size": 12}
    return stages.prepare_intermediate(run_dir, MODEL, data, settings, "", 0, device, arm, split, downstream)


def _loss_and_grads(task, fn) -> tuple[torch.Tensor, dict]:
    task.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


def _padded(batch: tuple, size: int) -> tuple[tuple, torch.Tensor]:
    """pad_batch for one member's batch (no member axis)."""
    padded, weight = pad_batch(tuple(t.unsqueeze(0) for t in batch), size)
    return tuple(t[0] for t in padded), weight


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_padded_batch_with_zero_weights_gives_the_unpadded_loss_and_gradients(name, data, tmp_path):
    """3 real samples padded to 5 (the padding repeats real samples): fp32, measured equal to ~1e-7; without the
    weights the padding moves the loss by ~1e-2 (checked, so the comparison is not of two equal inputs)."""
    job = _prepare(name, data, tmp_path).job
    batch = job.batch(torch.arange(3), torch.Generator().manual_seed(1))
    padded, weight = _padded(batch, 5)
    assert weight.tolist() == [1, 1, 1, 0, 0]
    real = _loss_and_grads(job.task, lambda: job.loss(job.task, *batch))
    weighted = _loss_and_grads(job.task, lambda: job.loss(job.task, *padded, weight=weight))
    assert_close(weighted[0], real[0], rtol=1e-5, atol=1e-6)
    assert weighted[1].keys() == real[1].keys()
    assert_close(weighted[1], real[1], rtol=1e-4, atol=1e-6)
    unweighted = job.loss(job.task, *padded).detach()
    assert (unweighted - real[0]).abs() > 1e-4 * real[0].abs(), "the padding should matter without weights"
    ones = job.loss(job.task, *batch, weight=torch.ones(3)).detach()
    assert_close(ones, real[0], rtol=1e-6, atol=0)


def _old_loss(name: str):
    """The stage's loss as it was before sample weights, as a function of (net, *batch)."""
    stage, settings, arm = VARIANTS[name]
    if stage == "pretrain":
        s, patch = C.build(C.PretrainConfig, settings, "pretrain"), stages.model_config(MODEL).patch_size

        def mim(net, x, mask):
            pred, target = net(x, mask), patchify(x, patch)
            if s.norm_pix_loss:
                mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
                target = (target - mean) / (var + 1e-6).sqrt()
            m = mask.to(pred.dtype)
            loss = ((pred - target).abs().mean(dim=-1) * m).sum() / m.sum().clamp(min=1)
            return loss / (m.sum() / len(m)).clamp(min=1) if s.loss_per_masked_count else loss

        return mim
    if stage == "segment":
        s = C.build(C.SegmentConfig, settings, "segment")

        def seg(net, x, y):
            logits = net(x).float()
            if s.spatial_log_softmax:
                logits = F.log_softmax(logits.flatten(2), dim=2).view_as(logits)
            return F.cross_entropy(logits, y)

        return seg
    if arm == "spatial":
        return lambda net, x, y: F.cross_entropy(net(x).float().flatten(0, 1), y.reshape(-1))
    return lambda net, x, y: torch.sum(-y * F.log_softmax(net(x).float(), dim=-1), dim=-1).mean()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_with_no_weight_each_loss_is_bit_for_bit_its_old_formula(name, data, tmp_path):
    """Eager CPU numbers do not move: the same loss and gradients, every bit, as the formula before weights."""
    job = _prepare(name, data, tmp_path).job
    batch = job.batch(torch.arange(4), torch.Generator().manual_seed(2))
    twin = copy.deepcopy(job.task)
    new = _loss_and_grads(job.task, lambda: job.loss(job.task, *batch))
    old = _loss_and_grads(twin, lambda: _old_loss(name)(twin, *batch))
    assert torch.equal(new[0], old[0]), f"{name}: loss {new[0].item()!r} != {old[0].item()!r}"
    assert new[1].keys() == old[1].keys()
    for n, g in new[1].items():
        assert torch.equal(g, old[1][n]), f"{name}: gradient of {n} differs"


def test_the_deterministic_cuda_formulation_weighs_alike(monkeypatch):
    """weighted_cross_entropy's one-hot path (deterministic CUDA, no gather) forced on the CPU: the same loss and
    gradient as F.cross_entropy's per-element path, for pixel [B, K, H, W] and per-patch [B, K, N] logits."""
    g = torch.Generator().manual_seed(0)
    weight = torch.tensor([1.0, 1.0, 0.0])
    for shape in [(3, 4, 5, 6), (3, 4, 7)]:
        logits = torch.randn(*shape, generator=g, dtype=torch.float64)
        target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
        out = []
        for onehot in (False, True):
            monkeypatch.setattr(T, "_deterministic_cuda", lambda _, onehot=onehot: onehot)
            leaf = logits.clone().requires_grad_()
            loss = T.weighted_cross_entropy(leaf, target, weight)
            loss.backward()
            out.append((loss.detach(), leaf.grad))
        assert_close(out[1], out[0], rtol=1e-12, atol=1e-15)
        assert_close(out[0][0], F.cross_entropy(logits[:2], target[:2]), rtol=1e-12, atol=0)


def test_a_stage_decodes_on_its_own_device_when_called_by_hand(data, tmp_path, monkeypatch):
    """Outside run_group (no decoders.using_device), a stage on a CUDA device hands that device to every loader it
    calls (so nvJPEG decodes), and a stage on the CPU hands the CPU even inside a CUDA group's context. The
    loaders are spies that stop the stage once its last loader is called (no GPU here)."""

    class Loaded(Exception):
        pass

    for device, context in [(torch.device("cuda", 0), "cpu"), (torch.device("cpu"), "cuda")]:
        monkeypatch.setattr(stages, "resolve_device", lambda name, device=device: device)
        for name, loader, calls in [
            ("pretrain", "load_image_set", 1),
            ("segment", "segmentation_split", 1),
            ("intel-mixup", "load_intel", 2),
            ("spatial", "segmentation_split", 1),
        ]:
            seen = []

            def spy(*args, device=None, calls=calls, seen=seen, **kwargs):
                seen.append(device)
                if len(seen) == calls:
                    raise Loaded

            monkeypatch.setattr(stages, loader, spy)
            with DEC.using_device(context), pytest.raises(Loaded):
                _prepare(name, data, tmp_path)
            assert seen == [str(device)] * calls, f"{name}: {loader} decoded for {seen}, the stage is on {device}"


TINY = ViTConfig("tiny", img_size=16, patch_size=8, dim=16, depth=1, heads=2, head_dim=8)


def test_a_compiled_group_pads_the_stage_losses_last_batch_into_its_one_graph(data, tmp_path):
    """fit_jobs, fused and compiled, with the segmentation stage's own loss (on a tiny Segmenter): 7 samples in
    batches of 4, the last of 3 padded to 4, so one graph serves the epoch. Fails where the stage loss takes no
    weight (the last batch is left short and compiles a second graph)."""
    seg_loss = _prepare("segment", data, tmp_path).job.loss

    def batch(idx, g):
        return torch.randn(len(idx), 3, 16, 16, generator=g), torch.randint(0, 3, (len(idx), 16, 16), generator=g)

    jobs = []
    for seed in range(2):
        (tmp_path / f"m{seed}").mkdir()
        torch.manual_seed(seed)
        jobs.append(T.Job(Segmenter(ViNy(TINY), 3), batch, seg_loss, 7, seed, tmp_path / f"m{seed}"))
    sched = T.Schedule(epochs=1, batch_size=4, lr=1e-3, precision="fp32")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    logs = fused_fit.fit_jobs(jobs, sched, torch.device("cpu"), True, 0.0, "default")
    assert all(isinstance(log, list) and len(log) == 1 for log in logs), logs
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
