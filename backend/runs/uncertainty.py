"""Every metric of an evaluation with its interval: the per-unit values a summary keeps (perplexity: each window's
mean NLL; divergences: each sample's mean; task scores: each example's score) and the seeded bootstrap intervals
drawn from them, one per metric and, paired over the same units, one per dense vs pruned difference."""

from __future__ import annotations

from typing import Mapping, Sequence

from metrics.intervals import Bootstrap, interval, paired_difference, paired_ratio

SIDES = ("dense", "pruned")
DIVERGENCES = ("jsd", "kl_dense_pruned", "kl_pruned_dense", "flip_rate")
TASK_SCORES = ("em", "f1", "rouge1", "judge")
SETTINGS = Bootstrap()
# a run row's column -> the interval key that bounds it (charts and tables draw it as an error bar)
ROW_INTERVALS: dict[str, str] = {
    "dense_ppl": "dense.ppl", "pruned_ppl": "pruned.ppl", "ppl_ratio": "ratio.ppl", "ppl_change": "delta.ppl",
    **{k: k for k in (*DIVERGENCES, "answer_jsd")},
    **{f"{side}_{t}": f"{side}.{t}" for side in SIDES for t in TASK_SCORES},
    **{f"{t}_change": f"delta.{t}" for t in TASK_SCORES},
}
UNIT_OF = {"ppl": "windows", "divergence": "samples", "tasks": "examples", "lm_eval": "documents"}


def units_of(dense_windows: Sequence[float] | None, pruned_windows: Sequence[float] | None,
             divergence_samples: Sequence[Mapping] | None, task_examples: Sequence[Mapping] | None,
             judged: Mapping[str, Sequence[Mapping]] | None = None,
             harness: tuple[Mapping[str, Sequence[float]], Mapping[str, Sequence[float]]] | None = None) -> dict:
    """The per-unit values of one evaluation, aligned by unit so that two runs measured with one protocol pair up:
    {'ppl': {'dense': [...], 'pruned': [...]}, 'divergence': {'jsd': [...], ...}, 'tasks': {'dense': {'em': [...],
    ...}, 'pruned': {...}, 'answer_jsd': [...]}}; a unit a metric could not score (a sample with no scored token,
    an example the judge failed on) is None. lm-eval's scores that are means over documents add
    'lm_eval': {'dense': {'lm:task:metric': [...]}, 'pruned': {...}}."""
    units: dict = {}
    if dense_windows is not None and pruned_windows is not None:
        units["ppl"] = {"dense": list(dense_windows), "pruned": list(pruned_windows)}
    if divergence_samples is not None:
        units["divergence"] = {k: [None if s.get("skipped") else s[k] for s in divergence_samples]
                               for k in DIVERGENCES}
    if task_examples is not None:
        tasks: dict = {side: {t: [e[side][t] for e in task_examples] for t in TASK_SCORES[:3]} for side in SIDES}
        for side in SIDES:
            records = list((judged or {}).get(side) or [])
            if records:
                scores = [r.get("mean") if r.get("error") is None else None for r in records]
                tasks[side]["judge"] = (scores + [None] * len(task_examples))[:len(task_examples)]
        tasks["answer_jsd"] = [e.get("answer_jsd") for e in task_examples]
        units["tasks"] = tasks
    if harness is not None:
        dense, pruned = harness
        shared = [key for key in dense if key in pruned and len(dense[key]) == len(pruned[key])]
        if shared:
            units["lm_eval"] = {"dense": {k: list(dense[k]) for k in shared},
                                "pruned": {k: list(pruned[k]) for k in shared}}
    return units


def _present(values: Sequence) -> list[float]:
    return [float(v) for v in values if v is not None]


def _pairs(a: Sequence, b: Sequence) -> tuple[list[float], list[float]]:
    """The units both sides scored, still paired."""
    kept = [(float(x), float(y)) for x, y in zip(a, b) if x is not None and y is not None]
    return [x for x, _ in kept], [y for _, y in kept]


def intervals_of(units: Mapping, settings: Bootstrap = SETTINGS) -> dict[str, list[float] | None]:
    """One interval per metric the units hold: 'dense.ppl', 'pruned.ppl', 'delta.ppl' (pruned - dense) and
    'ratio.ppl' over windows; 'jsd', 'kl_dense_pruned', 'kl_pruned_dense', 'flip_rate' over samples; 'dense.T',
    'pruned.T', 'delta.T' for each task score T and 'answer_jsd' over examples; 'dense.K', 'pruned.K', 'delta.K'
    for each lm-eval score K ('lm:task:metric') over documents. None where under 2 units."""
    out: dict[str, list[float] | None] = {}
    ppl = units.get("ppl")
    if ppl:
        for side in SIDES:
            out[f"{side}.ppl"] = interval(ppl[side], "exp_mean", settings)
        out["delta.ppl"] = paired_difference(ppl["dense"], ppl["pruned"], "exp_mean", settings)
        out["ratio.ppl"] = paired_ratio(ppl["dense"], ppl["pruned"], "exp_mean", settings)
    for key, values in (units.get("divergence") or {}).items():
        out[key] = interval(_present(values), "mean", settings)
    tasks = units.get("tasks")
    if tasks:
        for score in TASK_SCORES:
            if score not in tasks["dense"] or score not in tasks["pruned"]:
                continue
            for side in SIDES:
                out[f"{side}.{score}"] = interval(_present(tasks[side][score]), "mean", settings)
            out[f"delta.{score}"] = paired_difference(*_pairs(tasks["dense"][score], tasks["pruned"][score]),
                                                      "mean", settings)
        out["answer_jsd"] = interval(_present(tasks.get("answer_jsd") or []), "mean", settings)
    harness = units.get("lm_eval")
    for key in (harness or {}).get("dense", {}):
        for side in SIDES:
            out[f"{side}.{key}"] = interval(harness[side][key], "mean", settings)
        out[f"delta.{key}"] = paired_difference(harness["dense"][key], harness["pruned"][key], "mean", settings)
    return out


def uncertainty(units: Mapping, settings: Bootstrap = SETTINGS) -> dict:
    """What a summary gains: its per-unit values, their intervals and how they were drawn."""
    drawn = settings.to_dict()
    return {"units": dict(units), "intervals": intervals_of(units, settings), "confidence": drawn["confidence"],
            "resamples": drawn["resamples"], "seed": drawn["seed"], "interval_method": drawn["method"],
            "interval_units": {part: UNIT_OF[part] for part in units}}
