"""`study data get`: fetch a dataset when the user asks for it (never needed by tests or the demo)."""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path


def get_pets(root: str | Path) -> Path:
    """Oxford-IIIT Pet through torchvision (images + trimaps + split lists) -> root/oxford-iiit-pet."""
    from torchvision.datasets import OxfordIIITPet

    OxfordIIITPet(str(root), split="trainval", target_types="segmentation", download=True)
    return Path(root) / "oxford-iiit-pet"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def get_archive(url: str, dest: str | Path, sha256: str) -> Path:
    """Download a .zip/.tar(.gz) archive, check its SHA-256, and unpack it into dest (atomically:
    a temporary sibling folder is renamed into place). Used for Intel scenes from a mirror of the
    Kaggle archive; the checksum is required, so a wrong or tampered file never lands."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists and is not empty; choose another folder or delete it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        archive = Path(tmp) / "archive"
        with urllib.request.urlopen(url) as r, open(archive, "wb") as f:
            shutil.copyfileobj(r, f)
        got = sha256_of(archive)
        if got != sha256.lower():
            raise ValueError(f"checksum mismatch for {url}: expected {sha256}, got {got}; not unpacked")
        out = Path(tmp) / "out"
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(out)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                t.extractall(out, filter="data")
        else:
            raise ValueError(f"{url} is neither a zip nor a tar archive")
        if dest.exists():
            dest.rmdir()
        out.rename(dest)
    return dest
