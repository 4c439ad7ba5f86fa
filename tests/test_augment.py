"""Batched augmentation: identity, flip and transposed storage through the affine grid, crop boxes and
their statistics, contrast, ImageNet normalisation and MixUp."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from studylib.core import augment as A

torch.set_num_threads(2)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def images():
    return torch.rand(3, 3, 16, 16, generator=_gen(0))


@pytest.fixture
def labels():
    return torch.randint(0, 3, (3, 16, 16), generator=_gen(1), dtype=torch.int64).to(torch.uint8)


# ------------------------------------------------------------------------------------------ geometry


def test_full_boxes_without_flip_are_the_identity(images, labels):
    grid = A.affine_grid(A.full_boxes(3), torch.zeros(3, dtype=torch.bool), 16, "cpu")
    assert grid.shape == (3, 16, 16, 2)
    torch.testing.assert_close(A.warp_images(images, grid), images, rtol=0, atol=1e-5)
    out = A.warp_labels(labels, grid)
    assert out.dtype == labels.dtype
    assert torch.equal(out, labels)


def test_flip_mirrors_the_width_axis(images, labels):
    flips = torch.tensor([True, False, True])
    grid = A.affine_grid(A.full_boxes(3), flips, 16, "cpu")
    expect = torch.where(flips.view(3, 1, 1, 1), torch.flip(images, dims=[3]), images)
    torch.testing.assert_close(A.warp_images(images, grid), expect, rtol=0, atol=1e-5)
    out = A.warp_labels(labels, grid)
    assert out.dtype == torch.uint8
    assert set(out.unique().tolist()) <= set(labels.unique().tolist())
    expect_l = torch.where(flips.view(3, 1, 1), torch.flip(labels, dims=[2]), labels)
    assert torch.equal(out, expect_l)
    assert not torch.equal(out, labels)


def test_flip_keeps_long_labels_integer():
    y = torch.tensor([[[0, 1, 2, 2], [2, 1, 0, 0], [1, 1, 1, 2], [0, 0, 2, 1]]])
    grid = A.affine_grid(A.full_boxes(1), torch.tensor([True]), 4, "cpu")
    out = A.warp_labels(y, grid)
    assert out.dtype == torch.int64
    assert torch.equal(out, torch.flip(y, dims=[2]))


def test_left_half_box_upsamples_the_left_half(images, labels):
    box = torch.tensor([[0.25, 0.5, 0.5, 1.0]]).repeat(3, 1)
    grid = A.affine_grid(box, torch.zeros(3, dtype=torch.bool), 16, "cpu")
    out = A.warp_images(images, grid)
    ref = F.interpolate(images[..., :8], size=(16, 16), mode="bilinear", align_corners=False)
    # identical sampling positions; only the last column differs, where grid_sample still sees the
    # right half (a quarter of the next pixel) while interpolate clamps at the crop's edge
    torch.testing.assert_close(out[..., :-1], ref[..., :-1], rtol=0, atol=1e-5)
    assert (out[..., -1] - ref[..., -1]).abs().max() < 0.26
    lab = A.warp_labels(labels, grid)
    assert torch.equal(lab[..., 1:-1], labels[..., :8].repeat_interleave(2, dim=2)[..., 1:-1])


def test_affine_grid_places_a_quadrant_crop():
    # an image whose value is its column index: a crop of the right half maps onto columns 8..16
    x = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 1, 16, 16).contiguous()
    box = torch.tensor([[0.75, 0.5, 0.5, 1.0]])
    out = A.warp_images(x, A.affine_grid(box, torch.tensor([False]), 16, "cpu"))
    assert out.min() >= 7.5 and out.max() <= 15.0
    torch.testing.assert_close(out[0, 0, 0, 1:-1], 7.75 + 0.5 * torch.arange(1.0, 15.0))


# ------------------------------------------------------------------------------------------ crop boxes


def test_transposed_input_is_read_back_in_the_images_orientation(images):
    # a transposed copy of the images, warped with transposed=True, gives the images back (flipped where asked)
    stored = images.transpose(2, 3)
    flips = torch.tensor([True, False, True])
    grid = A.affine_grid(A.full_boxes(3), flips, 16, "cpu", torch.ones(3, dtype=torch.bool))
    expect = torch.where(flips.view(3, 1, 1, 1), torch.flip(images, dims=[3]), images)
    torch.testing.assert_close(A.warp_images(stored, grid), expect, rtol=0, atol=1e-5)
    mixed = A.affine_grid(A.full_boxes(3), flips, 16, "cpu", torch.tensor([False, True, False]))
    torch.testing.assert_close(mixed[[0, 2]], A.affine_grid(A.full_boxes(2), flips[[0, 2]], 16, "cpu"))


def test_canvas_boxes_place_crops_in_the_stored_array():
    sizes = torch.tensor([[10, 20], [20, 10]])  # a landscape image and a portrait one (stored transposed)
    params = torch.tensor([[2.0, 4.0, 6.0, 8.0], [4.0, 2.0, 8.0, 6.0]])  # (top, left, height, width)
    boxes, transposed = A.canvas_boxes(params, sizes, (10, 40))
    assert transposed.tolist() == [False, True]
    # fractions of the canvas in each image's orientation: 40 wide x 10 high, or 10 wide x 40 high
    torch.testing.assert_close(boxes[0], torch.tensor([8 / 40, 5 / 10, 8 / 40, 6 / 10]))
    torch.testing.assert_close(boxes[1], torch.tensor([5 / 10, 8 / 40, 6 / 10, 8 / 40]))
    whole = A.whole_image_params(sizes)
    assert whole.tolist() == [[0, 0, 10, 20], [0, 0, 20, 10]]


def test_random_resized_crop_params_statistics():
    n = 10_000
    sizes = torch.tensor([[400, 400]]).repeat(n, 1)
    p = A.random_resized_crop_params(sizes, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3), g=_gen(5))
    assert p.shape == (n, 4)
    top, left, h, w = p.unbind(1)
    assert (h > 0).all() and (w > 0).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 400).all() and (left + w <= 400).all()
    area = h * w / 400**2
    assert (area >= 0.67 - 0.01).all() and (area <= 1 + 1e-6).all()
    log_r = torch.log(w / h)
    assert (log_r.abs() <= math.log(4 / 3) + 0.01).all()
    assert abs(log_r.mean().item()) < 0.01
    # positions spread over the free room, in whole pixels
    assert left.std() > 5 and top.std() > 5 and torch.equal(p, p.round())


def test_random_resized_crop_params_unclipped_distribution():
    # at scale <= 0.5 every first try fits, so area ~ U(scale) and log aspect ~ U(log ratio) (up to rounding)
    sizes = torch.tensor([[1000, 1000]]).repeat(10_000, 1)
    _, _, h, w = A.random_resized_crop_params(sizes, scale=(0.1, 0.3), g=_gen(6)).unbind(1)
    area = h * w / 1e6
    assert (area >= 0.1 - 1e-3).all() and (area <= 0.3 + 1e-3).all()
    assert area.mean().item() == pytest.approx(0.2, abs=0.005)
    log_r = torch.log(w / h)
    a = math.log(4 / 3)
    assert (log_r.abs() <= a + 0.01).all()
    assert abs(log_r.mean().item()) < 0.01
    assert log_r.var().item() == pytest.approx(a**2 / 3, rel=0.05)  # variance of U(-a, a)
    hist = torch.histc(log_r, bins=4, min=-a - 0.01, max=a + 0.01) / len(log_r)
    assert (hist - 0.25).abs().max() < 0.02


def test_random_resized_crop_params_are_deterministic():
    sizes = torch.tensor([[100, 150], [150, 100], [90, 90]]).repeat(3, 1)
    a = A.random_resized_crop_params(sizes, g=_gen(9))
    b = A.random_resized_crop_params(sizes, g=_gen(9))
    c = A.random_resized_crop_params(sizes, g=_gen(10))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_flips_rate_and_determinism():
    f = A.random_flips(10_000, _gen(0))
    assert f.dtype == torch.bool
    assert f.float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(A.random_flips(50, _gen(4)), A.random_flips(50, _gen(4)))


# ------------------------------------------------------------------------------------------ photometric


def test_contrast_factor_one_is_identity(images):
    out = A.adjust_contrast(images.clone(), torch.ones(3))
    torch.testing.assert_close(out, images, rtol=0, atol=1e-6)


def test_contrast_factor_zero_gives_the_grayscale_mean(images):
    out = A.adjust_contrast(images.clone(), torch.zeros(3))
    gray = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    means = gray.mean(dim=(1, 2))
    torch.testing.assert_close(out, means.view(3, 1, 1, 1).expand_as(images), rtol=0, atol=1e-6)
    assert len(set(round(v, 6) for v in means.tolist())) == 3  # per image, not per batch


def test_contrast_blends_and_clamps():
    x = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2).contiguous()  # gray mean 0.5
    out = A.adjust_contrast(x.clone(), torch.tensor([1.5]))
    torch.testing.assert_close(out[0, :, 0], torch.tensor([[0.0, 1.0]] * 3))
    out = A.adjust_contrast(x.clone(), torch.tensor([0.5]))
    torch.testing.assert_close(out[0, :, 0], torch.tensor([[0.25, 0.75]] * 3))


def test_contrast_factors_range():
    f = A.contrast_factors(5000, 0.3, _gen(0))
    assert f.min() >= 0.7 and f.max() <= 1.3
    assert f.mean().item() == pytest.approx(1.0, abs=0.02)
    f = A.contrast_factors(1000, 1.5, _gen(0))
    assert f.min() >= 0.0 and f.max() <= 2.5


def test_normalize_uses_imagenet_statistics():
    assert A.IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert A.IMAGENET_STD == (0.229, 0.224, 0.225)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    torch.testing.assert_close(A.normalize(mean), torch.zeros(2, 3, 4, 4))
    ones = A.normalize(torch.ones(1, 3, 2, 2))
    expect = torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    torch.testing.assert_close(ones[0, :, 0, 0], expect)


def test_to_float_scales_uint8():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    torch.testing.assert_close(A.to_float(x), torch.tensor([0.0, 0.2, 1.0]).view(1, 1, 1, 3))


# ------------------------------------------------------------------------------------------ mixup


def test_mixup_soft_targets_and_determinism():
    x = torch.rand(8, 3, 4, 4, generator=_gen(0))
    y = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    xm, t = A.mixup(x, y, 6, 0.4, _gen(11))
    assert xm.shape == x.shape and t.shape == (8, 6)
    torch.testing.assert_close(t.sum(dim=1), torch.ones(8))
    assert (t >= 0).all()
    xm2, t2 = A.mixup(x, y, 6, 0.4, _gen(11))
    assert torch.equal(xm, xm2) and torch.equal(t, t2)
    xm3, _ = A.mixup(x, y, 6, 0.4, _gen(12))
    assert not torch.equal(xm, xm3)
    assert not torch.equal(xm, x)  # something was actually mixed


def test_mixup_mixes_images_and_targets_consistently():
    # one-pixel images that encode their own label: the mixed pixel equals the target-weighted label
    y = torch.tensor([0, 1, 2, 3])
    x = y.float().view(4, 1, 1, 1)
    xm, t = A.mixup(x, y, 4, 1.0, _gen(3))
    torch.testing.assert_close(xm.view(4), (t * torch.arange(4.0)).sum(dim=1))


def test_mixup_with_alpha_zero_is_one_hot():
    x = torch.rand(3, 3, 2, 2)
    y = torch.tensor([2, 0, 1])
    xm, t = A.mixup(x, y, 3, 0.0, _gen(0))
    assert torch.equal(xm, x)
    assert torch.equal(t, torch.eye(3)[[2, 0, 1]])
