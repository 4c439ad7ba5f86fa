"""Patch tokens and what the paper measures on them directly: their variances within and across images
(Table 2), their cosine similarity against distance on the patch grid (Fig. 5) and the reference-patch
heatmaps. Linear probes, effective rank and CKA: `studylib.analysis.probes`; all of it per layer:
`studylib.analysis.geometry`.

Shapes and conventions
----------------------
* ``T`` is a stack of patch tokens ``[N, P, D]``: N images, P = grid * grid patches in row-major order
  (patch index ``i`` sits at row ``i // grid``, column ``i % grid``), D channels.
* Trimap classes are the study's 0 pet, 1 background, 2 boundary (``studylib.data``).
* Variances take ``ddof``: 0 (the default, the clean protocol) is the *population* variance (divide by
  the count), 1 is the sample variance (divide by count - 1) of the authors' ``torch.var`` (``protocol:
  paper``; ``studylib.analysis.geometry.GeometrySettings``).
* All returned scalars are Python floats, so results go straight to JSON.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from studylib.core import augment as A

__all__ = [
    "PET",
    "BACKGROUND",
    "BOUNDARY",
    "patch_tokens",
    "within_image_variance",
    "across_image_variance",
    "manhattan_distances",
    "chessboard_distances",
    "cosine_by_distance",
    "reference_similarity",
    "pick_reference_patches",
    "patch_class_fractions",
    "paper_reference_patches",
]

PET, BACKGROUND, BOUNDARY = 0, 1, 2


def check_tokens(T: torch.Tensor) -> None:
    """Refuse anything but a tensor of tokens [N, P, D]."""
    if not isinstance(T, torch.Tensor) or T.dim() != 3:
        raise ValueError(f"tokens must be a tensor [N, P, D], got {getattr(T, 'shape', type(T))}")


def grid_of(P: int, grid: int | None) -> int:
    """The side of the square grid of P patches (`grid` when given); refuses P that is not grid^2."""
    g = int(round(math.sqrt(P))) if grid is None else int(grid)
    if g * g != P:
        raise ValueError(f"{P} tokens do not form a {g}x{g} grid")
    return g


# ------------------------------------------------------------------------------------------- tokens
@torch.no_grad()
def patch_tokens(
    encoder,
    images_uint8: torch.Tensor,
    layers: Iterable[int] | None = None,
    normalize: bool = True,
    batch_size: int = 256,
    device="cpu",
) -> dict[int, torch.Tensor]:
    """Patch tokens of `images_uint8` [N, 3, H, W] at each requested layer -> {layer: float32 CPU [N, P, D]}.

    Layer k >= 0 is the output of block k *without* the final LayerNorm (forward_intermediates(norm=False));
    a negative k other than -1 means block depth + k, also un-normed; layer -1 is the encoder's final
    output after the last LayerNorm, i.e. encoder.patch_features(x) (the dense path: no CLS token in the
    sequence, the tokens the authors measure).
    `layers=None` means every block 0..depth-1 and then -1.

    Inputs are scaled to [0, 1] (uint8 / 255; float inputs are taken as already in [0, 1]) and, when
    `normalize`, ImageNet-normalised, matching the study's pre-training and fine-tuning inputs (the
    authors' Pets pipeline skipped normalisation: pass normalize=False to reproduce that quirk).
    The encoder runs in eval mode under no_grad on `device`; its mode and device are restored after.
    """
    depth = len(encoder.blocks)
    layers = list(range(depth)) + [-1] if layers is None else [int(k) for k in layers]
    for k in layers:
        if not -depth <= k < depth:
            raise ValueError(f"layer {k} out of range for a {depth}-block encoder")
    blocks = sorted({k % depth for k in layers if k != -1} | ({depth - 1} if -1 in layers else set()))
    first = next(encoder.parameters())
    was_training, home = encoder.training, first.device
    encoder.to(device).eval()
    out: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    try:
        for s in range(0, len(images_uint8), batch_size):
            x = images_uint8[s : s + batch_size].to(device)
            x = A.to_float(x) if x.dtype == torch.uint8 else x.float()
            if normalize:
                x = A.normalize(x)
            # one pass serves every layer: the last block's un-normed output through encoder.norm is
            # exactly patch_features(x) because LayerNorm acts on each token separately
            taken = dict(zip(blocks, encoder.forward_intermediates(x, indices=blocks, norm=False)))
            for k in layers:
                t = encoder.norm(taken[depth - 1]) if k == -1 else taken[k % depth]
                out[k].append(t.float().cpu())
    finally:
        encoder.to(home).train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------- variances
def _check_ddof(ddof: int) -> int:
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population variance) or 1 (sample variance), got {ddof!r}")
    return int(ddof)


def within_image_variance(T: torch.Tensor, ddof: int = 0) -> float:
    """mean over images n and dims d of Var_p T[n, p, d]: the variance over the P tokens of one image,
    per dimension, averaged over dimensions and images (Table 2, column 1). Var divides the summed
    squared deviations by P - ddof: ddof 0 the population variance, ddof 1 the authors' unbiased
    ``torch.var``."""
    check_tokens(T)
    return float(T.double().var(dim=1, correction=_check_ddof(ddof)).mean())


def across_image_variance(T: torch.Tensor, ddof: int = 0) -> float:
    """mean over dims d of Var_n m[n, d], m[n] = mean_p T[n, p]: the variance over the N images of each
    image's mean token (dividing by N - ddof), averaged over dimensions (Table 2, column 2)."""
    check_tokens(T)
    return float(T.double().mean(dim=1).var(dim=0, correction=_check_ddof(ddof)).mean())


# ------------------------------------------------------------------------------ cosine vs distance
def _positions(grid: int) -> torch.Tensor:
    idx = torch.arange(grid * grid)
    return torch.stack([idx // grid, idx % grid], dim=1)  # [P, 2] (row, col)


def manhattan_distances(grid: int) -> torch.Tensor:
    """[P, P] long: |r_i - r_j| + |c_i - c_j| between row-major patches i, j of a grid x grid layout."""
    rc = _positions(grid)
    return (rc[:, None] - rc[None]).abs().sum(-1)


def chessboard_distances(grid: int) -> torch.Tensor:
    """[P, P] long: max(|r_i - r_j|, |c_i - c_j|) (Chebyshev distance) between patches i, j."""
    rc = _positions(grid)
    return (rc[:, None] - rc[None]).abs().amax(-1)


DISTANCES = {"manhattan": manhattan_distances, "chessboard": chessboard_distances}


def max_distance(grid: int, metric: str = "manhattan") -> int:
    """The largest distance between two patches of a grid x grid layout: 2(grid-1) Manhattan, grid-1
    chessboard."""
    if metric not in DISTANCES:
        raise ValueError(f"metric must be one of {', '.join(DISTANCES)}, got {metric!r}")
    return 2 * (grid - 1) if metric == "manhattan" else grid - 1


def cosine_by_distance(T: torch.Tensor, grid: int | None = None, metric: str = "manhattan") -> dict[int, float]:
    """{d: mean cosine similarity of token pairs (i, j), i != j, of the same image whose patches are at
    distance d on the grid}, for d = 1..max_distance (Manhattan: 2(grid-1), 14 on an 8x8 grid; the
    paper's Fig. 5 and the authors' diagnostics), averaged over images. Both orders (i, j) and (j, i)
    count, as in the authors' code; the cosine is symmetric, so the mean is the same over unordered pairs.

    Every image has the same set of pairs at each distance, so the mean over images of the per-image
    means equals the mean over pairs of the image-averaged cosine matrix; that matrix is one matmul.
    """
    check_tokens(T)
    N, P, D = T.shape
    g = grid_of(P, grid)
    top = max_distance(g, metric)
    u = F.normalize(T.double(), dim=-1)  # zero tokens get cosine 0
    flat = u.permute(1, 0, 2).reshape(P, N * D)  # [P, N*D]: contracts n and d at once
    mean_cos = flat @ flat.T / N  # [P, P] mean over images
    dist = DISTANCES[metric](g).flatten()
    sums = torch.bincount(dist, weights=mean_cos.flatten(), minlength=top + 1)
    counts = torch.bincount(dist, minlength=top + 1)
    return {d: float(sums[d] / counts[d]) for d in range(1, top + 1)}  # d = 0 is i == j: excluded


# ------------------------------------------------------------------------------ reference heatmaps
def reference_similarity(T: torch.Tensor, index: int, grid: int | None = None) -> torch.Tensor:
    """T [P, D] (one image) -> [grid, grid]: cosine similarity of patch `index`'s token to every patch's
    token (1 at the reference itself), laid out row-major on the grid."""
    if T.dim() != 2:
        raise ValueError(f"reference_similarity takes one image's tokens [P, D], got {tuple(T.shape)}")
    P = T.shape[0]
    g = grid_of(P, grid)
    u = F.normalize(T.double(), dim=-1)
    return (u @ u[index]).reshape(g, g).float()


def pick_reference_patches(
    labels: torch.Tensor,
    grid: int | None = None,
    metric: str = "chessboard",
    pet: int = PET,
    background: int = BACKGROUND,
    boundary: int = BOUNDARY,
) -> dict:
    """Reference patches of one image from its patch labels [P] (row-major), as in the paper's heatmaps.

    background: the first corner (top-left, top-right, bottom-left, bottom-right) whose label is
      background, else the first background patch in row-major order.
    pet: the pet patch farthest from any non-pet patch (brute-force distance transform on the grid,
      `metric` 'chessboard' (Chebyshev) or 'manhattan'). The image frame does not count as non-pet: a
      pet cut by the frame is not at its edge there. Ties go to the patch nearest (Euclidean) the pet
      patches' centroid, then to the lowest index; with no non-pet patch, to the centroid alone.
    boundary: the first patch (row-major) whose majority class is boundary, else the first pet patch
      4-adjacent to a background patch.
    Each entry is a patch index or None when the image has no such patch; `rules` says which rule
    picked each one ('corner' / 'first', 'interior', 'majority' / 'adjacent').
    """
    labels = labels.reshape(-1).long()
    P = len(labels)
    g = grid_of(P, grid)
    out: dict = {"background": None, "pet": None, "boundary": None, "rules": {}}

    corners = [0, g - 1, P - g, P - 1]
    bg = [c for c in corners if labels[c] == background]
    if bg:
        out["background"], out["rules"]["background"] = bg[0], "corner"
    elif (labels == background).any():
        out["background"] = int((labels == background).nonzero()[0])
        out["rules"]["background"] = "first"

    is_pet = labels == pet
    if is_pet.any():
        if metric == "chessboard":
            dist = chessboard_distances(g)
        elif metric == "manhattan":
            dist = manhattan_distances(g)
        else:
            raise ValueError(f"metric must be 'chessboard' or 'manhattan', got {metric!r}")
        # distance of each patch to the nearest non-pet patch (2g exceeds any on-grid distance)
        to_edge = dist[:, ~is_pet].amin(1) if (~is_pet).any() else torch.full((P,), 2 * g)
        rc = _positions(g).double()
        centroid = rc[is_pet].mean(0)
        near = ((rc - centroid) ** 2).sum(1)
        cand = is_pet.nonzero().flatten()
        # lexicographic: farthest from the edge, then nearest the centroid, then the lowest index
        best = min(cand.tolist(), key=lambda i: (-int(to_edge[i]), float(near[i]), i))
        out["pet"], out["rules"]["pet"] = best, "interior"

    if (labels == boundary).any():
        out["boundary"] = int((labels == boundary).nonzero()[0])
        out["rules"]["boundary"] = "majority"
    else:
        adjacent = (manhattan_distances(g) == 1)[:, labels == background].any(1) & is_pet
        if adjacent.any():
            out["boundary"] = int(adjacent.nonzero()[0])
            out["rules"]["boundary"] = "adjacent"
    return out


def _patch_class_counts(mask: torch.Tensor, grid: int, num_classes: int) -> tuple[torch.Tensor, int]:
    """One trimap [H, W] -> (long [grid*grid, num_classes] pixel counts per patch and class, pixels per patch)."""
    if mask.dim() != 2:
        raise ValueError(f"takes one trimap [H, W], got {tuple(mask.shape)}")
    H, W = mask.shape
    if H % grid or W % grid:
        raise ValueError(f"mask size {H}x{W} is not divisible by the {grid}x{grid} grid")
    ph, pw = H // grid, W // grid
    m = mask.long().reshape(grid, ph, grid, pw).transpose(1, 2).reshape(grid * grid, ph * pw)
    return torch.stack([(m == k).sum(-1) for k in range(num_classes)], dim=-1), ph * pw


def patch_class_fractions(mask: torch.Tensor, grid: int, num_classes: int = 3) -> torch.Tensor:
    """One trimap [H, W] (classes 0..num_classes-1) -> float64 [grid*grid, num_classes]: the fraction of
    each patch's pixels (H/grid x W/grid, row-major patches) in each class. Pixels outside the classes
    count in the patch's size but in no class."""
    counts, pixels = _patch_class_counts(mask, grid, num_classes)
    return counts.double() / pixels


def _first_argmax(x: torch.Tensor) -> int:
    """The lowest index of the largest value (made explicit rather than left to torch.argmax)."""
    return int((x == x.max()).nonzero()[0])


def paper_reference_patches(
    mask: torch.Tensor,
    grid: int,
    threshold: float = 0.2,
    pet: int = PET,
    boundary: int = BOUNDARY,
    num_classes: int = 3,
) -> dict:
    """The authors' reference patches (their heatmap code) from one image's trimap [H, W], by the class
    fractions of each patch (`patch_class_fractions`):

    background: patch (0, 0), the top-left corner, whatever it shows.
    boundary: the patch with the largest boundary fraction.
    pet: the patch with the largest pet fraction among those whose boundary fraction is at most
      `threshold` (0.2, inclusive: compared as pixel counts, boundary pixels <= threshold * patch
      pixels); when no patch qualifies, the largest pet fraction of all.
    Ties go to the lowest row-major index. Returns the layout of `pick_reference_patches`: patch
    indices under 'background', 'pet', 'boundary', the rule that picked each under 'rules', and the
    picked patches' class fractions under 'fractions' ([pet, background, boundary] for the study's classes).
    """
    counts, pixels = _patch_class_counts(mask, grid, num_classes)
    fr = counts.double() / pixels
    bd, pt = fr[:, boundary], fr[:, pet]
    low = counts[:, boundary].double() <= threshold * pixels + 1e-9  # the tolerance only absorbs rounding
    out: dict = {"background": 0, "pet": None, "boundary": _first_argmax(bd)}
    rules = {"background": "corner (0, 0)", "boundary": "largest boundary fraction"}
    if low.any():
        out["pet"] = _first_argmax(pt.masked_fill(~low, -1.0))
        rules["pet"] = f"largest pet fraction with boundary fraction <= {threshold:g}"
    else:
        out["pet"] = _first_argmax(pt)
        rules["pet"] = "largest pet fraction (no patch with a low boundary fraction)"
    out["rules"] = rules
    out["fractions"] = {k: fr[out[k]].tolist() for k in ("background", "pet", "boundary")}
    return out
