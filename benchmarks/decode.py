"""Time building the decoded-image store (studylib.data.decoded): one worker, every CPU, and nvJPEG.

    .venv/bin/python benchmarks/decode.py                      # 400 synthetic JPEGs: 1 worker, then every CPU
    .venv/bin/python benchmarks/decode.py --repeat 5 --json    # five rounds, with min/median/max
    .venv/bin/python benchmarks/decode.py --n 200000 --gpu --single-n 5000   # a GPU machine
    .venv/bin/python benchmarks/decode.py --folder ~/data/imagenet/train --n 20000

Synthetic images are ImageNet-like: 500x375 (every fifth one 375x500), smooth colour fields with noise,
JPEG quality 90. Each build starts from an empty cache folder (removed after it), with the source files
read once beforehand, so every run finds them in the page cache. The store geometry defaults to the
study's: short side 144 (a 128 px model with cache_margin 0.125), long side at most twice that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studylib.data import decoded, decoders
from studylib.data.readers import list_images, nested_subset


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=400, help="images to decode (default 400)")
    p.add_argument("--folder", type=Path, help="decode a seeded subset of this folder instead of synthetic JPEGs")
    p.add_argument("--size", type=int, default=144, help="short side (default 144)")
    p.add_argument("--max-aspect", type=float, default=2.0, help="long side bound over short (0: square squash)")
    p.add_argument("--workers", type=int, default=decoders.cpus(), help="the parallel run's processes (all CPUs)")
    p.add_argument("--single-n", type=int, help="time the 1-worker run on only this many of the images")
    p.add_argument("--repeat", type=int, default=1, help="rounds of all the runs (default 1)")
    p.add_argument("--gpu", action="store_true", help="also time nvJPEG, where CUDA is available")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where the scratch folders go")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the images


def _synthetic(args) -> tuple[int, str]:
    """Write synthetic image i into folder; returns its size in bytes."""
    i, folder = args
    rng = np.random.default_rng(i)
    w, h = (375, 500) if i % 5 == 4 else (500, 375)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    noisy = np.asarray(base, np.int16) + rng.normal(0, 10, (h, w, 3)).astype(np.int16)
    path = Path(folder) / f"n{i % 100:03d}" / f"img_{i:07d}.JPEG"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path.stat().st_size


def make_jpegs(folder: Path, n: int, workers: int) -> int:
    """n synthetic JPEGs in folder (written in parallel); their total size in bytes."""
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(_synthetic, [(i, str(folder)) for i in range(n)], chunksize=64))


def pick(folder: Path, n: int) -> list[Path]:
    """A seeded subset of n files, in file order (as load_image_set picks them)."""
    paths = list_images(folder)
    if n > len(paths):
        sys.exit(f"{folder} holds {len(paths)} images, fewer than --n {n}")
    return [paths[i] for i in sorted(nested_subset(len(paths), n, 0))]


def warm(files: list[Path]) -> int:
    """Read every file once, so that no run pays for the disk and the runs compare decoding alone."""
    return sum(len(f.read_bytes()) for f in files)


# ---------------------------------------------------------------- the runs


def build(folder: Path, files: list[Path], args, workers: int, device: str) -> dict:
    """Time one build of a store of `files` into an empty cache folder."""
    cache = Path(tempfile.mkdtemp(prefix="decode-bench-cache-", dir=args.tmp))
    try:
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        decoded.decoded_rows(folder, files, args.size, args.max_aspect or None, cache, True, workers, device)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {
        "images": len(files),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(files) / seconds, 1),
        "cores_busy": round(cpu / seconds, 2),  # below `workers` when others hold the CPUs
    }


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers, once it is shut down)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def round_of_runs(folder: Path, files: list[Path], args, gpu: bool) -> dict:
    runs = {"1 worker": build(folder, files[: args.single_n or len(files)], args, 1, "cpu")}
    runs[f"{args.workers} workers"] = build(folder, files, args, args.workers, "cpu")
    if gpu:
        runs["nvjpeg"] = build(folder, files, args, 1, "cuda")
    rate = lambda name: runs[name]["images_per_s"]  # noqa: E731
    runs["ratio"] = round(rate(f"{args.workers} workers") / rate("1 worker"), 3)
    if gpu:
        runs["nvjpeg_ratio"] = round(rate("nvjpeg") / rate("1 worker"), 3)
    return runs


def summary(rounds: list[dict], key: str) -> dict:
    values = [r[key] for r in rounds]
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    gpu = args.gpu and torch.cuda.is_available()
    if args.gpu and not gpu:
        print("no CUDA here: the nvJPEG run is left out", file=sys.stderr)
    scratch = None
    if args.folder is None:
        scratch = Path(tempfile.mkdtemp(prefix="decode-bench-jpegs-", dir=args.tmp))
        t0 = time.perf_counter()
        nbytes = make_jpegs(scratch, args.n, args.workers)
        if not args.json:
            print(f"wrote {args.n} JPEGs ({nbytes / args.n / 1024:.0f} KiB each) in {time.perf_counter() - t0:.1f} s")
    folder = args.folder or scratch
    try:
        files = pick(folder, args.n)
        warm(files)
        if gpu:  # CUDA's and nvJPEG's start-up is not decoding
            decoders.decode_jpegs(files[:8], decoders.Geometry(args.size, args.max_aspect or None), "cuda")
        rounds = []
        for r in range(args.repeat):
            rounds.append(round_of_runs(folder, files, args, gpu))
            if not args.json:
                print(f"round {r + 1}: " + ", ".join(f"{k} {v}" for k, v in rounds[-1].items()))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    out = {
        "n": args.n,
        "size": args.size,
        "max_aspect": args.max_aspect,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "rounds": rounds,
        "ratio": summary(rounds, "ratio"),
    }
    if gpu:
        out["nvjpeg_ratio"] = summary(rounds, "nvjpeg_ratio")
    print(json.dumps(out, indent=2) if args.json else f"{args.workers} workers / 1 worker: {out['ratio']}")
    return out


if __name__ == "__main__":
    main()
