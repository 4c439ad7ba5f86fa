"""The bench's rates in a run store (<runs>/bench/<device>.json, written by `study bench --runs`) and what reads
them without measuring anything: the device's file name, the CPU's bf16-against-fp32 verdict per model, ISA and
threads, and `resolve_precision` (precision: auto). Kept apart from studylib.study.bench, which measures (and
imports the stages), so that the stages and the settings can read the rates without an import circle."""

from __future__ import annotations

import platform
import re
import sys
from pathlib import Path

import torch

from studylib.core import train as T
from studylib.core.files import atomic_write_json, read_json
from studylib.study.config import device_type
from studylib.study.provenance import cpu_model


def device_name(device: torch.device | str = "auto") -> str:
    """The rates' file name: `cuda-<GPU name>` or `cpu-<CPU model, short>`, slugged."""
    dev = T.resolve_device(device) if isinstance(device, str) else device
    if dev.type == "cuda":
        return _slug(f"cuda-{torch.cuda.get_device_name(dev)}")
    return _slug(f"cpu-{_cpu_model()}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1]
                break
        else:
            name = platform.processor()
    except OSError:
        name = platform.processor()
    name = re.sub(r"\((r|tm)\)|@.*|\b\d+-core\b|\b(cpu|processor)\b", " ", name.lower())
    return name.strip() or platform.machine() or "unknown"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---------------------------------------------------------------- precision auto on a CPU


def machine_key(model: str, threads: int | None = None) -> dict:
    """What a CPU's bf16-against-fp32 verdict for a model holds for: the model, CPU model, kernel ISA, threads."""
    threads = torch.get_num_threads() if threads is None else threads
    isa = torch.backends.cpu.get_cpu_capability()
    return {"model": model, "cpu": cpu_model(), "isa": isa, "threads": threads}


def _key_text(key: dict) -> str:
    return f"{key['model']} | {key['cpu']} | {key['isa']} | {key['threads']} threads"


def precision_record(result: dict) -> dict:
    """{key text: {key, stages: {stage: {fp32, bf16}}}}: the single step's images/s in each precision per stage,
    from a CPU bench's single and single-bf16 entries; {} for a smoke run (not a measurement) or a GPU."""
    if result["smoke"] or result["device_type"] != "cpu":
        return {}
    stages: dict = {}
    for e in result["entries"]:
        if e["what"] in ("single", "single-bf16"):
            stages.setdefault(e["stage"], {})[e["precision"]] = e["images_per_s"]
    key = machine_key(result["model"], result["threads"])
    return {_key_text(key): {**key, "stages": stages}}


def precision_pick(runs: str | Path, model: str, stage: str) -> tuple[str | None, str]:
    """('bf16' or 'fp32', why) where this CPU's stored bench rates for the model, at this process's threads,
    measured the stage's single step in both precisions (the intermediate stage by segmentation's); (None, why
    not) otherwise."""
    key, task = machine_key(model), "pretrain" if stage == "pretrain" else "segment"
    rates = load_rates(runs, "cpu") or {}
    found = (rates.get("precision_auto") or {}).get(_key_text(key), {}).get("stages", {}).get(task, {})
    if "fp32" not in found or "bf16" not in found:
        return None, (
            f"no bench rates of {task} in both precisions for {_key_text(key)} in {Path(runs) / 'bench'} "
            f"(`OMP_NUM_THREADS={key['threads']} study bench --device cpu --model {model} --runs {runs}` measures them)"
        )
    pick = "bf16" if found["bf16"] > found["fp32"] else "fp32"
    return pick, f"{task} single step {found['bf16']:.0f} img/s in bf16, {found['fp32']:.0f} in fp32"


# ---------------------------------------------------------------- rates in the run store


def rates_path(runs: str | Path, device: str) -> Path:
    return Path(runs) / "bench" / f"{device}.json"


def save_rates(runs: str | Path, result: dict) -> Path:
    """Write the bench result as <runs>/bench/<device name>.json (atomically). The precision verdicts of other
    models and thread counts stored there before are kept (precision auto reads each run's own)."""
    path = rates_path(runs, result["device"])
    kept = (read_json(path) or {}).get("precision_auto") or {}
    return atomic_write_json(path, {**result, "precision_auto": {**kept, **(result.get("precision_auto") or {})}})


def load_rates(runs: str | Path, device: torch.device | str = "auto") -> dict | None:
    """The stored bench result of this device (auto, cpu, cuda or a torch.device), or None."""
    return read_json(rates_path(runs, device_name(device)))


_SAID: set = set()  # the 'no bench rates' notes already printed by this process


def resolve_precision(precision: str, device, model: str, stage: str, runs) -> str:
    """The precision a stage's Schedule trains with (studylib.core.train.autocast's values). 'auto' is 'bf16' on a
    GPU; on a CPU BF16_CPU_TOO where the run store's bench rates (<runs>/bench, `study bench`) of this model on
    this machine (CPU model, ISA, threads) measured the stage's bf16 step faster than its fp32 step, else 'fp32'
    (said once per process when no rates decide). A run's id says 'auto' (the same on every machine); its
    provenance.json records what it became."""
    if precision != "auto":
        return precision
    if device_type(device) == "cuda":
        return "bf16"
    pick, why = precision_pick(runs, model, stage)
    if pick is None and why not in _SAID:
        _SAID.add(why)
        print(f"precision auto: {why}; training in fp32", file=sys.stderr, flush=True)
    return T.BF16_CPU_TOO if pick == "bf16" else "fp32"
