"""Two runs measured on the same units (one protocol), compared directly: the difference of a pruned metric with a
paired bootstrap interval over the units both were scored on (C4 vs Alpaca calibration of one method, say)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backend.findings.evidence import Evidence, with_units
from backend.runs.protocol import LM_PREFIX
from backend.runs.store import Store
from backend.runs.uncertainty import DIVERGENCES, SETTINGS, TASK_SCORES, UNIT_OF
from metrics.intervals import Bootstrap, paired_difference

COMPARABLE = ("ppl", *DIVERGENCES, *TASK_SCORES)


@dataclass(frozen=True)
class Difference:
    """b - a of one metric, its paired interval and the units it was paired over."""

    metric: str
    a: str
    b: str
    point: float
    interval: list[float] | None
    units: int
    unit: str

    def excludes_zero(self) -> int:
        """+1 when the interval lies above 0, -1 when below, 0 when it holds 0 (or there is none)."""
        if not self.interval:
            return 0
        return 1 if self.interval[0] > 0 else -1 if self.interval[1] < 0 else 0

    def reading(self) -> str:
        """The difference in words: 'B higher', 'B lower', 'equal on every unit', 'within noise' or 'no interval'."""
        if not self.interval:
            return "no interval"
        if self.interval == [0.0, 0.0]:
            return "equal on every unit"
        return {1: "B higher", -1: "B lower", 0: "within noise"}[self.excludes_zero()]


def _path(metric: str) -> tuple[str, ...]:
    if metric == "ppl":
        return "ppl", "pruned"
    if metric in DIVERGENCES:
        return "divergence", metric
    if metric in TASK_SCORES:
        return "tasks", "pruned", metric
    if metric.startswith(LM_PREFIX):
        return "lm_eval", "pruned", metric
    raise ValueError(f"metric {metric!r} cannot be compared between runs: use one of {', '.join(COMPARABLE)} or an "
                     f"lm-eval score ({LM_PREFIX}task:metric)")


def _values(evidence: Evidence, path: tuple[str, ...]) -> list:
    values = evidence.units
    for key in path:
        values = (values or {}).get(key)
    if values is None:
        raise ValueError(f"run {evidence.run_id} has no per-unit values of {'/'.join(path[1:])}")
    return list(values)


def difference(a: Evidence, b: Evidence, metric: str, settings: Bootstrap = SETTINGS) -> Difference:
    """The pruned `metric` of run b minus that of run a (perplexity: over windows; divergences: samples; task scores:
    examples), paired over the units both scored; the runs must share a protocol, so their units are the same."""
    path = _path(metric)
    if a.row.get("protocol_key") != b.row.get("protocol_key"):
        raise ValueError(f"runs {a.run_id} and {b.run_id} were measured with different protocols: their "
                         f"{UNIT_OF[path[0]]} are not the same units, so they cannot be paired")
    x, y = _values(a, path), _values(b, path)
    if len(x) != len(y):
        raise ValueError(f"runs {a.run_id} and {b.run_id} hold {len(x)} and {len(y)} {UNIT_OF[path[0]]}")
    kept = [(float(u), float(v)) for u, v in zip(x, y) if u is not None and v is not None]
    first, second = [u for u, _ in kept], [v for _, v in kept]
    kind = "exp_mean" if metric == "ppl" else "mean"
    statistic = (lambda v: float(np.exp(np.mean(v)))) if kind == "exp_mean" else (lambda v: float(np.mean(v)))
    point = statistic(second) - statistic(first) if kept else float("nan")
    return Difference(metric, a.run_id, b.run_id, point, paired_difference(first, second, kind, settings), len(kept),
                      UNIT_OF[path[0]])


def differences(a: Evidence, b: Evidence, settings: Bootstrap = SETTINGS) -> list[Difference]:
    """b - a of every pruned metric both runs measured, each with its paired interval."""
    found = []
    for metric in (*COMPARABLE, *((a.units.get("lm_eval") or {}).get("pruned") or {})):
        path = _path(metric)
        try:
            _values(a, path), _values(b, path)
        except ValueError:
            continue
        found.append(difference(a, b, metric, settings))
    return found


def compare_runs(store: Store, a: str, b: str, settings: Bootstrap = SETTINGS) -> tuple[Evidence, Evidence,
                                                                                       list[Difference]]:
    """Two stored runs (ids) and b - a of every pruned metric both measured; ValueError when either has no per-unit
    values or they were measured with different protocols (they share no units to pair)."""
    rows = {r["run_id"]: r for r in store.runs() if r["run_id"] in (a, b)}
    found, left_out = with_units(store, [rows[a], rows[b]])
    if left_out:
        raise ValueError(f"run {left_out[0][0]} {left_out[0][1]}")
    first, second = found
    if first.row["protocol_key"] != second.row["protocol_key"]:
        raise ValueError(f"runs {a[:8]} and {b[:8]} were measured with different protocols "
                         f"({first.row['protocol_key']} and {second.row['protocol_key']}): they share no units to pair")
    return first, second, differences(first, second, settings)
