"""How a run's record reads to a person in tables: short strings made from its plain values."""

from __future__ import annotations

import os
import time

from backend.runs.protocol import protocol_label
from backend.runs.store import ACTIVE

MISSING = "–"


def progress_text(run: dict) -> str:
    """'pruning 12/30' while running, else the state."""
    if run.get("state") == "running" and run.get("stage"):
        return f"{run['stage']} {run.get('done')}/{run['total']}" if run.get("total") else run["stage"]
    return run.get("state") or ""


def when(stamp: float | None) -> str:
    """A time stamp as local 'YYYY-MM-DD HH:MM:SS', or a dash when there is none."""
    return MISSING if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def runs_table(rows: list[dict]) -> list[dict]:
    """One line per run for the Runs page's table: state, progress while active (fraction of the whole run and the
    stage), settings, protocol, times and the message of a run that did not finish."""
    return [{"run": r["run_id"], "state": r["state"],
             "progress": (r.get("overall") or 0.0) if r["state"] in ACTIVE else None,
             "stage": progress_text(r) if r["state"] in ACTIVE else "",
             "model": os.path.basename(str(r["model"]).rstrip("/")) or r["model"], "method": r["method"],
             "sparsity": r["sparsity"], "pattern": r["pattern"], "calibration": os.path.basename(r["calibration"]),
             "protocol": protocol_label(r.get("protocol") or {}), "created": when(r.get("created_at")),
             "finished": when(r.get("finished_at")),
             "message": "" if r["state"] in ("done", *ACTIVE) else r.get("message") or ""} for r in rows]
