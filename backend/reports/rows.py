"""How a run's record reads to a person in tables: short strings made from its plain values."""

from __future__ import annotations


def progress_text(run: dict) -> str:
    """'pruning 12/30' while running, else the state."""
    if run["state"] == "running" and run["stage"]:
        return f"{run['stage']} {run['done']}/{run['total']}" if run["total"] else run["stage"]
    return run["state"] or ""
