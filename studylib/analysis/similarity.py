"""How rich and how alike token representations are: effective rank (RankMe) and linear CKA between
layers or encoders (biased, and the minibatch estimate with the unbiased HSIC)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from studylib.analysis.tokens import check_tokens


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


def token_effective_rank(T: torch.Tensor, max_tokens: int | None = None, seed: int = 0, center: bool = False) -> float:
    """effective_rank of all tokens flattened to [N*P, D]; with `max_tokens`, of a seeded random subset of
    at most that many tokens."""
    check_tokens(T)
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
    kl = (K * L.T).sum()  # tr(K~ L~) = sum_ij K~_ij L~_ji
    cross = K.sum(0) @ L.sum(1)  # 1'K~L~1 = (1'K~)(L~1)
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
