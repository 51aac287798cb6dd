"""The worker lock of a store: held by exactly one live worker process (flock, released by the kernel when the
process dies, however it dies), so "is the job's worker alive" is a fact read from the lock, never a guess from
heartbeat times."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

LOCK_NAME = "worker.lock"
UNKNOWN = -1


def try_lock(root: Path, attempts: int = 1, wait_s: float = 0.2, name: str = LOCK_NAME):
    """The lock of a store (or the lock file `name` in the folder `root`): an open file holding it, with this pid
    written in, or None when another process holds it. A probe by another process holds it for an instant, so a
    starting worker tries a few times."""
    for attempt in range(attempts):
        handle = open(Path(root) / name, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            if attempt + 1 < attempts:
                time.sleep(wait_s)
            continue
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return handle
    return None


def lock_holder(root: Path, name: str = LOCK_NAME) -> int | None:
    """The pid of the worker holding the store's lock (or the lock file `name` in the folder `root`; UNKNOWN while
    it is still writing it), or None when no live process holds it."""
    path = Path(root) / name
    if not path.is_file():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = Path(path).read_text().strip()
            return int(text) if text.isdigit() else UNKNOWN
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None
