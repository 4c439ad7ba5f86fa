"""A study's plan checked against the data that is there, before anything trains.

`problems` lists every problem at once, one line each, naming the setting and the fix: a folder the plan needs
that is missing (only the folders it needs: Pets for segmentation and the Pets arms, the image folder when a
pre-training run trains, Intel when an intel arm runs), a pre-training size larger than the image folder, a
fine-tune or test size larger than the segmentation split allows, a Pets arm left no images to train on.
Counts come from file lists (real data) or the synthetic spec (nothing is generated), never from decoding, so a
file that cannot be decoded is still found at run time (see data.skip_unreadable).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from studylib.data import readers as R
from studylib.data.sources import synth_spec
from studylib.data.synth import BREEDS
from studylib.study.config import ParamError, SegmentConfig, StudyConfig

if TYPE_CHECKING:
    from studylib.study.grid import Run

PETS_ARMS = ("pets-breeds", "spatial")  # intermediate arms that train on Pets images outside the test split

_GET = {
    "pets": "download with `study data get pets {path}`",
    "intel": "download with `study data get intel {path} --url <a mirror of the Kaggle archive> --sha256 <its sha256>`",
    "images": "point data.images at a folder of unlabeled images (e.g. ImageNet's train/)",
}


class _Problem(Exception):
    """One line of `problems`: what stops the checks of one dataset."""


@dataclass
class _Source:
    """What a check says about one dataset: where it is, for the messages, and how to get more of it."""

    where: str
    more: str  # the fix that makes the dataset larger


def problems(cfg: StudyConfig, plan: list[Run]) -> list[str]:
    """Every problem of `plan` (grid.plan(cfg)) against the data that is there, one line each; [] when it can run."""
    uses = _uses(cfg, plan)
    out = []
    for name, check in (("pets", _pets_problems), ("images", _image_problems), ("intel", _intel_problems)):
        if name in uses:
            try:
                out += check(cfg, plan, uses[name])
            except _Problem as e:
                out.append(str(e))
    return out


def ensure(cfg: StudyConfig, plan: list[Run]) -> None:
    """Raise ParamError with every problem of the plan, one per line, when there is any."""
    found = problems(cfg, plan)
    if found:
        raise ParamError("\n".join(found))


def _uses(cfg: StudyConfig, plan: list[Run]) -> dict[str, str]:
    """{dataset: what in the plan needs it}, for the datasets the plan's runs read and no other."""
    arms = sorted({r.labels.get("arm") for r in plan if r.stage == "intermediate"})
    pets = (["every segmentation run"] if any(r.stage == "segment" for r in plan) else []) + [
        f"the {arm} arm" for arm in arms if arm in PETS_ARMS
    ]
    uses = {"pets": " and ".join(pets)} if pets else {}
    # an imported encoder (pretrain.from_encoder) trains nothing, so it reads no unlabeled images
    if any(r.stage == "pretrain" for r in plan) and not cfg.pretrain.from_encoder:
        uses["images"] = "the pre-training runs"
    if "intel" in arms:
        uses["intel"] = "the intel arm"
    return uses


def _folder(cfg: StudyConfig, name: str, why: str) -> Path:
    """data.<name> as an existing path, else the problem that names the setting and how to get the data."""
    path = getattr(cfg.data, name)
    if not path:
        hint = _GET[name].format(path="data/" + name)
        raise _Problem(f"data.{name}: not set (needed by {why}); {hint} and set data.{name} to that folder")
    if not Path(path).exists():
        shown = path if Path(path).is_absolute() else f"{path} (= {Path(path).resolve()})"
        raise _Problem(
            f"data.{name}: {shown} not found (needed by {why}); {_GET[name].format(path=path)} or fix the path"
        )
    return Path(path)


def _read(name: str, what, *args):
    """`what(*args)`, a reader's DataError (or an unreadable folder) as the problem of data.<name>."""
    try:
        return what(*args)
    except (R.DataError, OSError) as e:
        raise _Problem(f"data.{name}: {e}") from None


def _sizes(plan: list, stage: str, label: str) -> list[int]:
    return sorted({r.labels[label] for r in plan if r.stage == stage})


def _listed(values: list[int]) -> str:
    """[250, 500, 1000] -> '250, 500 and 1,000'."""
    shown = [f"{v:,}" for v in values]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} and {shown[-1]}"


# ---------------------------------------------------------------- unlabeled images (pre-training)


def _image_problems(cfg: StudyConfig, plan: list, why: str) -> list[str]:
    if cfg.data.kind == "synthetic":
        n = synth_spec(cfg.data.synth).unlabeled
        src = _Source(f"the synthetic data (data.synth.unlabeled) holds {n:,} images", "raise data.synth.unlabeled")
    else:
        root = _folder(cfg, "images", why)
        n = len(_read("images", R.list_images, root))  # the list load_image_set draws from
        src = _Source(f"{root} holds {n:,} image files", "point data.images at a larger folder")
    over = [s for s in _sizes(plan, "pretrain", "pretrain_size") if s > n]
    return [f"grid.pretrain_sizes: {_listed(over)} asked, {src.where}; lower it or {src.more}"] if over else []


# ---------------------------------------------------------------- Oxford-IIIT Pet (segmentation, Pets arms)


def _pets_counts(cfg: StudyConfig, why: str) -> tuple[int, int, _Source]:
    """(trainval, test) images of Pets and where they are."""
    if cfg.data.kind == "synthetic":
        n = synth_spec(cfg.data.synth).pets
        # synth._write_pets lists image i in trainval when (i // len(BREEDS)) is even (alternating per breed)
        trainval = sum((i // len(BREEDS)) % 2 == 0 for i in range(n))
        return trainval, n - trainval, _Source(f"the synthetic Pets (data.synth.pets: {n:,})", "raise data.synth.pets")
    root = _read("pets", R.pets_root, _folder(cfg, "pets", why))
    lists = {split: _read("pets", R.read_pets_list, root, split) for split in ("trainval", "test")}
    _check_listed_files(root, [name for entries in lists.values() for name, _ in entries])
    return len(lists["trainval"]), len(lists["test"]), _Source(str(root), "")


def _check_listed_files(root: Path, names: list[str]) -> None:
    """Every listed image has its image and trimap (load_pets stops at the first missing one)."""
    images = {p.stem for p in (root / "images").iterdir() if p.suffix.lower() in R.IMAGE_EXTENSIONS}
    trimaps = {p.stem for p in (root / "annotations" / "trimaps").glob("*.png")}
    missing = [n for n in names if n not in images or n not in trimaps]
    if missing:
        raise _Problem(
            f"data.pets: {len(missing):,} images listed in trainval.txt or test.txt have no image or trimap in "
            f"{root} (first: {missing[0]}); restore them, or download again with `study data get pets <folder>`"
        )


def _split_room(s: SegmentConfig, trainval: int, test: int) -> tuple[int, int, str]:
    """As data.splits.segmentation_split: (training images the split leaves outside its test set, images the test
    set is drawn from, which list those are)."""
    if s.split == "official":
        return trainval, test, "test.txt"
    return max(0, trainval + test - s.test_size), trainval + test, "trainval + test"


def _pets_problems(cfg: StudyConfig, plan: list, why: str) -> list[str]:
    trainval, test, src = _pets_counts(cfg, why)
    s, out = cfg.segment, []
    room, test_room, lists = _split_room(s, trainval, test)
    if s.test_size > test_room:
        out.append(
            f"segment.test_size: {s.test_size:,} asked, but the {s.split} split draws it from the {test_room:,} images "
            f"of {lists} in {src.where}; use at most {test_room:,}" + (f" or {src.more}" if src.more else "")
        )
    fixes = ([f"use at most {room:,}"] if room else []) + (["lower segment.test_size"] if s.split != "official" else [])
    fixes += [src.more] if src.more else []
    fix = " or ".join(fixes) or "add images to trainval.txt"
    over = [n for n in _sizes(plan, "segment", "finetune_size") if n > room]
    if over:
        out.append(
            f"grid.finetune_sizes: {_listed(over)} labelled images asked, but the {s.split} split leaves "
            f"{room:,} training images in {src.where}; {fix}"
        )
    arms = sorted({r.labels.get("arm") for r in plan if r.stage == "intermediate"} & set(PETS_ARMS))
    if arms and not room:
        who = f"the {arms[0]} arm trains" if len(arms) == 1 else f"the {' and '.join(arms)} arms train"
        out.append(
            f"grid.intermediate: {who} on the Pets images outside the test set, "
            f"but the {s.split} split leaves none in {src.where}; {fix}"
        )
    return out


# ---------------------------------------------------------------- Intel scenes (the intel arm)


def _intel_problems(cfg: StudyConfig, plan: list, why: str) -> list[str]:
    if cfg.data.kind == "synthetic":
        spec = synth_spec(cfg.data.synth)
        return [
            f"data.synth.{key}: 0 leaves {why} no {split} images; set it to at least 1 or drop intel from "
            "grid.intermediate"
            for key, split in (("intel_train_per_class", "training"), ("intel_test_per_class", "test"))
            if getattr(spec, key) == 0
        ]
    root, out = _folder(cfg, "intel", why), []
    for split in ("train", "test"):
        base = _read("intel", R.intel_split_dir, root, split)
        # as readers.load_intel: the image files of the class folders
        n = sum(p.suffix.lower() in R.IMAGE_EXTENSIONS for c in base.iterdir() if c.is_dir() for p in c.iterdir())
        if not n:
            out.append(
                f"data.intel: {base} holds no images in class folders (needed by {why}); "
                f"{_GET['intel'].format(path=root)} or fix the path"
            )
    return out
