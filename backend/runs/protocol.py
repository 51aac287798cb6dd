"""The evaluation protocol a run was measured with (data, lengths, windows and records actually used, template,
unit), so pages and reports put only runs measured the same way on one axis. Torch-free, plain dicts."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Iterable, Mapping

UNKNOWN = "protocol unknown (not finished, or measured by an older PruneScope)"

# the fields of each part that make two measurements comparable; the others are shown, not matched
KEY_FIELDS: dict[str, tuple[str, ...]] = {
    "ppl": ("source", "data", "seqlen", "windows"),
    "divergence": ("source", "data", "records", "template", "positions", "unit"),
    "tasks": ("source", "data", "examples", "template", "max_new_tokens", "decoding", "judge"),
    "lm_eval": ("tasks", "files", "examples", "fewshot", "versions", "lm_eval_version"),
}
LM_PREFIX = "lm:"
# which part each metric of a run row was measured under
METRIC_PART: dict[str, str] = {
    **{k: "ppl" for k in ("dense_ppl", "pruned_ppl", "ppl_ratio")},
    **{k: "divergence" for k in ("jsd", "kl_dense_pruned", "kl_pruned_dense", "flip_rate")},
    **{f"{side}_{t}": "tasks" for side in ("dense", "pruned") for t in ("em", "f1", "rouge1", "judge")},
    **{f"{t}_{kind}": "tasks" for t in ("em", "f1", "rouge1", "judge") for kind in ("change", "relative")},
    "answer_jsd": "tasks",
}


def lm_key(task: str, metric: str) -> str:
    """The name of one lm-eval score among a run's metrics: 'lm:arc_easy:acc_norm'."""
    return f"{LM_PREFIX}{task}:{metric}"


def lm_parts(key: str) -> tuple[str, str]:
    """(task, metric) of an lm-eval score's name."""
    task, _, metric = key[len(LM_PREFIX):].partition(":")
    return task, metric


def score_of(column: str) -> str | None:
    """The lm-eval score a run-row column is about ('dense_lm:t:m', 'lm:t:m_change', ...), else None."""
    for prefix in ("dense_", "pruned_"):
        if column.startswith(prefix + LM_PREFIX):
            return column[len(prefix):].removesuffix("_ci").removesuffix("_stderr")
    if column.startswith(LM_PREFIX):
        for suffix in ("_change", "_relative", "_ci"):
            if column.endswith(suffix):
                return score_of(column[:-len(suffix)]) or column[:-len(suffix)]
        return column
    return None


def metric_part(metric: str) -> str | None:
    """Which part of the protocol measured a run-row metric, or None for a setting."""
    return METRIC_PART.get(metric) or ("lm_eval" if score_of(metric) else None)


def protocol_of(spec: Mapping, summary: Mapping, prints: Mapping) -> dict:
    """The protocol of a finished run from its spec, its summary's measured protocol and its data fingerprints:
    {'ppl': {...}, 'divergence': {...}, 'tasks': {...}} with only the parts it measured ({} when unknown)."""
    measured = summary.get("protocol") or {}
    settings = spec.get("evaluation") or {}
    data = prints.get("data") or {}
    out: dict = {}
    if "ppl" in measured:
        p, name = measured["ppl"], settings.get("ppl")
        out["ppl"] = {"source": name, "data": data.get(name), "seqlen": p.get("seqlen"), "windows": p.get("windows"),
                      "windows_requested": settings.get("ppl_windows"), "scored_tokens": p.get("scored_tokens")}
    if "divergence" in measured:
        d, name = measured["divergence"], settings.get("jsd")
        out["divergence"] = {"source": name, "data": data.get(name), "records": d.get("samples"),
                             "template": d.get("template"), "positions": d.get("positions"),
                             "unit": "bits" if d.get("log") == "2" else "nats", "scored_tokens": d.get("scored_tokens")}
    if "tasks" in measured:
        t, name = measured["tasks"], settings.get("tasks")
        out["tasks"] = {"source": name, "data": data.get(name), "examples": t.get("examples"),
                        "template": t.get("template"), "max_new_tokens": t.get("max_new_tokens"),
                        "decoding": t.get("decoding"), "judge": settings.get("judge_model")}
    if "lm_eval" in measured:
        h = measured["lm_eval"]
        out["lm_eval"] = {"tasks": h.get("tasks"), "files": (prints.get("lm_eval") or {}).get("tasks"),
                          "examples": h.get("examples"), "fewshot": h.get("fewshot"), "versions": h.get("versions"),
                          "lm_eval_version": h.get("lm_eval_version"), "limit": h.get("limit")}
    return out


def protocol_key(protocol: Mapping) -> str:
    """A short stable id of what makes runs comparable; runs with equal keys were measured the same way."""
    if not protocol:
        return "unknown"
    exact = {part: {f: protocol[part].get(f) for f in fields} for part, fields in KEY_FIELDS.items() if part in protocol}
    return hashlib.sha256(json.dumps(exact, sort_keys=True, default=str).encode()).hexdigest()[:10]


def part_label(part: str, values: Mapping) -> str:
    """One part of a protocol as a person reads it, e.g. 'perplexity: wikitext2, 40 windows x 512 tokens'."""
    if part == "ppl":
        asked = values.get("windows_requested")
        used = f"{values.get('windows')} windows" + (f" (of {asked} asked)" if asked not in (None, values.get("windows"))
                                                     else "")
        return f"perplexity: {values.get('source')}, {used} x {values.get('seqlen')} tokens"
    if part == "divergence":
        return (f"JS/KL: {values.get('source')}, {values.get('records')} records, {values.get('positions')} "
                f"tokens ({values.get('scored_tokens')} scored), {values.get('template')} template, "
                f"{values.get('unit')}")
    if part == "lm_eval":
        tasks = ", ".join(f"{task} v{(values.get('versions') or {}).get(task)} "
                          f"({(values.get('examples') or {}).get(task)} docs, "
                          f"{(values.get('fewshot') or {}).get(task, 0)}-shot)"
                          for task in (values.get("examples") or {}))
        return f"lm-eval {values.get('lm_eval_version')}: {tasks or ', '.join(values.get('tasks') or [])}"
    judge = f", judge {values['judge']}" if values.get("judge") else ""
    return (f"tasks: {values.get('source')}, {values.get('examples')} examples, {values.get('template')} template, "
            f"{values.get('decoding')} <= {values.get('max_new_tokens')} new tokens{judge}")


def protocol_label(protocol: Mapping) -> str:
    """The whole protocol as one line."""
    if not protocol:
        return UNKNOWN
    return " · ".join(part_label(part, protocol[part]) for part in KEY_FIELDS if part in protocol)


UNITS: dict[str, str] = {
    "ppl": "perplexity: exp of the mean next-token negative log-likelihood (lower is better)",
    "ppl_ratio": "pruned / dense perplexity (1 = unchanged)",
    "jsd": "Jensen-Shannon divergence of the next-token distributions, mean per scored token",
    "kl": "KL divergence of the next-token distributions, mean per scored token",
    "flip_rate": "fraction of scored tokens whose top-1 prediction differs",
    "task": "fraction in [0, 1], mean over the examples",
}


def metric_note(metric: str, protocol: Mapping) -> str:
    """What a metric of a run row means and how it was measured: its unit and its part of the protocol."""
    part = metric_part(metric)
    if part == "lm_eval":
        task, name = lm_parts(score_of(metric))
        kind = next((what for end, what in (("_relative", "pruned / dense"), ("_change", "pruned - dense"))
                     if metric.endswith(end)), "mean over documents, as lm-eval computes it")
        unit = f"lm-eval {task} {name}, {kind}"
    elif metric in ("dense_ppl", "pruned_ppl"):
        unit = UNITS["ppl"]
    elif metric == "ppl_ratio":
        unit = UNITS["ppl_ratio"]
    elif metric in ("jsd", "answer_jsd"):
        unit = UNITS["jsd"] + (f", {protocol['divergence']['unit']}" if "divergence" in protocol else "")
    elif metric.startswith("kl_"):
        unit = UNITS["kl"] + (f", {protocol['divergence']['unit']}" if "divergence" in protocol else "")
    elif metric == "flip_rate":
        unit = UNITS["flip_rate"]
    elif part == "tasks":
        unit = UNITS["task"]
    else:
        return metric
    measured = part_label(part, protocol[part]) if part in protocol else "protocol unknown"
    return f"{unit}; {measured}"


def groups(rows: Iterable[Mapping]) -> list[tuple[str, list[Mapping]]]:
    """Rows grouped by protocol key, the largest group first (ties: the newest run's group first)."""
    rows = list(rows)
    order = Counter(r.get("protocol_key", "unknown") for r in rows)
    first = {}
    for i, r in enumerate(rows):
        first.setdefault(r.get("protocol_key", "unknown"), i)
    keys = sorted(order, key=lambda k: (-order[k], first[k]))
    return [(k, [r for r in rows if r.get("protocol_key", "unknown") == k]) for k in keys]


def comparable(rows: Iterable[Mapping], key: str | None = None) -> tuple[list[Mapping], str]:
    """The rows measured with one protocol (`key`, default the largest group) and a sentence saying how many were
    left out and why ('' when none was)."""
    grouped = groups(rows)
    if not grouped:
        return [], ""
    chosen = dict(grouped).get(key) if key is not None else None
    key = key if chosen is not None else grouped[0][0]
    kept = dict(grouped)[key]
    left = sum(len(g) for k, g in grouped if k != key)
    if not left:
        return kept, ""
    return kept, (f"{left} run(s) measured with {len(grouped) - 1} other protocol(s) are left out: numbers from "
                  f"different data, windows, records or templates are not comparable. Pick their protocol to see them.")
