"""Horizontally fused training: M runs of one architecture trained as one stacked model.

Every parameter and buffer gets a leading member axis [M, ...] (torch.func.stack_module_state) and the
forward pass is torch.func.functional_call under torch.func.vmap. The members' losses are summed before
backward, and a sum separates: member i's leaves receive exactly d loss_i / d theta_i. AdamW is
elementwise, so one AdamW over the stacked leaves equals M separate AdamWs up to float rounding, provided
the members share the lr / weight-decay schedule (they do inside a group). AdamW's `step` is one scalar
per leaf, shared by the members because they always step together.

A member stays interchangeable with a separate run: `write_back` copies it into a plain module and
`member_optimizer_state` gives the state a separate `train.make_optimizer` AdamW would hold, so
`train.save_checkpoint` writes the same file either way; `load_member_optimizer_state` lets a group resume
from its members' checkpoints.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn as nn
from torch.func import functional_call, stack_module_state, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from studylib.core.train import Schedule, make_optimizer, param_groups

SHARED_STATE = ("step",)  # optimizer state that is one value for the whole group, not one per member


class Fused:
    """M modules of one architecture as stacked leaves [M, ...] (params and buffers)."""

    def __init__(self, tasks: list[nn.Module], device: torch.device | str):
        _check_same_architecture(tasks)
        params, buffers = stack_module_state(tasks)  # also refuses members in mixed train/eval modes
        self.members = len(tasks)
        # fresh leaves on the device: .to() of a leaf that needs grad would return a non-leaf
        self.params = {n: p.detach().to(device).requires_grad_(p.requires_grad) for n, p in params.items()}
        self.buffers = {n: b.detach().to(device) for n, b in buffers.items()}
        # the architecture without storage: functional_call swaps one member's slices in
        self.template = copy.deepcopy(tasks[0]).to("meta")
        self.attention = attention_backends(torch.device(device))
        # a plain attribute, not a cached_property: a compiled forward reads it, and Dynamo cannot enter the
        # lock that cached_property takes (Python 3.11)
        self._matmul_leaves = _matmul_leaves(self.template)

    def parameters(self) -> list[torch.Tensor]:
        """The stacked leaves, in the members' named_parameters order."""
        return list(self.params.values())

    def param_groups(self, weight_decay: float, decay_all: bool = False) -> list[dict]:
        """train.param_groups' partition and order, decided on the unstacked template: a stacked bias is
        2-D, so the rule's `ndim <= 1` must see a member's shape, not the leaf's."""
        stacked = {id(p): self.params[n] for n, p in self.template.named_parameters()}
        groups = param_groups(self.template, weight_decay, decay_all)
        return [{**g, "params": [stacked[id(p)] for p in g["params"]]} for g in groups]

    def losses(
        self, loss_fn: Callable[..., torch.Tensor], *batch: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[M] losses: loss_fn(model, *member_batch) for each member, where `model(*inputs)` runs that
        member's weights and every batch tensor has a leading member axis [M, B, ...] (expand a batch
        shared by all members: it costs no memory). `weight` [B] (one for all members: they pad alike),
        when given, is passed on as loss_fn(model, *member_batch, weight=weight) (see `pad_batch`)."""

        def member(params, buffers, weight, *member_batch):
            def model(*args, **kwargs):
                return functional_call(self.template, (params, buffers), args, kwargs)

            if weight is None:
                return loss_fn(model, *member_batch)
            return loss_fn(model, *member_batch, weight=weight)

        # timm's Dropout(p=0) layers call dropout; it returns before drawing (torch 2.14), but "different"
        # does not rely on that, and should a member ever draw, members draw independently, as separate runs do
        in_dims = (0, 0, None, *[0] * len(batch))
        with sdpa_kernel(self.attention):
            return vmap(member, in_dims, randomness="different")(self._autocast_params(), self.buffers, weight, *batch)

    def _autocast_params(self) -> dict[str, torch.Tensor]:
        """The leaves as the forward sees them. Under autocast, the weights and biases of the matmul layers
        (Linear, Conv) are cast to its dtype here, as autocast casts them for a plain module: under vmap a
        biased Linear is decomposed into a matmul (autocast: bf16) and a bias add that an fp32 bias would
        promote to fp32, so everything after the first biased Linear ran in fp32. The cast is differentiable:
        the gradients reach the fp32 leaves the optimizer holds."""
        device_type = next(iter(self.params.values())).device.type
        if not torch.is_autocast_enabled(device_type):
            return self.params
        dtype = torch.get_autocast_dtype(device_type)
        return {n: p.to(dtype) if n in self._matmul_leaves else p for n, p in self.params.items()}

    @torch.no_grad()
    def write_back(self, tasks: list[nn.Module]) -> None:
        """Copy member i's slices into tasks[i], to save or evaluate it as a plain module."""
        if len(tasks) != self.members:
            raise ValueError(f"write_back: {len(tasks)} modules for a group of {self.members}")
        leaves = {**self.params, **self.buffers}
        for i, task in enumerate(tasks):
            for n, t in [*task.named_parameters(), *task.named_buffers()]:
                t.copy_(leaves[n][i])

    def member_optimizer_state(self, opt: torch.optim.Optimizer, i: int) -> dict:
        """Member i's optimizer state in the layout of a separate run's train.make_optimizer AdamW,
        {param_index: {"step", "exp_avg", "exp_avg_sq"}}: the indices match because both optimizers
        order their parameters by the same param_groups rule. `step` is the group's shared count."""
        state = {}
        for j, p in enumerate(self._ordered(opt)):
            if opt.state.get(p):  # a leaf that never had a gradient has no state, as in a separate run
                state[j] = {k: _member_value(k, v, i) for k, v in opt.state[p].items()}
        return state

    def load_member_optimizer_state(self, opt: torch.optim.Optimizer, i: int, state: dict) -> None:
        """The reverse of member_optimizer_state, e.g. from a separate run's checkpoint. Every member
        must be at the group's step: the stacked leaves share one step count."""
        slots = [(p, state[j]) for j, p in enumerate(self._ordered(opt)) if j in state]
        for p, member in slots:  # check everything first, so a refusal leaves the optimizer as it was
            st = opt.state.get(p, {})
            for k in SHARED_STATE:
                if k in st and k in member and float(st[k]) != float(member[k]):
                    raise ValueError(
                        f"member {i} is at {k} {float(member[k]):g} but the group is at {float(st[k]):g}: "
                        f"a group's members step together, so resume them from checkpoints of the same step"
                    )
        for p, member in slots:
            st = opt.state[p]
            for k, v in member.items():
                v = torch.as_tensor(v)
                if k in SHARED_STATE:
                    st[k] = _shared_value(v, _owning_group(opt, p))
                else:
                    if k not in st:
                        st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st[k][i].copy_(v)  # casts to the leaf's dtype and device, as Optimizer.load_state_dict

    def _ordered(self, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
        """The optimizer's parameters in its state_dict index order, checked to be this group's leaves."""
        ordered = [p for g in opt.param_groups for p in g["params"]]
        if sorted(map(id, ordered)) != sorted(map(id, self.parameters())):
            raise ValueError("the optimizer is not over this group's stacked leaves (use make_fused_optimizer)")
        return ordered


def make_fused_optimizer(fused: Fused, sched: Schedule, device: torch.device) -> torch.optim.AdamW:
    """train.make_optimizer for a group: the same groups, hyper-parameters and kernels, over stacked leaves."""
    groups = fused.param_groups(sched.weight_decay, sched.decay_all)
    return torch.optim.AdamW(groups, lr=sched.lr, fused=device.type == "cuda")


def member_optimizer(
    fused: Fused, opt: torch.optim.Optimizer, i: int, module: nn.Module, sched: Schedule, device: torch.device
) -> torch.optim.AdamW:
    """A separate run's optimizer (train.make_optimizer on member i's module) holding member i's state, so
    train.save_checkpoint(path, module, member_optimizer(...), meta) writes what a separate run would."""
    member_opt = make_optimizer(module, sched, device)
    sd = member_opt.state_dict()
    sd["state"] = fused.member_optimizer_state(opt, i)
    member_opt.load_state_dict(sd)
    return member_opt


def fused_step(
    fused: Fused,
    opt: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor],
    batches: tuple,
    amp: AbstractContextManager | None = None,
    weight: torch.Tensor | None = None,
    forward: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """One optimisation step of the whole group; returns the [M] losses, detached and left on the device
    (no host sync). `amp` (train.autocast) covers the forward only, as PyTorch advises. A member whose loss
    is not finite spoils only its own weights: the caller drops it and keeps its last checkpoint.
    `forward` (from `compile_losses`) replaces `fused.losses(loss_fn, ...)`; `weight` as in `Fused.losses`."""
    # the gradients are dropped before the forward, not after it: under CUDA graphs the last step's gradients
    # live in the graph's memory, which the next replay overwrites (same numbers: the step never reads them)
    opt.zero_grad(set_to_none=True)
    with amp or nullcontext():
        losses = (forward or functools.partial(fused.losses, loss_fn))(*batches, weight=weight)
    losses.sum().backward()
    opt.step()
    return losses.detach()


def compile_losses(fused: Fused, loss_fn: Callable[..., torch.Tensor], mode: str) -> Callable[..., torch.Tensor]:
    """`fused.losses` with `loss_fn`, compiled as one graph (fullgraph: a break would be an error, not a
    silent slowdown) for one batch shape (dynamic=False: pad the last batch, `pad_batch`, or it compiles
    again). The batch drawing stays outside (its torch.Generator calls would break the graph) and so does
    the optimizer step. 'reduce-overhead' also captures forward and backward as CUDA graphs: the stacked
    leaves are marked static so that a replay reads them in place instead of copying every weight in, and
    each call begins a new step (the last step's graph outputs may then be overwritten: fused_step has
    consumed them by then)."""
    compiled = torch.compile(functools.partial(fused.losses, loss_fn), mode=mode, fullgraph=True, dynamic=False)
    if mode != "reduce-overhead":
        return compiled
    for t in [*fused.params.values(), *fused.buffers.values()]:
        torch._dynamo.mark_static_address(t)

    def forward(*batch: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*batch, weight=weight)

    return forward


def pad_batch(batch: tuple, size: int) -> tuple[tuple, torch.Tensor]:
    """A last, partial batch (tensors [M, b, ...]) padded to `size` samples -> (padded batch, weight [size]):
    weight 1 for the b real samples, 0 for the padding. The padding repeats real samples, so that the model
    sees only inputs it can take (an all-zero image or mask could give a non-finite value, and 0 * inf is not
    0); a loss that takes `weight` and is a weighted mean then equals the unpadded loss, value and gradient."""
    real = batch[0].shape[1]
    if any(t.shape[1] != real for t in batch):
        raise ValueError(f"pad_batch: batch tensors of different sizes {[tuple(t.shape[:2]) for t in batch]}")
    weight = torch.zeros(size, device=batch[0].device)
    weight[:real] = 1
    if real == size:
        return batch, weight
    repeat = torch.arange(size - real, device=batch[0].device) % real
    return tuple(torch.cat([t, t[:, repeat]], dim=1) for t in batch), weight


def takes_weight(loss_fn: Callable[..., torch.Tensor]) -> bool:
    """Whether `loss_fn(model, *batch, weight=w)` is accepted: a loss that can average over weighted samples."""
    try:
        return "weight" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):  # a builtin or a C function: no signature to read
        return False


def attention_backends(device: torch.device) -> list[SDPBackend]:
    """The attention kernels that work under vmap, forward and backward. On CUDA (seen with torch 2.11) the
    memory-efficient kernel's backward fails ("LSE is not correctly aligned") and the math kernel's fails
    under bf16 autocast, while flash and cuDNN work (bf16 only, so fp32 falls through to math). On the CPU
    only math is batched: the flash kernel has no batching rule and vmap loops over the members."""
    if device.type == "cuda":
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    return [SDPBackend.MATH]


def _matmul_leaves(template: nn.Module) -> frozenset[str]:
    """The names of the Linear and Conv layers' floating-point parameters (autocast's lower-precision ops)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return frozenset(
        f"{prefix}.{name}" if prefix else name
        for prefix, module in template.named_modules()
        if isinstance(module, kinds)
        for name, p in module.named_parameters(recurse=False)
        if p.is_floating_point()
    )


def _check_same_architecture(tasks: list[nn.Module]) -> None:
    if not tasks:
        raise ValueError("a fused group needs at least one module")

    def shapes(m: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, tuple(t.shape)) for n, t in [*m.named_parameters(), *m.named_buffers()]]

    first = shapes(tasks[0])
    for i, task in enumerate(tasks[1:], start=1):
        if type(task) is not type(tasks[0]) or shapes(task) != first:
            raise ValueError(f"member {i} ({type(task).__name__}) differs in architecture from member 0")


def _member_value(key: str, value, i: int):
    if not torch.is_tensor(value):
        return value
    return value.detach().clone() if key in SHARED_STATE else value[i].detach().clone()


def _owning_group(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


def _shared_value(value: torch.Tensor, group: dict) -> torch.Tensor:
    """Where Optimizer.load_state_dict puts a step: on the device for fused/capturable kernels, else as given."""
    if group.get("fused") or group.get("capturable"):
        return value.to(dtype=torch.float32, device=group["params"][0].device).clone()
    return value.clone()
