"""The Ray executor: a dispatcher on the store's machine that claims queued jobs, runs each as a Ray task on
whatever node Ray picks (backend/runs/remote.py), writes the progress each task streams back, records its results
in one transaction, cancels a task whose run is cancelled, and marks a job whose task died interrupted. It holds
the store's worker lock, so a store has one dispatcher (or one local worker), never two."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from backend.log import Log
from backend.runs.lock import try_lock
from backend.runs.remote import clear_left_staging, snapshot
from backend.runs.store import Store
from backend.runs.worker import Heartbeat, let_go


def current_cluster() -> str | None:
    """The address of the Ray cluster started on this machine (`ray start --head` writes it where `auto` finds it)."""
    import tempfile

    path = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    return (path.read_text().strip() or None) if path.is_file() else None


def address_problem(address: str | None, timeout: float = 3.0) -> str | None:
    """Why no Ray cluster answers at `address`, in one line (None when one does, or when no address is given: the
    dispatcher then starts a local instance of its own). Checked before anything is queued."""
    import socket

    if not address:
        return None
    target = (os.environ.get("RAY_ADDRESS") or current_cluster()) if address == "auto" else address
    if not target:
        return ("--ray-address auto: no Ray cluster runs on this machine; start one with `ray start --head`, give "
                "the address another machine's `ray start --head` printed, or leave --ray-address out for a local "
                "instance")
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return f"--ray-address {address!r} is not an address: use auto or HOST:PORT (as `ray start --head` prints it)"
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        return (f"--ray-address {address}: no Ray cluster answers at {host}:{port} ({err.strerror or err}); start one "
                f"with `ray start --head` or give the address it printed")
    return None


def artifacts_problem(root: str | None) -> str | None:
    """Why the artifact root cannot take the pruned models, in one line (None when it can, or is not given): an
    fsspec URL whose scheme is not installed or cannot be written, a folder that cannot be made. Every node must
    reach it too, which only the cluster can tell."""
    if not root:
        return None
    from backend.runs.locations import filesystem, is_url

    try:
        if is_url(root):
            fs, path = filesystem(root)
            fs.makedirs(path, exist_ok=True)
        else:
            Path(root).expanduser().mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as err:
        return f"--artifacts {root}: cannot be written ({err}); give a folder every node reaches or an fsspec URL"
    return None


@dataclass(frozen=True)
class Resources:
    """What each job asks Ray for (fractional GPUs allowed) and how often a task whose worker died is retried."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None
    max_retries: int = 1


@dataclass
class Running:
    """A job sent to Ray: its row, its task's stream, its heartbeat and the dense side it computes (None when its
    dense side is cached or it does not evaluate)."""

    job: dict
    stream: object
    beat: Heartbeat
    computes: str | None = None


def _task(resources: Resources):
    import ray

    from backend.runs.remote import run_job

    options = dict(num_returns="streaming", num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                   max_retries=resources.max_retries, retry_exceptions=False)
    if resources.memory:
        options["memory"] = resources.memory
    return ray.remote(run_job).options(**options)


def _outcome(err: BaseException) -> tuple[str, str]:
    """The job's final state and message for what ended its task."""
    import ray.exceptions as rex

    if isinstance(err, rex.TaskCancelledError):
        return "cancelled", "cancelled"
    if isinstance(err, (rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError, rex.OwnerDiedError)):
        return "interrupted", f"its Ray task's worker died ({type(err).__name__}) after the retries allowed; " \
                              f"submit the run again to redo it"
    if isinstance(err, rex.RayTaskError):
        cause = err.cause if getattr(err, "cause", None) is not None else err
        return "failed", f"{type(cause).__name__}: {cause}"
    return "failed", f"{type(err).__name__}: {err}"


def serve_ray(root: Path, address: str | None = None, device: str = "auto", idle_exit: float = 60.0,
              resources: Resources = Resources(), log: Log = print, artifacts: str | None = None,
              ray_options: dict | None = None) -> int:
    """Dispatch the store's queued jobs to a Ray cluster (`address`: 'auto', HOST:PORT, or None for a local
    instance) until the queue has stayed empty for `idle_exit` seconds with nothing running. Returns the jobs run."""
    import ray

    root = Path(root)
    lock = try_lock(root, attempts=10)
    if lock is None:
        log("another worker or dispatcher already serves this store; exiting")
        return 0
    if threading.current_thread() is threading.main_thread():  # SIGTERM (stop_worker) ends it through `finally`
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    store = Store(root)
    lost = store.recover_stale()
    if lost:
        log(f"jobs {lost} were left running by a worker that stopped: marked interrupted")
    started_ray = not ray.is_initialized()
    if started_ray:
        project = str(Path(__file__).resolve().parents[2])  # PruneScope itself, importable by the tasks
        path = os.pathsep.join(filter(None, [project, os.environ.get("PYTHONPATH")]))
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}}, **(ray_options or {}))
    task = _task(resources)
    running: dict[object, Running] = {}
    waiting: list[tuple[dict, Heartbeat]] = []  # claimed, held while another task computes their dense side
    ran, idle_since, pid = 0, time.monotonic(), os.getpid()

    def send(job: dict, beat: Heartbeat) -> bool:
        """Send a claimed job to Ray, unless a running task is computing the dense side it needs (the dense side
        is computed once per model and setting, cluster-wide): then it waits for that result."""
        snap = snapshot(store, job, artifacts)
        computes = snap.dense_key if snap.dense is None and job["kind"] == "full" else None
        if computes and any(r.computes == computes for r in running.values()):
            return False
        stream = task.remote(snap, device)
        running[stream] = Running(job, stream, beat, computes)
        log(f"job {job['job_id']} ({job['kind']}) of run {job['run_id']} sent to Ray")
        return True

    def end(item: Running, state: str, message: str) -> None:
        nonlocal ran
        item.beat.stop()
        if not store.finish(item.job["job_id"], state, message, worker_pid=pid):
            log(f"job {item.job['job_id']} was no longer running under this dispatcher: its end is not recorded")
        running.pop(item.stream, None)
        ran += 1

    try:
        while True:
            capacity = max(1, int(ray.cluster_resources().get("CPU", 1) // max(resources.num_cpus, 1e-9)))
            waiting[:] = [(job, beat) for job, beat in waiting if len(running) >= capacity or not send(job, beat)]
            while len(running) < capacity:
                job = store.claim_next(pid)
                if job is None:
                    break
                job = dict(job)
                beat = Heartbeat(root, job["job_id"])
                beat.start()
                if not send(job, beat):
                    waiting.append((job, beat))
            if not running and not waiting:
                if time.monotonic() - idle_since > idle_exit:
                    lock = let_go(root, store, lock)
                    if lock is None:
                        return ran
                    idle_since = time.monotonic()
                    continue
                time.sleep(0.3)
                continue
            idle_since = time.monotonic()
            for job, beat in list(waiting):
                row = store.job(job["job_id"])
                if row and row.get("cancel_requested"):
                    beat.stop()
                    waiting.remove((job, beat))
                    store.finish(job["job_id"], "cancelled", "cancelled before it started", worker_pid=pid)
            for item in list(running.values()):
                row = store.job(item.job["job_id"])
                if row and row.get("cancel_requested"):
                    ray.cancel(item.stream, force=True)
            if not running:
                time.sleep(0.3)
                continue
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for stream in ready:
                item = running[stream]
                try:
                    event = ray.get(next(stream))
                except StopIteration:
                    end(item, "failed", "its Ray task ended without results")
                    continue
                except Exception as err:  # noqa: BLE001  (every way a task ends is recorded on its job)
                    state, message = _outcome(err)
                    if state == "failed":
                        log(traceback.format_exc())
                    end(item, state, message)
                    continue
                if "progress" in event:
                    store.progress(item.job["job_id"], *event["progress"])
                elif "log" in event:
                    log(event["log"])
                elif "writes" in event:
                    store.record(item.job["run_id"], item.job["job_id"], event["writes"])
                    end(item, "done", "done")
    finally:
        for job, beat in waiting:
            beat.stop()
            store.finish(job["job_id"], "interrupted", "the dispatcher stopped before this job started; submit the "
                                                       "run again", worker_pid=pid)
        for item in list(running.values()):
            ray.cancel(item.stream, force=True)
            end(item, "interrupted", "the dispatcher stopped during this job; submit the run again to redo it")
        if started_ray:
            ray.shutdown()
        clear_left_staging()  # what tasks killed on this node (a cancel is a kill) left staged
        store.close()
        if lock is not None:
            lock.close()
