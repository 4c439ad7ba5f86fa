"""Batched augmentation that runs the same code on CPU and GPU tensors.

Every random choice comes from an explicit torch.Generator, so a run is reproducible and resumes
bit-for-bit. Geometry (random resized crop, flip) is one affine sampling grid per image, so an image
and its trimap get exactly the same transform (bilinear for pixels, nearest for labels).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float in [0, 1]."""
    return images.float().div_(255)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def random_resized_crop_boxes(
    n: int, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3), g: torch.Generator | None = None
) -> torch.Tensor:
    """[n, 4] boxes (cx, cy, w, h) as fractions of the image, torchvision's RandomResizedCrop
    distribution: area ~ U(scale), log aspect ~ U(log ratio); crops that do not fit are clipped
    to the image (torchvision retries then falls back to a centre crop; clipping keeps it one pass)."""
    area = _uniform(n, scale[0], scale[1], g)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), g)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = w / 2 + (1 - w) * torch.rand(n, generator=g)
    cy = h / 2 + (1 - h) * torch.rand(n, generator=g)
    return torch.stack([cx, cy, w, h], dim=1)


def full_boxes(n: int) -> torch.Tensor:
    return torch.tensor([[0.5, 0.5, 1.0, 1.0]]).repeat(n, 1)


def random_flips(n: int, g: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


def affine_grid(boxes: torch.Tensor, flips: torch.Tensor, size: int, device) -> torch.Tensor:
    """Sampling grid [n, size, size, 2] that maps the output onto each box, mirrored where flipped."""
    boxes, flips = boxes.to(device), flips.to(device)
    n = len(boxes)
    theta = torch.zeros(n, 2, 3, device=device)
    sx = boxes[:, 2] * torch.where(flips, -1.0, 1.0)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = boxes[:, 0] * 2 - 1
    theta[:, 1, 1] = boxes[:, 3]
    theta[:, 1, 2] = boxes[:, 1] * 2 - 1
    return F.affine_grid(theta, [n, 1, size, size], align_corners=False)


def warp_images(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Float images [B, C, H, W] resampled bilinearly on grid."""
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def warp_labels(y: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Integer label maps [B, H, W] resampled with nearest neighbour on grid."""
    out = F.grid_sample(y.unsqueeze(1).float(), grid, mode="nearest", padding_mode="border", align_corners=False)
    return out.squeeze(1).round().to(y.dtype)


def adjust_contrast(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's contrast: blend each image with the mean of its grayscale, then clamp to [0, 1]."""
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean(dim=(1, 2)).view(-1, 1, 1, 1)
    f = factors.to(x.device, x.dtype).view(-1, 1, 1, 1)
    return (f * x + (1 - f) * gray).clamp_(0, 1)


def contrast_factors(n: int, strength: float, g: torch.Generator | None = None) -> torch.Tensor:
    """ColorJitter(contrast=s): factor ~ U(max(0, 1 - s), 1 + s)."""
    return _uniform(n, max(0.0, 1 - strength), 1 + strength, g)


def mixup(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float, g: torch.Generator | None = None):
    """MixUp with one lambda per batch ~ Beta(alpha, alpha); returns mixed images and soft targets."""
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    if alpha <= 0:
        return x, onehot
    seed = int(torch.randint(2**31 - 1, (1,), generator=g))  # numpy's Beta, seeded from g
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(len(x), generator=g).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * onehot + (1 - lam) * onehot[perm]
