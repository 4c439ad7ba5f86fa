"""Study parameter files: a typed schema, protocol presets, and strict validation.

A parameter file is YAML with the sections below. Every key is checked against the schema:
an unknown or ill-typed key is an error that lists the valid keys, so a typo never silently
falls back to a default.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ParamError(ValueError):
    """A parameter file or parameter value is invalid; the message says which and how to fix it."""


@dataclass
class DataConfig:
    kind: str = "synthetic"          # synthetic: generated on the fly; real: the folders below
    root: str = ""                   # synthetic: where to write it (default: <cache>/synth-<spec hash>)
    pets: str = ""                   # real: Oxford-IIIT Pet root (images/, annotations/)
    intel: str = ""                  # real: Intel root (seg_train/, seg_test/)
    images: str = ""                 # real: unlabeled image folder tree (e.g. ImageNet train/)
    cache: str = ""                  # decoded-image cache (default: <runs>/cache under `study run`)
    skip_unreadable: bool = False    # leave out files that cannot be decoded (listed in metrics.json)
    synth: dict = field(default_factory=dict)   # SynthSpec fields for kind=synthetic


@dataclass
class GridConfig:
    pretrain_sizes: list[int] = field(default_factory=lambda: [0])   # 0 = no pre-training
    # intermediate arms: none, intel (the paper's CLS scene stage), pets-breeds (CLS on Pets breeds),
    # spatial (per-patch trimap classes); true/false are read as intel/none
    intermediate: list[str] = field(default_factory=lambda: ["none"])
    finetune_sizes: list[int] = field(default_factory=lambda: [250])
    seeds: list[int] = field(default_factory=lambda: [0])


@dataclass
class StageConfig:
    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    milestones: list[float] = field(default_factory=list)  # fractions of `epochs` where lr *= gamma
    gamma: float = 0.1


@dataclass
class PretrainConfig(StageConfig):
    epochs: int = 100
    lr: float = 1e-3                 # the authors' code; the paper text says 1e-4 with gamma 0.1
    weight_decay: float = 0.05
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.85])
    gamma: float = 0.5
    mask_ratio: float = 0.5
    mask_unit: int = 0               # masking unit in pixels; 0 = the model's patch (the paper's 16 px)
    crop_scale: list[float] = field(default_factory=lambda: [0.67, 1.0])
    cache_margin: float = 0.125      # images are cached this much larger than the model input, for crops
    loss_per_masked_count: bool = False   # paper quirk: divide the L1 loss again by the masked count
    norm_pix_loss: bool = False      # MAE's per-patch normalised targets (not in the paper)


@dataclass
class IntermediateConfig(StageConfig):
    epochs: int = 200
    lr: float = 8e-4
    weight_decay: float = 0.0
    milestones: list[float] = field(default_factory=lambda: [0.9, 0.95])
    gamma: float = 0.1
    mixup_alpha: float = 0.1
    contrast: float = 0.3
    frozen_augmentation: bool = False   # paper quirk: one random flip/jitter per image for all epochs
    share: bool = True               # paper quirk (False): re-run the stage for every downstream run


@dataclass
class SegmentConfig(StageConfig):
    epochs: int = 100
    lr: float = 2e-3
    weight_decay: float = 1e-4
    milestones: list[float] = field(default_factory=lambda: [0.7, 0.9, 0.95])
    gamma: float = 0.5
    contrast: float = 0.3
    test_size: int = 1000
    normalize: bool = True           # paper quirk (False): Pets inputs not ImageNet-normalised
    interpolation: str = "bilinear"  # paper quirk ("nearest"): images resized with nearest neighbour
    spatial_log_softmax: bool = False   # paper quirk: extra log-softmax over pixels before the CE
    split: str = "fixed"             # fixed test subset of trainval+test; "official": the lists; paper: "pooled"
    frozen_augmentation: bool = False   # paper quirk: one random augmentation per image, frozen for all epochs
    test_augmentation: bool = False     # paper quirk: the frozen random flip/jitter also applied to the test set


@dataclass
class TimeoutConfig:
    cell: int = 600                  # seconds any notebook cell but a training call may run
    training: int = 0                # seconds a stage's training cell may run; 0: from its image-steps


@dataclass
class StudyConfig:
    name: str = "study"
    model: str = "viny"
    protocol: str = "clean"
    device: str = "auto"             # auto | cpu | cuda
    workers: int = 2                 # stage runs executed at once by `study run` (executor local)
    executor: str = "local"          # local | slurm (submitit job arrays) | submitit-local
    cluster: dict = field(default_factory=dict)   # submitit parameters, e.g. slurm_partition, gpus_per_node
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)   # a hung kernel is killed past these
    data: DataConfig = field(default_factory=DataConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    intermediate: IntermediateConfig = field(default_factory=IntermediateConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)


# What `protocol: paper` changes relative to the clean defaults; explicit keys in a file still win.
PROTOCOLS = {
    "clean": {},
    "paper": {
        "pretrain": {"loss_per_masked_count": True},
        "intermediate": {"frozen_augmentation": True, "share": False},
        "segment": {"normalize": False, "interpolation": "nearest", "spatial_log_softmax": True,
                    "split": "pooled", "frozen_augmentation": True, "test_augmentation": True},
    },
}


def _check_value(value, tp, where: str):
    """Return value converted to type tp, or raise ParamError naming the key and expected type."""
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ParamError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ParamError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):      # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp}")


def build(cls, values: dict, where: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ParamError(f"{where or 'parameters'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ParamError(f"unknown parameter {path!r}; valid parameters{' in ' + repr(where) if where else ''}: "
                             f"{', '.join(names)}")
        tp = hints[key]
        kwargs[key] = build(tp, value, path) if dataclasses.is_dataclass(tp) else _check_value(value, tp, path)
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve(values: dict) -> StudyConfig:
    """Apply the protocol preset under the file's own values, build, and check the values."""
    if not isinstance(values, dict):
        raise ParamError(f"parameters: expected a mapping of keys, got {values!r}")
    protocol = values.get("protocol", "clean")
    if not isinstance(protocol, str) or protocol not in PROTOCOLS:
        raise ParamError(f"protocol: unknown value {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    values = _merge(PROTOCOLS[protocol], values)
    arms = values.get("grid", {}).get("intermediate") if isinstance(values.get("grid"), dict) else None
    if isinstance(arms, list):
        values["grid"] = {**values["grid"], "intermediate": [
            {True: "intel", False: "none"}[a] if isinstance(a, bool) else a for a in arms]}
    cfg = build(StudyConfig, values)
    validate(cfg)
    return cfg


def load(path: str | Path) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"parameter file {str(path)!r} not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamError(f"{path}: not valid YAML: {e}") from None
    try:
        return resolve(values)
    except ParamError as e:
        raise ParamError(f"{path}: {e}") from None


def validate(cfg: StudyConfig) -> None:
    from studylib.core.model import MODELS
    if cfg.model not in MODELS:
        raise ParamError(f"model: unknown {cfg.model!r}; valid: {', '.join(MODELS)}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ParamError(f"device: {cfg.device!r} is not one of auto, cpu, cuda")
    if cfg.executor not in ("local", "slurm", "submitit-local"):
        raise ParamError(f"executor: {cfg.executor!r} is not one of local, slurm, submitit-local")
    if cfg.timeouts.cell < 1 or cfg.timeouts.training < 0:
        raise ParamError(f"timeouts: cell at least 1 s and training 0 (estimate) or more, got {cfg.timeouts}")
    if cfg.workers < 1:
        raise ParamError(f"workers: at least 1, got {cfg.workers}")
    if cfg.data.kind not in ("synthetic", "real"):
        raise ParamError(f"data.kind: {cfg.data.kind!r} is not one of synthetic, real")
    if cfg.data.kind == "real":
        needed = ["pets"] + (["images"] if any(cfg.grid.pretrain_sizes) else []) + \
                 (["intel"] if "intel" in cfg.grid.intermediate else [])
        for key in needed:
            if not getattr(cfg.data, key):
                raise ParamError(f"data.{key}: required for data.kind=real with this grid (the dataset's folder)")
    g = cfg.grid
    for key in ("pretrain_sizes", "finetune_sizes", "seeds"):
        vals = getattr(g, key)
        if not vals or len(set(vals)) != len(vals) or min(vals) < 0:
            raise ParamError(f"grid.{key}: needs distinct non-negative values, got {vals}")
    arms = ("none", "intel", "pets-breeds", "spatial")
    if not g.intermediate or len(set(g.intermediate)) != len(g.intermediate) or not set(g.intermediate) <= set(arms):
        raise ParamError(f"grid.intermediate: distinct arms among {', '.join(arms)} (true/false mean intel/none), "
                         f"got {g.intermediate}")
    if 0 in g.finetune_sizes:
        raise ParamError("grid.finetune_sizes: 0 labelled images cannot train a segmenter")
    for name in ("pretrain", "intermediate", "segment"):
        s = getattr(cfg, name)
        if s.epochs < 1 or s.batch_size < 1 or s.lr <= 0:
            raise ParamError(f"{name}: epochs, batch_size and lr must be positive")
        if any(not 0 < m <= 1 for m in s.milestones):
            raise ParamError(f"{name}.milestones: fractions of the epochs in (0, 1], got {s.milestones}")
    if not 0 < cfg.pretrain.mask_ratio < 1:
        raise ParamError(f"pretrain.mask_ratio: must be in (0, 1), got {cfg.pretrain.mask_ratio}")
    if cfg.segment.split not in ("fixed", "official", "pooled"):
        raise ParamError(f"segment.split: {cfg.segment.split!r} is not one of fixed, official, pooled")
    if cfg.segment.interpolation not in ("bilinear", "nearest", "bicubic"):
        raise ParamError("segment.interpolation: one of bilinear, nearest, bicubic")
    from studylib.core.model import model_config
    m = model_config(cfg.model)
    unit = cfg.pretrain.mask_unit or m.patch_size
    if unit % m.patch_size or m.img_size % unit:
        raise ParamError(f"pretrain.mask_unit: {unit} px must be a multiple of the patch ({m.patch_size} px) "
                         f"and divide the image ({m.img_size} px)")


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)
