"""A training step's batch reaches the device in at most one host-to-device copy, and its values are bit for bit
the old formulation's (every draw made from the same generator, in the same order).

The 'device' is meta: a real device for PyTorch (a copy to it is a `_to_copy` / `copy_` the counter sees, and an op
that mixes a host tensor into it is an implicit transfer the counter sees too), with no values, so the count runs on
a CPU. A read back to the host (`.item()`, a sync) fails on meta outright. The values are checked on the CPU against
the old per-step recipe, written out below independently of the stages' closures."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from studylib.core import augment as A
from studylib.core.fused_fit import draw_members
from studylib.core.model import model_config
from studylib.study import config as C
from studylib.study import stages

torch.set_num_threads(2)
aten = torch.ops.aten
MODEL, BATCH = "viny-tiny", 3


# ---------------------------------------------------------------- counting host-to-device copies


def _on_host(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu"


def _off_host(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "cpu"


class _Copies(TorchDispatchMode):
    """Records every aten op that moves host data to another device: an explicit copy (`_to_copy`, `copy_`) from a
    host tensor, or an op that reads a host tensor (not a 0-dim scalar) into a result on the device."""

    def __init__(self, log: list):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat = [a for a in (*args, *kwargs.values()) for a in (a if isinstance(a, (list, tuple)) else [a])]
        outs = out if isinstance(out, (list, tuple)) else [out]
        if func is aten.copy_.default:
            moved = _on_host(args[1]) and _off_host(args[0])
        else:
            moved = any(_off_host(o) for o in outs) and any(_on_host(a) and a.dim() > 0 for a in flat)
        if moved:
            self.log.append(f"{func} {[tuple(a.shape) for a in flat if _on_host(a)]}")
        return out


@contextlib.contextmanager
def host_to_device_copies():
    """-> a list that fills with one line per host-to-device copy made inside the block. The factories that build a
    device tensor from host data in C++ (torch.tensor, as_tensor, Tensor.new_tensor) are not aten ops a dispatch
    mode sees: they are wrapped here."""
    log: list[str] = []

    def wrap(fn, name):
        def counted(*args, **kwargs):
            out = fn(*args, **kwargs)
            if _off_host(out):
                log.append(f"{name} {tuple(out.shape)}")
            return out

        return counted

    saved = [(torch, "tensor"), (torch, "as_tensor"), (torch.Tensor, "new_tensor")]
    originals = [getattr(owner, name) for owner, name in saved]
    try:
        for (owner, name), fn in zip(saved, originals):
            setattr(owner, name, wrap(fn, name))
        with _Copies(log):
            yield log
    finally:
        for (owner, name), fn in zip(saved, originals):
            setattr(owner, name, fn)


def test_the_counter_sees_each_kind_of_copy():
    """The counter itself: an explicit move, a copy into a device tensor, a device tensor from host data, an index
    taken with a host index tensor; and no count for device-only work or a host scalar."""
    dev = torch.zeros(4, device="meta")
    with host_to_device_copies() as log:
        torch.ones(4).to("meta")
        dev.copy_(torch.ones(4))
        dev.new_tensor([1.0, 2.0])
        torch.tensor([1], device="meta")
        dev[torch.tensor([0, 1])]
        assert len(log) == 5, log
        dev * 2 + torch.tensor(3.0)
        torch.where(dev > 0, -1.0, 1.0)
        torch.ones(3).to("cpu")
    assert len(log) == 5, log


# ---------------------------------------------------------------- the stages' batches, as prepared


VARIANTS = {  # name: (stage, settings, size, seed, arm)
    "pretrain": ("pretrain", {}, 10, 0, ""),
    "pretrain-unit2": ("pretrain", {"mask_unit": 32, "crop_scale": [0.2, 1.0]}, 10, 1, ""),
    "segment": ("segment", {}, 12, 0, ""),
    "segment-paper": ("segment", {"frozen_augmentation": True, "normalize": False}, 12, 3, ""),
    "intel-mixup": ("intermediate", {}, 0, 0, "intel"),
    "intel-frozen-no-mixup": ("intermediate", {"mixup_alpha": 0, "frozen_augmentation": True}, 0, 2, "intel"),
    "pets-breeds": ("intermediate", {}, 12, 0, "pets-breeds"),
    "spatial": ("intermediate", {"normalize": False}, 12, 1, "spatial"),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    synth = {"seed": 0, "pets": 20, "unlabeled": 10, "intel_train_per_class": 2, "intel_test_per_class": 1}
    return {"kind": "synthetic", "synth": synth, "cache": str(tmp_path_factory.mktemp("device_copies") / "cache")}


def _prepare(name: str, data: dict, run_dir, device: str, monkeypatch) -> tuple:
    """-> (the variant's prepared job, the host training data its stage loaded: what the old recipe reads)."""
    stage, settings, size, seed, arm = VARIANTS[name]
    settings = {"epochs": 1, "batch_size": BATCH, **settings}
    loaded = {}

    def spy(name, key):
        fn = getattr(stages, name)

        def capture(*args, **kwargs):
            out = fn(*args, **kwargs)
            loaded.setdefault(key, out)
            return out

        monkeypatch.setattr(stages, name, capture)

    spy("load_image_set", "image_set")
    spy("segmentation_split", "split")
    spy("load_intel", "intel")
    run_dir = str(run_dir / name)
    if stage == "pretrain":
        p = stages.prepare_pretrain(run_dir, MODEL, data, settings, size, seed, device)
    elif stage == "segment":
        p = stages.prepare_segment(run_dir, MODEL, data, {**settings, "test_size": 8}, "", size, seed, device)
    else:
        split, downstream = {"test_size": 8}, {"finetune_size": size}
        p = stages.prepare_intermediate(run_dir, MODEL, data, settings, "", seed, device, arm, split, downstream)
    return p.job, loaded


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_training_step_sends_its_batch_in_at_most_one_copy(name, data, tmp_path, monkeypatch):
    """Two steps drawn as the loop draws them (one generator per epoch): the first may make the constants the
    device keeps (ImageNet mean and std, the whole-image box), the second sends at most its one packed buffer
    (index, crops, flips, contrast, MixUp permutation, masks). Fails on one copy per tensor (6-8 a step)."""
    job, _ = _prepare(name, data, tmp_path, "meta", monkeypatch)
    g = torch.Generator().manual_seed(5)
    order = torch.randperm(job.n_train, generator=g)
    job.batch(order[:BATCH], g)
    with host_to_device_copies() as log:
        out = job.batch(order[BATCH : 2 * BATCH], g)
    assert len(log) <= 1, f"{name}: {len(log)} host-to-device copies in one step: {log}"
    assert all(t.device.type == "meta" for t in out)


@pytest.mark.parametrize("name", ["pretrain", "segment", "intel-mixup"])
def test_a_fused_groups_step_sends_every_members_batch_in_one_copy(name, data, tmp_path, monkeypatch):
    """Three members of a group drawn as fused_fit draws them (draw_members): one packed copy for the step,
    not one per member; and on the host each member's batch is the one its own `batch` draws (same bits)."""
    jobs = [_prepare(name, data, tmp_path / f"m{i}", "meta", monkeypatch)[0] for i in range(3)]
    gens = [torch.Generator().manual_seed(5 + i) for i in range(3)]
    idx = [torch.randperm(j.n_train, generator=g)[:BATCH] for j, g in zip(jobs, gens)]
    draw_members(jobs, idx, gens, "meta")  # the first step may make the device's constants
    with host_to_device_copies() as log:
        out = draw_members(jobs, idx, gens, "meta")
    assert len(log) == 1, f"{name}: {len(log)} host-to-device copies for a group of 3: {log}"
    assert len(out) == 3 and all(t.device.type == "meta" for b in out for t in b)
    host = [_prepare(name, data, tmp_path / f"h{i}", "cpu", monkeypatch)[0] for i in range(3)]
    fused = draw_members(host, idx, [torch.Generator().manual_seed(9 + i) for i in range(3)], "cpu")
    alone = [j.batch(i, torch.Generator().manual_seed(9 + k)) for k, (j, i) in enumerate(zip(host, idx))]
    for a, b in zip(fused, alone):
        _assert_same_bits(a, b, name)


# ---------------------------------------------------------------- the same bits as the old recipe


def _old_flip_contrast(n: int, c: float, g) -> dict:
    flip = torch.rand(n, generator=g) < 0.5
    lo, hi = max(0.0, 1 - c), 1 + c
    return {"flip": flip, "contrast": lo + (hi - lo) * torch.rand(n, generator=g)}


def _old_normalize(x):
    mean = torch.tensor(A.IMAGENET_MEAN).view(1, 3, 1, 1)
    return (x - mean) / torch.tensor(A.IMAGENET_STD).view(1, 3, 1, 1)


def _old_whole(n: int):
    return torch.tensor([[0.5, 0.5, 1.0, 1.0]]).repeat(n, 1)


def _old_masks(n: int, grid: int, unit: int, ratio: float, g):
    m = grid // unit
    rank = torch.rand(n, m * m, generator=g).argsort(dim=1).argsort(dim=1)
    units = (rank < int(round(ratio * m * m))).view(n, m, m)
    return units.repeat_interleave(unit, dim=1).repeat_interleave(unit, dim=2).reshape(n, grid * grid)


def _old_pretrain(loaded, s, cfg):
    images, sizes = loaded["image_set"].images, loaded["image_set"].sizes
    unit = (s.mask_unit or cfg.patch_size) // cfg.patch_size

    def batch(idx, g, crops=None):
        x, hw = images[idx].float().div(255), sizes[idx]
        crops = A.random_resized_crop_params(hw, tuple(s.crop_scale), g=g) if crops is None else crops
        flips = torch.rand(len(x), generator=g) < 0.5
        x = _old_normalize(A.warp_images(x, A.crop_grid(crops, hw, flips, cfg.img_size, images.shape[-2:], "cpu")))
        return x, _old_masks(len(x), cfg.grid, unit, s.mask_ratio, g)

    return batch


def _old_draw(frozen: dict, s, idx, g) -> dict:
    """The flip and contrast of images idx: the frozen per-image draws (the paper), else drawn now from g."""
    if s.frozen_augmentation:
        return {k: v[idx] for k, v in frozen.items()}
    return _old_flip_contrast(len(idx), s.contrast, g)


def _old_segment(loaded, s, seed):
    train = loaded["split"][0]
    frozen = _old_flip_contrast(len(train), s.contrast, torch.Generator().manual_seed(seed))

    def batch(idx, g):
        p = _old_draw(frozen, s, idx, g)
        x, y = train.images[idx].float().div(255), train.masks[idx].long()
        grid = A.affine_grid(_old_whole(len(x)), p["flip"], x.shape[-1], "cpu")
        x, y = A.warp_images(x, grid), A.warp_labels(y, grid)
        x = A.adjust_contrast(x, p["contrast"])
        return (_old_normalize(x) if s.normalize else x), y

    return batch


def _old_intermediate(loaded, s, seed, arm, cfg):
    from studylib.data.splits import patch_labels

    train = loaded["intel"] if arm == "intel" else loaded["split"][0]
    labels = patch_labels(train.masks, cfg.grid) if arm == "spatial" else train.labels
    K = {"intel": len(train.classes if arm == "intel" else []), "spatial": 3}.get(arm) or int(labels.max()) + 1
    if arm == "pets-breeds":
        K = int(torch.cat([train.labels, loaded["split"][1].labels]).max()) + 1
    frozen = _old_flip_contrast(len(train), s.contrast, torch.Generator().manual_seed(seed))

    def batch(idx, g):
        p = _old_draw(frozen, s, idx, g)
        x = train.images[idx].float().div(255)
        x = A.adjust_contrast(
            A.warp_images(x, A.affine_grid(_old_whole(len(x)), p["flip"], cfg.img_size, "cpu")), p["contrast"]
        )
        x = _old_normalize(x) if s.normalize else x
        y = labels[idx]
        if arm == "spatial":
            y = y.view(-1, cfg.grid, cfg.grid)
            return x, torch.where(p["flip"].view(-1, 1, 1), y.flip(-1), y).reshape(len(x), -1)
        onehot = F.one_hot(y, K).to(x.dtype)
        if s.mixup_alpha <= 0:
            return x, onehot
        lam = float(
            np.random.default_rng(int(torch.randint(2**31 - 1, (1,), generator=g))).beta(s.mixup_alpha, s.mixup_alpha)
        )
        perm = torch.randperm(len(x), generator=g)
        return lam * x + (1 - lam) * x[perm], lam * onehot + (1 - lam) * onehot[perm]

    return batch


def _old_batch(name: str, loaded: dict):
    stage, settings, _, seed, arm = VARIANTS[name]
    cfg = model_config(MODEL)
    if stage == "pretrain":
        return _old_pretrain(loaded, C.build(C.PretrainConfig, settings, "pretrain"), cfg)
    if stage == "segment":
        return _old_segment(loaded, C.build(C.SegmentConfig, settings, "segment"), seed)
    return _old_intermediate(loaded, C.build(C.IntermediateConfig, settings, "intermediate"), seed, arm, cfg)


def _assert_same_bits(new: tuple, old: tuple, what: str) -> None:
    assert len(new) == len(old), what
    for k, (a, b) in enumerate(zip(new, old)):
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{what}, output {k}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        )
        assert torch.equal(a, b), f"{what}, output {k}: values differ from the old recipe's"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_stage_batch_is_bit_for_bit_the_old_recipes(name, data, tmp_path, monkeypatch):
    """Three steps from one generator (the last one short), as an epoch draws them: the same images, targets and
    masks as the old per-step recipe, and the generator left in the same state (the same number of draws)."""
    job, loaded = _prepare(name, data, tmp_path, "cpu", monkeypatch)
    old = _old_batch(name, loaded)
    g_new, g_old = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    order = torch.randperm(job.n_train, generator=g_new)
    assert torch.equal(order, torch.randperm(job.n_train, generator=g_old))
    for step, start in enumerate((0, BATCH, job.n_train - 2)):
        idx = order[start : start + BATCH]
        _assert_same_bits(job.batch(idx, g_new), old(idx, g_old), f"{name}, step {step}")
    assert torch.equal(g_new.get_state(), g_old.get_state()), f"{name}: the batch drew a different number of values"


@pytest.mark.parametrize("name", ["pretrain", "pretrain-unit2"])
def test_the_pretraining_evaluation_batch_is_the_old_recipes(name, data, tmp_path, monkeypatch):
    """Evaluation's batch: whole images (given crops), flips and masks from its own seeded generator."""
    job, loaded = _prepare(name, data, tmp_path, "cpu", monkeypatch)
    idx = torch.arange(4)
    crops = A.whole_image_params(loaded["image_set"].sizes[idx])
    new = job.batch(idx, torch.Generator().manual_seed(10_000), crops=crops)
    _assert_same_bits(new, _old_batch(name, loaded)(idx, torch.Generator().manual_seed(10_000), crops), name)


@pytest.mark.parametrize("name", ["pretrain", "segment", "intel-mixup"])
def test_a_batch_drawn_inside_bf16_autocast_is_the_fp32_batch(name, data, tmp_path, monkeypatch):
    """The plain loop draws its batch inside the step's autocast, a group outside it: both must get the same
    augmentation. Fails where the sampling grid (a batched matmul) is left to autocast, which rounds it to bf16."""
    job, _ = _prepare(name, data, tmp_path, "cpu", monkeypatch)
    idx = torch.arange(BATCH)
    plain = job.batch(idx, torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = job.batch(idx, torch.Generator().manual_seed(1))
    _assert_same_bits(autocast, plain, f"{name} under autocast")


# ---------------------------------------------------------------- the one copy itself


def _mixed_tensors() -> list:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randperm(7, generator=g),
        torch.rand(5, 4, generator=g),
        torch.rand(3, generator=g, dtype=torch.float64),
        torch.rand(6, generator=g) < 0.5,
        torch.randint(0, 255, (2, 3), generator=g, dtype=torch.uint8),
        torch.tensor(3.5),
        torch.zeros(0, 4, dtype=torch.int32),
        torch.rand(4, 3, generator=g).t(),  # not contiguous
        torch.rand(1, generator=g, dtype=torch.bfloat16),
    ]


def test_pack_and_unpack_return_the_same_bits_dtypes_and_shapes():
    tensors = _mixed_tensors()
    buf, spans = A.pack(tensors)
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    for a, b in zip(A.unpack(buf, spans), tensors):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_to_device_sends_all_host_tensors_in_one_copy():
    tensors = _mixed_tensors()
    on_device = torch.ones(2, device="meta")
    with host_to_device_copies() as log:
        *out, same, none = A.to_device("meta", *tensors, on_device, None)
    assert len(log) == 1, log
    assert same is on_device and none is None
    assert [(t.device.type, t.dtype, t.shape) for t in out] == [("meta", t.dtype, t.shape) for t in tensors]


def test_to_device_on_the_host_copies_nothing():
    tensors = _mixed_tensors()
    assert all(a is b for a, b in zip(A.to_device("cpu", *tensors), tensors))


def test_device_constants_are_made_once():
    with host_to_device_copies() as log:
        a, b = A.full_boxes(3, "meta"), A.full_boxes(5, "meta")
        x = torch.zeros(2, 3, 4, 4, device="meta")
        A.normalize(x)
        made = len(log)
        A.normalize(x)
    assert a.shape == (3, 4) and b.shape == (5, 4) and len(log) == made <= 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_to_device_on_cuda_returns_the_same_bits():
    """The pinned, non-blocking path: read back after a sync, every tensor is bit for bit what was sent."""
    tensors = _mixed_tensors()
    out = A.to_device("cuda", *tensors)
    torch.cuda.synchronize()
    for a, b in zip(out, tensors):
        assert a.is_cuda and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b)
