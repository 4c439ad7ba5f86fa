"""Hand-computed tests for studylib.metrics (expected numbers worked out in comments)."""

import math

import pytest
import torch

from studylib.core.metrics import (
    ClassificationMeter,
    SegmentationMeter,
    confusion_matrix,
    dataset_miou,
    iou_per_class,
    paper_miou,
    per_image_confusion,
    pixel_accuracy,
    segmentation_report,
    top1_accuracy,
)

C = 3
T = torch.tensor

# Case 1: a 2x3 image.  Pixel pairs (true, pred):
#   (0,0) (0,1) (1,1) / (1,1) (2,2) (2,0)
# confusion (rows true): [[1,1,0],[0,2,0],[1,0,1]]
#   class 0: TP=1 FP=1 (true 2 -> 0) FN=1 (true 0 -> 1) -> IoU 1/3
#   class 1: TP=2 FP=1 (true 0 -> 1) FN=0               -> IoU 2/3
#   class 2: TP=1 FP=0 FN=1 (true 2 -> 0)               -> IoU 1/2
#   mIoU = (1/3 + 2/3 + 1/2) / 3 = 0.5 ; pixel acc = 4/6
TGT1 = T([[0, 0, 1], [1, 2, 2]])
PRED1 = T([[0, 1, 1], [1, 2, 0]])

# Case 4: two 2x2 images.
# A: perfect, only classes 0,1 -> IoU (1, 1, absent) ; paper 2/3, present 1
# B: truth all 2, pred one pixel 0 -> class0 TP0 FP1 -> 0, class1 absent,
#    class2 TP3 FN1 -> 3/4 ; paper (0+0+3/4)/3 = 1/4, present (0+3/4)/2 = 3/8
# per-image paper mean  = (2/3 + 1/4)/2 = 11/24
# per-image present mean = (1 + 3/8)/2 = 11/16
# dataset confusion [[2,0,0],[0,2,0],[1,0,3]]:
#   class0 2/(2+1) = 2/3, class1 2/2 = 1, class2 3/(3+1) = 3/4
#   mean = (2/3 + 1 + 3/4)/3 = 29/36 ; pixel acc 7/8
TGT4 = T([[[0, 0], [1, 1]], [[2, 2], [2, 2]]])
PRED4 = T([[[0, 0], [1, 1]], [[2, 2], [2, 0]]])


def test_confusion_matrix_hand_counts():
    assert confusion_matrix(PRED1, TGT1, C).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert confusion_matrix(PRED1, TGT1, C).dtype == torch.long


def test_confusion_matrix_ignore_index():
    # pixel with target 255 is dropped: pairs (0,0) (1,1) (1,0)
    tgt = T([[0, 255], [1, 1]])
    pred = T([[0, 2], [1, 0]])
    assert confusion_matrix(pred, tgt, C, ignore_index=255).tolist() == [
        [1, 0, 0],
        [1, 1, 0],
        [0, 0, 0],
    ]
    assert per_image_confusion(pred[None], tgt[None], C, ignore_index=255)[0].tolist() == [
        [1, 0, 0],
        [1, 1, 0],
        [0, 0, 0],
    ]


def test_iou_and_pixel_accuracy_case1():
    conf = confusion_matrix(PRED1, TGT1, C)
    assert iou_per_class(conf).tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert float(pixel_accuracy(conf)) == pytest.approx(4 / 6)
    assert paper_miou(PRED1, TGT1, C) == pytest.approx(0.5)
    assert dataset_miou(PRED1, TGT1, C) == pytest.approx(0.5)


def test_absent_class_paper_vs_present():
    # perfect prediction of an image containing only classes 0 and 1:
    # IoU (1, 1, absent) -> paper (1+1+0)/3 = 2/3 ; present (1+1)/2 = 1
    img = T([[0, 0], [1, 1]])
    conf = confusion_matrix(img, img, C)
    assert iou_per_class(conf, absent="zero").tolist() == [1.0, 1.0, 0.0]
    nan_iou = iou_per_class(conf, absent="nan")
    assert nan_iou[:2].tolist() == [1.0, 1.0] and math.isnan(nan_iou[2])
    assert paper_miou(img, img, C) == pytest.approx(2 / 3)
    rep = segmentation_report(img, img, C, class_names=["pet", "background", "boundary"])
    assert rep["miou_per_image"] == pytest.approx(2 / 3)
    assert rep["miou_per_image_present"] == pytest.approx(1.0)
    assert rep["miou_dataset"] == pytest.approx(1.0)  # class 2 excluded dataset-wide
    assert rep["iou_per_class"] == {"pet": 1.0, "background": 1.0, "boundary": None}
    assert rep["pixel_acc"] == pytest.approx(1.0)
    assert rep["n_images"] == 1


def test_predicted_but_absent_from_truth_counts_zero():
    # truth has no class 2 but one pixel is predicted 2.
    # class0 TP2 FN1 -> 2/3 ; class1 TP1 -> 1 ; class2 TP0 FP1 -> 0 (union 1, not absent)
    # paper = present = (2/3 + 1 + 0)/3 = 5/9
    tgt = T([[0, 0], [0, 1]])
    pred = T([[0, 0], [2, 1]])
    conf = confusion_matrix(pred, tgt, C)
    assert iou_per_class(conf, absent="nan").tolist() == pytest.approx([2 / 3, 1.0, 0.0])
    rep = segmentation_report(pred, tgt, C)
    assert rep["miou_per_image"] == pytest.approx(5 / 9)
    assert rep["miou_per_image_present"] == pytest.approx(5 / 9)
    assert rep["iou_per_class"]["2"] == 0.0


def test_per_image_confusion_and_accuracy():
    conf = per_image_confusion(PRED4, TGT4, C)
    assert conf.shape == (2, 3, 3)
    assert conf[0].tolist() == [[2, 0, 0], [0, 2, 0], [0, 0, 0]]
    assert conf[1].tolist() == [[0, 0, 0], [0, 0, 0], [1, 0, 3]]
    assert pixel_accuracy(conf).tolist() == pytest.approx([1.0, 0.75])
    assert iou_per_class(conf).tolist()[1] == pytest.approx([0.0, 0.0, 0.75])


def test_dataset_vs_per_image_miou():
    assert paper_miou(PRED4, TGT4, C) == pytest.approx(11 / 24)
    assert dataset_miou(PRED4, TGT4, C) == pytest.approx(29 / 36)
    rep = segmentation_report(PRED4, TGT4, C)
    assert rep["miou_per_image"] == pytest.approx(11 / 24)
    assert rep["miou_per_image_present"] == pytest.approx(11 / 16)
    assert rep["miou_dataset"] == pytest.approx(29 / 36)
    assert rep["pixel_acc"] == pytest.approx(7 / 8)
    assert rep["iou_per_class"] == pytest.approx({"0": 2 / 3, "1": 1.0, "2": 0.75})
    assert rep["n_images"] == 2
    assert all(type(rep[k]) is float for k in ("pixel_acc", "miou_per_image", "miou_dataset"))


def test_meter_matches_report_on_uneven_chunks():
    g = torch.Generator().manual_seed(0)
    tgt = torch.randint(0, C, (7, 8, 8), generator=g)
    pred = torch.randint(0, C, (7, 8, 8), generator=g)
    tgt[2] = tgt[2] % 2  # images with a class absent from both
    pred[2] = pred[2] % 2
    tgt[5] = 0
    pred[5] = 0
    meter = SegmentationMeter(C)
    for lo, hi in [(0, 1), (1, 5), (5, 7)]:
        meter.update(pred[lo:hi], tgt[lo:hi])
    got, want = meter.compute(), segmentation_report(pred, tgt, C)
    assert got.keys() == want.keys()
    assert got["n_images"] == want["n_images"] == 7
    for k in ("pixel_acc", "miou_per_image", "miou_dataset", "miou_per_image_present"):
        assert got[k] == pytest.approx(want[k], abs=1e-12)
    assert got["iou_per_class"] == pytest.approx(want["iou_per_class"], abs=1e-12)


def test_top1_accuracy_and_meter():
    # argmax -> [0, 2, 0, 1] vs target [0, 2, 1, 1]: 3 of 4 correct
    logits = T([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 0.0], [0.0, 5.0, 1.0]])
    target = T([0, 2, 1, 1])
    assert top1_accuracy(logits, target) == pytest.approx(0.75)
    assert top1_accuracy(T([0, 2, 0, 1]), target) == pytest.approx(0.75)
    meter = ClassificationMeter(3)
    meter.update(logits[:1], target[:1])
    meter.update(T([2, 0, 1]), target[1:])
    out = meter.compute()
    assert out["top1"] == pytest.approx(0.75)
    # rows true: 0->0 ; 1->0, 1->1 ; 2->2
    assert out["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="shape mismatch"):
        confusion_matrix(T([0, 1]), T([0, 1, 2]), C)
    with pytest.raises(ValueError, match="pred has values outside"):
        confusion_matrix(T([0, 3]), T([0, 1]), C)
    with pytest.raises(ValueError, match="target has values outside"):
        paper_miou(T([[0, 1]]), T([[0, -1]]), C)
    with pytest.raises(ValueError, match="integer dtype"):
        dataset_miou(T([0.0, 1.0]), T([0, 1]), C)
    with pytest.raises(ValueError, match="absent"):
        iou_per_class(torch.eye(3, dtype=torch.long), absent="skip")
    with pytest.raises(ValueError, match="shape mismatch"):
        SegmentationMeter(C).update(TGT4, TGT4[:1])
    with pytest.raises(ValueError, match="class_names"):
        SegmentationMeter(C, class_names=["a", "b"])
    with pytest.raises(ValueError, match="batch size mismatch"):
        top1_accuracy(T([[1.0, 0.0]]), T([0, 1]))
    with pytest.raises(ValueError, match="columns"):
        ClassificationMeter(3).update(T([[1.0, 0.0]]), T([0]))
    with pytest.raises(ValueError, match="outside"):
        ClassificationMeter(3).update(T([0, 3]), T([0, 1]))
