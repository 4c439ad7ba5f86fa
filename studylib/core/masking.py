"""Masked image modelling: per-sample random masks and the L1 loss on masked patches."""

from __future__ import annotations

import torch

from studylib.core.model import patchify


def random_masks(batch: int, grid: int, unit: int, ratio: float, g: torch.Generator | None = None) -> torch.Tensor:
    """Bool masks [B, grid*grid] (True = masked). Masking works on square units of `unit` x `unit`
    patches (unit 1 = the paper's 16 px at patch 16; unit 2 = canonical SimMIM's 32 px); exactly
    round(ratio * units) units are masked in every image, chosen independently per image."""
    if grid % unit:
        raise ValueError(f"mask unit of {unit} patches does not tile a {grid}x{grid} grid")
    m = grid // unit
    k = int(round(ratio * m * m))
    rank = torch.rand(batch, m * m, generator=g).argsort(dim=1).argsort(dim=1)
    units = (rank < k).view(batch, m, m)
    patches = units.repeat_interleave(unit, dim=1).repeat_interleave(unit, dim=2)  # [B, grid, grid]
    return patches.reshape(batch, grid * grid)


def mim_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch: int,
    per_masked_count: bool = False,
    norm_pix: bool = False,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean absolute error over the pixels of masked patches. pred [B, N, p*p*3], imgs [B, 3, H, W]
    (already normalised), mask [B, N]. `per_masked_count` reproduces the authors' extra division by
    the number of masked patches per image. `norm_pix` (MAE's variant) standardises each target patch
    by its own mean and std, so the loss rewards predicting structure rather than average colour.
    `weight` [B] (1 real, 0 padding: core.fused.pad_batch) drops the padding's patches from the mean and its
    images from the per-image count, so a padded batch gives the unpadded batch's loss and gradients."""
    target = patchify(imgs, patch)
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    m = mask.float()  # counts in fp32: a bf16 sum rounds them (646 masked patches summed to 648)
    images = len(m)
    if weight is not None:
        m, images = m * weight.float()[:, None], weight.sum()
    loss = ((pred - target).abs().mean(dim=-1) * m).sum() / m.sum().clamp(min=1)
    if per_masked_count:
        loss = loss / (m.sum() / images).clamp(min=1)
    return loss
