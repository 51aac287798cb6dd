"""Findings over a store: the cohort they use, the three claims' verdicts, and exactly the runs missing to decide
them, which `queue` submits with the cohort's own settings so they join it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from backend.findings.claims import CLOSE_PPL, Finding, claim_one, claim_three, claim_two
from backend.findings.evidence import Cohort, pick_cohort
from backend.findings.study import SETTINGS, Cell, base_spec, cells
from backend.runs.service import submit_many
from backend.runs.spec import RunSpec
from backend.runs.store import Store
from backend.runs.uncertainty import SETTINGS as BOOTSTRAP
from backend.sources.names import DEFAULT_MODEL


@dataclass
class Findings:
    """The verdicts on one cohort, the settings its missing runs get, and the other cohorts one could pick."""

    cohort: Cohort | None
    task: str
    close: float
    claims: list[Finding]
    base: RunSpec
    size: str
    others: list[str] = field(default_factory=list)

    @property
    def missing(self) -> list[Cell]:
        """Every cell a claim lacks, once, in the study's order."""
        wanted = set(c for f in self.claims for c in f.missing)
        return [c for c in cells(self.size) if c in wanted] + sorted(wanted - set(cells(self.size)))

    def missing_specs(self) -> list[RunSpec]:
        return [cell.of(self.base) for cell in self.missing]

    def to_dict(self) -> dict:
        return {"cohort": self.cohort.label() if self.cohort else None, "cohort_key": self.cohort.key if self.cohort
                else None, "task": self.task, "close_ppl_ratio": self.close, "bootstrap": BOOTSTRAP.to_dict(),
                "claims": [f.to_dict() for f in self.claims],
                "missing": [{**vars(c), "label": c.label()} for c in self.missing],
                "left_out": [{"run_id": r, "why": why} for r, why in (self.cohort.left_out if self.cohort else [])],
                "other_cohorts": self.others}


def size_of(spec: RunSpec) -> str:
    """'full' for a cohort calibrated like the full study, else 'quick' (which ladder its missing runs follow)."""
    full = SETTINGS["full"]
    return "full" if (spec.nsamples, spec.seqlen) == (full["nsamples"], full["seqlen"]) else "quick"


def build(store: Store, model: str | None = None, cohort: str | None = None, task: str = "f1",
          close: float = CLOSE_PPL, size: str | None = None) -> Findings:
    """The three claims on the chosen cohort (default: the largest among `model`'s finished runs). With no finished
    run, every claim is inconclusive and the missing runs are the whole study (`size`, default quick)."""
    chosen, others = pick_cohort(store, model, cohort)
    if chosen is None:
        size = size or "quick"
        base = base_spec(model or DEFAULT_MODEL, size).normalised()
        chosen_cohort = Cohort("", [])
    else:
        base = store.spec(chosen.first["run_id"])
        size = size or size_of(base)
        chosen_cohort = chosen
    claims = [claim_one(chosen_cohort, task, close), claim_two(chosen_cohort, task, cells(size)),
              claim_three(chosen_cohort, task)]
    return Findings(chosen, task, close, claims, replace(base, per_row=False), size, others)


def queue(store: Store, found: Findings, data_dir: str | None = None, device: str = "auto",
          start_worker: bool = True) -> list[dict]:
    """Submit exactly the missing runs (checked first, all or none); each answer as service.submit gives it."""
    return submit_many(store, found.missing_specs(), data_dir, device, start_worker)
