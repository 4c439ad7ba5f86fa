"""The GPU path's settings, checked on the CPU: deterministic mode set up before CUDA starts, a deterministic
pixel loss, and TF32 as a stage setting (on for the clean protocol, off for the paper's) that keeps run ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from studylib.core import train as T
from studylib.study import config as C
from studylib.study import groups
from studylib.study.grid import plan

PARAMS = Path(__file__).resolve().parent.parent / "params"


@pytest.fixture
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


# ---------------------------------------------------------------- deterministic mode


def test_deterministic_setup_sets_the_cublas_workspace_and_the_algorithms(monkeypatch, restore_determinism):
    env: dict[str, str] = {}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    T.deterministic_setup(env)
    assert env["CUBLAS_WORKSPACE_CONFIG"] == T.CUBLAS_WORKSPACE
    assert torch.are_deterministic_algorithms_enabled()
    kept = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}  # a user's own valid setting is kept
    T.deterministic_setup(kept)
    assert kept == {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}


def test_deterministic_setup_refuses_once_cuda_started_without_the_workspace(monkeypatch, restore_determinism):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="CUBLAS_WORKSPACE_CONFIG"):
        T.deterministic_setup({})
    T.deterministic_setup({"CUBLAS_WORKSPACE_CONFIG": T.CUBLAS_WORKSPACE})  # set in the shell: fine


def test_a_group_sets_deterministic_mode_before_it_resolves_its_device(monkeypatch, restore_determinism):
    """run_group's first device call (resolve_device: torch.cuda.is_available) finds the workspace set."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = {}

    def resolve(name):
        seen["workspace"] = __import__("os").environ.get("CUBLAS_WORKSPACE_CONFIG")
        seen["deterministic"] = torch.are_deterministic_algorithms_enabled()
        raise KeyboardInterrupt  # stop here: nothing trains

    monkeypatch.setattr(groups, "resolve_device", resolve)
    with pytest.raises(KeyboardInterrupt):
        groups.run_group("segment", [], engine={"deterministic": True}, device="cpu")
    assert seen == {"workspace": T.CUBLAS_WORKSPACE, "deterministic": True}


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (7, 5)])
def test_the_deterministic_cross_entropy_is_f_cross_entropy(shape, monkeypatch, restore_determinism):
    """The formulation used on CUDA in deterministic mode (elementwise ops and sums, no NLL kernel) equals
    F.cross_entropy to float64 rounding, for per-pixel [B, K, H, W] and per-row [N, K] logits; on a CPU the
    loss stays F.cross_entropy's own bits."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(shape[1], (shape[0], *shape[2:]), generator=g)
    torch.use_deterministic_algorithms(True)
    assert torch.equal(T.cross_entropy(logits, target), F.cross_entropy(logits, target))  # the CPU: unchanged
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # as on a GPU
    ours = T.cross_entropy(logits, target)
    monkeypatch.undo()
    (grad_ours,) = torch.autograd.grad(ours, logits)
    ref = F.cross_entropy(logits, target)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- TF32


def _ids(values: dict) -> dict[str, str]:
    return {f"{r.stage} {r.labels}": r.id for r in plan(C.resolve(values))}


def test_tf32_is_on_for_the_clean_protocol_and_off_for_the_papers():
    clean, paper = C.resolve({"protocol": "clean"}), C.resolve({"protocol": "paper"})
    for stage in ("pretrain", "intermediate", "segment"):
        assert getattr(clean, stage).uses_tf32() and not getattr(paper, stage).uses_tf32()
    assert C.resolve({"segment": {"precision": "fp32", "tf32": "on"}}).segment.uses_tf32()


@pytest.mark.parametrize("protocol", ["clean", "paper"])
def test_tf32_at_auto_keeps_every_id_and_an_explicit_value_makes_other_runs(protocol):
    base = {"protocol": protocol, "model": "viny-tiny", "grid": {"finetune_sizes": [16]}}
    auto = _ids({**base, "segment": {"tf32": "auto"}})
    assert auto == _ids(base)
    explicit = _ids({**base, "segment": {"tf32": "on" if protocol == "paper" else "off"}})
    assert set(explicit.values()).isdisjoint(auto.values())


def test_tf32_context_sets_and_restores_the_flags_on_cuda_only():
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    before = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = False
        with T.tf32(torch.device("cpu"), True):
            assert [f.allow_tf32 for f in flags] == [False, False]
        with T.tf32(torch.device("cuda"), True):
            assert [f.allow_tf32 for f in flags] == [True, True]
        assert [f.allow_tf32 for f in flags] == [False, False]
    finally:
        for f, value in zip(flags, before):
            f.allow_tf32 = value


def test_a_stage_schedule_carries_its_tf32():
    from studylib.study.stages import _schedule

    assert _schedule(C.SegmentConfig()).tf32 and not _schedule(C.SegmentConfig(precision="fp32")).tf32


# ---------------------------------------------------------------- host copies released


@pytest.mark.parametrize("stage", ["pretrain", "segment"])
def test_a_prepared_run_keeps_no_host_copy_of_its_training_images(stage, tmp_path, monkeypatch):
    """Once the training images are on the device, nothing the run keeps (its job's closures) holds the host
    tensor: on a GPU a 200k-image pre-training would otherwise hold ~25 GB of host memory per member. The
    'device' here is meta (a copy that is not the host tensor, as CUDA's), so the test runs on a CPU."""
    import gc
    import weakref

    from studylib.study import bench as B
    from studylib.study import stages

    hosts = []
    if stage == "pretrain":
        load = stages.load_image_set

        def spy(*args, **kwargs):
            image_set = load(*args, **kwargs)
            hosts.append(weakref.ref(image_set.images))
            return image_set

        monkeypatch.setattr(stages, "load_image_set", spy)
    else:
        split = stages.segmentation_split

        def spy(*args, **kwargs):
            train, test = split(*args, **kwargs)
            hosts.append(weakref.ref(train.images))
            return train, test

        monkeypatch.setattr(stages, "segmentation_split", spy)
    monkeypatch.setattr(stages, "resolve_device", lambda name: torch.device("meta"))
    (prepared,) = B.prepare_jobs(stage, "viny-tiny", torch.device("meta"), B._data(tmp_path / "c", 4), tmp_path, 1, 4)
    gc.collect()
    assert prepared.job.n_train == 4 and len(hosts) == 1
    assert hosts[0]() is None
