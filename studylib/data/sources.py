"""Where a study's data lives: the real folders, or synthetic data generated on first use."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from studylib.study.config import DataConfig, build
from studylib.data.readers import default_cache_dir
from studylib.data.synth import FORMAT_VERSION, SynthSpec, write_synthetic


@dataclass
class DataPaths:
    pets: Path
    intel: Path
    images: Path
    cache: Path
    skip_unreadable: bool = False


def synth_spec(values: dict) -> SynthSpec:
    valid = [f.name for f in fields(SynthSpec)]
    unknown = set(values) - set(valid)
    if unknown:
        raise ValueError(f"unknown parameter data.synth.{sorted(unknown)[0]}; valid: {', '.join(valid)}")
    return SynthSpec(**values)


def default_synth_root(spec: SynthSpec) -> Path:
    import hashlib
    import json
    from dataclasses import asdict
    # the generator's format version is part of the key, so a new generator never meets stale files
    blob = json.dumps({"format": FORMAT_VERSION, **asdict(spec)}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return default_cache_dir() / f"synth-{key}"


def resolve_data(data: dict | None) -> DataPaths:
    """Data section (as in a parameter file) -> dataset folders, generating synthetic data if needed."""
    d = build(DataConfig, data or {}, "data")
    cache = Path(d.cache) if d.cache else default_cache_dir()
    if d.kind == "synthetic":
        spec = synth_spec(d.synth)
        root = Path(d.root) if d.root else default_synth_root(spec)
        out = write_synthetic(root, spec)
        return DataPaths(out["pets"], out["intel"], out["images"], cache, d.skip_unreadable)
    return DataPaths(Path(d.pets), Path(d.intel), Path(d.images), cache, d.skip_unreadable)
