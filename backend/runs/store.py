"""The results store: one SQLite file (WAL) holding runs, jobs, per-layer reports, metrics, per-example records,
the cached dense side of evaluations and the artifacts' checksums, beside a folder of artifacts."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from backend.runs.identity import code_version
from backend.runs.locations import location
from backend.runs.lock import UNKNOWN, lock_holder
from backend.runs.protocol import protocol_key, protocol_of
from backend.runs.schema import SCHEMA_VERSION, StoreError, migrate
from backend.runs.spec import RunSpec
from compression.targets import Targets

__all__ = ["ACTIVE", "DB_NAME", "FINAL", "SCHEMA_VERSION", "STATES", "Store", "StoreError", "Submission"]

DB_NAME = "prunescope.db"
ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "interrupted", "cancelled")
STATES = ACTIVE + FINAL
# spec fields beyond the filters that decide how the calibration made a pruned model (runs differing only in the
# calibration source pair up in a study only when these agree, and the targets' allocation too)
RECIPE_FIELDS = ("template", "order", "per_row", "dtype")


@dataclass(frozen=True)
class Submission:
    """What a submit found or created."""

    run_id: str
    job_id: int | None
    state: str
    cached: bool


def default_root() -> Path:
    """$PRUNESCOPE_STORE, else the user data directory."""
    env = os.environ.get("PRUNESCOPE_STORE", "").strip()
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "prunescope" / "store"


class Store:
    """A results store rooted at a folder; safe to open from several processes at once."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_root()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"store folder {str(self.root)!r} cannot be created: {err.strerror}") from None
        self.path = self.root / DB_NAME
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA busy_timeout = 60000")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.execute("PRAGMA foreign_keys = ON")
        migrate(self.db)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once so concurrent writers queue instead of deadlocking."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def run_folder(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    # submitting and claiming work

    def submit(self, spec: RunSpec, prints: dict, run_id: str, artifacts_ok: bool | None = None,
               data_dir: str | None = None) -> Submission:
        """Add the run if new. A finished run is served as it is; a run with a queued or running job returns that
        job; otherwise (new, failed, interrupted, cancelled, or its pruned model lost) a job is queued."""
        self.recover_stale()
        with self.write() as db:
            db.execute("INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (run_id, json.dumps(spec.to_dict()), json.dumps(prints), spec.model, spec.method,
                        spec.sparsity, spec.pattern, spec.calibration, time.time()))
            active = db.execute("SELECT job_id, state FROM jobs WHERE run_id = ? AND state IN ('queued', 'running')",
                                (run_id,)).fetchone()
            if active:
                return Submission(run_id, active["job_id"], active["state"], cached=False)
            finished = db.execute("SELECT 1 FROM metrics WHERE run_id = ?", (run_id,)).fetchone() is not None
            if finished and artifacts_ok is not False:
                return Submission(run_id, None, "done", cached=True)
            kind = "rebuild" if finished else "full"
            cursor = db.execute("INSERT INTO jobs (run_id, kind, state, data_dir, created_at) "
                                "VALUES (?, ?, 'queued', ?, ?)", (run_id, kind, data_dir, time.time()))
            return Submission(run_id, cursor.lastrowid, "queued", cached=False)

    def has_queued(self) -> bool:
        """Whether any job waits for a worker."""
        return self.db.execute("SELECT 1 FROM jobs WHERE state = 'queued' LIMIT 1").fetchone() is not None

    def claim_next(self, pid: int) -> sqlite3.Row | None:
        """The oldest queued job, marked running by this worker."""
        with self.write() as db:
            job = db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY job_id LIMIT 1").fetchone()
            if job is None:
                return None
            now = time.time()
            db.execute("UPDATE jobs SET state = 'running', worker_pid = ?, heartbeat = ?, started_at = ?, "
                       "stage = 'starting', message = NULL WHERE job_id = ?", (pid, now, now, job["job_id"]))
            return db.execute("SELECT * FROM jobs WHERE job_id = ?", (job["job_id"],)).fetchone()

    def progress(self, job_id: int, stage: str, done: int | None = None, total: int | None = None,
                 message: str | None = None, overall: float | None = None, remaining_s: float | None = None) -> bool:
        """Record a job's stage and progress, the whole job's fraction done and seconds left (kept while a report
        has none) and a heartbeat; a new stage drops the last one's message. True when a cancel was asked for."""
        with self.write() as db:
            now = time.time()
            db.execute("UPDATE jobs SET stage_started_at = CASE WHEN stage IS ? THEN stage_started_at ELSE ? END, "
                       "message = CASE WHEN stage IS ? THEN COALESCE(?, message) ELSE ? END, "
                       "stage = ?, done = ?, total = ?, overall = COALESCE(?, overall), "
                       "remaining_s = COALESCE(?, remaining_s), heartbeat = ? WHERE job_id = ?",
                       (stage, now, stage, message, message, stage, done, total, overall, remaining_s, now, job_id))
            row = db.execute("SELECT cancel_requested FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def save_timings(self, job_id: int, timings: dict) -> None:
        """Each finished stage's measured seconds and work, which estimate later jobs' stages."""
        self.record(None, job_id, [("timings", timings)])

    def finish(self, job_id: int, state: str, message: str | None = None, worker_pid: int | None = None) -> bool:
        """End a job that is still running under `worker_pid`; False (and nothing written) when it is not, so a
        job can end only once and only by its own worker."""
        if state not in FINAL:
            raise ValueError(f"state {state!r} is not final: use one of {', '.join(FINAL)}")
        with self.write() as db:
            cursor = db.execute("UPDATE jobs SET state = ?, message = COALESCE(?, message), finished_at = ?, "
                                "heartbeat = ? WHERE job_id = ? AND state = 'running' AND worker_pid IS ?",
                                (state, message, time.time(), time.time(), job_id, worker_pid))
        return cursor.rowcount == 1

    def cancel(self, run_id: str) -> str | None:
        """Cancel a queued job at once; ask a running one to stop. Returns the job's state, None when idle."""
        with self.write() as db:
            job = db.execute("SELECT job_id, state FROM jobs WHERE run_id = ? AND state IN ('queued', 'running')",
                             (run_id,)).fetchone()
            if job is None:
                return None
            if job["state"] == "queued":
                db.execute("UPDATE jobs SET state = 'cancelled', finished_at = ?, message = 'cancelled before it "
                           "started' WHERE job_id = ?", (time.time(), job["job_id"]))
                return "cancelled"
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE job_id = ?", (job["job_id"],))
            return "cancelling"

    def recover_stale(self) -> list[int]:
        """Running jobs whose worker is gone become 'interrupted'. Gone means: no live process holds the store's
        worker lock, or the process that holds it is another worker (it took the lock after the job's worker
        died). A slow job whose worker holds the lock is alive however old its heartbeat is."""
        rows = self.db.execute("SELECT job_id, worker_pid FROM jobs WHERE state = 'running'").fetchall()
        if not rows:
            return []
        holder = lock_holder(self.root)
        now = time.time()
        lost = [r["job_id"] for r in rows
                if holder is None or (holder != UNKNOWN and r["worker_pid"] != holder)]
        if lost:
            with self.write() as db:
                for job_id in lost:
                    db.execute("UPDATE jobs SET state = 'interrupted', finished_at = ?, message = 'the worker "
                               "stopped during this job; submit the run again to redo it' "
                               "WHERE job_id = ? AND state = 'running'", (now, job_id))
        return lost

    # results

    def save_results(self, run_id: str, prune: dict, layers: list[dict], summary: dict, examples: list[dict]) -> None:
        """The per-layer report, metrics and per-example records of a run, in one transaction."""
        self.record(run_id, None, [("results", prune, layers, summary, examples)])

    def save_layers(self, run_id: str, layers: list[dict]) -> None:
        self.record(run_id, None, [("layers", layers)])

    def record(self, run_id: str | None, job_id: int | None, writes: list[tuple]) -> None:
        """Writes of a run or job, in their order, in one transaction: what the save_* methods write one at a time,
        and a remote job's whole result (backend/runs/remote.py records them as these same tuples)."""
        with self.write() as db:
            for kind, *args in writes:
                if kind == "timings":
                    db.execute("UPDATE jobs SET timings = ? WHERE job_id = ?", (json.dumps(args[0]), job_id))
                elif kind == "dense":
                    key, model, result = args
                    db.execute("INSERT OR REPLACE INTO dense_results VALUES (?, ?, ?, ?)",
                               (key, model, json.dumps(result), time.time()))
                elif kind == "artifact":
                    name, path, files = args
                    db.execute("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?)",
                               (run_id, name, str(path), json.dumps(files), time.time()))
                elif kind == "layers":
                    self._write_layers(db, run_id, args[0])
                elif kind == "results":
                    prune, layers, summary, examples = args
                    self._write_layers(db, run_id, layers)
                    db.execute("DELETE FROM examples WHERE run_id = ?", (run_id,))
                    db.executemany("INSERT INTO examples VALUES (?, ?, ?, ?)",
                                   [(run_id, e["id"], e.get("kind", ""), json.dumps(e)) for e in examples])
                    db.execute("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)",
                               (run_id, json.dumps(summary), json.dumps(prune), time.time()))
                else:
                    raise ValueError(f"unknown write {kind!r} for run {run_id} (job {job_id})")

    @staticmethod
    def _write_layers(db: sqlite3.Connection, run_id: str, layers: list[dict]) -> None:
        db.execute("DELETE FROM layers WHERE run_id = ?", (run_id,))
        db.executemany("INSERT INTO layers (run_id, name, layer, module, sparsity, rel_error, seconds, rows, cols, "
                       "tokens, target) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       [(run_id, r["name"], r["layer"], r["module"], r["sparsity"], r["rel_error"], r["seconds"],
                         r["shape"][0], r["shape"][1], r["tokens"], r.get("target")) for r in layers])

    def save_artifact(self, run_id: str, name: str, path: Path, files: dict[str, dict]) -> None:
        self.record(run_id, None, [("artifact", name, str(path), files)])

    def artifact(self, run_id: str, name: str) -> dict | None:
        row = self.db.execute("SELECT * FROM artifacts WHERE run_id = ? AND name = ?", (run_id, name)).fetchone()
        return {"path": location(row["path"]), "files": json.loads(row["files"])} if row else None

    def dense_result(self, key: str) -> dict | None:
        row = self.db.execute("SELECT result FROM dense_results WHERE dense_key = ?", (key,)).fetchone()
        return json.loads(row["result"]) if row else None

    def save_dense_result(self, key: str, model: str, result: dict) -> None:
        self.record(None, None, [("dense", key, model, result)])

    # reading

    def find(self, prefix: str) -> str:
        """The run id that starts with this prefix; an error names the prefix when none or several match."""
        rows = self.db.execute("SELECT run_id FROM runs WHERE run_id LIKE ? || '%' LIMIT 2", (prefix,)).fetchall()
        if not prefix or not rows:
            raise StoreError(f"run {prefix!r} is not in the store {self.root} (see `python -m backend list`)")
        if len(rows) > 1:
            raise StoreError(f"run {prefix!r} is ambiguous: give more characters of the run id")
        return rows[0]["run_id"]

    def spec(self, run_id: str) -> RunSpec:
        row = self.db.execute("SELECT spec FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise StoreError(f"run {run_id!r} is not in the store {self.root}")
        return RunSpec.from_dict(json.loads(row["spec"]))

    def fingerprints(self, run_id: str) -> dict:
        row = self.db.execute("SELECT fingerprints FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return json.loads(row["fingerprints"])

    def latest_job(self, run_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM jobs WHERE run_id = ? ORDER BY job_id DESC LIMIT 1", (run_id,)).fetchone()
        return dict(row) if row else None

    def job(self, job_id: int) -> dict | None:
        row = self.db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return dict(row) if row else None

    def metrics(self, run_id: str) -> dict | None:
        row = self.db.execute("SELECT summary, prune FROM metrics WHERE run_id = ?", (run_id,)).fetchone()
        return {"summary": json.loads(row["summary"]), "prune": json.loads(row["prune"])} if row else None

    def evaluated(self, key: str, other_than: str | None = None) -> str | None:
        """A run whose evaluation had this key (backend/runs/jobs.py evaluation_key), if one is stored."""
        row = self.db.execute("SELECT run_id FROM metrics WHERE json_extract(summary, '$.evaluation_key') = ? AND "
                              "run_id != ? LIMIT 1", (key, other_than or "")).fetchone()
        return row["run_id"] if row else None

    def layers(self, run_id: str) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM layers WHERE run_id = ? ORDER BY layer, rowid",
                                                 (run_id,))]

    def examples(self, run_id: str, kind: str | None = None) -> list[dict]:
        query = "SELECT record FROM examples WHERE run_id = ?" + (" AND kind = ?" if kind else "") + " ORDER BY rowid"
        return [json.loads(r["record"]) for r in self.db.execute(query, (run_id, kind) if kind else (run_id,))]

    def runs(self) -> list[dict]:
        """One flat row per run, newest first: the spec, the latest job's state and progress, and key metrics."""
        rows = self.db.execute("""
            SELECT r.run_id, r.spec, r.fingerprints, r.created_at, m.summary, m.prune,
                   j.state, j.stage, j.done, j.total, j.message, j.worker_pid, j.heartbeat, j.started_at,
                   j.finished_at, j.kind, j.stage_started_at, j.overall, j.remaining_s
            FROM runs r
            LEFT JOIN metrics m ON m.run_id = r.run_id
            LEFT JOIN jobs j ON j.job_id = (SELECT MAX(job_id) FROM jobs WHERE run_id = r.run_id)
            ORDER BY r.created_at DESC""").fetchall()
        current = code_version()
        return [run_record(r, current) for r in rows]

    def integrity(self) -> str:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0]


def run_record(row: sqlite3.Row, current_code: str) -> dict:
    """A run as one dict of plain values, the shape charts and tables take; `other_code` marks a run made by
    another version of PruneScope (or with its provenance unknown), which a new submission computes again."""
    spec = json.loads(row["spec"])
    prints = json.loads(row["fingerprints"])
    origin = prints.get("provenance") or {}
    summary = json.loads(row["summary"]) if row["summary"] else {}
    prune = json.loads(row["prune"]) if row["prune"] else {}
    state = row["state"] or ("done" if summary else "new")
    if summary and state in ("failed", "interrupted", "cancelled") and row["kind"] == "rebuild":
        state = "done"
    out = {"run_id": row["run_id"], **{k: spec[k] for k in ("model", "method", "sparsity", "pattern", "calibration",
                                                            "nsamples", "seqlen", "seed")},
           **{k: spec.get(k) for k in RECIPE_FIELDS},
           "allocation": Targets.from_dict(spec.get("targets") or {}).describe(),
           "state": state, "stage": row["stage"], "done": row["done"], "total": row["total"],
           "message": row["message"], "worker_pid": row["worker_pid"],
           "heartbeat": row["heartbeat"], "created_at": row["created_at"], "started_at": row["started_at"],
           "stage_started_at": row["stage_started_at"], "finished_at": row["finished_at"],
           "overall": row["overall"], "remaining_s": row["remaining_s"],
           "overall_sparsity": prune.get("overall_sparsity"),
           "jsd": summary.get("jsd"), "kl_dense_pruned": summary.get("kl_dense_pruned"),
           "kl_pruned_dense": summary.get("kl_pruned_dense"), "flip_rate": summary.get("flip_rate"),
           "answer_jsd": summary.get("answer_jsd"), "provenance": origin, "code": origin.get("code"),
           "other_code": origin.get("code") != current_code, "intervals": summary.get("intervals") or {}}
    out["protocol"] = protocol_of(spec, summary, prints) if summary else {}
    out["protocol_key"] = protocol_key(out["protocol"])
    for side in ("dense", "pruned"):
        metrics = summary.get(side, {})
        for key in ("ppl", "em", "f1", "rouge1"):
            out[f"{side}_{key}"] = metrics.get(key)
        out[f"{side}_judge"] = (metrics.get("judge") or {}).get("overall")
        for key, value in (metrics.get("lm_eval") or {}).items():
            out[f"{side}_{key}"] = value
            out[f"{side}_{key}_stderr"] = (metrics.get("lm_eval_stderr") or {}).get(key)
    out["lm_eval"] = sorted((summary.get("dense") or {}).get("lm_eval") or {})
    return out
