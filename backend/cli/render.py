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


def print_eval(result: dict) -> None:
    print(f"{'':<10}{'ppl':>10}{'EM':>8}{'F1':>8}{'ROUGE-1':>9}{'judge':>7}")
    for side in ("dense", "pruned"):
        m = result[side]
        cells = [f"{m[k]:.3f}" if k in m else "-" for k in ("ppl", "em", "f1", "rouge1")]
        judge_mean = m.get("judge", {}).get("overall")
        print(f"{side:<10}{cells[0]:>10}{cells[1]:>8}{cells[2]:>8}{cells[3]:>9}"
              f"{f'{judge_mean:.2f}' if judge_mean is not None else '-':>7}")
    if "jsd" in result:
        p = result["protocol"]["divergence"]
        print(f"JS {result['jsd']:.4f}  KL(d||p) {result['kl_dense_pruned']:.4f}  KL(p||d) {result['kl_pruned_dense']:.4f}"
              f"  flip rate {result['flip_rate']:.3f}  ({p['samples']} {p['source']} records, {p['scored_tokens']} "
              f"{p['positions']} tokens, log base {p['log']})")
    if "flips_lost" in result:
        print(f"answers lost {result['flips_lost']}, gained {result['flips_gained']}; JS along the pruned answers "
              f"{result['answer_jsd']:.4f}")
    print("seconds: " + "  ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))


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
    print("relative reconstruction error per matrix (achieved sparsity); experts: the mean over experts")
    print(f"{'layer':>5}" + "".join(f"{m:>{width}}" for m in modules))
    for index, row in cells.items():
        text = (f"{mean(row[m], 'rel_error'):.4f} ({mean(row[m], 'sparsity'):.3f})" if m in row else "-" for m in modules)
        print(f"{index:>5}" + "".join(f"{t:>{width}}" for t in text))
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
    print(f"{result['seconds']:.1f} s total | peak RSS {result['peak_rss_mb']:.0f} MB | saved to {result['save_path']}")
    print(f"stages: {stages}")


def print_ppl(result: dict) -> None:
    print(f"perplexity {result['ppl']:.4f}  ({result['source']}, seqlen {result['seqlen']}, {result['windows']} of "
          f"{result['windows_available']} windows, {result['scored_tokens']} scored tokens, "
          f"{result['seconds']:.1f} s, {result['tokens_per_s']:.0f} tokens/s)")


def print_runs(rows: list[dict]) -> None:
    print(f"{'run_id':<17}{'model':<14}{'method':<10}{'sparsity':>9}{'pattern':>13} {'calibration':<12}"
          f"{'state':<12}{'progress':<22}{'pid':>7}{'ppl d/p':>16}{'JS':>7}{'F1 d/p':>13}  code")
    for r in rows:
        print(f"{r['run_id']:<17}{Path(r['model']).name[:13]:<14}{r['method']:<10}{r['sparsity']:>9.2f}"
              f"{r['pattern']:>13} {Path(r['calibration']).name[:11]:<12}{r['state']:<12}{progress_text(r)[:21]:<22}"
              f"{r['worker_pid'] or '-':>7}{fmt(r['dense_ppl'], '.2f') + '/' + fmt(r['pruned_ppl'], '.2f'):>16}"
              f"{fmt(r['jsd']):>7}{fmt(r['dense_f1']) + '/' + fmt(r['pruned_f1']):>13}  "
              f"{'other: ' + str(r['code']) if r.get('other_code') else 'current'}")


def print_outcome(result: dict) -> None:
    if "summary" not in result and "dense" not in result:
        print(f"run {result['run_id']}: {result['state']}" + (f" ({result['store']})" if "store" in result else ""))
        return
    print(f"run {result['run_id']}: {result['state']}" + (" (from the store)" if result.get("cached") else ""))
    print_eval(result)
