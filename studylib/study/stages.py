"""The three stages of the study: what each trains on, its batch and loss, and how it is evaluated.
Each stage notebook calls studylib.study.groups.run_notebook, which runs them.

    pretrain(...)      masked image modelling on unlabeled images          -> encoder.safetensors
    intermediate(...)  CLS scene classification on Intel (optional)       -> encoder.safetensors
    segment(...)       per-patch trimap segmentation on Oxford-IIIT Pet    -> metrics.json

A stage writes into its run folder: params.json, train_log.jsonl, a resumable checkpoint while it
trains, then encoder.safetensors + head.safetensors and, last of all, metrics.json (the marker that
the run is finished). Calling a stage on a finished folder trains nothing and re-reads the results.

A run's lifecycle around the recipe (lock, train, finish) is studylib.study.lifecycle's; running a group
of runs in one kernel is studylib.study.groups' (which imports this module, never the other way).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from studylib.core import augment as A
from studylib.core.masking import mim_loss, random_masks
from studylib.core.metrics import ClassificationMeter, SegmentationMeter
from studylib.core.model import (
    Classifier,
    MaskedImageModel,
    PatchClassifier,
    Segmenter,
    build_encoder,
    load_encoder,
    model_config,
)
from studylib.core.train import Job, Schedule, cross_entropy, resolve_device, weighted_cross_entropy
from studylib.data import resident
from studylib.data.decoded import load_image_set
from studylib.data.readers import (
    PET_CLASSES,
    _find_image,
    decode_image,
    load_intel,
    pets_root,
    read_pets_list,
)
from studylib.data.sources import resolve_data
from studylib.data.splits import segmentation_split
from studylib.study.config import (
    ARMS,
    IntermediateConfig,
    ParamError,
    PretrainConfig,
    SegmentConfig,
    build,
    file_sha256,
)
from studylib.study.lifecycle import Prepared, StageResult, exclusive, prepared, run_folder, train
from studylib.study.rates import resolve_precision
from studylib.study.store import RunFolder

EVAL_BATCH = 256


# ---------------------------------------------------------------- shared by the recipes


def _schedule(s, dev=None, model: str = "", run_dir="", stage: str = "") -> Schedule:
    """The run's schedule; precision auto resolved for its device, model and stage from the bench rates of the
    run store it sits in (<runs>/<stage>/<id>: rates.resolve_precision)."""
    precision = s.precision
    if dev is not None:
        precision = resolve_precision(precision, dev, model, stage, Path(run_dir).parent.parent)
    milestones = list(s.milestones)
    return Schedule(
        s.epochs, s.batch_size, s.lr, s.weight_decay, milestones, s.gamma, s.decay_all, precision, s.uses_tf32()
    )


def _encoder(model: str, parent_dir: str, seed: int, init: str = "trunc_normal"):
    """A fresh encoder (seeded init) or the parent run's trained one."""
    torch.manual_seed(seed)
    if parent_dir:
        return RunFolder(parent_dir).load_encoder()
    return build_encoder(model, init)


def _head_seeded(seed: int) -> None:
    """Seed the global generator for a task head's init, whatever the encoder's making drew before it.
    Common random numbers: every arm of one seed (a fresh encoder under any init, or a parent's) starts
    its head from the same weights, so the paired differences the findings test carry the arms' effect,
    not a different head draw (recipe 2 of the intermediate and segment stages; see study.identity)."""
    torch.manual_seed(seed + HEAD_SEED_OFFSET)


HEAD_SEED_OFFSET = 7_919  # a head's stream is not the encoder's: seed s and s + offset never meet in one grid


@torch.no_grad()
def _batched(fn, n: int, bs: int = EVAL_BATCH):
    for i in range(0, n, bs):
        yield i, fn(slice(i, min(n, i + bs)))


def _decoding(dev: torch.device) -> str:
    """The device a stage's images are decoded on, given to the loaders so that a stage called by hand decodes as
    it would in a group (data.decoders): its CUDA device (nvJPEG), else the CPU (PIL; also for the meta device)."""
    return str(dev) if dev.type == "cuda" else "cpu"


# ---------------------------------------------------------------- stage 1: masked image modelling


@exclusive
def pretrain(
    run_dir: str = "",
    model: str = "viny-tiny",
    data: dict | None = None,
    settings: dict | None = None,
    size: int = 64,
    seed: int = 0,
    device: str = "auto",
    engine: dict | None = None,
) -> StageResult:
    """SimMIM pre-training of a fresh encoder on `size` unlabeled images; with `from_encoder` in the settings,
    that encoder file becomes the run's encoder and nothing is trained (`size` is then only its label)."""
    s = build(PretrainConfig, settings or {}, "pretrain")
    if s.from_encoder:
        return _import_encoder(run_dir, model, data, s, seed, device)
    return train(prepare_pretrain(run_dir, model, data, settings, size, seed, device), engine)


def prepare_pretrain(run_dir, model, data, settings, size, seed, device) -> Prepared:
    s = build(PretrainConfig, settings or {}, "pretrain")
    run_dir, dev, paths = run_folder(run_dir), resolve_device(device), resolve_data(data)
    task = MaskedImageModel(_encoder(model, "", seed, s.init), s.init)
    cfg = task.encoder.cfg
    # crops are taken, as the authors' RandomResizedCrop on the full image, from a copy with the aspect
    # kept: short side a little larger than the model input, long side at most twice that, the excess
    # cut from both ends (no crop of the paper's settings needs more: see readers.aspect_geometry)
    cached = round(cfg.img_size * (1 + s.cache_margin))
    image_set = load_image_set(
        paths.images, size, cached, seed, paths.cache, paths.skip_unreadable, max_aspect=2.0, device=_decoding(dev)
    )
    # the uint8 images move to the device once; the closures below keep no host copy (image_set is not captured)
    images, sizes, skipped = resident.share(image_set.origin, image_set.images, dev), image_set.sizes, image_set.skipped
    canvas = tuple(images.shape[-2:])
    unit = (s.mask_unit or cfg.patch_size) // cfg.patch_size

    def draw(idx, g, crops=None):
        """The host draws for images idx, in the recipe's order (crops unless given, flips when g is
        given, masks): (idx, boxes, flips, transposed, mask)."""
        n, hw = len(idx), sizes[idx]
        crops = A.random_resized_crop_params(hw, tuple(s.crop_scale), g=g) if crops is None else crops
        flips = A.random_flips(n, g) if g is not None else torch.zeros(n, dtype=torch.bool)
        mask = random_masks(n, cfg.grid, unit, s.mask_ratio, g)
        boxes, transposed = A.canvas_boxes(crops, hw, canvas)
        return idx, boxes, flips, transposed, mask

    def apply(i, boxes, flips, transposed, mask):
        """The draws on the device -> the images cropped, resized, flipped and normalised, with their masks."""
        grid = A.affine_grid(boxes, flips, cfg.img_size, dev, transposed)
        return A.normalize(A.warp_images(A.to_float(images[i]), grid)), mask

    def batch(idx, g, crops=None):
        return apply(*A.to_device(dev, *draw(idx, g, crops)))  # one copy per step

    def loss(net, x, mask, weight=None):
        """`weight` [B]: 1 real, 0 padding (a compiled group's padded last batch); None: every sample counts."""
        pred = net(x, mask)
        return mim_loss(pred, x, mask, cfg.patch_size, s.loss_per_masked_count, s.norm_pix_loss, weight)

    def evaluate():
        # a fixed evaluation: the first (up to) 256 images, no crop, one seeded mask each
        g = torch.Generator().manual_seed(10_000 + seed)
        idx = torch.arange(min(len(images), EVAL_BATCH))
        with torch.no_grad():
            x, mask = batch(idx, g, crops=A.whole_image_params(sizes[idx]))  # the whole valid image
            pred = task(x, mask)
            eval_loss = mim_loss(pred, x, mask, cfg.patch_size, norm_pix=s.norm_pix_loss).item()
        examples = {
            "images": x[:6].cpu(),
            "mask": mask[:6].cpu(),
            "pred": pred[:6].float().cpu(),
            "patch": cfg.patch_size,
        }
        fields = {"images": len(images), "skipped": skipped, "epochs": s.epochs, "eval_masked_l1": eval_loss}
        return examples, fields

    job = Job(task, batch, loss, len(images), seed, run_dir, "pretrain", draw, apply)
    sched = _schedule(s, dev, model, run_dir, "pretrain")
    return prepared("pretrain", job, sched, dev, evaluate, {"images": len(images)})


class _EncoderOnly(torch.nn.Module):
    """An encoder with no task head: what an imported encoder's run folder holds (an empty head file)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder


def _import_encoder(run_dir: str, model: str, data: dict | None, s: PretrainConfig, seed: int, device: str):
    """pretrain.from_encoder: write that file's encoder (a study's model, e.g. a checkpoint trained elsewhere)
    as this run's pre-trained encoder. metrics.json records the source path and its sha256. The stage's
    picture shows a few Pets images with this run's masks and, as the file has no MIM head, the masked
    patches in the mean colour instead of a reconstruction."""
    run_dir, dev = run_folder(run_dir), resolve_device(device)
    folder, source = RunFolder(run_dir), Path(s.from_encoder).resolve()
    finished = folder.is_done
    if finished:
        enc = folder.load_encoder()
    else:
        digest = file_sha256(source)
        if s.from_encoder_sha256 and digest != s.from_encoder_sha256:
            raise ParamError(
                f"pretrain.from_encoder: {source} changed since the run was planned (sha256 {digest}, planned "
                f"{s.from_encoder_sha256}); plan the study again to make a run of the new file"
            )
        enc = load_encoder(source)
        if enc.cfg != model_config(model):
            raise ParamError(f"pretrain.from_encoder: {source} holds a {enc.cfg.name!r} encoder, not model {model!r}")
    cfg = enc.cfg
    # the picture: the first trainval Pets images, masked as pre-training masks them
    root = pets_root(resolve_data(data).pets)
    names = [name for name, _ in read_pets_list(root, "trainval")[:6]]
    imgs = [decode_image(_find_image(root / "images", n), cfg.img_size) for n in names]
    x = A.normalize(A.to_float(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)))
    g = torch.Generator().manual_seed(10_000 + seed)
    mask = random_masks(len(x), cfg.grid, (s.mask_unit or cfg.patch_size) // cfg.patch_size, s.mask_ratio, g)
    pred = torch.zeros(len(x), cfg.grid**2, cfg.patch_dim)
    examples = {"images": x, "mask": mask, "pred": pred, "patch": cfg.patch_size}
    if finished:
        return StageResult(run_dir, folder.metrics, [], examples)
    metrics = {
        "stage": "pretrain",
        "from_encoder": str(source),
        "from_encoder_sha256": digest,
        "images": 0,
        "skipped": [],
        "epochs": 0,
        "final_train_loss": None,
        "eval_masked_l1": None,
        "train_seconds": 0.0,
        "device": str(dev),
    }
    folder.finish(_EncoderOnly(enc), metrics, {"stage": "pretrain", "from_encoder": str(source)})
    return StageResult(run_dir, metrics, [], examples)


# ---------------------------------------------------------------- stage 2: scene classification


@exclusive
def intermediate(
    run_dir: str = "",
    model: str = "viny-tiny",
    data: dict | None = None,
    settings: dict | None = None,
    parent_dir: str = "",
    seed: int = 0,
    device: str = "auto",
    arm: str = "intel",
    pets_split: dict | None = None,
    downstream: dict | None = None,
    engine: dict | None = None,
) -> StageResult:
    """Fine-tune the encoder on an intermediate task (the `arm`):
    'intel'        CLS classification of Intel scenes (the paper's stage);
    'pets-breeds'  CLS classification of Pets breeds;
    'spatial'      a linear head on every patch token predicting its patch's majority trimap class.
    The Pets arms train on images outside the downstream test split (`pets_split` holds the segment
    split settings that define it). `downstream` names the segmentation run this one serves when runs
    are not shared (the paper's pipeline)."""
    p = prepare_intermediate(run_dir, model, data, settings, parent_dir, seed, device, arm, pets_split, downstream)
    return train(p, engine)


def _intermediate_data(arm, s, paths, seed, S, grid, pets_split, downstream, dev):
    """-> (train, test, class names, train labels, test labels) of an intermediate arm, decoded for `dev`."""
    if arm == "intel":
        read = dict(cache_dir=paths.cache, skip=paths.skip_unreadable, interpolation=s.interpolation)
        train = load_intel(paths.intel, "train", S, **read, device=_decoding(dev))
        test = load_intel(paths.intel, "test", S, **read, device=_decoding(dev))
        return train, test, train.classes, train.labels, test.labels
    seg = build(SegmentConfig, pets_split or {}, "pets_split")
    n = (downstream or {}).get("finetune_size", 0)
    train, test = segmentation_split(paths, seg, n, seed, S, all_but_test=True, device=_decoding(dev))
    if arm == "pets-breeds":
        K = int(torch.cat([train.labels, test.labels]).max()) + 1
        return train, test, [str(k + 1) for k in range(K)], train.labels, test.labels
    from studylib.data.splits import patch_labels

    return train, test, list(PET_CLASSES), patch_labels(train.masks, grid), patch_labels(test.masks, grid)


def prepare_intermediate(
    run_dir, model, data, settings, parent_dir, seed, device, arm, pets_split=None, downstream=None
):
    if arm not in ARMS[1:]:
        raise ValueError(f"intermediate arm {arm!r} is not one of {', '.join(ARMS[1:])}")
    s = build(IntermediateConfig, settings or {}, "intermediate")
    run_dir, dev, paths = Path(run_dir), resolve_device(device), resolve_data(data)
    enc = _encoder(model, parent_dir, seed, s.init)
    S, grid = enc.cfg.img_size, enc.cfg.grid
    train, test, classes, train_y, test_y = _intermediate_data(
        arm, s, paths, seed, S, grid, pets_split, downstream, dev
    )
    K = len(classes)
    norm = A.normalize if s.normalize else (lambda x: x)  # the Table-2 spatial recipe: raw inputs
    _head_seeded(seed)
    task = PatchClassifier(enc, K, s.init) if arm == "spatial" else Classifier(enc, K, s.init)
    frozen = (
        _flip_contrast(len(train), s.contrast, torch.Generator().manual_seed(seed)) if s.frozen_augmentation else None
    )
    # the uint8 images move to the device once, shared with the group's other members (data.resident)
    images, labels = resident.share(train.origin, train.images, dev), train_y.to(dev)

    def draw(idx, g):
        """The host draws in the recipe's order (flip, contrast, then MixUp's): (idx, flip, contrast, lam, perm)."""
        p = {k: v[idx] for k, v in frozen.items()} if frozen else _flip_contrast(len(idx), s.contrast, g)
        lam, perm = A.mixup_draw(len(idx), s.mixup_alpha, g) if arm != "spatial" else (1.0, None)
        return idx, p["flip"], p["contrast"], lam, perm

    def batch(idx, g):
        return apply(*A.to_device(dev, *draw(idx, g)))  # one copy per step

    def apply(i, flip, contrast, lam, perm):
        x = A.to_float(images[i])
        x = norm(A.adjust_contrast(A.warp_images(x, A.affine_grid(A.full_boxes(len(x), dev), flip, S, dev)), contrast))
        y = labels[i]
        if arm == "spatial":  # flip the patch labels with the image; no MixUp for a dense target
            flip = flip.view(-1, 1, 1)
            return x, torch.where(flip, y.view(-1, grid, grid).flip(-1), y.view(-1, grid, grid)).reshape(len(x), -1)
        return A.mix(x, y, K, lam, perm)

    def loss(net, x, y, weight=None):
        """`weight` [B]: 1 real, 0 padding (a compiled group's padded last batch); None: every sample counts."""
        logits = net(x).float()  # [B, K], or [B, grid^2, K] per patch (spatial)
        if arm == "spatial":
            if weight is None:
                return cross_entropy(logits.flatten(0, 1), y.reshape(-1))
            return weighted_cross_entropy(logits.transpose(1, 2), y, weight)  # per patch [B, grid^2], weighted
        per_sample = torch.sum(-y * F.log_softmax(logits, dim=-1), dim=-1)  # soft targets (MixUp)
        return per_sample.mean() if weight is None else (per_sample * weight).sum() / weight.sum()

    def evaluate():
        meter = ClassificationMeter(K)
        for i, logits in _batched(lambda sl: task(norm(A.to_float(test.images[sl].to(dev)))), len(test)):
            meter.update(logits.float().cpu().reshape(-1, K), test_y[i : i + len(logits)].reshape(-1))
        result = meter.compute()
        examples = {"confusion": result["confusion_matrix"], "classes": classes}
        fields = {
            "arm": arm,
            "train_images": len(train),
            "test_images": len(test),
            "epochs": s.epochs,
            "skipped": sorted(set(train.skipped + test.skipped)),
            "downstream": downstream,
            "top1": result["top1"],
            "confusion_matrix": result["confusion_matrix"],
            "classes": classes,
        }
        return examples, fields

    job = Job(task, batch, loss, len(train), seed, run_dir, f"intermediate {arm}", draw, apply)
    sched = _schedule(s, dev, model, run_dir, "intermediate")
    return prepared("intermediate", job, sched, dev, evaluate, {"arm": arm})


# ---------------------------------------------------------------- stage 3: trimap segmentation


def pixel_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """The authors' extra normalisation: log-softmax of [B, K, H, W] logits over the pixel axis."""
    return F.log_softmax(logits.flatten(2), dim=2).view_as(logits)


def predict_classes(logits: torch.Tensor, eval_log_softmax: bool = False) -> torch.Tensor:
    """Per-pixel classes [B, H, W] from [B, K, H, W] logits: the argmax over classes, taken (as the
    authors did, `eval_log_softmax`) after the pixel-axis log-softmax, which can change it."""
    return (pixel_log_softmax(logits) if eval_log_softmax else logits).argmax(1)


def _flip_contrast(n: int, contrast: float, g: torch.Generator) -> dict:
    """Per-image draws of the flip and contrast jitter (drawn once per epoch, or once for all)."""
    return {"flip": A.random_flips(n, g), "contrast": A.contrast_factors(n, contrast, g)}


def _seg_apply(images, masks, p: dict, s: SegmentConfig, dev, augment: bool = True):
    """Joint image+trimap transform: one flip grid for both, contrast on the image only."""
    x, y = A.to_float(images.to(dev)), masks.to(dev).long()
    if augment:
        grid = A.affine_grid(A.full_boxes(len(x), dev), p["flip"], x.shape[-1], dev)
        x, y = A.warp_images(x, grid), A.warp_labels(y, grid)
        x = A.adjust_contrast(x, p["contrast"])
    return (A.normalize(x) if s.normalize else x), y


@exclusive
def segment(
    run_dir: str = "",
    model: str = "viny-tiny",
    data: dict | None = None,
    settings: dict | None = None,
    parent_dir: str = "",
    size: int = 32,
    seed: int = 0,
    device: str = "auto",
    engine: dict | None = None,
) -> StageResult:
    """Fine-tune a per-patch segmentation head and the encoder on `size` labelled Pets images."""
    return train(prepare_segment(run_dir, model, data, settings, parent_dir, size, seed, device), engine)


def prepare_segment(run_dir, model, data, settings, parent_dir, size, seed, device) -> Prepared:
    s = build(SegmentConfig, settings or {}, "segment")
    run_dir, dev, paths = run_folder(run_dir), resolve_device(device), resolve_data(data)
    enc = _encoder(model, parent_dir, seed, s.init)
    train, test = segmentation_split(paths, s, size, seed, enc.cfg.img_size, device=_decoding(dev))
    _head_seeded(seed)
    task = Segmenter(enc, len(PET_CLASSES), s.init)
    # the paper froze one random augmentation per image for all epochs (and the test set)
    frozen = (
        _flip_contrast(len(train), s.contrast, torch.Generator().manual_seed(seed)) if s.frozen_augmentation else None
    )
    # the uint8 images move to the device once, shared with the group's other members (data.resident); the
    # closures below keep no host copy of them (`train` is not captured: its count and skipped files are)
    images = resident.share(train.origin, train.images, dev)
    masks = resident.share(train.mask_origin, train.masks, dev)
    n_train, train_skipped = len(train), train.skipped

    def draw(idx, g):
        p = {k: v[idx] for k, v in frozen.items()} if frozen else _flip_contrast(len(idx), s.contrast, g)
        return idx, p["flip"], p["contrast"]

    def apply(i, flip, contrast):
        return _seg_apply(images[i], masks[i], {"flip": flip, "contrast": contrast}, s, dev)

    def batch(idx, g):
        return apply(*A.to_device(dev, *draw(idx, g)))  # one copy per step

    def loss(net, x, y, weight=None):
        """`weight` [B]: 1 real, 0 padding (a compiled group's padded last batch); None: every sample counts."""
        logits = net(x).float()  # [B, K, H, W]
        if s.spatial_log_softmax:  # the authors' extra normalisation over the pixel axis
            logits = pixel_log_softmax(logits)
        return cross_entropy(logits, y) if weight is None else weighted_cross_entropy(logits, y, weight)

    def evaluate():
        test_aug = (
            _flip_contrast(len(test), s.contrast, torch.Generator().manual_seed(seed + 1))
            if s.test_augmentation
            else None
        )
        meter, preds = SegmentationMeter(len(PET_CLASSES), PET_CLASSES), []

        def predict(sl):
            p = {k: v[sl] for k, v in test_aug.items()} if test_aug else None
            x, y = _seg_apply(test.images[sl], test.masks[sl], p, s, dev, augment=test_aug is not None)
            return predict_classes(task(x).float(), s.eval_log_softmax).cpu(), y.cpu()

        for _, (pred, y) in _batched(predict, len(test)):
            meter.update(pred, y)
            preds.append(pred)
        pred = torch.cat(preds)
        report = meter.compute()
        examples = {"images": test.images[:8], "masks": test.masks[:8], "pred": pred[:8], "names": test.names[:8]}
        fields = {
            "train_images": n_train,
            "test_images": len(test),
            "test_names": list(test.names),  # so any two runs can be checked for a shared test set
            "epochs": s.epochs,
            "skipped": sorted(set(train_skipped + test.skipped)),
            **report,
        }
        return examples, fields

    job = Job(task, batch, loss, n_train, seed, run_dir, "segment", draw, apply)
    return prepared("segment", job, _schedule(s, dev, model, run_dir, "segment"), dev, evaluate)


# ---------------------------------------------------------------- the recipes by stage

PREPARE = {"pretrain": prepare_pretrain, "intermediate": prepare_intermediate, "segment": prepare_segment}
STAGE = {"pretrain": pretrain, "intermediate": intermediate, "segment": segment}
