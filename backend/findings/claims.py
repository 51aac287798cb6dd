"""The three claims of arXiv 2409.11233 tested on one cohort of runs: each a verdict (held, not held, inconclusive)
by a rule written in one sentence, the numbers and intervals behind it, the runs it used and the runs it lacks."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

from backend.findings.between import difference
from backend.findings.evidence import Cohort, Evidence
from backend.findings.predictors import NAMES, Ranking, ranking
from backend.findings.study import (
    CALIBRATED,
    CLAIM_SPARSITY,
    GENERAL,
    PATTERN,
    TASK_SPECIFIC,
    Cell,
)
from backend.runs.protocol import LM_PREFIX

HELD, NOT_HELD, INCONCLUSIVE = "held", "not held", "inconclusive"
VERDICTS = (HELD, NOT_HELD, INCONCLUSIVE)
CLOSE_PPL = 1.5  # "perplexity close to dense": a pruned / dense ratio below this
MIN_PREDICTOR_RUNS = 6
STATEMENTS = {
    1: "At 50% sparsity SparseGPT and Wanda keep perplexity close to dense while downstream task scores drop "
       "significantly (magnitude pruning keeps task scores better than its perplexity suggests).",
    2: "Jensen-Shannon divergence captures the impact of compression on task performance better than perplexity.",
    3: "Task-specific calibration data (Alpaca) gives better downstream performance than general data (C4).",
}
RULES = {
    1: "Holds when, for both SparseGPT and Wanda at 50% unstructured with C4 calibration, the interval of the "
       "pruned / dense perplexity ratio lies below {close:g} and the paired interval of the {task} change (pruned - "
       "dense) lies below 0, and fails when for either the ratio's interval lies above {close:g} or the change's "
       "above 0 (magnitude's parenthesis is tested alongside, not counted).",
    2: "Holds when, across at least {min_runs} runs of one cohort, the bootstrap interval of Spearman "
       "rho(JS divergence, {task} drop) - rho(perplexity ratio, {task} drop) lies above 0, and fails when it lies "
       "below 0.",
    3: "Holds when, for both SparseGPT and Wanda at 50% unstructured, the paired interval (same examples) of the "
       "pruned {task} with Alpaca minus with C4 calibration lies above 0, and fails when it lies below 0 for either.",
}


@dataclass
class Number:
    """One figure behind a verdict: what it is, its value and interval, and the run(s) it comes from."""

    label: str
    value: float | None
    interval: list[float] | None
    runs: list[str] = field(default_factory=list)


@dataclass
class Part:
    """One tested statement of a claim (one method, say) with its own verdict and why."""

    name: str
    verdict: str
    why: str
    numbers: list[Number] = field(default_factory=list)
    counted: bool = True


@dataclass
class Finding:
    """One claim: the paper's words, the rule, the verdict, its parts, the runs used, and what is missing to decide
    (cells to run, and in words)."""

    claim: int
    statement: str
    rule: str
    verdict: str
    parts: list[Part]
    runs: list[str]
    missing: list[Cell]
    needs: list[str]
    ranking: Ranking | None = None

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("ranking", "missing")}
        out["missing"] = [asdict(cell) for cell in self.missing]
        if self.ranking is not None:
            out["predictors"] = {"table": self.ranking.table.to_dict("records"), "sentence": self.ranking.sentence(),
                                 "best": self.ranking.best, "runner_up": self.ranking.runner_up,
                                 "differences": {k: list(v) for k, v in self.ranking.differences.items()}}
        return out


def combine(parts: Sequence[Part]) -> str:
    """Not held when a counted part is not held, held when every counted part holds, else inconclusive."""
    counted = [p.verdict for p in parts if p.counted]
    if NOT_HELD in counted:
        return NOT_HELD
    return HELD if counted and all(v == HELD for v in counted) else INCONCLUSIVE


def interval_of(evidence: Evidence, interval_key: str) -> list[float] | None:
    """A run's stored interval of a metric ('ratio.ppl', 'delta.f1', ...); None when it has none."""
    return (evidence.row.get("intervals") or {}).get(interval_key)


def point(evidence: Evidence, metric: str) -> float | None:
    """A run's point value: 'ppl_ratio', 'T_change' (pruned - dense) or a row column."""
    row = evidence.row
    if metric == "ppl_ratio":
        return row["pruned_ppl"] / row["dense_ppl"] if row.get("pruned_ppl") and row.get("dense_ppl") else None
    if metric.endswith("_change"):
        task = metric.removesuffix("_change")
        d, p = row.get(f"dense_{task}"), row.get(f"pruned_{task}")
        return None if d is None or p is None else p - d
    return row.get(metric)


def _straddles(label: str, bounds: list[float], threshold: float) -> str:
    return f"the interval of {label} [{bounds[0]:.3g}, {bounds[1]:.3g}] holds {threshold:g}"


def claim_one(cohort: Cohort, task: str, close: float = CLOSE_PPL) -> Finding:
    """Perplexity stays close while the task score drops, for SparseGPT and Wanda at 50%; magnitude alongside."""
    parts, missing, needs = [], [], []
    used: dict[str, Evidence] = {}
    for method in CALIBRATED:
        cell = Cell(method, CLAIM_SPARSITY, PATTERN, GENERAL)
        run = cohort.evidence.get(cell)
        if run is None:
            missing.append(cell)
            parts.append(Part(method, INCONCLUSIVE, f"no run of {cell.label()}"))
            continue
        used[method] = run
        ratio, change = interval_of(run, "ratio.ppl"), interval_of(run, f"delta.{task}")
        numbers = [Number("perplexity ratio (pruned / dense)", point(run, "ppl_ratio"), ratio, [run.run_id]),
                   Number(f"{task} change (pruned - dense)", point(run, f"{task}_change"), change, [run.run_id])]
        if ratio is None or change is None:
            parts.append(Part(method, INCONCLUSIVE, f"its protocol lacks perplexity or {task}", numbers))
            needs.append(f"perplexity and {task} on the {method} run")
            continue
        if ratio[1] < close and change[1] < 0:
            verdict, why = HELD, f"perplexity stays within {close:g}x of dense while {task} drops"
        elif ratio[0] > close:
            verdict, why = NOT_HELD, f"perplexity rises beyond {close:g}x of dense (interval above {close:g})"
        elif change[0] > 0:
            verdict, why = NOT_HELD, f"{task} rises (interval above 0)"
        else:
            verdict = INCONCLUSIVE
            why = "; ".join(text for text, bounds, at in (
                (_straddles("the perplexity ratio", ratio, close), ratio, close),
                (_straddles(f"the {task} change", change, 0), change, 0)) if bounds[0] <= at <= bounds[1])
            needs.append(f"{method}: {why}; more windows or examples would narrow it")
        parts.append(Part(method, verdict, why, numbers))
    parts.append(_magnitude_remark(cohort, task, used, missing))
    return Finding(1, STATEMENTS[1], RULES[1].format(close=close, task=task), combine(parts), parts,
                   _runs(parts), missing, needs)


def _magnitude_remark(cohort: Cohort, task: str, others: dict[str, Evidence], missing: list[Cell]) -> Part:
    """Magnitude keeps task scores better than its perplexity suggests: its perplexity ratio is clearly above each
    calibrated method's while its task score is not clearly below theirs (paired over the same examples)."""
    cell = Cell("magnitude", CLAIM_SPARSITY, PATTERN, GENERAL)
    run = cohort.evidence.get(cell)
    if run is None:
        missing.append(cell)
        return Part("magnitude (parenthesis)", INCONCLUSIVE, f"no run of {cell.label()}", counted=False)
    if not others:
        return Part("magnitude (parenthesis)", INCONCLUSIVE, "no SparseGPT or Wanda run to compare it with",
                    counted=False)
    ratio = interval_of(run, "ratio.ppl")
    numbers = [Number("magnitude perplexity ratio", point(run, "ppl_ratio"), ratio, [run.run_id])]
    verdicts = []
    for method, other in others.items():
        gap = difference(other, run, task)
        numbers.append(Number(f"magnitude - {method} pruned {task}", gap.point, gap.interval,
                              [other.run_id, run.run_id]))
        other_ratio = interval_of(other, "ratio.ppl")
        higher = ratio is not None and other_ratio is not None and ratio[0] > other_ratio[1]
        verdicts.append(NOT_HELD if gap.excludes_zero() < 0 else HELD if higher else INCONCLUSIVE)
    if NOT_HELD in verdicts:
        verdict, why = NOT_HELD, f"its {task} is clearly below a calibrated method's"
    elif all(v == HELD for v in verdicts):
        verdict, why = HELD, f"its perplexity ratio is clearly higher while its {task} is not clearly lower"
    else:
        verdict, why = INCONCLUSIVE, "its perplexity ratio is not clearly above the others'"
    return Part("magnitude (parenthesis)", verdict, why, numbers, counted=False)


def claim_two(cohort: Cohort, task: str, wanted: Sequence[Cell], min_runs: int = MIN_PREDICTOR_RUNS) -> Finding:
    """JS divergence ranks the runs' task loss better than the perplexity ratio does."""
    scored = "lm_eval" if task.startswith(LM_PREFIX) else "tasks"
    runs = [e for e in cohort.runs() if all(part in e.units for part in ("ppl", "divergence", scored))]
    missing = [c for c in wanted if c not in cohort.evidence] if len(runs) < min_runs else []
    found = ranking(runs, task, compare=[("jsd", "ppl_ratio")])
    gap = found.difference("jsd", "ppl_ratio")
    table = found.table.set_index("metric")
    numbers = [Number(f"Spearman rho({NAMES[m]}, {task} drop)", _float(table.loc[m, "spearman"]),
                      _pair(table.loc[m, "spearman_low"], table.loc[m, "spearman_high"]), found.runs)
               for m in ("jsd", "ppl_ratio")]
    if gap is not None:
        numbers.append(Number("difference (JS - perplexity ratio)", _float(gap[0]), _pair(gap[1], gap[2]), found.runs))
    needs = []
    if len(runs) < min_runs:
        verdict, why = INCONCLUSIVE, f"{len(runs)} runs with perplexity, JS and {task}; at least {min_runs} needed"
        needs.append(f"{min_runs - len(runs)} more runs (the study's sparsity ladder)")
    elif gap is None or not all(math.isfinite(v) for v in gap):
        notes = sorted({n for n in found.table["note"] if n})
        verdict, why = INCONCLUSIVE, found.note or "; ".join(notes) or "the correlations are undefined on these runs"
    elif gap[1] > 0:
        verdict, why = HELD, "JS ranks the task loss better than perplexity, beyond noise"
    elif gap[2] < 0:
        verdict, why = NOT_HELD, "perplexity ranks the task loss better than JS, beyond noise"
    else:
        verdict, why = INCONCLUSIVE, f"the difference's interval [{gap[1]:.2f}, {gap[2]:.2f}] holds 0"
        needs.append("more runs across sparsities, or more examples, would narrow the difference")
    part = Part("JS vs perplexity", verdict, why, numbers)
    return Finding(2, STATEMENTS[2], RULES[2].format(min_runs=min_runs, task=task), verdict, [part], found.runs,
                   missing, needs, found)


def claim_three(cohort: Cohort, task: str) -> Finding:
    """Alpaca calibration beats C4 calibration on the task, per calibrated method, paired over the same examples."""
    parts, missing, needs = [], [], []
    for method in CALIBRATED:
        cells = [Cell(method, CLAIM_SPARSITY, PATTERN, c) for c in (GENERAL, TASK_SPECIFIC)]
        general, specific = (cohort.evidence.get(c) for c in cells)
        absent = [c for c in cells if c not in cohort.evidence]
        if absent:
            missing.extend(absent)
            parts.append(Part(method, INCONCLUSIVE, "no run of " + " or ".join(c.label() for c in absent)))
            continue
        gap = difference(general, specific, task)
        numbers = [Number(f"pruned {task}, C4 calibration", point(general, f"pruned_{task}"),
                          interval_of(general, f"pruned.{task}"), [general.run_id]),
                   Number(f"pruned {task}, Alpaca calibration", point(specific, f"pruned_{task}"),
                          interval_of(specific, f"pruned.{task}"), [specific.run_id]),
                   Number(f"Alpaca - C4 (paired over {gap.units} {gap.unit})", gap.point, gap.interval,
                          [general.run_id, specific.run_id])]
        sign = gap.excludes_zero()
        if sign > 0:
            verdict, why = HELD, f"Alpaca calibration scores higher {task}, beyond noise"
        elif sign < 0:
            verdict, why = NOT_HELD, f"C4 calibration scores higher {task}, beyond noise"
        else:
            verdict, why = INCONCLUSIVE, ("no interval" if not gap.interval else
                                          _straddles("Alpaca - C4", gap.interval, 0))
            needs.append(f"{method}: {why}; more examples would narrow it")
        parts.append(Part(method, verdict, why, numbers))
    return Finding(3, STATEMENTS[3], RULES[3].format(task=task), combine(parts), parts, _runs(parts), missing, needs)


def _runs(parts: Sequence[Part]) -> list[str]:
    return list(dict.fromkeys(r for p in parts for n in p.numbers for r in n.runs))


def _float(value) -> float | None:
    return None if value is None or value != value else float(value)


def _pair(low, high) -> list[float] | None:
    low, high = _float(low), _float(high)
    return None if low is None or high is None else [low, high]
