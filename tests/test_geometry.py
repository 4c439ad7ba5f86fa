"""Known-answer tests for studylib.geometry (expected values worked out in comments or by brute force)."""

import json
import math

import numpy as np
import pytest
import torch

from studylib.analysis import geometry, probes, reference, similarity, tokens
from studylib.core import augment as A
from studylib.data.splits import patch_labels


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def orthonormal(m, k, seed):
    """[m, k] with orthonormal columns."""
    q, _ = torch.linalg.qr(torch.randn(m, k, generator=gen(seed), dtype=torch.float64))
    return q


# ------------------------------------------------------------------------------------------ variances
def test_variances_identical_tokens_within_image():
    # 3 images, 5 tokens each, every token of image n equals v_n:
    # dim 0 values 0, 2, 4 -> mean 2, population variance (4 + 0 + 4) / 3 = 8/3
    # dim 1 values 0, 4, 8 -> mean 4, population variance (16 + 0 + 16) / 3 = 32/3
    # across = (8/3 + 32/3) / 2 = 20/3 ; within = 0
    v = torch.tensor([[0.0, 0.0], [2.0, 4.0], [4.0, 8.0]])
    T = v[:, None, :].expand(3, 5, 2)
    assert tokens.within_image_variance(T) == pytest.approx(0.0, abs=1e-12)
    assert tokens.across_image_variance(T) == pytest.approx(20 / 3, rel=1e-9)


def test_variances_population_not_sample():
    # one image, one dim, tokens 0 and 2: population variance 1 (the sample variance would be 2)
    T = torch.tensor([[[0.0], [2.0]]])
    assert tokens.within_image_variance(T) == pytest.approx(1.0)


def test_variances_iid_gaussian_tokens():
    # i.i.d. N(0, s^2): within -> s^2 (P-1)/P (ddof 0), across -> s^2 / P (variance of a mean of P draws)
    s, N, P, D = 2.0, 400, 64, 32
    T = s * torch.randn(N, P, D, generator=gen(1))
    assert tokens.within_image_variance(T) == pytest.approx(s**2 * (P - 1) / P, rel=0.03)
    assert tokens.across_image_variance(T) == pytest.approx(s**2 / P, rel=0.1)


# --------------------------------------------------------------------------------- cosine vs distance
def smooth_tokens(grid, a, N=3):
    rc = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1).reshape(-1, 2)
    r, c = rc[:, 0].double() * a, rc[:, 1].double() * a
    t = torch.stack([torch.cos(r), torch.sin(r), torch.cos(c), torch.sin(c)], -1)  # [P, 4]
    # a different rotation per image: cosines are unchanged, so the curve must not move
    Qs = [orthonormal(4, 4, seed) for seed in range(N)]
    return torch.stack([t @ Q for Q in Qs])


def test_cosine_smooth_tokens_known_curve_and_monotone():
    grid, a = 8, 0.2
    T = smooth_tokens(grid, a)
    curve = tokens.cosine_by_distance(T, grid)
    assert sorted(curve) == list(range(1, 2 * (grid - 1) + 1))
    # brute force: cos(t_p, t_q) = (cos(a dr) + cos(a dc)) / 2 (both halves have norm 1, total norm sqrt 2)
    sums, counts = {}, {}
    for p in range(grid * grid):
        for q in range(grid * grid):
            dr, dc = abs(p // grid - q // grid), abs(p % grid - q % grid)
            d = dr + dc
            if d:
                sums[d] = sums.get(d, 0.0) + (math.cos(a * dr) + math.cos(a * dc)) / 2
                counts[d] = counts.get(d, 0) + 1
    for d in curve:
        assert curve[d] == pytest.approx(sums[d] / counts[d], abs=1e-9)
    values = [curve[d] for d in sorted(curve)]
    assert all(x > y for x, y in zip(values, values[1:]))


def test_cosine_constant_tokens_and_length():
    T = torch.randn(1, 1, 16, generator=gen(2)).expand(4, 36, 16)
    curve = tokens.cosine_by_distance(T, 6)
    assert len(curve) == 10
    assert all(v == pytest.approx(1.0, abs=1e-9) for v in curve.values())
    assert len(tokens.cosine_by_distance(torch.randn(2, 64, 8), 8)) == 14


def test_manhattan_distances_small_grid():
    # 2x2 grid: patches 0 (0,0) 1 (0,1) 2 (1,0) 3 (1,1)
    assert tokens.manhattan_distances(2).tolist() == [[0, 1, 1, 2], [1, 0, 2, 1], [1, 2, 0, 1], [2, 1, 1, 0]]
    assert tokens.chessboard_distances(2).tolist() == [[0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]]


# -------------------------------------------------------------------------------------- patch labels
def test_patch_labels_hand_mask_with_ties():
    # 4x4 mask, 2x2 grid of 2x2 patches:
    # patch 0 (top-left)  0 0 / 1 2 -> 0 (2 votes)
    # patch 1 (top-right) 1 1 / 2 2 -> tie 1-2 -> 1 (lowest id)
    # patch 2 (bot-left)  2 2 / 2 0 -> 2
    # patch 3 (bot-right) 0 1 / 1 0 -> tie 0-1 -> 0
    m = torch.tensor([[0, 0, 1, 1], [1, 2, 2, 2], [2, 2, 0, 1], [2, 0, 1, 0]])
    out = patch_labels(m[None], 2)
    assert out.tolist() == [[0, 1, 2, 0]]
    assert out.dtype == torch.long
    # one 2x2 patch per mask: 0 1 / 2 2 -> 2 (two votes) ; 1 2 / 1 2 -> tie 1-2 -> 1
    m2 = torch.tensor([[[0, 1], [2, 2]], [[1, 2], [1, 2]]])
    assert patch_labels(m2, 1).tolist() == [[2], [1]]


def test_patch_labels_uint8_and_shape():
    m = torch.randint(0, 3, (5, 64, 64), generator=gen(3)).to(torch.uint8)
    out = patch_labels(m, 8)
    assert out.shape == (5, 64)
    # patch (r, c) covers pixels 8r..8r+7, 8c..8c+7
    block = m[2, 16:24, 40:48].flatten().long()
    counts = torch.bincount(block, minlength=3)
    assert out[2, 2 * 8 + 5] == int(counts.argmax())
    with pytest.raises(ValueError):
        patch_labels(m[:, :63], 8)


def square_pet(rows, cols, grid=8):
    lab = torch.full((grid, grid), tokens.BACKGROUND)
    lab[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = tokens.PET
    return lab


def test_pick_reference_patches_square_pet():
    # 5x5 pet at rows 1..5, cols 2..6: its centre (3, 4) -> index 28 is 3 steps from the background
    lab = square_pet((1, 5), (2, 6))
    for metric in ("chessboard", "manhattan"):
        refs = tokens.pick_reference_patches(lab.flatten(), 8, metric=metric)
        assert refs["pet"] == 28
    assert refs["background"] == 0 and refs["rules"]["background"] == "corner"
    # no boundary-majority patch: first pet patch next to background, (1, 2) -> 10
    assert refs["boundary"] == 10 and refs["rules"]["boundary"] == "adjacent"


def test_pick_reference_patches_corner_and_boundary_rules():
    lab = square_pet((1, 5), (2, 6))
    lab[0, 0] = tokens.PET  # top-left corner is pet -> the top-right corner (index 7) is chosen
    lab[6, 4] = tokens.BOUNDARY  # a boundary-majority patch -> index 52
    refs = tokens.pick_reference_patches(lab.flatten(), 8)
    assert refs["background"] == 7 and refs["boundary"] == 52 and refs["rules"]["boundary"] == "majority"
    # no background corner at all: the first background patch in row-major order
    lab2 = torch.full((8, 8), tokens.PET)
    lab2[3, 5] = tokens.BACKGROUND
    refs2 = tokens.pick_reference_patches(lab2.flatten(), 8)
    assert refs2["background"] == 29 and refs2["rules"]["background"] == "first"
    # a pet with no pet patches: None
    assert tokens.pick_reference_patches(torch.full((64,), tokens.BACKGROUND), 8)["pet"] is None


def test_reference_similarity():
    T = torch.zeros(16, 3)
    T[:, 0] = 1.0
    T[5] = torch.tensor([0.0, 1.0, 0.0])  # orthogonal to the others
    T[6] = torch.tensor([-2.0, 0.0, 0.0])  # opposite
    m = tokens.reference_similarity(T, 0)
    assert m.shape == (4, 4)
    assert m[0, 0] == pytest.approx(1.0) and m[1, 1] == pytest.approx(0.0) and m[1, 2] == pytest.approx(-1.0)
    assert m[3, 3] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------- linear probes
def test_split_images_disjoint_and_seeded():
    tr, te = probes.split_images(10, 0.5, seed=3)
    assert len(tr) == 5 and len(te) == 5
    assert sorted(tr.tolist() + te.tolist()) == list(range(10))
    assert probes.split_images(10, 0.5, seed=3)[0].tolist() == tr.tolist()
    assert probes.split_images(10, 0.5, seed=4)[0].tolist() != tr.tolist()


def test_linear_probe_separable():
    N, P, D = 64, 16, 8
    y = torch.randint(0, 3, (N, P), generator=gen(4))
    centres = 3 * torch.eye(3, D)
    T = centres[y] + 0.3 * torch.randn(N, P, D, generator=gen(5))
    out = probes.linear_probe(T, y, 3)
    assert out["heldout_accuracy"] > 0.98 and out["heldout_balanced_accuracy"] > 0.98
    assert out["train_accuracy"] > 0.95
    assert out["train_images"] == 32 and out["heldout_images"] == 32
    assert sum(out["train_counts"]) == 32 * P and sum(out["heldout_counts"]) == 32 * P


def test_linear_probe_random_labels_near_chance():
    N, P, D = 64, 16, 8
    T = torch.randn(N, P, D, generator=gen(6))
    y = torch.randint(0, 3, (N, P), generator=gen(7))
    out = probes.linear_probe(T, y, 3)
    assert abs(out["heldout_accuracy"] - 1 / 3) < 0.07


def test_linear_probe_splits_images_not_patches():
    # each image's tokens are its own random vector (+ tiny noise) and all share one random label:
    # the probe can memorise training images, but on unseen images it can only guess.
    # A split of patches would put the same images on both sides and score ~1 held-out.
    N, P, D = 90, 16, 48
    v = torch.randn(N, 1, D, generator=gen(8))
    T = v + 0.01 * torch.randn(N, P, D, generator=gen(9))
    y = torch.randint(0, 3, (N, 1), generator=gen(10)).expand(N, P)
    out = probes.linear_probe(T, y, 3, epochs=200)
    assert out["final_train_accuracy"] > 0.95
    assert out["heldout_accuracy"] < 0.6


def test_balanced_accuracy_hand_checked():
    # 8 of class 0, 2 of class 1, class 2 absent; predict 0 everywhere except one class-1 hit:
    # recall 0 = 8/8 = 1, recall 1 = 1/2 -> balanced (1 + 0.5) / 2 = 0.75; plain accuracy 9/10
    target = torch.tensor([0] * 8 + [1, 1])
    pred = torch.tensor([0] * 8 + [1, 0])
    bal, recall = probes.balanced_accuracy(pred, target, 3)
    assert bal == pytest.approx(0.75) and recall == [1.0, 0.5, None]
    # all-majority prediction: accuracy 0.8 but balanced 0.5
    assert probes.balanced_accuracy(torch.zeros(10, dtype=torch.long), target, 3)[0] == pytest.approx(0.5)


def test_linear_probe_imbalanced_uninformative():
    # 90% class 0, tokens carry no information: accuracy near the majority rate, balanced near 1/2
    N, P, D = 64, 16, 8
    T = torch.randn(N, P, D, generator=gen(11))
    y = (torch.rand(N, P, generator=gen(12)) < 0.1).long()
    out = probes.linear_probe(T, y, 3)
    present = [r for r in out["heldout_recall"] if r is not None]
    assert out["heldout_recall"][2] is None
    assert out["heldout_balanced_accuracy"] == pytest.approx(sum(present) / len(present))
    assert out["heldout_balanced_accuracy"] < 0.6
    assert out["heldout_accuracy"] == pytest.approx(out["majority_baseline"], abs=0.05)


def test_position_probe_one_hot_positions():
    N, P = 40, 64
    T = torch.eye(P).expand(N, P, P) + 0.05 * torch.randn(N, P, P, generator=gen(13))
    out = probes.position_probe(T, 8)
    assert out["heldout_accuracy"] > 0.99 and out["mean_manhattan_error"] < 0.02
    assert out["chance"] == pytest.approx(1 / 64)
    assert out["chance_manhattan_error"] == pytest.approx(2 * (64 - 1) / (3 * 8))  # 5.25


def test_position_probe_no_positional_information():
    N, P, D = 40, 64, 16
    T = torch.randn(N, P, D, generator=gen(14))
    out = probes.position_probe(T, 8)
    assert out["heldout_accuracy"] < 3 / P
    assert out["mean_manhattan_error"] == pytest.approx(out["chance_manhattan_error"], abs=0.6)


# ------------------------------------------------------------------------------------ effective rank
def test_effective_rank_equal_singular_values_is_exact():
    k, M, D = 5, 200, 32
    X = orthonormal(M, k, 15) @ orthonormal(D, k, 16).T * 3.0  # k singular values, all 3
    assert similarity.effective_rank(X) == pytest.approx(k, abs=1e-4)
    # the Gram-matrix path for tall matrices gives the same answer
    Xt = orthonormal(40000, k, 17) @ orthonormal(128, k, 18).T
    assert similarity.effective_rank(Xt) == pytest.approx(k, abs=1e-3)


def test_effective_rank_random_rank_k_and_identity():
    k, M, D = 6, 2000, 64
    X = torch.randn(M, k, generator=gen(19)) @ torch.randn(k, D, generator=gen(20))
    assert k - 1 < similarity.effective_rank(X) < k + 0.5
    assert similarity.effective_rank(torch.eye(16)) == pytest.approx(16, abs=1e-6)
    # one dominant direction: close to 1
    assert similarity.effective_rank(torch.outer(torch.ones(100), torch.arange(1.0, 9.0))) == pytest.approx(1, abs=1e-3)


def test_token_effective_rank_subsample_is_seeded():
    T = torch.randn(50, 16, 12, generator=gen(21))
    a = similarity.token_effective_rank(T, max_tokens=100, seed=1)
    assert a == similarity.token_effective_rank(T, max_tokens=100, seed=1)
    assert a != similarity.token_effective_rank(T, max_tokens=100, seed=2)
    assert 10 < similarity.token_effective_rank(T) <= 12


# ---------------------------------------------------------------------------------------------- CKA
def test_cka_invariances():
    X = torch.randn(2048, 32, generator=gen(22), dtype=torch.float64)
    Q = orthonormal(32, 32, 23)
    for Y in (X @ Q, 7.5 * X):
        assert similarity.linear_cka(X, Y) == pytest.approx(1.0, abs=1e-9)
        assert similarity.minibatch_cka(X, Y, batch_size=256) == pytest.approx(1.0, abs=1e-9)


def test_linear_cka_matches_kernel_form():
    # biased HSIC with centred kernels: tr(HKH HLH) / sqrt(tr(HKH HKH) tr(HLH HLH)), K = XX', L = YY'
    X = torch.randn(30, 5, generator=gen(24), dtype=torch.float64)
    Y = torch.randn(30, 7, generator=gen(25), dtype=torch.float64) + X[:, :1]
    H = torch.eye(30, dtype=torch.float64) - 1 / 30
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    want = (K * L).sum() / torch.sqrt((K * K).sum() * (L * L).sum())
    assert similarity.linear_cka(X, Y) == pytest.approx(float(want), rel=1e-9)


def test_unbiased_cka_of_independent_data_near_zero():
    X = torch.randn(4096, 64, generator=gen(26))
    Y = torch.randn(4096, 32, generator=gen(27))
    assert abs(similarity.minibatch_cka(X, Y, batch_size=512)) < 0.1
    # the biased estimator is far from 0 on few examples with many dims: why the unbiased one is used
    assert similarity.linear_cka(X[:64], Y[:64]) > 0.3


def test_hsic_unbiased_shift_invariant_and_pairs_iterable():
    X = torch.randn(64, 6, generator=gen(28), dtype=torch.float64)
    Y = X @ torch.randn(6, 4, generator=gen(29), dtype=torch.float64) + torch.randn(64, 4, generator=gen(30))
    h = similarity.hsic_unbiased(X @ X.T, Y @ Y.T)
    Ys = Y + 5.0
    assert similarity.hsic_unbiased(X @ X.T, Ys @ Ys.T) == pytest.approx(h, rel=1e-8)
    batches = [slice(0, 32), slice(32, 64)]
    from_pairs = similarity.minibatch_cka([(X[b], Y[b]) for b in batches])
    h = [
        [sum(similarity.hsic_unbiased(A_[b] @ A_[b].T, B_[b] @ B_[b].T) for b in batches) for B_ in (X, Y)]
        for A_ in (X, Y)
    ]
    assert from_pairs == pytest.approx(h[0][1] / math.sqrt(h[0][0] * h[1][1]), rel=1e-9)


def test_cka_matrix_symmetric_unit_diagonal():
    X = torch.randn(512, 16, generator=gen(31))
    reps = {"a": X, "b": X @ torch.randn(16, 8, generator=gen(32)), "c": torch.randn(512, 4, generator=gen(33))}
    for method in ("minibatch", "linear"):
        names, m = similarity.cka_matrix(reps, method=method, batch_size=128)
        m = torch.tensor(m)
        assert names == ["a", "b", "c"] and m.shape == (3, 3)
        assert torch.allclose(m, m.T) and torch.allclose(m.diagonal(), torch.ones(3, dtype=m.dtype))
        assert m[0, 1] > m[0, 2]


# ------------------------------------------------------------------------------------ encoder + report
@pytest.fixture(scope="module")
def tiny(tiny_encoder_images):
    return tiny_encoder_images  # tests/conftest.py


def test_patch_tokens_layers(tiny):
    enc, images, _ = tiny
    enc.train()
    tok = tokens.patch_tokens(enc, images, layers=[0, -1], batch_size=5)
    assert enc.training  # mode restored
    assert set(tok) == {0, -1} and tok[-1].shape == (16, 64, 64)
    x = A.normalize(A.to_float(images))
    enc.eval()
    with torch.no_grad():
        assert torch.allclose(tok[-1], enc.patch_features(x), atol=1e-5)
        assert torch.allclose(tok[0], enc.forward_intermediates(x, [0], norm=False)[0], atol=1e-5)
    assert set(tokens.patch_tokens(enc, images[:2])) == {0, 1, 2, 3, -1}


def test_geometry_report_tiny_encoder(tiny_report):
    r = tiny_report  # tests/conftest.py: geometry_report of the tiny encoder, layers 0 and -1
    json.dumps(r)  # plain Python types only
    assert r["layers"] == [0, -1] and r["grid"] == 8 and r["num_images"] == 16 and r["dim"] == 64
    assert r["distances"] == list(range(1, 15))
    for row in r["per_layer"]:
        scalars = [
            row["within_image_variance"],
            row["across_image_variance"],
            row["effective_rank"],
            row["effective_rank_centered"],
            *row["cosine_by_distance"],
            *[v for v in row["patch_probe"].values() if isinstance(v, float)],
            *[v for v in row["position_probe"].values() if isinstance(v, float)],
        ]
        assert all(math.isfinite(v) for v in scalars)
        assert len(row["cosine_by_distance"]) == 14
        assert set(row["patch_probe"]) >= {
            "train_accuracy",
            "heldout_accuracy",
            "heldout_balanced_accuracy",
            "train_counts",
            "heldout_counts",
        }
        maps = row["reference"]["maps"]
        assert maps and all(len(m) == 8 and len(m[0]) == 8 for m in maps.values())
    m = torch.tensor(r["cka"]["matrix"])
    assert r["cka"]["names"] == ["0", "-1"] and m.shape == (2, 2) and torch.allclose(m, m.T)
    df = geometry.table(r)
    assert len(df) == 2 and list(df.index) == [0, -1]
    assert {"within_image_variance", "across_image_variance", "patch_probe_train_pct", "cos_d1"} <= set(df.columns)


def test_paper_constants():
    assert set(reference.PAPER_TABLE2) == {"SimMIM", "+CLS Intel", "+CLS Pets", "+spatial Pets"}
    assert reference.PAPER_TABLE2["+spatial Pets"] == {
        "within_image_variance": 0.32,
        "across_image_variance": 0.06,
        "patch_probe_accuracy_pct": 93.3,
    }
    assert all(len(v) == 9 for v in reference.PAPER_COSINE.values())
    assert reference.PAPER_COSINE["SimMIM"][0] == 0.58 and reference.PAPER_COSINE["+spatial Pets"][-1] == 0.63
    assert reference.PAPER_COSINE["+CLS Pets"] == [0.57, 0.38, 0.30, 0.26, 0.24, 0.28, 0.29, 0.29, 0.32]


def test_reference_maps_outline_their_patches_on_the_image():
    from studylib.views import plots

    grid = [[0.0] * 8 for _ in range(8)]
    report = {
        "encoder": {"name": "mim", "pretrain_size": 500},
        "per_layer": [
            {
                "layer": -1,
                "reference": {
                    "image": 0,
                    "patches": {"background": 0, "pet": 9, "boundary": None, "rules": {"pet": "interior"}},
                    "maps": {"background": grid, "pet": grid},
                },
            }
        ],
    }
    fig = plots.reference_maps(report, image=np.zeros((64, 64, 3), dtype=np.uint8))
    assert [t.type for t in fig.data] == ["image", "heatmap", "heatmap"]
    # flat index 9 on the 8x8 grid is row 1, column 1: pixels 8..15 of the 64 px image
    boxes = [(s.x0, s.y0) for s in fig.layout.shapes]
    assert boxes == [(-0.5, -0.5), (7.5, 7.5)]
    assert "mim, pre-training 500" in fig.layout.title.text and "output" in fig.layout.title.text
