"""Run a command N times and count the runs that hang: a run is hung when its whole process tree (the
command and the kernels it starts) uses no CPU for `--idle` seconds while it has not ended. Unlike a
wall-clock limit this does not mistake a slow run on a busy machine for a hung one.

    python tools/hang_watch.py -n 12 --idle 30 --log LOG -- study run params/smoke.yaml --runs STORE

Prints one line per run (ok, failed rc=K, or HUNG after S s) and a JSON summary at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil


def _cpu(tree: psutil.Process) -> float:
    total = 0.0
    for p in [tree, *tree.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _kill(tree: psutil.Process) -> None:
    for p in [*tree.children(recursive=True), tree]:
        try:
            p.kill()
        except psutil.Error:
            pass


def _dump(tree: psutil.Process, path: str) -> None:
    """Where every process of a hung tree waits (py-spy, when installed), for the record."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return
    with open(path, "w") as f:
        for p in [tree, *tree.children(recursive=True)]:
            out = subprocess.run([spy, "dump", "--pid", str(p.pid)], capture_output=True, text=True)
            f.write(f"== {p.pid} {' '.join(p.cmdline())[:200]}\n{out.stdout}{out.stderr}\n")


def run_once(cmd: list[str], idle: float, dump_to: str = "") -> tuple[str, float]:
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree = psutil.Process(proc.pid)
    last, since = -1.0, time.time()
    while proc.poll() is None:
        time.sleep(1)
        used = _cpu(tree)
        if used > last + 0.05:  # some work was done in the last second(s)
            last, since = used, time.time()
        elif time.time() - since > idle:
            if dump_to:
                _dump(tree, dump_to)
            _kill(tree)
            proc.wait()
            return "hung", time.time() - t0
    return ("ok" if proc.returncode == 0 else f"failed rc={proc.returncode}"), time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=12)
    ap.add_argument("--idle", type=float, default=30.0, help="seconds without CPU use that count as a hang")
    ap.add_argument("--log", default="")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    outcomes = []
    for i in range(args.n):
        status, seconds = run_once(cmd, args.idle, f"{args.log}.hang{i + 1}.txt" if args.log else "")
        outcomes.append(status)
        line = f"{i + 1:3d} {status} {seconds:6.1f}s"
        print(line, flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(line + "\n")
    summary = {"runs": args.n, "hung": outcomes.count("hung"), "ok": outcomes.count("ok"), "command": " ".join(cmd)}
    print(json.dumps(summary))
    if args.log:
        with open(args.log, "a") as f:
            f.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
