"""Batched augmentation that runs the same code on CPU and GPU tensors.

Every random choice comes from an explicit torch.Generator, so a run is reproducible and resumes
bit-for-bit. Geometry (random resized crop, flip) is one affine sampling grid per image, so an image
and its trimap get exactly the same transform (bilinear for pixels, nearest for labels).

Pre-training crops follow torchvision's RandomResizedCrop on each image's own (aspect-kept) pixels:
random_resized_crop_params draws (top, left, height, width) per image, crop_grid places them in the
padded array the image set is stored in (long side along the width, portrait images transposed).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float in [0, 1]."""
    return images.float().div_(255)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = constant(IMAGENET_MEAN, x.device, x.dtype).view(1, 3, 1, 1)
    std = constant(IMAGENET_STD, x.device, x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def constant(values: tuple, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor of `values` made on `device` once and kept (a fresh one per call would be a host-to-device copy per
    step). Read-only by contract: callers build new tensors from it."""
    key = (tuple(values), str(torch.device(device)), dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=dtype).to(device)
    return _CONSTANTS[key]


_ALIGN = 16  # bytes: every packed tensor starts where any dtype's view of the buffer may start


def pack(tensors) -> tuple[torch.Tensor, list[tuple]]:
    """Host tensors -> one uint8 buffer holding their bytes (each part aligned) and the spans to read them back."""
    spans, at = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        spans.append((at, n, t.dtype, t.shape))
        at += n + (-n % _ALIGN)
    buf = torch.empty(at, dtype=torch.uint8)
    for t, (start, n, _, _) in zip(tensors, spans):
        if n:
            buf[start : start + n].copy_(t.contiguous().reshape(-1).view(torch.uint8))
    return buf, spans


def unpack(buf: torch.Tensor, spans: list[tuple]) -> list[torch.Tensor]:
    """The tensors `pack` packed, as views of `buf` (on whatever device it now is): bit for bit what went in."""
    return [buf[start : start + n].view(dtype).view(shape) for start, n, dtype, shape in spans]


def to_device(device, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors on `device`, those on the host sent in ONE copy (their bytes packed in one buffer, pinned and sent
    without blocking on CUDA) and read back as views: the same bits. A step's index, crop boxes, flips, contrast
    factors, MixUp permutation and masks are a few kB; one copy each was one synchronising transfer each. A None
    (a draw the recipe does not make) or a plain number (MixUp's lambda) passes as it is."""
    device = torch.device(device)
    tensor = [isinstance(t, torch.Tensor) for t in tensors]
    host = [i for i, t in enumerate(tensors) if tensor[i] and t.device.type == "cpu" and t.device != device]
    out = list(tensors)
    if host:
        buf, spans = pack([tensors[i] for i in host])
        cuda = device.type == "cuda"
        moved = unpack((buf.pin_memory() if cuda else buf).to(device, non_blocking=cuda), spans)
        for i, t in zip(host, moved):
            out[i] = t
    return tuple(t.to(device) if is_tensor else t for t, is_tensor in zip(out, tensor))


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def random_resized_crop_params(
    sizes: torch.Tensor,
    scale=(0.67, 1.0),
    ratio=(3 / 4, 4 / 3),
    g: torch.Generator | None = None,
    tries: int = 10,
) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for a batch: [n, 4] crops (top, left, height, width)
    in whole pixels of each image's own coordinates, `sizes` being the images' valid [n, 2] (height,
    width). Per image: up to `tries` draws of an area fraction ~ U(scale) of the image area and a log
    aspect ~ U(log ratio), the first whose rounded crop fits being taken at a uniform position; when
    none fits, the central crop with the aspect clamped to `ratio`. Every draw comes from `g` (made for
    all tries at once, so a batch costs a fixed number of draws); the result is on `sizes`' device."""
    out_device = sizes.device
    dev = g.device if g is not None else out_device
    H, W = sizes.to(dev, torch.float64).unbind(1)
    n = len(H)
    area_frac = scale[0] + (scale[1] - scale[0]) * torch.rand(n, tries, generator=g, device=dev, dtype=torch.float64)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(lo + (hi - lo) * torch.rand(n, tries, generator=g, device=dev, dtype=torch.float64))
    pos = torch.rand(n, 2, generator=g, device=dev, dtype=torch.float64)
    target = (H * W)[:, None] * area_frac
    w, h = torch.round(torch.sqrt(target * r)), torch.round(torch.sqrt(target / r))
    fits = (w > 0) & (h > 0) & (w <= W[:, None]) & (h <= H[:, None])
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits
    found = fits.any(1)
    # fallback: torchvision's central crop, the aspect clamped to the ratio range
    in_ratio = W / H
    tall, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fw = torch.where(wide, torch.round(H * max(ratio)), W)
    fh = torch.where(tall, torch.round(W / min(ratio)), H)
    cw = torch.where(found, w.gather(1, first).squeeze(1), fw)
    ch = torch.where(found, h.gather(1, first).squeeze(1), fh)
    top = torch.where(found, torch.floor(pos[:, 0] * (H - ch + 1)), torch.floor((H - ch) / 2))
    left = torch.where(found, torch.floor(pos[:, 1] * (W - cw + 1)), torch.floor((W - cw) / 2))
    top, left = torch.minimum(top, H - ch), torch.minimum(left, W - cw)  # pos < 1; guards rounding only
    return torch.stack([top, left, ch, cw], dim=1).float().to(out_device)


def whole_image_params(sizes: torch.Tensor) -> torch.Tensor:
    """[n, 4] crops (top, left, height, width) covering each image's whole valid area."""
    hw = sizes.float()
    return torch.cat([torch.zeros_like(hw), hw], dim=1)


def stored_transposed(sizes: torch.Tensor) -> torch.Tensor:
    """The storage rule of an aspect-kept image set (studylib.data.decoded.load_image_set): each image
    lies with its long side along the array's width, so one whose height exceeds its width is stored
    transposed."""
    return sizes[:, 0] > sizes[:, 1]


def canvas_boxes(params: torch.Tensor, sizes: torch.Tensor, canvas) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel crops (top, left, height, width) of images stored top-left in a [rows, cols] `canvas`
    (long side along the width, see stored_transposed) -> boxes (cx, cy, w, h) as fractions of the
    canvas seen in each image's own orientation, and the per-image transpose flags for affine_grid."""
    rows, cols = canvas
    transposed = stored_transposed(sizes).to(params.device)
    top, left, h, w = params.float().unbind(1)
    width = torch.where(transposed, float(rows), float(cols))  # the canvas in the image's orientation
    height = torch.where(transposed, float(cols), float(rows))
    boxes = torch.stack([(left + w / 2) / width, (top + h / 2) / height, w / width, h / height], dim=1)
    return boxes, transposed


def crop_grid(params: torch.Tensor, sizes: torch.Tensor, flips: torch.Tensor, size: int, canvas, device):
    """Sampling grid [n, size, size, 2] that resamples each pixel crop of an aspect-kept image set
    (stored in a [rows, cols] canvas) to size x size, mirrored where flipped."""
    boxes, transposed = canvas_boxes(params, sizes, canvas)
    return affine_grid(boxes, flips, size, device, transposed)


def full_boxes(n: int, device="cpu") -> torch.Tensor:
    """[n, 4] boxes (cx, cy, w, h) of the whole image, on `device` (a kept constant, expanded: read-only)."""
    return constant((0.5, 0.5, 1.0, 1.0), device).expand(n, 4)


def random_flips(n: int, g: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


def affine_grid(
    boxes: torch.Tensor, flips: torch.Tensor, size: int, device, transposed: torch.Tensor | None = None
) -> torch.Tensor:
    """Sampling grid [n, size, size, 2] that maps the output onto each box (cx, cy, w, h as fractions
    of the input), mirrored where flipped. Where `transposed`, the input holds the image transposed
    (rows and columns swapped) and the box is given in the image's own orientation. Always fp32, even inside an
    autocast region: F.affine_grid is a batched matmul, which bf16 autocast would round to ~3 digits (grid points
    moved by up to ~half a pixel at 224 px), and a run's augmentation must not depend on where it is drawn."""
    with _without_autocast(device):
        return _affine_grid(boxes, flips, size, device, transposed)


def _without_autocast(device):
    kind = torch.device(device).type
    return torch.autocast(kind, enabled=False) if kind in ("cpu", "cuda") else nullcontext()


def _affine_grid(boxes, flips, size, device, transposed):
    boxes, flips = boxes.to(device), flips.to(device)
    n = len(boxes)
    theta = torch.zeros(n, 2, 3, device=device)
    sx = boxes[:, 2] * torch.where(flips, -1.0, 1.0)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = boxes[:, 0] * 2 - 1
    theta[:, 1, 1] = boxes[:, 3]
    theta[:, 1, 2] = boxes[:, 1] * 2 - 1
    if transposed is not None:  # the output's x reads the stored rows, its y the stored columns
        theta = torch.where(transposed.to(device).view(n, 1, 1), theta.flip(1), theta)
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
    lam, perm = mixup_draw(len(x), alpha, g)
    return mix(x, y, num_classes, lam, perm)


def mixup_draw(n: int, alpha: float, g: torch.Generator | None = None) -> tuple[float, torch.Tensor | None]:
    """MixUp's draws for a batch of n, on the host: (lambda ~ Beta(alpha, alpha), a permutation); none at alpha 0."""
    if alpha <= 0:
        return 1.0, None
    seed = int(torch.randint(2**31 - 1, (1,), generator=g))  # numpy's Beta, seeded from g
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return lam, torch.randperm(n, generator=g)


def mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, lam: float, perm: torch.Tensor | None):
    """Images and one-hot targets mixed with their `perm` partners by `lam` (unmixed one-hot where perm is None)."""
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    if perm is None:
        return x, onehot
    perm = perm.to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * onehot + (1 - lam) * onehot[perm]
