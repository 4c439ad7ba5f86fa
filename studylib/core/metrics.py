"""Segmentation and classification metrics (torch only).

Conventions
-----------
* Confusion matrices have rows = true class, columns = predicted class.
* IoU_c = TP_c / (TP_c + FP_c + FN_c).  A class absent from both prediction
  and truth has union 0; its IoU is then 0 (``absent="zero"``, the paper's
  convention) or NaN (``absent="nan"``, excluded from nan-means).
* ``paper_miou``: per image, mean IoU over ALL classes (absent classes count 0
  and are still divided by C), then averaged over images.
* ``dataset_miou``: one confusion matrix over all pixels, mean IoU over the
  classes that occur anywhere (prediction or truth).
* "present" per-image mIoU: per image, mean IoU over the classes that occur in
  that image's prediction or truth, then averaged over images.

All reported values are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "PET_CLASS_NAMES",
    "confusion_matrix",
    "per_image_confusion",
    "pixel_accuracy",
    "iou_per_class",
    "paper_miou",
    "dataset_miou",
    "segmentation_report",
    "SegmentationMeter",
    "top1_accuracy",
    "ClassificationMeter",
]

#: Class names of the study's 3-class Oxford-IIIT Pet trimap labels.
PET_CLASS_NAMES = ("pet", "background", "boundary")


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #
def _check_num_classes(num_classes: int) -> None:
    """Raise ValueError unless ``num_classes`` is an int >= 1."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def _check_integer(t: torch.Tensor, name: str) -> None:
    """Raise ValueError unless ``t`` is a tensor with an integer (non-bool) dtype."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")


def _check_range(t: torch.Tensor, num_classes: int, name: str) -> None:
    """Raise ValueError if any value of ``t`` lies outside [0, num_classes)."""
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name} has values outside [0, {num_classes}): min={lo}, max={hi}")


def _check_labels(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
) -> torch.Tensor | None:
    """Validate a pred/target pair; return the mask of kept pixels (or None)."""
    _check_num_classes(num_classes)
    _check_integer(pred, "pred")
    _check_integer(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    keep = None if ignore_index is None else target != ignore_index
    _check_range(pred if keep is None else pred[keep], num_classes, "pred")
    _check_range(target if keep is None else target[keep], num_classes, "target")
    return keep


def _as_batch(t: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``t`` as [B, ...]: an [H, W] image becomes a batch of one."""
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() < 2:
        raise ValueError(f"{name} must be [H,W] or [B,H,W,...], got shape {tuple(t.shape)}")
    return t


# --------------------------------------------------------------------------- #
# confusion matrices
# --------------------------------------------------------------------------- #
def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """LongTensor[C, C] of pixel counts; entry [t, p] counts true t predicted p.

    Pixels whose target equals ``ignore_index`` are skipped.
    """
    keep = _check_labels(pred, target, num_classes, ignore_index)
    p, t = pred.reshape(-1).long(), target.reshape(-1).long()
    if keep is not None:
        keep = keep.reshape(-1)
        p, t = p[keep], t[keep]
    counts = torch.bincount(t * num_classes + p, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def per_image_confusion(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """LongTensor[B, C, C]: one confusion matrix per image (dim 0 indexes images).

    An [H, W] input is treated as a single image.
    """
    keep = _check_labels(pred, target, num_classes, ignore_index)
    pred, target = _as_batch(pred, "pred"), _as_batch(target, "target")
    b = pred.shape[0]
    c2 = num_classes**2
    p, t = pred.reshape(b, -1).long(), target.reshape(b, -1).long()
    img = torch.arange(b, device=p.device).unsqueeze(1).expand_as(p)
    idx = img * c2 + t * num_classes + p
    if keep is not None:
        idx = idx[keep.reshape(b, -1)]
    counts = torch.bincount(idx.reshape(-1), minlength=b * c2)
    return counts.reshape(b, num_classes, num_classes)


# --------------------------------------------------------------------------- #
# scores from confusion matrices
# --------------------------------------------------------------------------- #
def _check_conf(conf: torch.Tensor) -> None:
    """Raise ValueError unless ``conf`` is a [..., C, C] tensor."""
    if not isinstance(conf, torch.Tensor) or conf.dim() < 2 or conf.shape[-1] != conf.shape[-2]:
        shape = tuple(conf.shape) if isinstance(conf, torch.Tensor) else type(conf).__name__
        raise ValueError(f"conf must be a [C,C] or [B,C,C] tensor, got {shape}")


def pixel_accuracy(conf: torch.Tensor) -> torch.Tensor:
    """Correct / total pixels: a 0-d tensor for [C,C], a [B] tensor for [B,C,C].

    Float64; NaN where the matrix counts no pixels.
    """
    _check_conf(conf)
    conf = conf.double()
    correct = conf.diagonal(dim1=-2, dim2=-1).sum(-1)
    return correct / conf.sum((-2, -1))


def iou_per_class(conf: torch.Tensor, absent: str = "zero") -> torch.Tensor:
    """IoU_c = TP / (TP + FP + FN) along the last dim, for [C,C] or [B,C,C].

    A class with union 0 (absent from prediction and truth) gets 0.0 when
    ``absent="zero"`` (paper convention) or NaN when ``absent="nan"``.
    Returns float64 of shape [C] or [B, C].
    """
    _check_conf(conf)
    if absent not in ("zero", "nan"):
        raise ValueError(f'absent must be "zero" or "nan", got {absent!r}')
    conf = conf.double()
    tp = conf.diagonal(dim1=-2, dim2=-1)
    fn = conf.sum(-1) - tp  # true c, predicted something else
    fp = conf.sum(-2) - tp  # predicted c, truly something else
    union = tp + fp + fn
    fill = 0.0 if absent == "zero" else float("nan")
    safe = torch.where(union > 0, union, torch.ones_like(union))
    return torch.where(union > 0, tp / safe, torch.full_like(union, fill))


def _per_image_mious(per_img_conf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mIoU [B] two ways: (paper: all C, absent=0; present: nan-mean)."""
    paper = iou_per_class(per_img_conf, absent="zero").mean(-1)
    present = iou_per_class(per_img_conf, absent="nan").nanmean(-1)
    return paper, present


def paper_miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """The paper's mIoU: per image, mean IoU over all C classes (absent -> 0,
    still divided by C); then the mean over images. A float in [0, 1]."""
    conf = per_image_confusion(pred, target, num_classes)
    return float(iou_per_class(conf, absent="zero").mean(-1).mean())


def dataset_miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Dataset mIoU: one confusion matrix over all pixels, IoU per class, mean
    over the classes that occur (classes absent from both are excluded)."""
    conf = confusion_matrix(pred, target, num_classes)
    return float(iou_per_class(conf, absent="nan").nanmean())


# --------------------------------------------------------------------------- #
# segmentation report / streaming meter
# --------------------------------------------------------------------------- #
def _to_opt_float(x: torch.Tensor) -> float | None:
    """Python float of a scalar tensor, or None if it is NaN."""
    v = float(x)
    return None if v != v else v


class SegmentationMeter:
    """Streaming segmentation metrics over batches of [B, H, W] label maps.

    Keeps the dataset confusion matrix and running sums of the per-image
    mIoUs, never the predictions; ``compute()`` equals ``segmentation_report``
    on the concatenation of all batches.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None):
        """Create an empty meter for ``num_classes`` classes."""
        _check_num_classes(num_classes)
        names = [str(c) for c in range(num_classes)] if class_names is None else list(class_names)
        if len(names) != num_classes:
            raise ValueError(f"class_names has {len(names)} names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = names
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        self.sum_miou_paper = 0.0
        self.sum_miou_present = 0.0
        self.n_images = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predictions and targets ([B,H,W] or one [H,W] image)."""
        conf = per_image_confusion(pred, target, self.num_classes)
        paper, present = _per_image_mious(conf)
        self.conf += conf.sum(0).cpu()
        self.sum_miou_paper += float(paper.sum())
        self.sum_miou_present += float(present.sum())
        self.n_images += conf.shape[0]

    def compute(self) -> dict:
        """Report dict of plain floats (fractions in [0, 1]); see module doc."""
        if self.n_images == 0:
            raise ValueError("SegmentationMeter.compute() called before any update()")
        ious = iou_per_class(self.conf, absent="nan")
        return {
            "pixel_acc": float(pixel_accuracy(self.conf)),
            "miou_per_image": self.sum_miou_paper / self.n_images,
            "miou_dataset": float(ious.nanmean()),
            "iou_per_class": {n: _to_opt_float(v) for n, v in zip(self.class_names, ious)},
            "miou_per_image_present": self.sum_miou_present / self.n_images,
            "n_images": self.n_images,
        }


def segmentation_report(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> dict:
    """All segmentation metrics for [B,H,W] (or [H,W]) label maps, as floats.

    Keys: ``pixel_acc``; ``miou_per_image`` (paper: per image over all C classes,
    absent -> 0); ``miou_dataset`` (one confusion matrix, classes that occur);
    ``iou_per_class`` {name: dataset-level IoU, None if the class never
    occurs}; ``miou_per_image_present`` (per image over classes present in
    prediction or truth of that image); ``n_images``.
    """
    meter = SegmentationMeter(num_classes, class_names)
    meter.update(pred, target)
    return meter.compute()


# --------------------------------------------------------------------------- #
# classification
# --------------------------------------------------------------------------- #
def _to_pred(logits_or_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Predicted labels [N] from logits [N, K] (argmax) or labels [N]; validates shapes."""
    if not isinstance(logits_or_pred, torch.Tensor):
        raise ValueError(f"logits/pred must be a torch.Tensor, got {type(logits_or_pred).__name__}")
    _check_integer(target, "target")
    if target.dim() != 1:
        raise ValueError(f"target must be [N], got shape {tuple(target.shape)}")
    x = logits_or_pred
    if x.dim() == 2:
        pred = x.argmax(-1)
    elif x.dim() == 1:
        _check_integer(x, "pred")
        pred = x
    else:
        raise ValueError(f"expected logits [N,K] or pred [N], got shape {tuple(x.shape)}")
    if pred.shape[0] != target.shape[0]:
        raise ValueError(f"batch size mismatch: {pred.shape[0]} predictions vs {target.shape[0]} targets")
    return pred


def top1_accuracy(logits_or_pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of samples whose argmax logit (or given label) equals the target."""
    pred = _to_pred(logits_or_pred, target)
    if target.numel() == 0:
        raise ValueError("top1_accuracy of an empty batch is undefined")
    if logits_or_pred.dim() == 2:
        _check_range(target, logits_or_pred.shape[1], "target")
    return float((pred == target.to(pred.device)).double().mean())


class ClassificationMeter:
    """Streaming top-1 accuracy and confusion matrix over [N,K] logits or [N] labels."""

    def __init__(self, num_classes: int):
        """Create an empty meter for ``num_classes`` classes."""
        _check_num_classes(num_classes)
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    @torch.no_grad()
    def update(self, logits_or_pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of logits [N, K=C] or predicted labels [N] with targets [N]."""
        pred = _to_pred(logits_or_pred, target)
        if logits_or_pred.dim() == 2 and logits_or_pred.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits_or_pred.shape[1]} columns, expected {self.num_classes}")
        self.conf += confusion_matrix(pred, target.to(pred.device), self.num_classes).cpu()

    def compute(self) -> dict:
        """``{"top1": float, "confusion_matrix": [[int]] (rows true), "n": int}``."""
        n = int(self.conf.sum())
        if n == 0:
            raise ValueError("ClassificationMeter.compute() called before any update()")
        return {
            "top1": float(pixel_accuracy(self.conf)),
            "confusion_matrix": self.conf.tolist(),
            "n": n,
        }
