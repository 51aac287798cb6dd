"""The store's SQLite schema as versioned migrations, and the step that brings any older store up to date."""

from __future__ import annotations

import sqlite3


class StoreError(ValueError):
    """A store that cannot be used, or a run that is not in it; one line for the user."""


MIGRATIONS: list[str] = [
    # 1: runs, their jobs and results
    """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        fingerprints TEXT NOT NULL,
        model TEXT NOT NULL, method TEXT NOT NULL, sparsity REAL NOT NULL, pattern TEXT NOT NULL,
        calibration TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE jobs (
        job_id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        kind TEXT NOT NULL DEFAULT 'full',
        state TEXT NOT NULL,
        data_dir TEXT,
        stage TEXT, done INTEGER, total INTEGER, message TEXT,
        worker_pid INTEGER, heartbeat REAL,
        created_at REAL NOT NULL, started_at REAL, finished_at REAL
    );
    CREATE UNIQUE INDEX one_active_job ON jobs(run_id) WHERE state IN ('queued', 'running');
    CREATE INDEX jobs_by_state ON jobs(state, job_id);
    CREATE TABLE layers (
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        name TEXT NOT NULL, layer INTEGER NOT NULL, module TEXT NOT NULL,
        sparsity REAL, rel_error REAL, seconds REAL, rows INTEGER, cols INTEGER, tokens INTEGER,
        PRIMARY KEY (run_id, name)
    );
    CREATE TABLE metrics (
        run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
        summary TEXT NOT NULL,
        prune TEXT NOT NULL,
        finished_at REAL NOT NULL
    );
    CREATE TABLE examples (
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        example_id TEXT NOT NULL, kind TEXT NOT NULL, record TEXT NOT NULL,
        PRIMARY KEY (run_id, example_id)
    );
    CREATE TABLE artifacts (
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        name TEXT NOT NULL, path TEXT NOT NULL, files TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (run_id, name)
    );
    """,
    # 2: the dense side of an evaluation, computed once per model and setting; cancellation requests
    """
    CREATE TABLE dense_results (
        dense_key TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        result TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
    """,
    # 3: when the current stage began, for the dashboard's time estimate
    """
    ALTER TABLE jobs ADD COLUMN stage_started_at REAL;
    """,
    # 4: the whole job's progress (a fraction of its estimated cost), its estimated seconds left at the last
    # report, and each finished stage's measured seconds and units, which estimate the next jobs' stages
    """
    ALTER TABLE jobs ADD COLUMN overall REAL;
    ALTER TABLE jobs ADD COLUMN remaining_s REAL;
    ALTER TABLE jobs ADD COLUMN timings TEXT;
    """,
    # 5: each matrix's target sparsity (uniform, OWL's allocation or explicit), beside the sparsity it reached
    """
    ALTER TABLE layers ADD COLUMN target REAL;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Bring a store up to `target`, one versioned step per transaction; returns the version reached."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(f"the store's schema version {version} is newer than this PruneScope's "
                         f"({SCHEMA_VERSION}): upgrade PruneScope")
    while version < target:
        db.execute("BEGIN IMMEDIATE")
        try:
            current = db.execute("PRAGMA user_version").fetchone()[0]
            if current == version:
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {version + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        version = db.execute("PRAGMA user_version").fetchone()[0]
    return version
