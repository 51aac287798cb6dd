"""A run's progress as a person trusts it: one bar and estimate for the whole run, then the current stage's i of N."""

from __future__ import annotations

import time

import streamlit as st


def remaining(row: dict, now: float | None = None) -> float | None:
    """Seconds left: the worker's estimate at its last report, less the time since then (None while unknown)."""
    if row.get("remaining_s") is None or row.get("heartbeat") is None:
        return None
    now = time.time() if now is None else now
    return max(row["remaining_s"] - max(now - row["heartbeat"], 0.0), 0.0)


def overall_text(row: dict, now: float | None = None) -> str:
    """'42% of the run · elapsed 31 s · about 44 s left', or 'queued' before a worker took it."""
    if row.get("state") == "queued" or not row.get("started_at"):
        return "queued: waiting for the worker"
    now = time.time() if now is None else now
    text = f"{(row.get('overall') or 0.0):.0%} of the run · elapsed {now - row['started_at']:.0f} s"
    left = remaining(row, now)
    return text + (f" · about {left:.0f} s left" if left is not None else " · estimating the time left")


# what a stage counts, by the start of its name
UNITS = {"pruning": "decoder layers", "saving": "models", "perplexity": "windows",
         "answers": "generated tokens", "judge": "answers", "divergence": "records"}


def stage_text(row: dict) -> str:
    """'pruning 12/30 decoder layers · layer 13 of 30 self_attn.q_proj'."""
    stage = row.get("stage") or "starting"
    total = row.get("total")
    unit = next((u for prefix, u in UNITS.items() if stage.startswith(prefix)), "")
    text = f"{stage}: {row.get('done') or 0}/{total} {unit}".rstrip() if total else stage
    return text + (f" · {row['message']}" if row.get("message") else "")


def show_progress(row: dict) -> None:
    """The run's overall bar with its estimate, and under it the current stage."""
    st.progress(min(max(row.get("overall") or 0.0, 0.0), 1.0), text=overall_text(row))
    total, done = row.get("total") or 0, row.get("done") or 0
    st.progress(min(done / total, 1.0) if total else 0.0, text=stage_text(row))
