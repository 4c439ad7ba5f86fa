"""What produced a run: code version, packages, machine, seed and wall time (provenance.json).

The machine matters to the numbers: on a CPU the kernels torch picks for the instruction set (AVX2 and
AVX512 give different demo tables) and the thread count (a different summation order) change results in
the last digits, and so do the torch version and the GPU, and the precision a run trained in (`precision: auto`
is bf16 on a CPU only where the bench measured it faster there). `machine()` records what a run got; these are
not part of a run's id (a store stays usable elsewhere), so a table that mixes machines says so
(`describe` and `mixed`).
"""

from __future__ import annotations

import os
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


# environment variables that change which CPU kernels torch and oneDNN run
ISA_OVERRIDES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def trained_precision(device, precision: str) -> str:
    """'bf16' or 'fp32': what a Schedule's precision (studylib.core.train.autocast's values) trains in on `device`."""
    import torch

    from studylib.core import train

    dev = torch.device(device) if isinstance(device, str) else device
    return "bf16" if isinstance(train.autocast(dev, precision), torch.autocast) else "fp32"


def machine(device: str, precision: str | None = None) -> dict:
    """What this process computes with: device, CPU kernel ISA and threads, CPU model, torch, GPU name, and
    the precision the run trained in ('bf16' or 'fp32', see trained_precision; left out where not given)."""
    import torch

    out = {
        "device": str(device),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "gpu": None,
        "overrides": {k: os.environ[k] for k in ISA_OVERRIDES if k in os.environ},
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if precision is not None:
        out["precision"] = precision
    return out


def describe(m: dict | None) -> str:
    """One line for a machine record, e.g. 'cpu, ISA AVX512, 1 thread, AMD EPYC 7B13, torch 2.14.1'."""
    if not m:
        return "unrecorded machine"
    if m.get("gpu"):
        head = f"{m['device']} ({m['gpu']})"
    else:
        threads = m.get("threads")
        head = f"{m.get('device', 'cpu')}, ISA {m.get('isa')}, {threads} thread{'s' if threads != 1 else ''}"
    extra = "".join(f", {k}={v}" for k, v in sorted((m.get("overrides") or {}).items()))
    # bf16 on a CPU only comes from precision auto, whose id does not say it: a table mixing it with fp32 says so
    cpu_bf16 = ", bf16 autocast" if not m.get("gpu") and m.get("precision") == "bf16" else ""
    return f"{head}, {m.get('cpu')}, torch {m.get('torch')}{cpu_bf16}{extra}"


def mixed(records: list[dict | None]) -> list[str]:
    """The distinct machine lines of a table's runs, most runs first; more than one means the table mixes
    machines whose numbers can differ in the last digits."""
    counts: dict[str, int] = {}
    for m in records:
        line = describe(m)
        counts[line] = counts.get(line, 0) + 1
    return sorted(counts, key=lambda k: -counts[k])


def record(
    repo: Path, seed: int | None, device: str, started: float, ended: float, precision: str | None = None
) -> dict:
    """provenance.json's content; `precision`: what the run trained in (trained_precision), where known."""
    return {
        "machine": machine(device, precision),
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
