"""Study parameter files: a typed schema, protocol presets, and strict validation.

A parameter file is YAML with the sections below. Every key is checked against the schema:
an unknown or ill-typed key is an error that lists the valid keys, so a typo never silently
falls back to a default. Each section checks its own types and value ranges when it is made
(see studylib.core.schema), so a stage given a plain dict of settings is as strict as a whole
file; the checks that need the whole study (the model, the masking unit against the model's patch, an
imported encoder) are StudyConfig's, and the data a plan needs (folders, sizes) is checked against the
plan by studylib.study.checks before anything trains. Which settings enter a run's id, and how, is
studylib.study.identity's rule.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from studylib.core.schema import ParamError, at_least, build, check_types, key, one_of, positive, require
from studylib.data.sources import DataConfig

__all__ = [
    "DataConfig",
    "GridConfig",
    "IntermediateConfig",
    "ParamError",
    "PretrainConfig",
    "PROTOCOLS",
    "SegmentConfig",
    "StageConfig",
    "StudyConfig",
    "TimeoutConfig",
    "EngineConfig",
    "build",
    "file_sha256",
    "load",
    "resolve",
    "to_dict",
]

ARMS = ("none", "intel", "pets-breeds", "spatial")
PRECISIONS = ("bf16", "fp32", "auto")  # a stage's `precision` (rates.resolve_precision: what auto trains in)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's content (remembered per path, size and mtime: a plan hashes it once)."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _distinct(values: list, low: int) -> bool:
    return bool(values) and len(set(values)) == len(values) and min(values) >= low


@dataclass
class GridConfig:
    section: ClassVar[str] = "grid"
    pretrain_sizes: list[int] = field(default_factory=lambda: [0])  # 0 = no pre-training
    # intermediate arms: none, intel (the paper's CLS scene stage), pets-breeds (CLS on Pets breeds),
    # spatial (per-patch trimap classes); true/false are read as intel/none
    intermediate: list[str] = field(default_factory=lambda: ["none"])
    finetune_sizes: list[int] = field(default_factory=lambda: [250])
    seeds: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self):
        check_types(self)
        for name in ("pretrain_sizes", "seeds"):
            require(self, name, _distinct(getattr(self, name), 0), "distinct non-negative values (at least one)")
        # 0 labelled images cannot train a segmenter
        require(self, "finetune_sizes", _distinct(self.finetune_sizes, 1), "distinct positive values (at least one)")
        require(
            self,
            "intermediate",
            bool(self.intermediate)
            and len(set(self.intermediate)) == len(self.intermediate)
            and set(self.intermediate) <= set(ARMS),
            f"distinct arms among {', '.join(ARMS)} (true/false mean intel/none)",
        )


@dataclass
class StageConfig:
    section: ClassVar[str] = "stage"
    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    milestones: list[float] = field(default_factory=list)  # fractions of `epochs` where lr *= gamma
    gamma: float = 0.1
    init: str = "trunc_normal"  # paper ("torch"): PyTorch's default Linear init, standard-normal mask token
    decay_all: bool = False  # paper quirk (True): weight decay on every parameter, norms and biases too
    # bf16 autocast on a GPU (fp32 on a CPU); paper: "fp32" everywhere; auto: bf16 on a GPU, and on a CPU where
    # `study bench` measured bf16 faster for the model on that machine (rates.resolve_precision; provenance records it)
    precision: str = "bf16"
    # TF32 matmuls and convolutions for what runs in fp32 on a CUDA GPU (nothing on a CPU): auto is on with
    # precision bf16 (the clean protocol) and off with fp32 (the paper's: the authors ran plain fp32)
    tf32: str = "auto"

    def __post_init__(self):
        check_types(self)
        one_of(self, "init", ("trunc_normal", "torch"))
        one_of(self, "precision", PRECISIONS)
        one_of(self, "tf32", ("auto", "on", "off"))
        at_least(self, "epochs", 1)
        at_least(self, "batch_size", 1)
        positive(self, "lr")
        at_least(self, "weight_decay", 0.0)
        require(self, "milestones", all(0 < m <= 1 for m in self.milestones), "fractions of the epochs in (0, 1]")
        require(self, "gamma", 0 < self.gamma <= 1, "in (0, 1] (the factor lr is multiplied by at a milestone)")

    def uses_tf32(self) -> bool:
        """Whether fp32 matmuls may run as TF32 on a CUDA GPU (see `tf32`)."""
        return self.tf32 == "on" or (self.tf32 == "auto" and self.precision in ("bf16", "auto"))


@dataclass
class PretrainConfig(StageConfig):
    section: ClassVar[str] = "pretrain"
    epochs: int = 100
    lr: float = 1e-3  # the authors' code; the paper text says 1e-4 with gamma 0.1
    weight_decay: float = 0.05
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.85])
    gamma: float = 0.5
    mask_ratio: float = 0.5
    mask_unit: int = 0  # masking unit in pixels; 0 = the model's patch (the paper's 16 px)
    crop_scale: list[float] = field(default_factory=lambda: [0.67, 1.0])
    cache_margin: float = 0.125  # images are cached this much larger than the model input, for crops
    loss_per_masked_count: bool = False  # paper quirk: divide the L1 loss again by the masked count
    norm_pix_loss: bool = False  # MAE's per-patch normalised targets (not in the paper)
    # an encoder.safetensors (studylib.core.model.save_encoder) trained elsewhere: the stage trains nothing and
    # takes it as the run's pre-trained encoder (the grid's pretrain_sizes label it); the settings above are unused
    from_encoder: str = ""
    from_encoder_sha256: str = ""  # optional: the file's expected sha256 (a different file is an error)

    def __post_init__(self):
        super().__post_init__()
        require(
            self,
            "from_encoder",
            not self.from_encoder or Path(self.from_encoder).is_file(),
            "empty or an existing encoder file (an encoder.safetensors written by studylib.core.model.save_encoder)",
        )
        require(
            self,
            "from_encoder_sha256",
            not self.from_encoder_sha256
            or (bool(self.from_encoder) and re.fullmatch(r"[0-9a-f]{64}", self.from_encoder_sha256) is not None),
            "empty, or with pretrain.from_encoder the file's sha256 (64 lowercase hex digits)",
        )
        require(self, "mask_ratio", 0 < self.mask_ratio < 1, "in (0, 1)")
        require(self, "mask_unit", self.mask_unit >= 0, "0 (the model's patch) or a size in pixels")
        lo_hi = self.crop_scale
        require(
            self,
            "crop_scale",
            len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1] <= 1,
            "[low, high] area fractions with 0 < low <= high <= 1",
        )
        at_least(self, "cache_margin", 0.0)


@dataclass
class IntermediateConfig(StageConfig):
    section: ClassVar[str] = "intermediate"
    epochs: int = 200
    lr: float = 8e-4
    weight_decay: float = 0.0
    milestones: list[float] = field(default_factory=lambda: [0.9, 0.95])
    gamma: float = 0.1
    mixup_alpha: float = 0.1
    contrast: float = 0.3
    frozen_augmentation: bool = False  # one random flip/jitter per image for all epochs (the authors: fresh)
    share: bool = True  # paper quirk (False): re-run the stage for every downstream run
    interpolation: str = "bilinear"  # paper quirk ("nearest"): Intel images resized with nearest neighbour
    normalize: bool = True  # ImageNet-normalise the inputs (the Table-2 spatial arm: false, as segmentation)
    # per-arm recipes: {arm: {key: value}} over the settings above, e.g. {spatial: {lr: 5.0e-4, normalize: false}}
    arms: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        one_of(self, "interpolation", ("bilinear", "nearest", "bicubic"))
        require(self, "mixup_alpha", self.mixup_alpha >= 0, "at least 0 (0: no MixUp)")
        require(self, "contrast", self.contrast >= 0, "at least 0 (factors drawn from [1 - c, 1 + c])")
        arms = {}
        for arm, over in self.arms.items():
            where = f"{key(self, 'arms')}.{arm}"
            if arm not in ARMS[1:]:
                raise ParamError(f"{where}: unknown arm; arms with an intermediate stage: {', '.join(ARMS[1:])}")
            if not isinstance(over, dict):
                raise ParamError(f"{where}: expected a mapping of intermediate settings, got {over!r}")
            if "arms" in over:
                raise ParamError(f"{where}.arms: an arm's recipe cannot hold per-arm recipes")
            built = build(IntermediateConfig, {**self._base(), **over}, where)  # unknown keys and values
            arms[arm] = {k: getattr(built, k) for k in over}
        self.arms = arms

    def _base(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "arms"}

    def for_arm(self, arm: str) -> IntermediateConfig:
        """The settings of one arm's runs: these with the arm's overrides (`arms`) applied, and no `arms`."""
        return IntermediateConfig(**{**self._base(), **self.arms.get(arm, {})})


@dataclass
class SegmentConfig(StageConfig):
    section: ClassVar[str] = "segment"
    epochs: int = 100
    lr: float = 2e-3
    weight_decay: float = 1e-4
    milestones: list[float] = field(default_factory=lambda: [0.7, 0.9, 0.95])
    gamma: float = 0.5
    contrast: float = 0.3
    test_size: int = 1000
    normalize: bool = True  # paper quirk (False): Pets inputs not ImageNet-normalised
    interpolation: str = "bilinear"  # paper quirk ("nearest"): images resized with nearest neighbour
    spatial_log_softmax: bool = False  # paper quirk: extra log-softmax over pixels before the CE
    split: str = "fixed"  # fixed test subset of trainval+test; "official": the lists; paper: "pooled"
    frozen_augmentation: bool = False  # paper quirk: one random augmentation per image, frozen for all epochs
    test_augmentation: bool = False  # paper quirk: the frozen random flip/jitter also applied to the test set
    eval_log_softmax: bool = False  # paper quirk: predict the argmax of the pixel-log-softmaxed logits
    split_seed: int = 0  # seed of the one permutation of the pooled data (paper: 42, the same for every run)

    def __post_init__(self):
        super().__post_init__()
        require(self, "contrast", self.contrast >= 0, "at least 0 (factors drawn from [1 - c, 1 + c])")
        at_least(self, "test_size", 1)
        one_of(self, "interpolation", ("bilinear", "nearest", "bicubic"))
        one_of(self, "split", ("fixed", "official", "pooled"))
        at_least(self, "split_seed", 0)


@dataclass
class TimeoutConfig:
    section: ClassVar[str] = "timeouts"
    cell: int = 600  # seconds any notebook cell but a training call may run
    training: int = 0  # seconds a stage's training cell may run; 0: from its image-steps

    def __post_init__(self):
        check_types(self)
        at_least(self, "cell", 1)
        require(self, "training", self.training >= 0, "0 (estimated from the image-steps) or more")


@dataclass
class EngineConfig:
    """How runs execute; none of it is part of a run's identity (the same run trains to the same
    numbers however it is executed, up to float rounding; see `deterministic`).

    'auto' picks per device: on a GPU, groups train fused as one stacked model; on a CPU, a group's
    members train one after another in one kernel (fusing measured no faster there). `compile` covers both
    paths: a fused group's stacked forward and loss compile as one graph (the last batch padded to the full
    size where the stage's loss takes sample weights, else it compiles a second graph), a group of one the
    plain step; `cuda_graphs` then captures it as CUDA graphs. 'auto' compiles on a GPU only: on a CPU a
    compiled fused step (viny-tiny segmentation, batch 16, 1 thread) ran 1.2-1.35x faster but took 28-37 s to
    compile, more than a demo group (at most 360 steps) wins back."""

    section: ClassVar[str] = "engine"
    group_size: int = 0  # runs of one shape executed in one kernel; 0: auto (8 on a CPU, 32 on a GPU); 1: no groups
    fuse: str = "auto"  # auto | on | off: train a group's members as one stacked model
    compile: str = "auto"  # auto | on | off: torch.compile the model and loss
    cuda_graphs: str = "auto"  # auto | on | off: CUDA graphs for the compiled step (GPU only)
    checkpoint_seconds: float = (
        120.0  # a resumable checkpoint at most this often (and after the last epoch); 0: every epoch
    )
    deterministic: bool = False  # deterministic kernels: resume gives bit-identical results on a GPU too (slower)
    # CPU threads per kernel; 0: the cores shared out over the workers (cores // workers). On a CPU the numbers
    # depend on it (float summation order), so every run records what it got in provenance.json
    threads: int = 0
    threads_from_env: bool = False  # true: a shell's OMP_NUM_THREADS wins over `threads` (otherwise ignored)
    # a local worker's kernel runs its groups one after another (cleared between them, replaced after a failure):
    # no start-up and imports per group; false: a new kernel for every group
    reuse_kernels: bool = True

    def __post_init__(self):
        check_types(self)
        at_least(self, "group_size", 0)
        at_least(self, "threads", 0)
        for name in ("fuse", "compile", "cuda_graphs"):
            one_of(self, name, ("auto", "on", "off"))
        at_least(self, "checkpoint_seconds", 0)

    def _on(self, name: str, device) -> bool:
        value = getattr(self, name)
        return value == "on" or (value == "auto" and device_type(device) == "cuda")

    def fused(self, device) -> bool:
        return self._on("fuse", device)

    def compile_mode(self, device) -> str:
        """'' (eager), 'default' or 'reduce-overhead' (compiled with CUDA graphs): torch.compile's mode."""
        if not self._on("compile", device):
            return ""
        return "reduce-overhead" if self._on("cuda_graphs", device) and device_type(device) == "cuda" else "default"

    def members(self, device) -> int:
        return self.group_size or (32 if device_type(device) == "cuda" else 8)

    def kernel_threads(self, workers: int, environ=None) -> int:
        """The CPU threads each of `workers` concurrent kernels gets: `threads`, else the cores shared out;
        a shell's OMP_NUM_THREADS only when `threads_from_env` says so."""
        env = os.environ if environ is None else environ
        if self.threads_from_env and env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
            return int(env["OMP_NUM_THREADS"])
        return self.threads or max(1, (os.cpu_count() or 1) // max(1, workers))


def device_type(device) -> str:
    """'cuda', 'cpu', ... of a torch.device or a name ('cuda:1'); 'auto': this machine's (a GPU if there is one)."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return getattr(device, "type", None) or str(device).split(":")[0]


@dataclass
class StudyConfig:
    section: ClassVar[str] = ""  # the top level: its keys are not prefixed
    name: str = "study"
    model: str = "viny"
    protocol: str = "clean"
    device: str = "auto"  # auto | cpu | cuda
    workers: int = 2  # stage runs executed at once by `study run` (executor local)
    executor: str = "local"  # local | slurm (submitit job arrays) | submitit-local
    cluster: dict = field(default_factory=dict)  # submitit parameters, e.g. slurm_partition, gpus_per_node
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)  # a hung kernel is killed past these
    engine: EngineConfig = field(default_factory=EngineConfig)  # groups, fusing, compiling, checkpoints
    data: DataConfig = field(default_factory=DataConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    intermediate: IntermediateConfig = field(default_factory=IntermediateConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)

    def __post_init__(self):
        check_types(self)  # the sections checked themselves when they were made
        one_of(self, "protocol", PROTOCOLS)
        one_of(self, "device", ("auto", "cpu", "cuda"))
        one_of(self, "executor", ("local", "slurm", "submitit-local"))
        at_least(self, "workers", 1)
        self._check_across()

    def _check_across(self) -> None:
        """The checks that need more than one section. The data folders are not among them: which ones a study
        needs follows from its plan, so studylib.study.checks checks them against the plan (before it runs)."""
        from studylib.core.model import MODELS  # imports torch: only once a study is checked

        one_of(self, "model", MODELS)
        m = MODELS[self.model]
        unit = self.pretrain.mask_unit or m.patch_size
        if unit % m.patch_size or m.img_size % unit:
            raise ParamError(
                f"pretrain.mask_unit: {unit} px must be a multiple of the patch ({m.patch_size} px) "
                f"and divide the image ({m.img_size} px)"
            )
        if self.pretrain.from_encoder:
            self._check_from_encoder(m.to_dict())

    def _check_from_encoder(self, model: dict) -> None:
        """The imported encoder: one pre-training size labels it, it is this study's model, and (when given)
        its content is the expected one."""
        path = self.pretrain.from_encoder
        if len([n for n in self.grid.pretrain_sizes if n]) != 1:
            raise ParamError(
                f"grid.pretrain_sizes: with pretrain.from_encoder, exactly one non-zero size (the label of the "
                f"imported encoder, e.g. [200000]; 0 may be added for no pre-training), got {self.grid.pretrain_sizes}"
            )
        try:
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                found = json.loads((f.metadata() or {})["config"])
        except Exception as e:
            raise ParamError(
                f"pretrain.from_encoder: {path} is not an encoder file written by studylib.core.model.save_encoder "
                f"({type(e).__name__}: {e})"
            ) from None
        if found != model:
            diff = ", ".join(f"{k} {found.get(k)!r} (model: {v!r})" for k, v in model.items() if found.get(k) != v)
            raise ParamError(f"pretrain.from_encoder: {path} holds another encoder than model {self.model!r}: {diff}")
        expected = self.pretrain.from_encoder_sha256
        if expected and file_sha256(path) != expected:
            raise ParamError(
                f"pretrain.from_encoder_sha256: {path} has sha256 {file_sha256(path)}, not the expected {expected}"
            )


# What the authors' code does in every stage: PyTorch's default init, weight decay on every parameter, fp32.
_AUTHORS_TRAINING = {"init": "torch", "decay_all": True, "precision": "fp32"}

# What `protocol: paper` changes relative to the clean defaults; explicit keys in a file still win.
PROTOCOLS = {
    "clean": {},
    "paper": {
        "pretrain": {"loss_per_masked_count": True, **_AUTHORS_TRAINING},
        "intermediate": {"share": False, "interpolation": "nearest", **_AUTHORS_TRAINING},
        "segment": {
            **_AUTHORS_TRAINING,
            "eval_log_softmax": True,
            "split_seed": 42,
            "normalize": False,
            "interpolation": "nearest",
            "spatial_log_softmax": True,
            "split": "pooled",
            "frozen_augmentation": True,
            "test_augmentation": True,
        },
    },
}


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
        values["grid"] = {
            **values["grid"],
            "intermediate": [{True: "intel", False: "none"}[a] if isinstance(a, bool) else a for a in arms],
        }
    return build(StudyConfig, values)


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


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)
