"""Expand a study's grid into a plan: a list of stage runs in dependency order.

A run's id is a hash of its stage, its identity parameters and its parent's id (studylib.study.identity
says which settings enter it and how), so identical work gets the same id (an intermediate run is shared
by every downstream run of its encoder and seed, and a finished run is never redone), while any change of
a parameter, an ancestor or the stage's recipe makes a new id.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from studylib.study import identity
from studylib.study.config import EngineConfig, PretrainConfig, StudyConfig, file_sha256

STAGES = ("pretrain", "intermediate", "segment")
NOTEBOOKS = {"pretrain": "01_pretrain.ipynb", "intermediate": "02_intermediate.ipynb", "segment": "03_segment.ipynb"}


@dataclass
class Run:
    stage: str
    params: dict  # the run's identity parameters: what its stage computes from (see studylib.study.identity)
    parent: Run | None = None
    labels: dict = field(default_factory=dict)  # where the run sits in the grid, for the tables

    @property
    def id(self) -> str:
        return identity.run_id(self.stage, self.params, self.parent.id if self.parent else None)

    @property
    def recipe(self) -> int:
        """The version of the stage's code recipe this run is made with (identity.RECIPES)."""
        return identity.RECIPES[self.stage]

    def dir(self, runs: str | Path) -> Path:
        return Path(runs) / self.stage / self.id

    def describe(self) -> str:
        bits = [f"{k}={v}" for k, v in self.labels.items()]
        return f"{self.stage}/{self.id} ({', '.join(bits)})"


def _pretrain_settings(s: PretrainConfig) -> dict:
    """A pre-training run's settings; for an imported encoder (pretrain.from_encoder) only the file: its
    absolute path and its content's sha256, so a different file (or new content) makes a different run."""
    if not s.from_encoder:
        return identity.settings(s)
    path = Path(s.from_encoder).resolve()
    return {"from_encoder": str(path), "from_encoder_sha256": file_sha256(path)}


def plan(cfg: StudyConfig) -> list[Run]:
    """All runs of the grid, each once, parents before children."""
    common = {"model": cfg.model, "data": identity.data(cfg.data)}
    segment = identity.settings(cfg.segment)
    runs: dict[str, Run] = {}

    def add(run: Run) -> Run:
        return runs.setdefault(run.id, run)

    g = cfg.grid
    for seed in g.seeds:
        for p_size in g.pretrain_sizes:
            pre = None
            if p_size:
                pre = add(
                    Run(
                        "pretrain",
                        {**common, "settings": _pretrain_settings(cfg.pretrain), "size": p_size, "seed": seed},
                        labels={"pretrain_size": p_size, "seed": seed},
                    )
                )
            for arm in g.intermediate:
                if arm != "none" and pre is None:
                    continue  # the intermediate stage is only applied to pre-trained encoders
                for f_size in g.finetune_sizes:
                    parent = pre
                    if arm != "none":
                        inter = cfg.intermediate.for_arm(arm)
                        params = {**common, "settings": identity.settings(inter), "seed": seed, "arm": arm}
                        if arm != "intel":  # Pets arms: the downstream split defines their images
                            params["pets_split"] = {
                                k: segment[k] for k in ("split", "test_size", "interpolation", "split_seed")
                            }
                        if not inter.share:  # the authors' pipeline: one per downstream run
                            params["downstream"] = {"finetune_size": f_size, "segment": segment}
                        parent = add(
                            Run(
                                "intermediate",
                                params,
                                parent=pre,
                                labels={"pretrain_size": p_size, "arm": arm, "seed": seed},
                            )
                        )
                    add(
                        Run(
                            "segment",
                            {**common, "settings": segment, "size": f_size, "seed": seed},
                            parent=parent,
                            labels={
                                "protocol": cfg.protocol,
                                "pretrain_size": p_size,
                                "intermediate": arm,
                                "finetune_size": f_size,
                                "seed": seed,
                            },
                        )
                    )
    return sorted(runs.values(), key=lambda r: STAGES.index(r.stage))


@dataclass
class Group:
    """Runs of one stage executed in one kernel. Fused (a GPU) they share the model and step shape (settings,
    data size) and train as one stacked model, differing in seed and parent encoder; one after another (a
    CPU) they share the model, data and settings (`wait_key`) and may differ in size too."""

    stage: str
    runs: list[Run]

    @property
    def id(self) -> str:
        return hashlib.sha256(" ".join(sorted(r.id for r in self.runs)).encode()).hexdigest()[:12]

    def dir(self, runs: str | Path) -> Path:
        return Path(runs) / "groups" / self.stage / self.id

    def describe(self) -> str:
        if len(self.runs) == 1:
            return self.runs[0].describe()
        shared = {k: v for k, v in self.runs[0].labels.items() if all(r.labels.get(k) == v for r in self.runs)}
        return f"{self.stage} x{len(self.runs)} ({', '.join(f'{k}={v}' for k, v in shared.items() if k != 'protocol')})"


def shape_key(run: Run) -> str:
    """Runs with equal keys can train together: everything but the seed (and the parent, not in params)."""
    return json.dumps({"stage": run.stage, **{k: v for k, v in run.params.items() if k != "seed"}}, sort_keys=True)


def wait_key(run: Run) -> str:
    """Runs with equal keys share the stage's arguments (model, data, settings) and wait for the same kind of
    parent (the same pre-training size and arm), so one kernel can train them one after another: the shape
    without the seed and the run's own size (the pre-training or fine-tune size)."""
    own = {"pretrain": "pretrain_size", "segment": "finetune_size"}.get(run.stage)
    params = {k: v for k, v in run.params.items() if k not in ("seed", "size")}
    labels = {k: v for k, v in run.labels.items() if k not in ("seed", own)}
    return json.dumps({"stage": run.stage, **params, "labels": labels}, sort_keys=True)


def groups(runs: list[Run], size: int, spread: int = 1, max_steps: int = 0) -> list[Group]:
    """The groups the runs execute in, in stage order, the most work first within a stage (the longest
    groups start first, so they do not finish last).
    Fused (max_steps 0): runs of equal shape (shape_key), at most `size` per group, split evenly.
    Sequential (max_steps > 0: members run one after another, so only kernel starts are shared): runs of
    equal wait_key packed into as few balanced groups as hold at most max_steps image-steps and `size` runs each
    (what a group shares is paid per group, not per run: its notebook, and a kernel start or clearing; a longer run
    is a group of its own), then each stage
    split into at least `spread` groups where it can (that many workers stay busy)."""
    if max_steps <= 0:
        return _by_order(_fused_groups(runs, size))
    out: list[Group] = []
    for stage in STAGES:
        by_key: dict[str, list[Run]] = {}
        for run in runs:
            if run.stage == stage:
                by_key.setdefault(wait_key(run), []).append(run)
        packed = [Group(stage, b) for members in by_key.values() for b in _pack(members, max_steps, size)]
        out += _spread(packed, spread)
    return _by_order(out)


def _fused_groups(runs: list[Run], size: int) -> list[Group]:
    by_key: dict[str, list[Run]] = {}
    for run in runs:
        by_key.setdefault(shape_key(run), []).append(run)
    out = []
    for members in by_key.values():
        chunks = -(-len(members) // max(1, size))
        out += [Group(members[0].stage, members[i::chunks]) for i in range(chunks)]
    return out


def _work(runs: list[Run]) -> int:
    return sum(image_steps(r) for r in runs)


def _pack(members: list[Run], max_steps: int, size: int) -> list[list[Run]]:
    """As few bins as hold the work at most max_steps image-steps (a longer run alone) and `size` runs each,
    balanced by work: the longest run first into the least loaded bin with room."""
    order = sorted(members, key=lambda r: (-image_steps(r), r.id))
    n_bins = max(-(-_work(members) // max_steps), -(-len(members) // max(1, size)), 1)
    while True:
        bins: list[list[Run]] = [[] for _ in range(min(n_bins, len(members)))]
        for run in order:
            min((b for b in bins if len(b) < size), key=_work).append(run)
        if all(len(b) == 1 or _work(b) <= max_steps for b in bins):
            return bins
        n_bins += 1


def _spread(stage_groups: list[Group], spread: int) -> list[Group]:
    """Split the stage's largest group in two (balanced by work) until it has `spread` groups or none can split."""
    out = list(stage_groups)
    while len(out) < spread:
        splittable = [g for g in out if len(g.runs) > 1]
        if not splittable:
            break
        big = max(splittable, key=lambda g: _work(g.runs))
        halves: list[list[Run]] = [[], []]
        for run in sorted(big.runs, key=lambda r: (-image_steps(r), r.id)):
            min(halves, key=_work).append(run)
        out.remove(big)
        out += [Group(big.stage, h) for h in halves]
    return out


def _by_order(gs: list[Group]) -> list[Group]:
    return sorted(gs, key=lambda g: (STAGES.index(g.stage), -_work(g.runs)))


# A sequential group holds at most this many image-steps (about 2.5 min of viny-tiny on one CPU core):
# what a group pays once (its notebook, and a new kernel's start, ~3 s, or a reused one's clearing, ~0.65 s)
# matters for short runs only, and one worker must not queue all the long ones.
SEQUENTIAL_GROUP_STEPS = 30_000


def schedule(runs: list[Run], engine: EngineConfig, device: str, workers: int, executor: str = "local") -> list[Group]:
    """The groups the runner executes `runs` in (and the estimate predicts): engine.group_size members (by
    device) fused on a GPU; where members run one after another (not fused, local workers), the runs that
    wait for the same kind of parent share kernels of at most SEQUENTIAL_GROUP_STEPS image-steps (and
    engine.group_size runs when it is set), each stage spread over the workers."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    sequential = not engine.fused(device) and executor == "local"
    if sequential:
        return [g for g in groups(runs, engine.group_size or len(runs), workers, SEQUENTIAL_GROUP_STEPS) if g.runs]
    return [g for g in groups(runs, engine.members(device)) if g.runs]


INTEL_TRAIN_IMAGES = 14034  # the published seg_train (paper.md)
PETS_LISTS = {"trainval": 3680, "test": 3669}  # the published split lists (7,349 pooled; paper.md)


def image_steps(run: Run) -> int:
    """Training images processed by a run: the images it trains on x epochs (the unit of the cost estimates).
    An intermediate run trains on Intel (the intel arm) or on the Pets images outside the test split."""
    if run.params["settings"].get("from_encoder"):
        return 0  # an imported encoder: nothing is trained
    epochs = run.params["settings"]["epochs"]
    if run.stage != "intermediate":
        return run.params["size"] * epochs
    if run.params["arm"] == "intel":
        return intel_train_images(run.params["data"]) * epochs
    split = run.params["pets_split"]
    trainval, test = pets_list_sizes(run.params["data"])
    if split["split"] == "official":
        return trainval * epochs
    return max(0, trainval + test - split["test_size"]) * epochs


def intel_train_images(data: dict) -> int:
    """Intel's training images: the synthetic spec's count, the folder's files, or (no folder yet) the published
    count, so that a plan or an estimate works before the data is there."""
    if data["kind"] == "synthetic":
        from studylib.data.readers import INTEL_CLASSES
        from studylib.data.sources import synth_spec

        return synth_spec(data["synth"]).intel_train_per_class * len(INTEL_CLASSES)
    from studylib.data.readers import IMAGE_EXTENSIONS, intel_split_dir

    if not Path(data["intel"]).exists():
        return INTEL_TRAIN_IMAGES
    return sum(p.suffix.lower() in IMAGE_EXTENSIONS for p in intel_split_dir(data["intel"], "train").rglob("*"))


def pets_list_sizes(data: dict) -> tuple[int, int]:
    """(trainval, test) image counts of the Pets lists: the synthetic spec's halves, the folder's list files,
    or (no folder yet) the published sizes."""
    if data["kind"] == "synthetic":
        from studylib.data.sources import synth_spec
        from studylib.data.synth import BREEDS

        n = synth_spec(data["synth"]).pets
        trainval = sum((i // len(BREEDS)) % 2 == 0 for i in range(n))  # the generator alternates per breed
        return trainval, n - trainval
    from studylib.data.readers import DataError, pets_root, read_pets_list

    try:
        root = pets_root(data["pets"])
    except DataError:
        return PETS_LISTS["trainval"], PETS_LISTS["test"]
    return len(read_pets_list(root, "trainval")), len(read_pets_list(root, "test"))
