"""How command results are printed for a person: tables, totals and progress bars on stderr."""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

from backend.reports.rows import progress_text


def progress_bar(total: int, desc: str, unit: str = "item"):
    """A tqdm bar on stderr."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, unit=unit, dynamic_ncols=True, leave=False)


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def with_interval(value, bounds, spec: str = ".3f") -> str:
    """'0.412 [0.351, 0.470]': a number and its interval, or a dash."""
    if value is None:
        return "-"
    return format(value, spec) + (f" [{format(bounds[0], spec)}, {format(bounds[1], spec)}]" if bounds else "")


EVAL_COLUMNS = (("ppl", "perplexity", ".2f"), ("em", "EM", ".3f"), ("f1", "F1", ".3f"), ("rouge1", "ROUGE-1", ".3f"),
                ("judge", "judge", ".2f"))


def print_eval(result: dict) -> None:
    """Dense, pruned and pruned - dense with their intervals, then the divergences, the flips and the seconds."""
    intervals = result.get("intervals") or {}
    shown = [(key, title, spec) for key, title, spec in EVAL_COLUMNS
             if any(key in result[side] for side in ("dense", "pruned"))]
    values = {side: {key: (result[side].get("judge") or {}).get("overall") if key == "judge"
                     else result[side].get(key) for key, _, _ in shown} for side in ("dense", "pruned")}
    values["pruned - dense"] = {key: None if values["pruned"][key] is None or values["dense"][key] is None
                                else values["pruned"][key] - values["dense"][key] for key, _, _ in shown}
    prefix = {"dense": "dense", "pruned": "pruned", "pruned - dense": "delta"}
    cells = {side: [with_interval(values[side][key], intervals.get(f"{prefix[side]}.{key}"), spec)
                    for key, _, spec in shown] for side in values}
    widths = [max(len(title), *(len(cells[side][i]) for side in cells)) + 2 for i, (_, title, _) in enumerate(shown)]
    if shown:
        print(f"{'':<15}" + "".join(f"{title:>{w}}" for (_, title, _), w in zip(shown, widths)))
        for side in cells:
            print(f"{side:<15}" + "".join(f"{cell:>{w}}" for cell, w in zip(cells[side], widths)))
    if "lm_eval" in result.get("protocol", {}):
        print_harness(result)
    if "jsd" in result:
        p = result["protocol"]["divergence"]
        print("  ".join(f"{name} {with_interval(result[key], intervals.get(key), '.4f')}" for key, name in (
            ("jsd", "JS"), ("kl_dense_pruned", "KL(d||p)"), ("kl_pruned_dense", "KL(p||d)"), ("flip_rate", "flip rate")))
              + f"  ({p['samples']} {p['source']} records, {p['scored_tokens']} {p['positions']} tokens, "
                f"log base {p['log']})")
    if "flips_lost" in result:
        print(f"answers lost {result['flips_lost']}, gained {result['flips_gained']}; JS along the pruned answers "
              f"{with_interval(result['answer_jsd'], intervals.get('answer_jsd'), '.4f')}")
    if intervals:
        units = ", ".join(f"{part}: {unit}" for part, unit in (result.get("interval_units") or {}).items())
        print(f"[low, high]: {result['confidence']:.0%} {result.get('interval_method', '')} bootstrap intervals, "
              f"{result['resamples']} resamples, seed {result['seed']}, over the units ({units}); pruned - dense "
              f"paired over the same units")
    print("seconds: " + "  ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))


def print_harness(result: dict) -> None:
    """lm-eval's scores: dense and pruned with lm-eval's stderr, pruned - dense with its paired bootstrap interval
    over the documents, and the protocol (versions, documents, shots)."""
    from backend.runs.protocol import lm_parts, part_label

    intervals = result.get("intervals") or {}
    lines = [("task", "metric", "dense ± stderr", "pruned ± stderr", "pruned - dense [95%]")]
    for key, dense in result["dense"].get("lm_eval", {}).items():
        pruned = result["pruned"]["lm_eval"].get(key)
        errors = [result[side].get("lm_eval_stderr", {}).get(key) for side in ("dense", "pruned")]
        change = None if dense is None or pruned is None else pruned - dense
        lines.append((*lm_parts(key), *(fmt(v, ".4f") + (f" ± {e:.4f}" if e is not None else "")
                                        for v, e in zip((dense, pruned), errors)),
                      with_interval(change, intervals.get(f"delta.{key}"), "+.4f")))
    widths = [max(len(line[i]) for line in lines) + 2 for i in range(len(lines[0]))]
    print(part_label("lm_eval", result["protocol"]["lm_eval"]))
    for line in lines:
        print(("  " + "".join(f"{cell:<{w}}" for cell, w in zip(line, widths))).rstrip())


def table_module(module: str) -> str:
    """Expert slices share one column per projection (`mlp.experts.3.down_proj` -> `mlp.experts.*.down_proj`)."""
    return re.sub(r"\.\d+\.", ".*.", module)


def print_prune_table(result: dict) -> None:
    """Per decoder layer: reconstruction error (sparsity) of each module (experts averaged), then totals, what was
    kept dense and why, and the check against the model's own forward."""
    cells: dict[int, dict[str, list[dict]]] = {}
    for layer in result["layers"]:
        cells.setdefault(layer["layer"], {}).setdefault(table_module(layer["module"]), []).append(layer)
    modules = list(dict.fromkeys(m for row in cells.values() for m in row))
    width = max(15, *(len(m) for m in modules)) + 2
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
    allocation = result.get("allocation") or {}
    goals, ratios = allocation.get("layer_targets") or [], allocation.get("outlier_ratios") or []
    extra = len({g for g in goals if g is not None}) > 1
    print("relative reconstruction error per matrix (achieved sparsity); experts: the mean over experts"
          + ("; the layer's target sparsity" + (" and OWL outlier ratio" if ratios else "") if extra else ""))
    print(f"{'layer':>5}" + "".join(f"{m:>{width}}" for m in modules)
          + (f"{'target':>9}" + (f"{'outliers':>10}" if ratios else "") if extra else ""))
    for index, row in cells.items():
        text = (f"{mean(row[m], 'rel_error'):.4f} ({mean(row[m], 'sparsity'):.3f})" if m in row else "-" for m in modules)
        tail = (f"{fmt(goals[index]):>9}" + (f"{ratios[index]:>10.2%}" if ratios else "")) if extra else ""
        print(f"{index:>5}" + "".join(f"{t:>{width}}" for t in text) + tail)
    notes = Counter(r["note"] for r in result["layers"] if r.get("note"))
    for note, count in notes.items():
        print(f"{count} matrices: {note}")
    kept = Counter(k["reason"] for k in result.get("kept", []))
    kept_text = "; ".join(f"{n} kept dense: {reason}" for reason, n in kept.items()) or "none kept dense"
    print(f"\nsparsity {result['overall_sparsity']:.4f} over every matrix in the decoder layers "
          f"({result['pruned_sparsity']:.4f} over the {len(result['layers'])} pruned; {kept_text}) | model-wide "
          f"{result['model_sparsity']:.4f} of {result['model_parameters'] / 1e6:.1f} M parameters (embeddings and "
          f"lm_head included)")
    check = result.get("check") or {}
    if check:
        print(f"check: the layer-by-layer pass matches the pruned model's own forward (relative difference "
              f"{check['relative_difference']:.1e} on {check['tokens']} tokens)")
    stages = "  ".join(f"{k} {v:.1f}s" for k, v in result["stages"].items())
    if result.get("placement"):
        print(f"placement {result['placement']['mode']}: {result['placement']['reason']}")
    device = (f" | peak device memory {result['peak_device_mb']:.0f} MB" if result.get("peak_device_mb") is not None
              else "")
    print(f"{result['seconds']:.1f} s total | peak RSS {result['peak_rss_mb']:.0f} MB{device} | saved to "
          f"{result['save_path']}")
    print(f"stages: {stages}")


def print_ppl(result: dict) -> None:
    print(f"perplexity {result['ppl']:.4f}  ({result['source']}, seqlen {result['seqlen']}, {result['windows']} of "
          f"{result['windows_available']} windows, {result['scored_tokens']} scored tokens, "
          f"{result['seconds']:.1f} s, {result['tokens_per_s']:.0f} tokens/s)")


def short_allocation(text: str | None) -> str:
    """'uniform', 'owl' or 'explicit', with a '*' when include/exclude narrowed the matrices."""
    text = text or "uniform"
    short = next((word for word in ("owl", "explicit") if text.startswith(word)), "uniform")
    return short + ("*" if ", only " in text or ", not " in text else "")


def print_runs(rows: list[dict]) -> None:
    print(f"{'run_id':<17}{'model':<14}{'method':<10}{'sparsity':>9}{'pattern':>13} {'alloc':<10}{'calibration':<12}"
          f"{'state':<12}{'progress':<22}{'pid':>7}{'ppl d/p':>16}{'JS':>7}{'F1 d/p':>13}{'lm-eval d/p':>14}  code")
    for r in rows:
        first = (r.get("lm_eval") or [None])[0]  # the first lm-eval score, e.g. lm:prunescope_facts:acc
        print(f"{r['run_id']:<17}{Path(r['model']).name[:13]:<14}{r['method']:<10}{r['sparsity']:>9.2f}"
              f"{r['pattern']:>13} {short_allocation(r.get('allocation')):<10}{Path(r['calibration']).name[:11]:<12}"
              f"{r['state']:<12}{progress_text(r)[:21]:<22}"
              f"{r['worker_pid'] or '-':>7}{fmt(r['dense_ppl'], '.2f') + '/' + fmt(r['pruned_ppl'], '.2f'):>16}"
              f"{fmt(r['jsd']):>7}{fmt(r['dense_f1']) + '/' + fmt(r['pruned_f1']):>13}"
              f"{fmt(r.get(f'dense_{first}')) + '/' + fmt(r.get(f'pruned_{first}')):>14}  "
              f"{'other: ' + str(r['code']) if r.get('other_code') else 'current'}")


def print_outcome(result: dict) -> None:
    if "summary" not in result and "dense" not in result:
        print(f"run {result['run_id']}: {result['state']}" + (f" ({result['store']})" if "store" in result else ""))
        return
    print(f"run {result['run_id']}: {result['state']}" + (" (from the store)" if result.get("cached") else ""))
    print_eval(result)
