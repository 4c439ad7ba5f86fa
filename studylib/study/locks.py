"""A lock per run folder that dies with its holder: fcntl.flock is released by the kernel when the
process exits, however it exits (SIGKILL included), so a crashed runner never blocks the run forever."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class RunLock:
    """Exclusive lock on `folder/name`. `with RunLock(d):` waits for any other holder."""

    def __init__(self, folder: str | Path, name: str = ".lock"):
        self.path = Path(folder) / name
        self.fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            return False
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
