"""The runs a finding may use: finished runs grouped into cohorts (one model, one calibration recipe, one evaluation
protocol), one run per study cell, each with the per-unit values behind its intervals."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from backend.findings.study import Cell
from backend.runs.protocol import protocol_label
from backend.runs.store import RECIPE_FIELDS, Store

COHORT_FIELDS = ("model", "nsamples", "seqlen", "seed", *RECIPE_FIELDS, "allocation", "protocol_key")


@dataclass(frozen=True)
class Evidence:
    """One finished run: its flat row (settings, metrics, intervals) and the per-unit values behind them."""

    row: Mapping
    units: Mapping

    @property
    def run_id(self) -> str:
        return self.row["run_id"]

    @property
    def cell(self) -> Cell:
        return cell_of(self.row)


@dataclass
class Cohort:
    """The runs of one model, calibration recipe and protocol that findings compare, one per cell (the run of the
    current code first, then the newest), and those it left out with the reason."""

    key: str
    rows: list[Mapping]
    evidence: dict[Cell, Evidence] = field(default_factory=dict)
    left_out: list[tuple[str, str]] = field(default_factory=list)

    @property
    def first(self) -> Mapping:
        return self.rows[0]

    def label(self) -> str:
        return cohort_label(self.first)

    def runs(self) -> list[Evidence]:
        return list(self.evidence.values())


def cohort_label(row: Mapping) -> str:
    """What a cohort shares, as a person reads it: model, calibration recipe and protocol."""
    model = os.path.basename(str(row["model"]).rstrip("/")) or row["model"]
    return (f"{model} · calibration {row['nsamples']} x {row['seqlen']}, seed {row['seed']} · "
            f"{protocol_label(row.get('protocol') or {})}")


def cell_of(row: Mapping) -> Cell:
    return Cell(row["method"], round(float(row["sparsity"]), 6), row["pattern"], row["calibration"])


def cohort_key(row: Mapping) -> str:
    """A short stable id of what runs must share to be compared in a study (model, calibration recipe, protocol)."""
    shared = json.dumps({f: row.get(f) for f in COHORT_FIELDS}, sort_keys=True, default=str)
    return hashlib.sha256(shared.encode()).hexdigest()[:10]


def cohorts(rows: Iterable[Mapping]) -> list[tuple[str, list[Mapping]]]:
    """Finished runs grouped by cohort, the largest first (ties: the group of the newest run first)."""
    done = [r for r in rows if r.get("state") == "done"]
    count = Counter(cohort_key(r) for r in done)
    first: dict[str, int] = {}
    for i, r in enumerate(done):
        first.setdefault(cohort_key(r), i)
    return [(k, [r for r in done if cohort_key(r) == k]) for k in sorted(count, key=lambda k: (-count[k], first[k]))]


NO_UNITS = "measured before PruneScope kept per-example values, so it has no intervals: run it again"


def units_of_run(store: Store, run_id: str) -> Mapping | None:
    """The per-unit values a finished run's summary keeps; None for a run measured before they were kept."""
    return ((store.metrics(run_id) or {}).get("summary") or {}).get("units") or None


def with_units(store: Store, rows: Iterable[Mapping]) -> tuple[list[Evidence], list[tuple[str, str]]]:
    """The rows that hold per-unit values as Evidence, and the others with the reason they were left out."""
    kept, left_out = [], []
    for row in rows:
        units = units_of_run(store, row["run_id"])
        if units:
            kept.append(Evidence(row, units))
        else:
            left_out.append((row["run_id"], NO_UNITS))
    return kept, left_out


def load_cohort(store: Store, key: str, rows: list[Mapping]) -> Cohort:
    """A cohort's runs with their per-unit values, one per cell: a run without per-unit values (measured before
    PruneScope kept them) or a second run of a cell (the run of the current code is kept, then the newest) is left
    out, with the reason."""
    cohort = Cohort(key, rows)
    ordered = sorted(rows, key=lambda r: (bool(r.get("other_code")),
                                          -(r.get("finished_at") or r.get("created_at") or 0)))
    found, cohort.left_out = with_units(store, ordered)
    for evidence in found:
        kept = cohort.evidence.setdefault(evidence.cell, evidence)
        if kept is not evidence:
            cohort.left_out.append((evidence.run_id, f"a second run of {evidence.cell.label()}: {kept.run_id[:8]} "
                                                     f"is used"))
    return cohort


def pick_cohort(store: Store, model: str | None = None, key: str | None = None) -> tuple[Cohort | None, list[str]]:
    """The cohort findings use (the given key, else the largest among `model`'s runs) and the keys of the others."""
    rows = [r for r in store.runs() if model is None or r["model"] == model or
            os.path.basename(str(r["model"]).rstrip("/")) == model]
    found = cohorts(rows)
    keys = [k for k, _ in found]
    if key is not None and key not in keys:
        raise ValueError(f"cohort {key!r} is not among this store's finished runs"
                         + (f" of model {model!r}" if model else "") + ": use "
                         + (f"one of {', '.join(keys)}" if keys else "no --cohort until a run has finished"))
    if not found:
        return None, []
    chosen = key or keys[0]
    return load_cohort(store, chosen, dict(found)[chosen]), [k for k in keys if k != chosen]
