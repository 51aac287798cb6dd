"""Which metric predicts the task loss: the rank correlation, across runs, of each candidate metric with the drop of a
task score, each with a bootstrap interval that resamples the units every run was measured on (perplexity windows,
divergence samples, task examples, each set on its own) and recomputes every run's metrics from them; and whether
the best predictor is distinguishable from the next (the interval of their difference, from the same resamples)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from backend.findings.evidence import Evidence
from backend.runs.protocol import LM_PREFIX
from backend.runs.uncertainty import DIVERGENCES, SETTINGS
from metrics.intervals import Bootstrap, over_units
from metrics.ranks import CORRELATIONS

PREDICTORS = ("ppl_ratio", *DIVERGENCES)
NAMES = {"ppl_ratio": "perplexity ratio", "jsd": "JS divergence", "kl_dense_pruned": "KL(dense‖pruned)",
         "kl_pruned_dense": "KL(pruned‖dense)", "flip_rate": "top-1 flip rate"}
MIN_RUNS = 3
DECIMALS = 12
COLUMNS = ["metric", *(f"{c}{s}" for c in CORRELATIONS for s in ("", "_low", "_high", "_p")), "n", "note"]
Interval = tuple[float, float, float]  # point, low, high


@dataclass
class Ranking:
    """The correlations table (COLUMNS), the runs it used, the best predictor and its runner-up, and the bootstrap
    intervals of Spearman differences asked for ('a - b' -> point, low, high)."""

    table: pd.DataFrame
    task: str
    runs: list[str]
    best: str | None = None
    runner_up: str | None = None
    differences: dict[str, Interval] = field(default_factory=dict)
    note: str = ""

    def difference(self, a: str, b: str) -> Interval | None:
        return self.differences.get(f"{a} - {b}")

    def sentence(self) -> str:
        """Which metric predicts best, and whether the next is within noise of it."""
        if self.best is None:
            return self.note or "no metric can be correlated with these runs"
        row = self.table.set_index("metric")
        best = row.loc[self.best]
        said = (f"{NAMES[self.best]} predicts the {self.task} drop best: Spearman ρ {best.spearman:.2f} "
                f"[{best.spearman_low:.2f}, {best.spearman_high:.2f}] over {len(self.runs)} runs")
        gap = self.difference(self.best, self.runner_up) if self.runner_up else None
        if gap is None:
            return said + "."
        verdict = ("distinguishable from" if gap[1] > 0 else "not distinguishable, within noise, from")
        runner_up = row.loc[self.runner_up].spearman
        return (f"{said}; it is {verdict} the next, {NAMES[self.runner_up]} (ρ {runner_up:.2f}): "
                f"their difference {gap[0]:.2f} has the interval [{gap[1]:.2f}, {gap[2]:.2f}]"
                + (", above 0." if gap[1] > 0 else ", which holds 0."))


def _matrix(evidence: Sequence[Evidence], part: str, *path: str) -> np.ndarray | None:
    """The runs' per-unit values of one metric as a [runs, units] array (NaN where a unit was not scored); None when
    a run lacks the part. Runs of one cohort share their units, so their counts must agree."""
    rows = []
    for e in evidence:
        values = e.units.get(part)
        for key in path:
            values = None if values is None else values.get(key)
        if values is None:
            return None
        rows.append([np.nan if v is None else float(v) for v in values])
    if len({len(r) for r in rows}) > 1:
        raise ValueError(f"the runs were measured on different numbers of {part} units "
                         f"({sorted({len(r) for r in rows})}): compare runs of one protocol only")
    return np.asarray(rows, dtype=float)


def _mean(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.nanmean(values[:, index], axis=-1)


def ranking(evidence: Sequence[Evidence], task: str = "f1", compare: Sequence[tuple[str, str]] = (),
            settings: Bootstrap = SETTINGS) -> Ranking:
    """Spearman and Kendall correlations of each predictor with the drop in `task` (dense - pruned) across the runs,
    with intervals; plus the interval of the Spearman difference best - runner-up and of each pair in `compare`."""
    evidence = list(evidence)
    runs = [e.run_id for e in evidence]
    part = "lm_eval" if task.startswith(LM_PREFIX) else "tasks"  # an lm-eval score's units are its documents
    dense, pruned = _matrix(evidence, part, "dense", task), _matrix(evidence, part, "pruned", task)
    empty = pd.DataFrame([{"metric": m, "n": len(evidence)} for m in PREDICTORS], columns=COLUMNS)
    if dense is None or pruned is None:
        return Ranking(empty.assign(note=f"{task} not measured"), task, runs, note=f"{task} was not measured")
    if len(evidence) < MIN_RUNS:
        note = f"a rank correlation needs at least {MIN_RUNS} runs; {len(evidence)} given"
        return Ranking(empty.assign(note=note), task, runs, note=note)
    sets: dict[str, int] = {"examples": dense.shape[1]}
    windows = (_matrix(evidence, "ppl", "dense"), _matrix(evidence, "ppl", "pruned"))
    if windows[0] is not None:
        sets["windows"] = windows[0].shape[1]
    samples = {k: _matrix(evidence, "divergence", k) for k in DIVERGENCES}
    if samples["jsd"] is not None:
        sets["samples"] = samples["jsd"].shape[1]
    order = list(sets)
    available = [m for m in PREDICTORS if (m == "ppl_ratio" and "windows" in sets) or samples.get(m) is not None]

    def values(indices: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"drop": _mean(dense, indices["examples"]) - _mean(pruned, indices["examples"])}
        if "windows" in indices:
            out["ppl_ratio"] = np.exp(_mean(windows[1], indices["windows"]) - _mean(windows[0], indices["windows"]))
        for key in DIVERGENCES:
            if key in available:
                out[key] = _mean(samples[key], indices["samples"])
        return out

    def correlations(indices: dict[str, np.ndarray], pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        measured = values(indices)
        found = {}
        for name, correlate in CORRELATIONS.items():
            for metric in available:
                x, y = np.broadcast_arrays(measured[metric], measured["drop"])
                found[name, metric] = correlate(x, y, axis=0)
        extra = [found["spearman", a] - found["spearman", b] for a, b in pairs]
        # rank correlations take few distinct values: rounding off float noise keeps a resample equal to the point
        # estimate equal to it, as BCa's bias correction counts them
        return np.round(np.stack([*found.values(), *extra]), DECIMALS)

    full = {name: np.arange(size) for name, size in sets.items()}
    point = correlations(full, ())
    spearman_point = dict(zip(available, point[:len(available)]))
    ranked = sorted((m for m in available if math.isfinite(spearman_point[m])), key=lambda m: -spearman_point[m])
    best, runner_up = (ranked + [None, None])[:2]
    pairs = ([(best, runner_up)] if runner_up else []) + [p for p in compare if p[0] in available and p[1] in available
                                                          and p != (best, runner_up)]
    statistic = lambda *idx, axis=-1: correlations(dict(zip(order, idx)), pairs)  # noqa: E731
    estimate, low, high = over_units(statistic, [sets[name] for name in order], settings)
    measured = values(full)
    table = []
    for metric in PREDICTORS:
        row = {"metric": metric, "n": len(evidence), "note": ""}
        if metric not in available:
            row["note"] = "not measured in this protocol"
        elif not all(np.ptp(v) > 0 for v in (measured[metric], measured["drop"])):
            row["note"] = f"constant {metric if np.ptp(measured[metric]) == 0 else task + ' drop'} across runs"
        else:
            for j, (name, test) in enumerate((("spearman", stats.spearmanr), ("kendall", stats.kendalltau))):
                k = j * len(available) + available.index(metric)
                row.update({name: estimate[k], f"{name}_low": low[k], f"{name}_high": high[k],
                            f"{name}_p": float(test(measured[metric], measured["drop"]).pvalue)})
        table.append(row)
    base = 2 * len(available)
    differences = {f"{a} - {b}": (float(estimate[base + i]), float(low[base + i]), float(high[base + i]))
                   for i, (a, b) in enumerate(pairs)}
    return Ranking(pd.DataFrame(table, columns=COLUMNS), task, runs, best, runner_up, differences)
