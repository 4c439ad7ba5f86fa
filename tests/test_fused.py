"""Horizontally fused training: a stacked group trains every member exactly as its separate run would
(losses, weights, weight-decay groups), member checkpoints interchange with separate runs both ways, and
a member whose loss is NaN leaves the others untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.testing import assert_close

from studylib.core import train as T
from studylib.core.fused import Fused, fused_step, make_fused_optimizer, member_optimizer
from studylib.core.masking import mim_loss, random_masks
from studylib.core.model import Classifier, MaskedImageModel, Segmenter, build_encoder, load_encoder, save_encoder

CPU = torch.device("cpu")
B = 2
# lr * weight_decay = 5e-3 a step: a member whose weights sat in the wrong decay group would show at once
SCHED = T.Schedule(epochs=1, batch_size=B, lr=1e-2, weight_decay=0.5)
# float64, so the only differences are rounding: a batched (vmap) matmul sums in another order than a single
# one, ~1e-16 relative, and AdamW's normalised steps carry that into the weights far below 1e-10. 1e-5 is
# a wide margin under any real difference (a wrong decay group, a gradient leaking between members), which
# moves weights by ~1e-3 relative or more
TOL = {"rtol": 1e-5, "atol": 1e-10}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for these small steps


# ------------------------------------------------------------------------------------------ three tasks


def _seg_batch(g: torch.Generator) -> tuple:
    return torch.randn(B, 3, 64, 64, generator=g, dtype=torch.float64), torch.randint(0, 3, (B, 64, 64), generator=g)


def _seg_loss(model, x, y):
    return F.cross_entropy(model(x), y)  # per-pixel over [B, 3, H, W] logits


def _mim_batch(g: torch.Generator) -> tuple:
    return torch.randn(B, 3, 64, 64, generator=g, dtype=torch.float64), random_masks(B, 8, 1, 0.5, g)


def _mim_loss(model, x, mask):
    return mim_loss(model(x, mask), x, mask, 8)


def _cls_batch(g: torch.Generator) -> tuple:
    return torch.randn(B, 3, 64, 64, generator=g, dtype=torch.float64), torch.randint(0, 6, (B,), generator=g)


TASKS = {  # head on an encoder, loss_fn(model, *batch), one member's batch for one step
    "segmenter": (lambda enc: Segmenter(enc, 3), _seg_loss, _seg_batch),
    "mim": (MaskedImageModel, _mim_loss, _mim_batch),
    "classifier": (lambda enc: Classifier(enc, 6), _seg_loss, _cls_batch),
}


def _members(head, tmp_path, count: int = 3) -> list[nn.Module]:
    """float64 members: fresh encoders of different seeds, the last one loaded from a saved parent encoder
    with other weights instead, as a group's members come from different parents."""
    members = []
    for seed in range(count - 1):
        torch.manual_seed(seed)
        members.append(head(build_encoder("viny-tiny")))
    torch.manual_seed(count)
    parent = build_encoder("viny-tiny")
    with torch.no_grad():  # non-trivial biases and norms, so their (absent) weight decay matters
        for p in parent.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_encoder(tmp_path / "parent.safetensors", parent, {})
    members.append(head(load_encoder(tmp_path / "parent.safetensors")))
    return [m.double() for m in members]


def _data(make_batch, steps: int, members: int = 3) -> list[list[tuple]]:
    """data[step][member]: each member's own batch at each step."""
    return [[make_batch(torch.Generator().manual_seed(100 * s + i)) for i in range(members)] for s in range(steps)]


def _stack(step: list[tuple]) -> tuple:
    return tuple(torch.stack(ts) for ts in zip(*step))


# ------------------------------------------------------------------------------------------ two ways to train


def _train_separate(module, loss_fn, batches, opt=None) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    opt = opt or T.make_optimizer(module, SCHED, CPU)
    losses = []
    for batch in batches:
        loss = loss_fn(module, *batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), opt


def _train_fused(fused: Fused, loss_fn, data, opt=None) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    """[steps, M] losses of fused steps over data[step][member]."""
    opt = opt or make_fused_optimizer(fused, SCHED, CPU)
    return torch.stack([fused_step(fused, opt, loss_fn, _stack(step)) for step in data]), opt


def _assert_member_is(fused: Fused, i: int, module: nn.Module) -> None:
    for n, p in module.named_parameters():
        assert_close(fused.params[n][i], p, **TOL, msg=lambda m, n=n: f"{n}: {m}")


# ------------------------------------------------------------------------------------------ same training


@pytest.mark.parametrize("task", TASKS)
def test_a_group_trains_each_member_as_its_separate_run(task, tmp_path):
    head, loss_fn, make_batch = TASKS[task]
    members = _members(head, tmp_path)
    data = _data(make_batch, steps=3)
    fused = Fused(members, CPU)  # copies: the modules stay at their start for the separate runs
    fused_losses, _ = _train_fused(fused, loss_fn, data)
    for i, member in enumerate(members):
        losses, _ = _train_separate(member, loss_fn, [step[i] for step in data])
        assert_close(fused_losses[:, i], losses, **TOL)
        _assert_member_is(fused, i, member)
    assert not torch.equal(fused_losses[:, 0], fused_losses[:, 1])  # the members did differ


def test_decay_groups_are_the_members_partition_by_name():
    torch.manual_seed(0)
    members = [MaskedImageModel(build_encoder("viny-tiny")) for _ in range(2)]
    fused = Fused(members, CPU)
    stacked_name = {id(p): n for n, p in fused.params.items()}
    member_name = {id(p): n for n, p in members[0].named_parameters()}
    for decay_all in (False, True):
        ours = fused.param_groups(0.1, decay_all)
        theirs = T.param_groups(members[0], 0.1, decay_all)
        assert [[stacked_name[id(p)] for p in g["params"]] for g in ours] == [
            [member_name[id(p)] for p in g["params"]] for g in theirs
        ]
        assert [g["weight_decay"] for g in ours] == [0.1, 0.0]
    decay, no_decay = ([stacked_name[id(p)] for p in g["params"]] for g in fused.param_groups(0.1, False))
    assert fused.params["encoder.blocks.0.mlp.fc1.bias"].ndim == 2  # stacked, yet a bias: no decay
    assert {
        "encoder.blocks.0.mlp.fc1.bias",
        "encoder.blocks.0.norm1.weight",
        "encoder.patch_embed.norm_in.bias",
        "encoder.norm.weight",
        "encoder.cls_token",
        "encoder.pos_embed",
        "mask_token",
    } <= set(no_decay)
    assert {"encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight", "head.weight"} <= set(decay)
    assert all(members[0].get_parameter(n).ndim == 2 for n in decay)
    everything, nothing = fused.param_groups(0.1, decay_all=True)
    assert len(everything["params"]) == len(fused.parameters()) and nothing["params"] == []


def test_members_of_different_architectures_are_refused():
    enc = build_encoder("viny-tiny")
    with pytest.raises(ValueError, match="member 1"):
        Fused([Segmenter(enc, 3), Segmenter(enc, 4)], CPU)


# ------------------------------------------------------------------------------------------ checkpoints


def test_a_member_checkpoint_from_a_group_is_a_separate_runs_checkpoint(tmp_path):
    head, loss_fn, make_batch = TASKS["segmenter"]
    members = _members(head, tmp_path, 2)
    data = _data(make_batch, steps=4, members=2)
    own = [step[1] for step in data]  # member 1's batches
    ref = copy.deepcopy(members[1])
    _, ref_opt = _train_separate(ref, loss_fn, own[:2])
    T.save_checkpoint(tmp_path / "separate.safetensors", ref, ref_opt, {"epoch": 2})
    ref_last, _ = _train_separate(ref, loss_fn, own[2:], ref_opt)

    fused = Fused(members, CPU)
    _, opt = _train_fused(fused, loss_fn, data[:2])
    fused.write_back(members)
    T.save_checkpoint(
        tmp_path / "member.safetensors", members[1], member_optimizer(fused, opt, 1, members[1], SCHED, CPU), {}
    )
    separate = load_file(tmp_path / "separate.safetensors")
    member = load_file(tmp_path / "member.safetensors")
    assert member.keys() == separate.keys()
    for k in separate:
        assert_close(member[k], separate[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")

    torch.manual_seed(9)
    resumed = head(build_encoder("viny-tiny")).double()  # other weights: all must come from the file
    resumed_opt = T.make_optimizer(resumed, SCHED, CPU)
    T.load_checkpoint(tmp_path / "member.safetensors", resumed, resumed_opt)
    last, _ = _train_separate(resumed, loss_fn, own[2:], resumed_opt)
    assert_close(last, ref_last, **TOL)
    for (n, p), q in zip(resumed.named_parameters(), ref.parameters()):
        assert_close(p, q, **TOL, msg=lambda m, n=n: f"{n}: {m}")


def test_a_group_resumes_from_its_members_separate_checkpoints(tmp_path):
    head, loss_fn, make_batch = TASKS["mim"]
    members = _members(head, tmp_path, 2)
    data = _data(make_batch, steps=4, members=2)
    ref_losses = []
    for i, m in enumerate(members):  # separate runs of 4 steps that checkpoint after step 2
        own = [step[i] for step in data]
        first, opt = _train_separate(m, loss_fn, own[:2])
        T.save_checkpoint(tmp_path / f"m{i}.safetensors", m, opt, {"epoch": 2})
        ref_losses.append(torch.cat([first, _train_separate(m, loss_fn, own[2:], opt)[0]]))

    resumed, states = [], []
    for i in range(len(members)):
        torch.manual_seed(20 + i)
        module = head(build_encoder("viny-tiny")).double()  # other weights: all must come from the file
        opt = T.make_optimizer(module, SCHED, CPU)
        T.load_checkpoint(tmp_path / f"m{i}.safetensors", module, opt)
        resumed.append(module)
        states.append(opt.state_dict()["state"])
    fused = Fused(resumed, CPU)
    opt = make_fused_optimizer(fused, SCHED, CPU)
    for i, state in enumerate(states):
        fused.load_member_optimizer_state(opt, i, state)
    behind = {j: {**s, "step": s["step"] - 1} for j, s in states[0].items()}
    with pytest.raises(ValueError, match="step"):  # the members share one step count
        fused.load_member_optimizer_state(opt, 0, behind)

    losses, _ = _train_fused(fused, loss_fn, data[2:], opt)
    for i, member in enumerate(members):
        assert_close(losses[:, i], ref_losses[i][2:], **TOL)
        _assert_member_is(fused, i, member)


# ------------------------------------------------------------------------------------------ a NaN member


def test_a_member_with_a_nan_loss_leaves_the_others_untouched(tmp_path):
    head, loss_fn, make_batch = TASKS["segmenter"]
    members = _members(head, tmp_path)
    data = _data(make_batch, steps=2)
    poisoned = [
        [(torch.full_like(x, float("nan")), y) if i == 1 else (x, y) for i, (x, y) in enumerate(step)] for step in data
    ]
    fused = Fused(members, CPU)
    losses, _ = _train_fused(fused, loss_fn, poisoned)
    clean = Fused([members[0], members[2]], CPU)  # the group without the poisoned member
    clean_losses, _ = _train_fused(clean, loss_fn, [[step[0], step[2]] for step in data])

    assert losses[:, 1].isnan().all() and fused.params["head.weight"][1].isnan().all()
    assert_close(losses[:, [0, 2]], clean_losses, **TOL)
    for i, j in ((0, 0), (2, 1)):
        for n, p in fused.params.items():
            assert p[i].isfinite().all(), n
            assert_close(p[i], clean.params[n][j], **TOL, msg=lambda m, n=n: f"{n}: {m}")


# ------------------------------------------------------------------------------------------ bf16 autocast


def _leaf_dtypes(root: nn.Module, run) -> dict[str, str]:
    """{leaf module name: the dtype of its output} while `run()` calls the module tree `root` belongs to."""
    seen: dict[str, str] = {}

    def hook(name):
        def record(module, args, out):  # returns None: a hook's value would replace the output
            seen.setdefault(name, str(out.dtype))

        return record

    hooks = [m.register_forward_hook(hook(name)) for name, m in root.named_modules() if not list(m.children())]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_bf16_autocast_covers_the_whole_fused_forward():
    """Under autocast, every layer of the stacked forward computes in the dtype it has in a plain module:
    bf16 after each Linear (biased ones too: under vmap the bias add used to promote to fp32 and leave the
    rest of the block in fp32, GELU and all), fp32 in LayerNorm."""
    torch.manual_seed(0)
    members = [Segmenter(build_encoder("viny-tiny"), 3) for _ in range(2)]
    x = torch.randn(2, B, 3, 64, 64)
    plain = _leaf_dtypes(members[0], lambda: members[0](x[0]))
    fused = Fused(members, CPU)
    stacked = _leaf_dtypes(fused.template, lambda: fused.losses(lambda net, xb: net(xb).float().mean(), x))
    norms = {n for n, m in fused.template.named_modules() if isinstance(m, nn.LayerNorm)}
    assert "torch.bfloat16" in plain.values() and set(stacked) == set(plain)
    assert {n: d for n, d in stacked.items() if n not in norms} == {n: d for n, d in plain.items() if n not in norms}
    # LayerNorm stays fp32, autocast's policy on CUDA (the CPU's mixed-dtype kernel would give bf16 for a bf16
    # input; vmap's decomposition computes in fp32, and the next op adds an fp32 residual either way)
    assert {stacked[n] for n in norms} == {"torch.float32"}
    # the cast is differentiable: the fp32 leaves get their gradients
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused.losses(lambda net, xb: net(xb).float().mean(), x).sum().backward()
    cast = [fused.params[n] for n in fused._matmul_leaves]
    assert cast and all(p.grad is not None and p.grad.dtype == torch.float32 for p in cast)
