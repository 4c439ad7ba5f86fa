"""What a run's id is made of, and the rules that keep ids from drifting.

A run's id hashes its stage, its identity parameters (model, data, the stage's settings, size, seed, arm)
and its parent's id. Two things could change ids by accident, and the rules below stop both:

- A setting added later. Every field of every settings section is declared here, once, in exactly one of:
  `always` (part of the id since ids were pinned), `later` (added after: left out of the id while it holds
  the value recorded here, so existing stores keep their ids), or `never` (how runs execute, not what they
  compute). A field declared nowhere is an error the first time a plan is made, so it cannot be forgotten;
  a `later` field whose default moves away from its recorded value is caught by tests/test_identity.py.
- A change of code that changes numbers without a setting (a new way of drawing a seed's randomness, a new
  synthetic-data generator). Each stage has a recipe version; bump it with such a change. Version 1 is left
  out of the id (the ids pinned before versions existed), any later version enters it, so runs of two
  recipes never share an id, and a store never mixes them in one table.

What the machine does to the numbers (CPU instruction set, thread count, torch version, GPU) is recorded in
each run's provenance.json and shown under the results, not hashed: a run store must stay usable on another
machine, and a table that mixes machines says so (see studylib.study.provenance).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

_STAGE = ("epochs", "batch_size", "lr", "weight_decay", "milestones", "gamma", "init", "decay_all", "precision")


@dataclass(frozen=True)
class Rule:
    """How the fields of one settings section enter a run's identity."""

    always: tuple[str, ...] = ()
    later: dict = field(default_factory=dict)  # field -> the value it is left out at (its default when added)
    never: tuple[str, ...] = ()  # execution only: never part of an id
    base: Rule | None = None  # a rule for fields the section inherits (StageConfig's, in every stage), merged in

    def fields(self) -> set[str]:
        own = set(self.always) | set(self.later) | set(self.never)
        return own | (self.base.fields() if self.base else set())

    def enters(self, name: str, value) -> bool:
        """Whether a field at `value` is part of the id: `always`, or `later` and away from its recorded value."""
        if self.base and name in self.base.fields():
            return self.base.enters(name, value)
        return name in self.always or (name in self.later and value != self.later[name])


# fields every stage section inherits from StageConfig, added after ids were pinned. tf32 "auto" resolves per
# precision: off under the paper's fp32, as every run before the setting computed; on under the clean protocol's
# bf16, where only the fp32 parts of a GPU run move, by TF32 rounding (a GPU is not hashed)
_STAGE_RULE = Rule(later={"tf32": "auto"})

RULES = {
    "pretrain": Rule(
        always=_STAGE
        + ("mask_ratio", "mask_unit", "crop_scale", "cache_margin", "loss_per_masked_count", "norm_pix_loss"),
        later={"from_encoder": "", "from_encoder_sha256": ""},
        base=_STAGE_RULE,
    ),
    "intermediate": Rule(
        always=_STAGE + ("mixup_alpha", "contrast", "frozen_augmentation", "share", "interpolation"),
        later={"normalize": True},
        base=_STAGE_RULE,
        never=("arms",),  # resolved into each arm's own settings (IntermediateConfig.for_arm) before hashing
    ),
    "segment": Rule(
        always=_STAGE
        + ("contrast", "test_size", "normalize", "interpolation", "spatial_log_softmax", "split")
        + ("frozen_augmentation", "test_augmentation", "eval_log_softmax", "split_seed"),
        base=_STAGE_RULE,
    ),
    "data": Rule(
        always=("kind", "root", "pets", "intel", "images", "skip_unreadable", "synth"),
        never=("cache",),  # where decoded images are kept changes no number
    ),
    # the grid enters as each run's size, seed and arm; the model by name
    "grid": Rule(always=("pretrain_sizes", "intermediate", "finetune_sizes", "seeds")),
    "": Rule(
        always=("model", "protocol", "data", "grid", "pretrain", "intermediate", "segment"),
        never=("name", "device", "workers", "executor", "cluster", "timeouts", "engine"),
    ),
    "timeouts": Rule(never=("cell", "training")),
    "engine": Rule(
        never=(
            "group_size",
            "fuse",
            "compile",
            "cuda_graphs",
            "checkpoint_seconds",
            "deterministic",
            "threads",
            "threads_from_env",
            "reuse_kernels",
        )
    ),
}

# Bump a stage's version when its code changes what a run computes without any setting changing.
# intermediate and segment 2: each head's init has its own seeded stream (stages._head_seeded), so every arm
# of a seed starts from the same head under the paper's init too (common random numbers)
RECIPES = {"pretrain": 1, "intermediate": 2, "segment": 2}
# The synthetic generator's format the pinned ids were made with (studylib.data.synth.FORMAT_VERSION).
SYNTH_FORMAT_PINNED = 6


class IdentityError(RuntimeError):
    """A settings field has no identity rule: a code change that must say how the field enters run ids."""


def undeclared(section) -> list[str]:
    """The fields of a settings section (a dataclass instance or class) that no rule declares."""
    rule = RULES.get(section.section, Rule())
    return [f.name for f in dataclasses.fields(section) if f.name not in rule.fields()]


def settings(section) -> dict:
    """A settings section as it enters a run's id: `always` fields, and `later` fields that differ from the
    value recorded for them; `never` fields left out."""
    missing = undeclared(section)
    if missing:
        where = ", ".join(f"{section.section}.{name}" for name in missing)
        raise IdentityError(
            f"{where}: no identity rule; declare each in studylib/study/identity.py RULES (always, later with its "
            "default, or never) so existing run ids stay what they were"
        )
    rule = RULES[section.section]
    values = dataclasses.asdict(section)
    return {k: v for k, v in values.items() if rule.enters(k, v)}


def data(section) -> dict:
    """The data section's identity: folders made absolute (relative paths mean the directory `study` runs
    in, not the run folder); the synthetic generator's format once it differs from the pinned one."""
    d = settings(section)
    for key in ("root", "pets", "intel", "images"):
        if d[key]:
            d[key] = str(Path(d[key]).resolve())
    from studylib.data.synth import FORMAT_VERSION

    if d["kind"] == "synthetic" and FORMAT_VERSION != SYNTH_FORMAT_PINNED:
        d["synth_format"] = FORMAT_VERSION
    return d


def run_id(stage: str, params: dict, parent_id: str | None) -> str:
    """12 hex digits of the sha256 of a run's stage, identity parameters, parent and (after 1) recipe."""
    content = {"stage": stage, "params": params, "parent": parent_id}
    if RECIPES[stage] != 1:
        content["recipe"] = RECIPES[stage]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]
