"""Masking and the MIM loss: exact masked counts, unit blocks, seeding, and hand-computed losses."""

from __future__ import annotations

import pytest
import torch

from studylib.core.masking import mim_loss, random_masks
from studylib.core.model import patchify

torch.set_num_threads(2)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ masks


def test_unit1_masks_exactly_half_of_the_patches():
    m = random_masks(16, 8, 1, 0.5, _gen(0))
    assert m.shape == (16, 64) and m.dtype == torch.bool
    assert m.sum(dim=1).tolist() == [32] * 16


def test_unit2_canonical_simmim_masks_ten_of_sixteen_units():
    # 32 px units at 16 px patches: a 4x4 grid of 2x2-patch units, round(0.6 * 16) = 10 masked -> 40 patches
    m = random_masks(12, 8, 2, 0.6, _gen(1))
    assert m.sum(dim=1).tolist() == [40] * 12
    blocks = m.view(12, 4, 2, 4, 2)  # [B, unit row, r, unit col, c]
    first = blocks[:, :, :1, :, :1]
    assert torch.equal(blocks, first.expand_as(blocks)), "a 2x2 unit is not masked as a whole"
    assert (blocks[:, :, 0, :, 0].sum(dim=(1, 2)) == 10).all()


def test_masks_differ_between_samples():
    m = random_masks(8, 8, 1, 0.5, _gen(2))
    assert len({tuple(row.tolist()) for row in m}) == 8
    m2 = random_masks(8, 8, 2, 0.5, _gen(2))
    assert len({tuple(row.tolist()) for row in m2}) > 1


def test_masks_are_deterministic_for_a_seeded_generator():
    a = random_masks(4, 8, 1, 0.5, _gen(7))
    b = random_masks(4, 8, 1, 0.5, _gen(7))
    c = random_masks(4, 8, 1, 0.5, _gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_masking_is_roughly_uniform_over_positions():
    m = random_masks(4000, 8, 1, 0.5, _gen(3)).float().mean(dim=0)
    assert (m - 0.5).abs().max() < 0.05


@pytest.mark.parametrize("grid,unit", [(8, 3), (8, 5), (6, 4)])
def test_unit_must_tile_the_grid(grid, unit):
    with pytest.raises(ValueError, match="tile"):
        random_masks(2, grid, unit, 0.5, _gen(0))


# ------------------------------------------------------------------------------------------ loss


def _tiny_case():
    """1 image, 3 channels, 4x4 pixels, patch 2: 4 patches of 12 values."""
    imgs = torch.zeros(1, 3, 4, 4)
    pred = torch.zeros(1, 4, 12)
    mask = torch.tensor([[True, False, True, False]])
    return imgs, pred, mask


def test_perfect_prediction_has_zero_loss():
    g = _gen(0)
    imgs = torch.randn(2, 3, 8, 8, generator=g)
    pred = patchify(imgs, 4)
    mask = random_masks(2, 2, 1, 0.5, g)
    assert mim_loss(pred, imgs, mask, 4).item() == 0.0
    assert mim_loss(pred, imgs, mask, 4, per_masked_count=True).item() == 0.0


def test_loss_by_hand_counts_only_masked_patches():
    imgs, pred, mask = _tiny_case()
    pred[0, 0] = 1.0  # masked: error 1 on each of its 12 values
    pred[0, 2, :6] = 2.0  # masked: error 2 on half its values -> mean 1
    base = mim_loss(pred, imgs, mask, 2)
    assert base.item() == pytest.approx((1.0 + 1.0) / 2)
    pred[0, 1] = 100.0  # unmasked patches do not count
    pred[0, 3, 0] = -7.0
    assert mim_loss(pred, imgs, mask, 2).item() == pytest.approx(base.item())


def test_loss_by_hand_with_nonzero_target():
    imgs = torch.zeros(1, 3, 4, 4)
    imgs[0, :, 2:, 2:] = 0.5  # bottom-right cell = patch 3
    pred = torch.zeros(1, 4, 12)
    mask = torch.tensor([[False, False, False, True]])
    assert mim_loss(pred, imgs, mask, 2).item() == pytest.approx(0.5)
    mask = torch.tensor([[True, False, False, False]])  # top-left cell is zero: perfect
    assert mim_loss(pred, imgs, mask, 2).item() == 0.0


def test_per_masked_count_divides_by_the_masked_count_per_image():
    imgs = torch.zeros(2, 3, 4, 4)
    pred = torch.zeros(2, 4, 12)
    pred[0, 0] = 1.0
    pred[0, 3] = 3.0
    pred[1, 1] = 2.0
    mask = torch.tensor([[True, False, False, True], [False, True, True, False]])  # 2 masked in each
    plain = mim_loss(pred, imgs, mask, 2)
    assert plain.item() == pytest.approx((1 + 3 + 2 + 0) / 4)
    quirk = mim_loss(pred, imgs, mask, 2, per_masked_count=True)
    assert quirk.item() == pytest.approx(plain.item() / 2)  # per image (2), not the batch total (4)


def test_loss_has_gradient_only_on_masked_predictions():
    imgs, pred, mask = _tiny_case()
    pred = (pred + 0.3).requires_grad_()
    mim_loss(pred, imgs, mask, 2).backward()
    assert (pred.grad[0, 1] == 0).all() and (pred.grad[0, 3] == 0).all()
    assert (pred.grad[0, 0] != 0).all() and (pred.grad[0, 2] != 0).all()


def test_the_masked_count_is_exact_under_bf16_predictions():
    """Under bf16 autocast the prediction is bf16; the count of masked patches must not be (646 summed in bf16
    is 648): the loss equals the fp32 loss of the same bf16 values."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(17, 3, 64, 64, generator=g)
    mask = torch.rand(17, 64, generator=g) < 0.6
    pred = torch.randn(17, 64, 8 * 8 * 3, generator=g).bfloat16()
    for per_count in (False, True):
        got = mim_loss(pred, imgs, mask, 8, per_masked_count=per_count)
        want = mim_loss(pred.float(), imgs, mask, 8, per_masked_count=per_count)
        assert torch.equal(got, want)
