"""Geometry of patch tokens: the paper's v2 analysis (Table 2, Fig. 5) and a few measurements beyond it.

Shapes and conventions
----------------------
* ``T`` is a stack of patch tokens ``[N, P, D]``: N images, P = grid * grid patches in row-major order
  (patch index ``i`` sits at row ``i // grid``, column ``i % grid``), D channels.
* Trimap classes are the study's 0 pet, 1 background, 2 boundary (``studylib.data``).
* Every variance is a *population* variance (ddof = 0, divide by the count, not count - 1).
* All returned scalars are Python floats, so results go straight to JSON.

The paper's four measurements (on final-layer tokens after the last LayerNorm):
``within_image_variance`` / ``across_image_variance``, ``cosine_by_distance``, ``linear_probe`` on
``patch_labels`` (majority trimap class per patch), and reference-patch heatmaps
(``pick_reference_patches`` + ``reference_similarity``).

Beyond the paper: ``effective_rank`` (RankMe), ``linear_cka`` / ``minibatch_cka`` / ``cka_matrix``,
``position_probe``, and ``geometry_report`` which runs everything per layer.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

from studylib.core import augment as A

__all__ = [
    "PAPER_TABLE2", "PAPER_COSINE", "PET", "BACKGROUND", "BOUNDARY",
    "patch_tokens", "within_image_variance", "across_image_variance",
    "manhattan_distances", "chessboard_distances", "cosine_by_distance",
    "patch_labels", "split_images", "balanced_accuracy", "linear_probe",
    "reference_similarity", "pick_reference_patches",
    "effective_rank", "token_effective_rank",
    "linear_cka", "hsic_unbiased", "minibatch_cka", "cka_matrix",
    "position_probe", "geometry_report", "table",
]

PET, BACKGROUND, BOUNDARY = 0, 1, 2

#: The paper's Table 2 (final-layer patch tokens of ~2,048 Pets images). Probe accuracy is the last
#: epoch's *training* accuracy, in percent.
PAPER_TABLE2 = {
    "SimMIM": {"within_image_variance": 0.10, "across_image_variance": 0.02, "patch_probe_accuracy_pct": 79.5},
    "+CLS Intel": {"within_image_variance": 0.18, "across_image_variance": 0.11, "patch_probe_accuracy_pct": 76.1},
    "+CLS Pets": {"within_image_variance": 0.58, "across_image_variance": 0.29, "patch_probe_accuracy_pct": 78.6},
    "+spatial Pets": {"within_image_variance": 0.32, "across_image_variance": 0.06,
                      "patch_probe_accuracy_pct": 93.3},
}

#: Fig. 5 of the paper, read off the figure: mean token cosine at Manhattan distances 1..9 on the 8x8 grid
#: (the figure stops at 9 although the grid reaches 14; the paper shows no curve for "+CLS Pets").
PAPER_COSINE = {
    "SimMIM": [0.58, 0.41, 0.33, 0.30, 0.29, 0.32, 0.33, 0.32, 0.35],
    "+CLS Intel": [0.68, 0.57, 0.51, 0.49, 0.47, 0.47, 0.46, 0.43, 0.43],
    "+spatial Pets": [0.54, 0.27, 0.13, 0.09, 0.13, 0.30, 0.44, 0.53, 0.63],
}


def _check_tokens(T: torch.Tensor) -> None:
    if not isinstance(T, torch.Tensor) or T.dim() != 3:
        raise ValueError(f"tokens must be a tensor [N, P, D], got {getattr(T, 'shape', type(T))}")


def _grid_of(P: int, grid: int | None) -> int:
    g = int(round(math.sqrt(P))) if grid is None else int(grid)
    if g * g != P:
        raise ValueError(f"{P} tokens do not form a {g}x{g} grid")
    return g


# ------------------------------------------------------------------------------------------- tokens
@torch.no_grad()
def patch_tokens(encoder, images_uint8: torch.Tensor, layers: Iterable[int] | None = None, normalize: bool = True,
                 batch_size: int = 256, device="cpu") -> dict[int, torch.Tensor]:
    """Patch tokens of `images_uint8` [N, 3, H, W] at each requested layer -> {layer: float32 CPU [N, P, D]}.

    Layer k >= 0 is the output of block k *without* the final LayerNorm (forward_intermediates(norm=False));
    a negative k other than -1 means block depth + k, also un-normed; layer -1 is the encoder's final
    output after the last LayerNorm, i.e. forward_features(x)[:, 1:] (the tokens the paper measures).
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
            x = images_uint8[s:s + batch_size].to(device)
            x = A.to_float(x) if x.dtype == torch.uint8 else x.float()
            if normalize:
                x = A.normalize(x)
            # one pass serves every layer: the last block's un-normed output through encoder.norm is
            # exactly forward_features(x)[:, 1:] because LayerNorm acts on each token separately
            taken = dict(zip(blocks, encoder.forward_intermediates(x, indices=blocks, norm=False)))
            for k in layers:
                t = encoder.norm(taken[depth - 1]) if k == -1 else taken[k % depth]
                out[k].append(t.float().cpu())
    finally:
        encoder.to(home).train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------- variances
def within_image_variance(T: torch.Tensor) -> float:
    """mean over images n and dims d of Var_p T[n, p, d]: the population variance (ddof=0) over the P
    tokens of one image, per dimension, averaged over dimensions and images (Table 2, column 1)."""
    _check_tokens(T)
    return float(T.double().var(dim=1, unbiased=False).mean())


def across_image_variance(T: torch.Tensor) -> float:
    """mean over dims d of Var_n m[n, d], m[n] = mean_p T[n, p]: the population variance (ddof=0) over
    images of each image's mean token, averaged over dimensions (Table 2, column 2)."""
    _check_tokens(T)
    return float(T.double().mean(dim=1).var(dim=0, unbiased=False).mean())


# ------------------------------------------------------------------------------ cosine vs distance
def _positions(grid: int) -> torch.Tensor:
    idx = torch.arange(grid * grid)
    return torch.stack([idx // grid, idx % grid], dim=1)              # [P, 2] (row, col)


def manhattan_distances(grid: int) -> torch.Tensor:
    """[P, P] long: |r_i - r_j| + |c_i - c_j| between row-major patches i, j of a grid x grid layout."""
    rc = _positions(grid)
    return (rc[:, None] - rc[None]).abs().sum(-1)


def chessboard_distances(grid: int) -> torch.Tensor:
    """[P, P] long: max(|r_i - r_j|, |c_i - c_j|) (Chebyshev distance) between patches i, j."""
    rc = _positions(grid)
    return (rc[:, None] - rc[None]).abs().amax(-1)


def cosine_by_distance(T: torch.Tensor, grid: int | None = None) -> dict[int, float]:
    """{d: mean cosine similarity of token pairs (i, j), i != j, of the same image whose patches are at
    Manhattan distance d on the grid}, for d = 1..2(grid-1), averaged over images (Fig. 5).

    Every image has the same set of pairs at each distance, so the mean over images of the per-image
    means equals the mean over pairs of the image-averaged cosine matrix; that matrix is one matmul.
    """
    _check_tokens(T)
    N, P, D = T.shape
    g = _grid_of(P, grid)
    u = F.normalize(T.double(), dim=-1)                                # zero tokens get cosine 0
    flat = u.permute(1, 0, 2).reshape(P, N * D)                        # [P, N*D]: contracts n and d at once
    mean_cos = flat @ flat.T / N                                       # [P, P] mean over images
    dist = manhattan_distances(g).flatten()
    sums = torch.bincount(dist, weights=mean_cos.flatten(), minlength=2 * g - 1)
    counts = torch.bincount(dist, minlength=2 * g - 1)
    return {d: float(sums[d] / counts[d]) for d in range(1, 2 * g - 1)}   # d = 0 is i == j: excluded


# ------------------------------------------------------------------------------------ patch labels
def patch_labels(masks: torch.Tensor, grid: int, num_classes: int = 3) -> torch.Tensor:
    """masks [N, H, W] (classes 0..num_classes-1) -> long [N, grid*grid]: the majority class of the
    pixels in each (H/grid x W/grid) patch, row-major. Ties go to the lowest class id. Pixels outside
    0..num_classes-1 (e.g. an ignore value) are not counted; a patch with none of them gets class 0."""
    if masks.dim() != 3:
        raise ValueError(f"masks must be [N, H, W], got {tuple(masks.shape)}")
    N, H, W = masks.shape
    if H % grid or W % grid:
        raise ValueError(f"mask size {H}x{W} is not divisible by the {grid}x{grid} grid")
    ph, pw = H // grid, W // grid
    m = masks.reshape(N, grid, ph, grid, pw).transpose(2, 3).reshape(N, grid * grid, ph * pw)
    # per-class counts one class at a time: a one-hot of 2,048 128x128 masks would need ~800 MB
    counts = torch.stack([(m == k).sum(-1) for k in range(num_classes)], dim=-1)      # [N, P, K]
    # score = count * K + (K-1-k): strictly ordered, so argmax is unique and ties go to the lowest k
    # (not relying on torch.argmax's first-index behaviour)
    score = counts * num_classes + (num_classes - 1 - torch.arange(num_classes))
    return score.argmax(-1)


# ---------------------------------------------------------------------------------- linear probes
def split_images(n: int, train_frac: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of image indices 0..n-1 -> (train, held-out), sorted; round(n*train_frac)
    training images, at least one on each side when n >= 2."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * train_frac))
    k = min(max(k, 1), n - 1) if n >= 2 else n
    return perm[:k].sort().values, perm[k:].sort().values


def balanced_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[float, list]:
    """(mean recall over the classes present in `target`, per-class recall with None for absent classes).
    recall_k = #(pred == k and target == k) / #(target == k)."""
    pred, target = pred.reshape(-1), target.reshape(-1)
    support = torch.bincount(target, minlength=num_classes)
    hits = torch.bincount(target[pred == target], minlength=num_classes)
    recall = [float(hits[k] / support[k]) if support[k] > 0 else None for k in range(num_classes)]
    present = [r for r in recall if r is not None]
    return (sum(present) / len(present) if present else float("nan")), recall


def _fit_linear(X: torch.Tensor, y: torch.Tensor, K: int, epochs: int, lr: float, weight_decay: float,
                batch_size: int | None, seed: int) -> tuple[torch.nn.Linear, float]:
    """AdamW cross-entropy on a zero-initialised Linear(D -> K); returns the layer and the accuracy of the
    last epoch's forward passes (what a training loop logs, and what the paper reports)."""
    head = torch.nn.Linear(X.shape[1], K)
    # zero init: the problem is convex, so this loses nothing and keeps the global RNG untouched
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    M = len(X)
    bs = M if batch_size is None else int(batch_size)
    last_acc = float("nan")
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.arange(M) if bs >= M else torch.randperm(M, generator=g)
            correct = 0
            for s in range(0, M, bs):
                i = order[s:s + bs]
                logits = head(X[i])
                loss = F.cross_entropy(logits, y[i])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                correct += int((logits.detach().argmax(-1) == y[i]).sum())
            last_acc = correct / M
    return head, last_acc


def _standardise(train: torch.Tensor, *others: torch.Tensor):
    """(x - mean) / std with the training set's per-dimension mean and population std (+1e-6, so constant
    dimensions stay finite); the same transform is applied to the other sets."""
    mu, sd = train.mean(0), train.std(0, unbiased=False) + 1e-6
    return [(x - mu) / sd for x in (train, *others)]


def linear_probe(T: torch.Tensor, labels: torch.Tensor, num_classes: int = 3, train_frac: float = 0.5,
                 epochs: int = 100, lr: float = 1e-2, seed: int = 0, weight_decay: float = 0.01,
                 batch_size: int | None = None) -> dict:
    """Frozen-token linear probe: Linear(D -> num_classes) on every patch token, labels [N, P].

    Images (not patches) are split at random with `seed` (`train_frac` of them train), so held-out
    tokens come from unseen images. Features are standardised with the training tokens' mean/std.
    The head is trained with AdamW cross-entropy for `epochs` epochs, full batch when `batch_size` is
    None, else shuffled minibatches. Tokens whose label lies outside 0..num_classes-1 are dropped.

    Returns train_accuracy (the last epoch's training accuracy, what the paper reports: the accuracy of
    that epoch's forward passes), final_train_accuracy (after the last update), heldout_accuracy,
    heldout_balanced_accuracy (mean recall over the classes present in the held-out tokens),
    heldout_recall (per class, None when absent), majority_baseline (held-out accuracy of always
    predicting the training set's most frequent class), train_counts / heldout_counts (tokens per
    class), train_images / heldout_images.
    """
    _check_tokens(T)
    N, P, D = T.shape
    labels = labels.reshape(N, -1).long()
    if labels.shape[1] != P:
        raise ValueError(f"labels {tuple(labels.shape)} do not match tokens {tuple(T.shape)}")
    tr, te = split_images(N, train_frac, seed)
    Xtr, ytr = T[tr].reshape(-1, D).float(), labels[tr].reshape(-1)
    Xte, yte = T[te].reshape(-1, D).float(), labels[te].reshape(-1)
    keep_tr, keep_te = (ytr >= 0) & (ytr < num_classes), (yte >= 0) & (yte < num_classes)
    Xtr, ytr, Xte, yte = Xtr[keep_tr], ytr[keep_tr], Xte[keep_te], yte[keep_te]
    Xtr, Xte = _standardise(Xtr, Xte)
    head, last_acc = _fit_linear(Xtr, ytr, num_classes, epochs, lr, weight_decay, batch_size, seed)
    with torch.no_grad():
        ptr, pte = head(Xtr).argmax(-1), head(Xte).argmax(-1)
    bal, recall = balanced_accuracy(pte, yte, num_classes)
    train_counts = torch.bincount(ytr, minlength=num_classes)
    return {
        "train_accuracy": last_acc,
        "final_train_accuracy": float((ptr == ytr).float().mean()),
        "heldout_accuracy": float((pte == yte).float().mean()),
        "heldout_balanced_accuracy": bal,
        "heldout_recall": recall,
        "majority_baseline": float((yte == train_counts.argmax()).float().mean()),
        "train_counts": train_counts.tolist(),
        "heldout_counts": torch.bincount(yte, minlength=num_classes).tolist(),
        "train_images": len(tr), "heldout_images": len(te),
    }


def position_probe(T: torch.Tensor, grid: int | None = None, train_frac: float = 0.5, epochs: int = 100,
                   lr: float = 1e-2, seed: int = 0, weight_decay: float = 0.01,
                   batch_size: int | None = None) -> dict:
    """Does a token still know where it is? A linear probe (as `linear_probe`: seeded image split,
    standardised features, zero-initialised Linear(D -> P), AdamW) predicting each token's own patch
    index 0..P-1 from the frozen token.

    Returns heldout_accuracy (chance = 1/P), train_accuracy (last epoch), chance, mean_manhattan_error
    (mean over held-out tokens of |r_pred - r| + |c_pred - c|) and chance_manhattan_error (the same for
    a uniformly random guess: mean of the P x P Manhattan distance matrix, 2(g^2-1)/(3g), 5.25 at g=8).
    """
    _check_tokens(T)
    N, P, D = T.shape
    g = _grid_of(P, grid)
    tr, te = split_images(N, train_frac, seed)
    pos = torch.arange(P)
    Xtr, Xte = _standardise(T[tr].reshape(-1, D).float(), T[te].reshape(-1, D).float())
    ytr, yte = pos.repeat(len(tr)), pos.repeat(len(te))
    head, last_acc = _fit_linear(Xtr, ytr, P, epochs, lr, weight_decay, batch_size, seed)
    with torch.no_grad():
        pred = head(Xte).argmax(-1)
    err = (pred // g - yte // g).abs() + (pred % g - yte % g).abs()
    return {
        "heldout_accuracy": float((pred == yte).float().mean()),
        "train_accuracy": last_acc,
        "chance": 1.0 / P,
        "mean_manhattan_error": float(err.float().mean()),
        "chance_manhattan_error": float(manhattan_distances(g).double().mean()),
    }


# ------------------------------------------------------------------------------ reference heatmaps
def reference_similarity(T: torch.Tensor, index: int, grid: int | None = None) -> torch.Tensor:
    """T [P, D] (one image) -> [grid, grid]: cosine similarity of patch `index`'s token to every patch's
    token (1 at the reference itself), laid out row-major on the grid."""
    if T.dim() != 2:
        raise ValueError(f"reference_similarity takes one image's tokens [P, D], got {tuple(T.shape)}")
    P = T.shape[0]
    g = _grid_of(P, grid)
    u = F.normalize(T.double(), dim=-1)
    return (u @ u[index]).reshape(g, g).float()


def pick_reference_patches(labels: torch.Tensor, grid: int | None = None, metric: str = "chessboard",
                           pet: int = PET, background: int = BACKGROUND, boundary: int = BOUNDARY) -> dict:
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
    g = _grid_of(P, grid)
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


# --------------------------------------------------------------------------------- effective rank
def effective_rank(X: torch.Tensor, eps: float = 1e-12, center: bool = False) -> float:
    """RankMe (Garrido et al. 2023) of X [M, D]: exp(-sum_i p_i log p_i) with p_i = s_i / sum_j s_j + eps,
    s the singular values of X (of X minus its column means when `center`; RankMe itself does not centre).
    Between 1 and min(M, D); exactly k for k equal non-zero singular values."""
    X = X.double()
    if center:
        X = X - X.mean(0)
    M, D = X.shape
    if M * D <= 4_000_000:
        s = torch.linalg.svdvals(X)
    else:
        # tall token matrices: the D x D Gram matrix gives the same singular values at a fraction of the
        # cost; float64 keeps the error of the smallest ones far below what moves the entropy
        s = torch.linalg.eigvalsh(X.T @ X if M >= D else X @ X.T).clamp(min=0).sqrt()
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def token_effective_rank(T: torch.Tensor, max_tokens: int | None = None, seed: int = 0,
                         center: bool = False) -> float:
    """effective_rank of all tokens flattened to [N*P, D]; with `max_tokens`, of a seeded random subset of
    at most that many tokens."""
    _check_tokens(T)
    X = T.reshape(-1, T.shape[-1])
    if max_tokens is not None and len(X) > max_tokens:
        X = X[torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))[:max_tokens]]
    return effective_rank(X, center=center)


# ---------------------------------------------------------------------------------------------- CKA
def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA with the biased (centred) HSIC: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), where
    Xc, Yc are X [M, D1], Y [M, D2] minus their column means; rows are the same M examples."""
    if len(X) != len(Y):
        raise ValueError(f"X and Y need the same examples, got {len(X)} and {len(Y)} rows")
    X, Y = X.double() - X.double().mean(0), Y.double() - Y.double().mean(0)
    xy = (Y.T @ X).square().sum()
    return float(xy / (torch.linalg.matrix_norm(X.T @ X) * torch.linalg.matrix_norm(Y.T @ Y)))


def hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> float:
    """Unbiased HSIC (Song et al. 2012) of n x n kernel matrices, n > 3, with K~, L~ their copies with a
    zero diagonal: [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))."""
    n = K.shape[0]
    if n <= 3:
        raise ValueError(f"unbiased HSIC needs more than 3 examples, got {n}")
    K = K.double().clone().fill_diagonal_(0)
    L = L.double().clone().fill_diagonal_(0)
    kl = (K * L.T).sum()                                               # tr(K~ L~) = sum_ij K~_ij L~_ji
    cross = K.sum(0) @ L.sum(1)                                        # 1'K~L~1 = (1'K~)(L~1)
    return float((kl + K.sum() * L.sum() / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3)))


def _batches(M: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Seeded shuffle of 0..M-1 cut into batches of batch_size; a last batch of 3 or fewer is dropped
    (the unbiased estimator needs n > 3)."""
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(seed))
    return [b for b in perm.split(batch_size) if len(b) > 3]


def _hsic_table(batches: Iterable[list[torch.Tensor]]) -> torch.Tensor:
    """Mean over minibatches of HSIC_1(K_a, K_b) for every pair of representations a, b, linear kernels
    K = X X^T of each batch's rows -> [R, R]."""
    total, count = None, 0
    for reps in batches:
        Ks = [x.double() @ x.double().T for x in reps]
        R = len(Ks)
        h = torch.zeros(R, R, dtype=torch.float64)
        for a in range(R):
            for b in range(a, R):
                h[a, b] = h[b, a] = hsic_unbiased(Ks[a], Ks[b])
        total, count = (h if total is None else total + h), count + 1
    if not count:
        raise ValueError("minibatch CKA needs at least one minibatch of more than 3 examples")
    return total / count


def _cka_from_hsic(h: torch.Tensor) -> torch.Tensor:
    d = h.diagonal().clamp(min=1e-300)
    return h / torch.sqrt(d[:, None] * d[None])


def minibatch_cka(X, Y: torch.Tensor | None = None, batch_size: int = 256, seed: int = 0) -> float:
    """Minibatch linear CKA (Nguyen et al. 2021, "Do wide and deep networks learn the same things?"):
    mean_b HSIC_1(K_b, L_b) / sqrt(mean_b HSIC_1(K_b, K_b) * mean_b HSIC_1(L_b, L_b)), with HSIC_1 the
    unbiased estimator (`hsic_unbiased`) and K_b = X_b X_b^T, L_b = Y_b Y_b^T on minibatch b.

    Either X [M, D1] and Y [M, D2] (same rows), shuffled with `seed` into minibatches of `batch_size`,
    or Y=None and X an iterable of (X_b, Y_b) pairs that are already minibatches (e.g. features computed
    batch by batch). No centring is needed: the unbiased HSIC is unchanged by shifting the features.
    """
    if Y is None:
        pairs = ((xb, yb) for xb, yb in X)
    else:
        if len(X) != len(Y):
            raise ValueError(f"X and Y need the same examples, got {len(X)} and {len(Y)} rows")
        pairs = ((X[b], Y[b]) for b in _batches(len(X), batch_size, seed))
    return float(_cka_from_hsic(_hsic_table(pairs))[0, 1])


def cka_matrix(reps: dict, method: str = "minibatch", batch_size: int = 256, seed: int = 0):
    """(names, [R, R] list of lists): CKA between every pair of representations in `reps` {name: X [M, D]},
    all with the same M rows. method 'minibatch' (unbiased, `minibatch_cka`; one shared seeded split into
    minibatches, so every pair sees the same batches) or 'linear' (biased, `linear_cka`). Symmetric by
    construction; the diagonal is 1."""
    names = list(reps)
    Xs = [reps[k].reshape(len(reps[k]), -1) for k in names]
    if len({len(x) for x in Xs}) > 1:
        raise ValueError("all representations need the same number of rows")
    if method == "minibatch":
        m = _cka_from_hsic(_hsic_table([x[b] for x in Xs] for b in _batches(len(Xs[0]), batch_size, seed)))
    elif method == "linear":
        R = len(Xs)
        m = torch.eye(R, dtype=torch.float64)
        for a in range(R):
            for b in range(a + 1, R):
                m[a, b] = m[b, a] = linear_cka(Xs[a], Xs[b])
    else:
        raise ValueError(f"method must be 'minibatch' or 'linear', got {method!r}")
    return names, m.tolist()


# ------------------------------------------------------------------------------------------ report
def geometry_report(encoder, images: torch.Tensor, masks: torch.Tensor, layers: Iterable[int] | None = None,
                    normalize: bool = True, batch_size: int = 256, device="cpu", train_frac: float = 0.5,
                    probe_epochs: int = 100, probe_lr: float = 1e-2, seed: int = 0,
                    max_rank_tokens: int | None = 65536, cka_tokens: int = 8192, cka_batch_size: int = 512,
                    reference_image: int = 0) -> dict:
    """Every measurement of this module at each layer of `encoder` (see `patch_tokens` for the layer
    numbering; -1 is the final normed output the paper measures) on `images` uint8 [N, 3, S, S] with
    trimaps `masks` [N, S, S] -> a JSON-ready dict of plain Python types:

    layers, grid, num_images, dim, distances (1..2(grid-1)), settings, and per_layer: one dict per layer
    with within_image_variance, across_image_variance, effective_rank (RankMe of all tokens, uncentred),
    effective_rank_centered, cosine_by_distance (list aligned with `distances`), patch_probe
    (`linear_probe` on majority trimap classes), position_probe, and reference (the reference patches of
    image `reference_image` and their [grid][grid] cosine maps);
    cka: {names, matrix} minibatch (unbiased) linear CKA between the layers. Its examples are tokens (a
    seeded sample of at most `cka_tokens`, the same for every layer): the question is how patch-level
    structure changes through depth, which per-image mean tokens would average away.
    """
    tokens = patch_tokens(encoder, images, layers, normalize=normalize, batch_size=batch_size, device=device)
    layer_ids = list(tokens)
    N, P, D = tokens[layer_ids[0]].shape
    g = _grid_of(P, encoder.cfg.grid if hasattr(encoder, "cfg") else None)
    labels = patch_labels(masks, g)
    refs = pick_reference_patches(labels[reference_image], g)
    per_layer = []
    for k in layer_ids:
        T = tokens[k]
        cos = cosine_by_distance(T, g)
        maps = {name: reference_similarity(T[reference_image], i, g).tolist()
                for name, i in refs.items() if name != "rules" and i is not None}
        per_layer.append({
            "layer": k,
            "within_image_variance": within_image_variance(T),
            "across_image_variance": across_image_variance(T),
            "effective_rank": token_effective_rank(T, max_rank_tokens, seed),
            "effective_rank_centered": token_effective_rank(T, max_rank_tokens, seed, center=True),
            "cosine_by_distance": [cos[d] for d in sorted(cos)],
            "patch_probe": linear_probe(T, labels, 3, train_frac, probe_epochs, probe_lr, seed),
            "position_probe": position_probe(T, g, train_frac, probe_epochs, probe_lr, seed),
            "reference": {"image": reference_image, "patches": refs, "maps": maps},
        })
    # tokens as CKA examples: one seeded sample of token positions shared by every layer
    flat = {str(k): tokens[k].reshape(-1, D) for k in layer_ids}
    pick = torch.randperm(N * P, generator=torch.Generator().manual_seed(seed))[:cka_tokens]
    names, matrix = cka_matrix({k: v[pick] for k, v in flat.items()}, "minibatch", cka_batch_size, seed)
    return {
        "layers": layer_ids, "grid": g, "num_images": N, "dim": D,
        "distances": list(range(1, 2 * g - 1)),
        "per_layer": per_layer,
        "cka": {"names": names, "matrix": matrix, "method": "minibatch unbiased linear CKA", "examples": "tokens"},
        "settings": {"normalize": normalize, "train_frac": train_frac, "probe_epochs": probe_epochs,
                     "probe_lr": probe_lr, "seed": seed, "max_rank_tokens": max_rank_tokens,
                     "cka_tokens": min(cka_tokens, N * P), "cka_batch_size": cka_batch_size},
    }


def table(report: dict):
    """A pandas DataFrame with one row per layer of a `geometry_report`: the Table 2 columns (variances,
    patch probe last-epoch training accuracy in percent, as the paper) plus held-out and balanced probe
    accuracy (percent), effective ranks, position-probe accuracy (percent) and error, and the cosine at
    each distance (cos_d1, cos_d2, ...)."""
    import pandas as pd                    # only here: the measurements themselves need torch alone

    rows = []
    for r in report["per_layer"]:
        pp, pos = r["patch_probe"], r["position_probe"]
        row = {"layer": r["layer"],
               "within_image_variance": r["within_image_variance"],
               "across_image_variance": r["across_image_variance"],
               "patch_probe_train_pct": 100 * pp["train_accuracy"],
               "patch_probe_heldout_pct": 100 * pp["heldout_accuracy"],
               "patch_probe_balanced_pct": 100 * pp["heldout_balanced_accuracy"],
               "effective_rank": r["effective_rank"],
               "effective_rank_centered": r["effective_rank_centered"],
               "position_probe_pct": 100 * pos["heldout_accuracy"],
               "position_error": pos["mean_manhattan_error"]}
        row.update({f"cos_d{d}": c for d, c in zip(report["distances"], r["cosine_by_distance"])})
        rows.append(row)
    return pd.DataFrame(rows).set_index("layer")
