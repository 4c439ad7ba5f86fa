"""What a linear read-out and whole-representation statistics find in patch tokens: the frozen-token
linear probe on patch labels (Table 2) and on patch positions, effective rank (RankMe) and linear CKA
(biased and minibatch-unbiased). Token shapes and conventions: `studylib.analysis.tokens`.

Two probe recipes (`ProbeRecipe`): the clean one (`linear_probe`: standardised tokens, zero-initialised
head, full-batch AdamW, 100 epochs, a seeded split of the measured images) and the authors' one
(`ProbeRecipe.paper()` with `probe_on_sets`: raw tokens, PyTorch's default Linear init, Adam lr 1e-2,
5 epochs over minibatches of 64 images in order, on given train and held-out image sets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from studylib.analysis.tokens import check_tokens, grid_of, manhattan_distances

__all__ = [
    "ProbeRecipe",
    "probe_on_sets",
    "split_images",
    "balanced_accuracy",
    "linear_probe",
    "position_probe",
]


# ---------------------------------------------------------------------------------- linear probes
@dataclass(frozen=True)
class ProbeRecipe:
    """How a frozen-token linear probe Linear(D -> K) is trained.

    optimizer: 'adamw' (clean) or 'adam' (the authors' `torch.optim.Adam`).
    lr, weight_decay: the optimiser's (Adam's weight_decay is L2 in the gradient; the authors: 0).
    epochs: passes over the training tokens; the reported training accuracy is the last one's.
    batch_images: images per minibatch (all their tokens together, as the authors' DataLoader of 64
      images feeds 64 x P tokens per step); None: one full batch of every training token.
    shuffle: a seeded new order of the training tokens each epoch; False keeps the images (and their
      tokens) in their order (the authors' DataLoader has shuffle=False). Irrelevant for a full batch.
    standardize: standardise the tokens with the training tokens' per-dimension mean and std (clean);
      False feeds the raw frozen tokens (the authors).
    init: 'zeros' (clean; the problem is convex) or 'torch' (PyTorch's default Linear init, the authors',
      drawn from a generator seeded with the probe's seed so the global RNG is left alone).
    """

    optimizer: str = "adamw"
    lr: float = 1e-2
    weight_decay: float = 0.01
    epochs: int = 100
    batch_images: int | None = None
    shuffle: bool = True
    standardize: bool = True
    init: str = "zeros"

    def __post_init__(self):
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.init not in ("zeros", "torch"):
            raise ValueError(f"init must be 'zeros' or 'torch', got {self.init!r}")
        if self.epochs < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"probe recipe needs epochs >= 1, lr > 0, weight_decay >= 0: {self}")
        if self.batch_images is not None and self.batch_images < 1:
            raise ValueError(f"batch_images must be None (full batch) or at least 1, got {self.batch_images}")

    @classmethod
    def clean(cls) -> ProbeRecipe:
        """This project's probe: standardised tokens, zero init, full-batch AdamW (lr 1e-2, wd 0.01), 100 epochs."""
        return cls()

    @classmethod
    def paper(cls) -> ProbeRecipe:
        """The authors' probe (`diagnostics.py`): raw tokens, default Linear init, Adam lr 1e-2 without weight
        decay, 5 epochs over minibatches of 64 images in dataset order."""
        return cls("adam", 1e-2, 0.0, 5, 64, False, False, "torch")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def _fit_linear(
    X: torch.Tensor,
    y: torch.Tensor,
    K: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int | None,
    seed: int,
    optimizer: str = "adamw",
    init: str = "zeros",
    shuffle: bool = True,
) -> tuple[torch.nn.Linear, float]:
    """Cross-entropy on a Linear(D -> K) over minibatches of `batch_size` rows of X (None: full batch),
    in a seeded random order each epoch (`shuffle`) or in X's order; returns the layer and the accuracy
    of the last epoch's forward passes (what a training loop logs, and what the paper reports).
    optimizer 'adamw' or 'adam'; init 'zeros' or 'torch' (PyTorch's default, seeded with `seed`)."""
    if init == "torch":
        # PyTorch's default Linear init from a seeded copy of the RNG: the caller's global RNG is untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = torch.nn.Linear(X.shape[1], K)
    else:
        head = torch.nn.Linear(X.shape[1], K)
        # zero init: the problem is convex, so this loses nothing and keeps the global RNG untouched
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    make = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    opt = make(head.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    M = len(X)
    bs = M if batch_size is None else int(batch_size)
    last_acc = float("nan")
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.arange(M) if bs >= M or not shuffle else torch.randperm(M, generator=g)
            correct = 0
            for s in range(0, M, bs):
                i = order[s : s + bs]
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


def _tokens_and_labels(T: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """[N, P, D] tokens and [N, P] labels -> (X [M, D] float, y [M]) with the tokens whose label lies
    outside 0..num_classes-1 dropped; rows stay image-major (all of image 0's tokens first)."""
    check_tokens(T)
    N, P, D = T.shape
    labels = labels.reshape(N, -1).long()
    if labels.shape[1] != P:
        raise ValueError(f"labels {tuple(labels.shape)} do not match tokens {tuple(T.shape)}")
    X, y = T.reshape(-1, D).float(), labels.reshape(-1)
    keep = (y >= 0) & (y < num_classes)
    return X[keep], y[keep]


def _probe_result(head, last_acc, Xtr, ytr, Xte, yte, num_classes: int, n_train: int, n_heldout: int) -> dict:
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
        "train_images": n_train,
        "heldout_images": n_heldout,
    }


def linear_probe(
    T: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int = 3,
    train_frac: float = 0.5,
    epochs: int = 100,
    lr: float = 1e-2,
    seed: int = 0,
    weight_decay: float = 0.01,
    batch_size: int | None = None,
) -> dict:
    """Frozen-token linear probe: Linear(D -> num_classes) on every patch token, labels [N, P].

    Images (not patches) are split at random with `seed` (`train_frac` of them train), so held-out
    tokens come from unseen images. Features are standardised with the training tokens' mean/std.
    The head is trained with AdamW cross-entropy for `epochs` epochs, full batch when `batch_size` is
    None, else shuffled minibatches. Tokens whose label lies outside 0..num_classes-1 are dropped.
    (The clean recipe, `ProbeRecipe.clean()`; the authors' recipe on given sets: `probe_on_sets`.)

    Returns train_accuracy (the last epoch's training accuracy, what the paper reports: the accuracy of
    that epoch's forward passes), final_train_accuracy (after the last update), heldout_accuracy,
    heldout_balanced_accuracy (mean recall over the classes present in the held-out tokens),
    heldout_recall (per class, None when absent), majority_baseline (held-out accuracy of always
    predicting the training set's most frequent class), train_counts / heldout_counts (tokens per
    class), train_images / heldout_images.
    """
    check_tokens(T)
    N = T.shape[0]
    tr, te = split_images(N, train_frac, seed)
    labels = labels.reshape(N, -1)
    Xtr, ytr = _tokens_and_labels(T[tr], labels[tr], num_classes)
    Xte, yte = _tokens_and_labels(T[te], labels[te], num_classes)
    Xtr, Xte = _standardise(Xtr, Xte)
    head, last_acc = _fit_linear(Xtr, ytr, num_classes, epochs, lr, weight_decay, batch_size, seed)
    return _probe_result(head, last_acc, Xtr, ytr, Xte, yte, num_classes, len(tr), len(te))


def probe_on_sets(
    train_tokens: torch.Tensor,
    train_labels: torch.Tensor,
    heldout_tokens: torch.Tensor,
    heldout_labels: torch.Tensor,
    num_classes: int = 3,
    recipe: ProbeRecipe | None = None,
    seed: int = 0,
) -> dict:
    """Frozen-token linear probe trained on one image set and tested on another (by default the authors'
    recipe, `ProbeRecipe.paper()`: raw tokens, Adam lr 1e-2, 5 epochs, minibatches of 64 images in order).

    train_tokens [N, P, D] with train_labels [N, P] (e.g. every Pets trainval image, as the authors),
    heldout_tokens [M, P, D] with heldout_labels [M, P] (images the probe never sees). Tokens whose label
    lies outside 0..num_classes-1 are dropped. Returns the keys of `linear_probe` (train_accuracy is the
    last epoch's training accuracy, the number the paper reports; heldout_accuracy sits beside it) and
    the recipe used.
    """
    recipe = ProbeRecipe.paper() if recipe is None else recipe
    check_tokens(train_tokens)
    check_tokens(heldout_tokens)
    P = train_tokens.shape[1]
    Xtr, ytr = _tokens_and_labels(train_tokens, train_labels, num_classes)
    Xte, yte = _tokens_and_labels(heldout_tokens, heldout_labels, num_classes)
    if recipe.standardize:
        Xtr, Xte = _standardise(Xtr, Xte)
    batch = None if recipe.batch_images is None else recipe.batch_images * P  # image-major rows
    head, last_acc = _fit_linear(
        Xtr,
        ytr,
        num_classes,
        recipe.epochs,
        recipe.lr,
        recipe.weight_decay,
        batch,
        seed,
        recipe.optimizer,
        recipe.init,
        recipe.shuffle,
    )
    out = _probe_result(head, last_acc, Xtr, ytr, Xte, yte, num_classes, len(train_tokens), len(heldout_tokens))
    return {**out, "recipe": recipe.to_dict()}


def position_probe(
    T: torch.Tensor,
    grid: int | None = None,
    train_frac: float = 0.5,
    epochs: int = 100,
    lr: float = 1e-2,
    seed: int = 0,
    weight_decay: float = 0.01,
    batch_size: int | None = None,
) -> dict:
    """Does a token still know where it is? A linear probe (as `linear_probe`: seeded image split,
    standardised features, zero-initialised Linear(D -> P), AdamW) predicting each token's own patch
    index 0..P-1 from the frozen token.

    Returns heldout_accuracy (chance = 1/P), train_accuracy (last epoch), chance, mean_manhattan_error
    (mean over held-out tokens of |r_pred - r| + |c_pred - c|) and chance_manhattan_error (the same for
    a uniformly random guess: mean of the P x P Manhattan distance matrix, 2(g^2-1)/(3g), 5.25 at g=8).
    """
    check_tokens(T)
    N, P, D = T.shape
    g = grid_of(P, grid)
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
