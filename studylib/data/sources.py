"""Where a study's data lives: the real folders, or synthetic data generated on first use."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from studylib.core.schema import build, check_types, one_of
from studylib.data.synth import FORMAT_VERSION, SynthSpec, write_synthetic


@dataclass
class DataConfig:
    section: ClassVar[str] = "data"
    kind: str = "synthetic"  # synthetic: generated on the fly; real: the folders below
    root: str = ""  # synthetic: where to write it (default: <cache>/synth-<spec hash>)
    pets: str = ""  # real: Oxford-IIIT Pet root (images/, annotations/)
    intel: str = ""  # real: Intel root (seg_train/, seg_test/)
    images: str = ""  # real: unlabeled image folder tree (e.g. ImageNet train/)
    cache: str = ""  # decoded-image cache (default: <runs>/cache under `study run`)
    skip_unreadable: bool = False  # leave out files that cannot be decoded (listed in metrics.json)
    synth: dict = field(default_factory=dict)  # SynthSpec fields for kind=synthetic

    def __post_init__(self):
        check_types(self)
        one_of(self, "kind", ("synthetic", "real"))
        synth_spec(self.synth)  # its keys and types


@dataclass
class DataPaths:
    pets: Path
    intel: Path
    images: Path
    cache: Path
    skip_unreadable: bool = False


def default_cache_dir() -> Path:
    """The cache when the data section names none (`study run` always names the run store's cache)."""
    return Path.home() / ".cache" / "studylib"


def synth_spec(values: dict) -> SynthSpec:
    """The `data.synth` mapping as a SynthSpec; an unknown key or a wrong type is a ParamError."""
    return build(SynthSpec, values, "data.synth")


def default_synth_root(spec: SynthSpec, cache: str | Path | None = None) -> Path:
    """<cache>/synth-<hash of the spec and the generator's format>; the cache folder is the data section's
    `cache` (the run store's cache under `study run`), else the user's default cache."""
    # the generator's format version is part of the key, so a new generator never meets stale files
    blob = json.dumps({"format": FORMAT_VERSION, **asdict(spec)}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return (Path(cache) if cache else default_cache_dir()) / f"synth-{key}"


def resolve_data(data: dict | None) -> DataPaths:
    """Data section (as in a parameter file) -> dataset folders, generating synthetic data if needed."""
    d = build(DataConfig, data or {}, "data")
    cache = Path(d.cache) if d.cache else default_cache_dir()
    if d.kind == "synthetic":
        spec = synth_spec(d.synth)
        root = Path(d.root) if d.root else default_synth_root(spec, cache)
        out = write_synthetic(root, spec)
        return DataPaths(out["pets"], out["intel"], out["images"], cache, d.skip_unreadable)
    return DataPaths(Path(d.pets), Path(d.intel), Path(d.images), cache, d.skip_unreadable)


class DataError(ValueError):
    """A dataset folder or file is missing or unreadable; the message names it and the fix."""
