"""What produced a run: code version, packages, machine, seed and wall time (provenance.json)."""

from __future__ import annotations

import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("studylib", "torch", "timm", "numpy", "papermill", "safetensors")


def git_commit(repo: Path) -> dict:
    def git(*args) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty if commit else None}


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def record(repo: Path, seed: int | None, device: str, started: float, ended: float) -> dict:
    return {
        "git": git_commit(repo),
        "packages": versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "device": device,
        "seed": seed,
        "started": started,
        "ended": ended,
        "wall_seconds": round(ended - started, 3),
    }
