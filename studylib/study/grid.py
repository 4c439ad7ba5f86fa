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
    """Runs of one stage that share the model and step shape (settings, data size): executed in one
    kernel, and on a GPU trained as one stacked model. They differ in seed and parent encoder."""

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


def groups(runs: list[Run], size: int, spread: int = 1, max_steps: int = 0) -> list[Group]:
    """The runs in groups of equal shape, at most `size` each (split evenly); in stage order, the most work
    first within a stage (the longest groups start first, so they do not finish last). Members of a
    sequential (not fused) group run one after another, so: with spread = k a shape's runs form at least k
    groups where they can (k workers stay busy), and with max_steps a group holds at most that many
    image-steps (a long run pays one kernel start either way; one worker must not get them all)."""
    by_key: dict[str, list[Run]] = {}
    for run in runs:
        by_key.setdefault(shape_key(run), []).append(run)
    out = []
    for members in by_key.values():
        per_group = max(1, min(size, max_steps // max(1, image_steps(members[0])))) if max_steps else max(1, size)
        chunks = max(-(-len(members) // per_group), min(len(members), spread))
        out += [Group(members[0].stage, members[i::chunks]) for i in range(chunks)]
    return sorted(out, key=lambda g: (STAGES.index(g.stage), -sum(image_steps(r) for r in g.runs)))


# A sequential group holds at most this many image-steps (about 2.5 min of viny-tiny on one CPU core):
# a kernel start (~8 s) matters for short runs only, and one worker must not queue all the long ones.
SEQUENTIAL_GROUP_STEPS = 30_000


def schedule(runs: list[Run], engine: EngineConfig, device: str, workers: int, executor: str = "local") -> list[Group]:
    """The groups the runner executes `runs` in (and the estimate predicts): engine.group_size members (by
    device) fused on a GPU; where members run one after another (not fused, local workers), each shape is
    spread over the workers and a group holds at most SEQUENTIAL_GROUP_STEPS image-steps."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    sequential = not engine.fused(device) and executor == "local"
    spread, max_steps = (workers, SEQUENTIAL_GROUP_STEPS) if sequential else (1, 0)
    return [g for g in groups(runs, engine.members(device), spread, max_steps) if g.runs]


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
