"""A job run away from the store (a Ray task on any node): it reads what it needs from a snapshot the dispatcher
took, streams its progress back, and returns every write for the dispatcher to record in one transaction, so the
store (one SQLite file on the head) is written by the dispatcher alone."""

from __future__ import annotations

import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterator

from backend.runs.locations import is_url, upload
from backend.runs.lock import lock_holder, try_lock
from backend.runs.progress import measured_rates
from backend.runs.spec import RunSpec, dense_key
from backend.runs.store import Store


@dataclass(frozen=True)
class Snapshot:
    """What a job reads of the store: its row, its spec and fingerprints, the cached dense side of its evaluation
    (None: to compute), the measured stage rates and the artifact root every node can reach."""

    job: dict
    spec: dict
    prints: dict
    dense_key: str
    dense: dict | None
    rates: dict
    artifacts: str


def snapshot(store: Store, job: dict, artifacts: str | None = None) -> Snapshot:
    """The dispatcher's snapshot of one claimed job."""
    run_id = job["run_id"]
    spec, prints = store.spec(run_id), store.fingerprints(run_id)
    key = dense_key(spec, prints)
    device_type = (prints.get("provenance") or {}).get("device_type")
    return Snapshot(dict(job), spec.to_dict(), prints, key, store.dense_result(key),
                    measured_rates(store, spec.model, device_type, spec.calibration == "self"),
                    str(artifacts or store.root / "runs"))


STAGING = "prunescope-staging-"
MAKING = "prunescope-making-"
STAGING_LOCK = ".held"


def staging_folder(parent: Path | None = None) -> tuple[Path, IO]:
    """A new staging folder in the temp dir and the open file that locks it while this process lives (the kernel lets
    go of it however the process ends). The folder gets its name only once locked, so `clear_left_staging` never
    takes a live task's folder for a dead one's."""
    parent = Path(parent or tempfile.gettempdir())
    making = Path(tempfile.mkdtemp(prefix=MAKING, dir=parent))
    handle = try_lock(making, name=STAGING_LOCK)  # a new folder: no other process holds its lock
    folder = parent / f"{STAGING}{making.name.removeprefix(MAKING)}"
    making.rename(folder)
    return folder, handle


def clear_left_staging(parent: Path | None = None) -> list[Path]:
    """Remove the staging folders of tasks that died on this node (a killed Ray task cannot clean up after itself,
    and what it staged may be a whole pruned model); a folder whose lock is held, or that has no lock, is left."""
    removed = []
    for folder in sorted(Path(parent or tempfile.gettempdir()).glob(f"{STAGING}*")):
        if folder.is_symlink() or not (folder / STAGING_LOCK).is_file():
            continue
        if lock_holder(folder, STAGING_LOCK) is not None:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


@dataclass
class RecordingStore:
    """The store as a remote job sees it: reads come from the snapshot, progress goes out as it happens, and the
    writes are kept, in order, for the dispatcher."""

    snap: Snapshot
    emit: Callable[[tuple], None]
    writes: list[tuple] = field(default_factory=list)
    staging: Path | None = None
    staging_lock: IO | None = field(default=None, repr=False)
    root = None  # no key server here: a judge endpoint that needs a typed key runs on the local executor

    def spec(self, run_id: str) -> RunSpec:
        return RunSpec.from_dict(self.snap.spec)

    def fingerprints(self, run_id: str) -> dict:
        return self.snap.prints

    def dense_result(self, key: str) -> dict | None:
        return self.snap.dense if key == self.snap.dense_key else None

    def evaluated(self, key: str, other_than: str | None = None) -> str | None:
        return None  # the snapshot carries no other run's evaluation: a remote job evaluates

    def run_folder(self, run_id: str) -> Path:
        """The run's folder under the artifact root; for an fsspec URL, a staging folder on this node whose
        artifacts save_artifact uploads."""
        if not is_url(self.snap.artifacts):
            return Path(self.snap.artifacts) / run_id
        if self.staging is None:
            self.staging, self.staging_lock = staging_folder()
        return self.staging / run_id

    def progress(self, job_id: int, *report) -> bool:
        self.emit(("progress", report))
        return False  # a cancel is the dispatcher's: it cancels the Ray task

    def save_timings(self, job_id: int, timings: dict) -> None:
        self.writes.append(("timings", timings))

    def save_dense_result(self, key: str, model: str, result: dict) -> None:
        self.writes.append(("dense", key, model, result))

    def save_artifact(self, run_id: str, name: str, path: Path, files: dict) -> None:
        if is_url(self.snap.artifacts):
            url = f"{self.snap.artifacts.rstrip('/')}/{run_id}/{name}"
            self.emit(("log", f"uploading {name} of run {run_id} to {url}"))
            upload(path, url)
            shutil.rmtree(path)
            path = url
        self.writes.append(("artifact", name, str(path), files))

    def save_layers(self, run_id: str, layers: list[dict]) -> None:
        self.writes.append(("layers", layers))

    def save_results(self, run_id: str, prune: dict, layers: list[dict], summary: dict, examples: list[dict]) -> None:
        self.writes.append(("results", prune, layers, summary, examples))


def run_job(snap: Snapshot, device: str = "auto") -> Iterator[dict]:
    """Run one job from its snapshot (the body of the Ray task): yields {'progress': (stage, done, total, message,
    overall, left)} and {'log': line} as the job goes, then {'writes': [...]}; the job's error is raised."""
    from backend.runs.jobs import ModelCache, execute

    clear_left_staging()
    events: queue.Queue = queue.Queue()
    store = RecordingStore(snap, events.put)
    failed: list[BaseException] = []

    def body() -> None:
        try:
            execute(store, snap.job, ModelCache(device=device, log=lambda m: events.put(("log", m))),
                    lambda m: events.put(("log", m)), rates=snap.rates)
        except BaseException as err:  # noqa: BLE001  (raised again below, in the task's own thread)
            failed.append(err)
        finally:
            events.put(("end", None))

    threading.Thread(target=body, daemon=True, name=f"job-{snap.job['job_id']}").start()
    try:
        while True:
            kind, value = events.get()
            if kind == "end":
                break
            yield {kind: value}
    finally:
        if store.staging is not None:
            shutil.rmtree(store.staging, ignore_errors=True)
            store.staging_lock.close()
    if failed:
        raise failed[0]
    yield {"writes": store.writes}
