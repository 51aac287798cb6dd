"""The worker: its own process (`python -m backend worker`) that runs the store's queued jobs one at a time, with
a heartbeat, and exits after a while with nothing to do. Starting it (`ensure_worker`) is torch-free."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TextIO

from backend.log import Log
from backend.runs.lock import UNKNOWN, lock_holder, try_lock
from backend.runs.store import DB_NAME, Store

LOG_NAME = "worker.log"
LOG_KEEP_BYTES = 10 << 20
HEARTBEAT_S = 2.0


def worker_running(root: Path) -> bool:
    """Whether a live worker serves this store."""
    return lock_holder(root) is not None


def stop_worker(root: Path) -> int | None:
    """SIGTERM the worker serving this store, if one holds its lock; returns its pid. A job it was running is
    found interrupted later, like any other stop."""
    pid = lock_holder(Path(root))
    if pid in (None, UNKNOWN):
        return None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return None
    return pid


EXECUTOR_ENV, RAY_ADDRESS_ENV, ARTIFACTS_ENV = "PRUNESCOPE_EXECUTOR", "PRUNESCOPE_RAY_ADDRESS", "PRUNESCOPE_ARTIFACTS"


def cluster_address() -> str | None:
    """The Ray cluster configured for this machine's workers (PRUNESCOPE_RAY_ADDRESS), if any."""
    return os.environ.get(RAY_ADDRESS_ENV) or None


def executor_flags(executor: str | None = None) -> list[str]:
    """The worker flags that pick the executor a started worker uses: `executor`, else PRUNESCOPE_EXECUTOR; ray
    makes it a Ray dispatcher on PRUNESCOPE_RAY_ADDRESS with its artifacts at PRUNESCOPE_ARTIFACTS (`run`/`sweep
    --executor ray [--ray-address A] [--artifacts R]` set them)."""
    if (executor or os.environ.get(EXECUTOR_ENV, "local")) != "ray":
        return []
    address, artifacts = os.environ.get(RAY_ADDRESS_ENV), os.environ.get(ARTIFACTS_ENV)
    return ["--executor", "ray", *(["--ray-address", address] if address else []),
            *(["--artifacts", artifacts] if artifacts else [])]


def ensure_worker(root: Path, device: str = "auto", executor: str | None = None) -> subprocess.Popen | None:
    """Start a worker for this store as a separate program unless one runs (on `executor`, see executor_flags);
    returns the new process."""
    root = Path(root)
    if worker_running(root):
        return None
    path = root / LOG_NAME
    if path.is_file() and path.stat().st_size > LOG_KEEP_BYTES:
        path.replace(path.with_name(LOG_NAME + ".1"))
    log = open(path, "ab")
    command = [sys.executable, "-m", "backend", "worker", "--store", str(root), "--device", device,
               *executor_flags(executor)]
    project = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=project, env=env)


class Heartbeat(threading.Thread):
    """Marks the running job alive every few seconds from its own connection, even inside long torch calls."""

    def __init__(self, root: Path, job_id: int) -> None:
        super().__init__(daemon=True)
        self.root, self.job_id, self.stopped = root, job_id, threading.Event()

    def run(self) -> None:
        db = sqlite3.connect(self.root / DB_NAME, timeout=60, isolation_level=None)
        try:
            while not self.stopped.wait(HEARTBEAT_S):
                db.execute("UPDATE jobs SET heartbeat = ? WHERE job_id = ? AND state = 'running'",
                           (time.time(), self.job_id))
        finally:
            db.close()

    def stop(self) -> None:
        self.stopped.set()
        self.join()


def let_go(root: Path, store: Store, lock: TextIO) -> TextIO | None:
    """Release an idle worker's lock of the store, then look once more for queued jobs: a job queued before that look
    is served by this worker (the lock taken again, which is returned), one queued after it finds no worker holding
    the store and starts one. So no submission is left waiting on a worker that was about to exit. None: let go."""
    lock.close()
    return try_lock(root, attempts=10) if store.has_queued() else None


def serve(root: Path, device: str = "auto", idle_exit: float = 60.0, log: Log | None = None) -> int:
    """Run queued jobs until the queue has stayed empty for `idle_exit` seconds. Returns the jobs run."""
    def say(message: str) -> None:
        print(f"[worker {os.getpid()} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    log = log or say
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lock = try_lock(root, attempts=10)
    if lock is None:
        log("another worker already serves this store; exiting")
        return 0
    from backend.runs.jobs import ModelCache, execute
    from backend.runs.progress import Cancelled

    store = Store(root)
    lost = store.recover_stale()
    if lost:
        log(f"jobs {lost} were left running by a worker that stopped: marked interrupted")
    cache = ModelCache(device=device, log=log)
    ran, idle_since = 0, time.monotonic()
    try:
        while True:
            job = store.claim_next(os.getpid())
            if job is None:
                if time.monotonic() - idle_since > idle_exit:
                    lock = let_go(root, store, lock)
                    if lock is None:
                        return ran
                    idle_since = time.monotonic()
                    continue
                time.sleep(0.3)
                continue
            job = dict(job)
            log(f"job {job['job_id']} ({job['kind']}) of run {job['run_id']}")
            beat = Heartbeat(root, job["job_id"])
            beat.start()
            try:
                execute(store, job, cache, log)
                outcome = ("done", "done")
            except Cancelled as stop:
                outcome = ("cancelled", str(stop))
                log(str(stop))
            except Exception as err:  # noqa: BLE001  (a job's error is recorded and the worker goes on)
                outcome = ("failed", f"{type(err).__name__}: {err}")
                log(traceback.format_exc())
            finally:
                beat.stop()
            if not store.finish(job["job_id"], *outcome, worker_pid=os.getpid()):
                log(f"job {job['job_id']} was no longer running under this worker: its end ({outcome[0]}) "
                    f"is not recorded")
            ran += 1
            idle_since = time.monotonic()
    finally:
        store.close()
        if lock is not None:
            lock.close()
