"""Uniform vs OWL allocation (Wanda, SparseGPT at 60% and 70%) and RIA vs Wanda (50% unstructured and 2:4) on the
embedded model, as issue 14 asks: C4 32 x 256 calibration, seed 0; WikiText-2 test perplexity, 512 x 40 windows.

The runs go through the store (a finished run of the same spec is used, whatever code made it: the last line names
the code). The table gives each run's pruned perplexity with its 95% interval, the paired change against its
baseline (OWL - uniform, RIA - Wanda, over the same windows), the sparsity reached and the pruning seconds.

    python bench/targets_bench.py --data-dir ../shared/data [--store DIR] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.findings.between import compare_runs  # noqa: E402
from backend.runs.service import submit_many, wait  # noqa: E402
from backend.runs.spec import EvalSettings, RunSpec  # noqa: E402
from backend.runs.store import Store  # noqa: E402
from compression.targets import Targets  # noqa: E402

EVALUATION = EvalSettings(ppl="wikitext2", ppl_seqlen=512, ppl_windows=40, jsd=None, tasks=None)


def pairs(model: str) -> list[tuple[str, RunSpec, RunSpec]]:
    """(label, baseline, candidate): uniform vs OWL per method and sparsity, Wanda vs RIA per pattern."""
    base = dict(model=model, calibration="c4", nsamples=32, seqlen=256, seed=0, evaluation=EVALUATION)
    out = [(f"{method} {sparsity:.0%}: uniform -> OWL", RunSpec(method=method, sparsity=sparsity, **base),
            RunSpec(method=method, sparsity=sparsity, targets=Targets(allocation="owl"), **base))
           for method in ("wanda", "sparsegpt") for sparsity in (0.6, 0.7)]
    out += [(f"50% {pattern}: wanda -> ria", RunSpec(method="wanda", sparsity=0.5, pattern=pattern, **base),
             RunSpec(method="ria", sparsity=0.5, pattern=pattern, **base)) for pattern in ("unstructured", "2:4")]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--store", help="results store (default: $PRUNESCOPE_STORE, else the user's store)")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    store = Store(args.store)
    grid = pairs(args.model)
    specs = [spec.normalised() for _, *both in grid for spec in both]
    done = {}
    for row in store.runs():  # newest first: a finished run of the very spec is used whatever code made it
        if row["state"] == "done":
            done.setdefault(store.spec(row["run_id"]), row["run_id"])
    missing = [spec for spec in specs if spec not in done]
    if missing:
        submitted = submit_many(store, missing, args.data_dir)
        wait(store, [s["run_id"] for s in submitted])
        done.update({spec: s["run_id"] for spec, s in zip(missing, submitted)})
    ids = [done[spec] for spec in specs]
    rows = {r["run_id"]: r for r in store.runs()}
    failed = [rid for rid in ids if rows[rid]["state"] != "done"]
    if failed:
        sys.exit(f"runs not done: {', '.join(failed)} (see python -m backend show RUN)")
    print(f"{'comparison':<30}{'baseline ppl [95%]':>26}{'candidate ppl [95%]':>26}{'change [paired 95%]':>30}"
          f"{'sparsity b/c':>16}{'prune s b/c':>14}")
    for (label, *_), (a, b) in zip(grid, zip(ids[::2], ids[1::2])):
        ra, rb = rows[a], rows[b]
        ppl = next(d for d in compare_runs(store, a, b)[2] if d.metric == "ppl")
        text = lambda r: f"{r['pruned_ppl']:.2f} [{r['intervals']['pruned.ppl'][0]:.2f}, " \
                         f"{r['intervals']['pruned.ppl'][1]:.2f}]"
        seconds = [(store.metrics(rid)["prune"] or {}).get("seconds", float("nan")) for rid in (a, b)]
        print(f"{label:<30}{text(ra):>26}{text(rb):>26}"
              f"{f'{ppl.point:+.2f} [{ppl.interval[0]:+.2f}, {ppl.interval[1]:+.2f}]':>30}"
              f"{ra['overall_sparsity']:>8.4f}/{rb['overall_sparsity']:.4f}{seconds[0]:>8.0f}/{seconds[1]:.0f}")
    print(f"dense perplexity {rows[ids[0]]['dense_ppl']:.2f}; runs {', '.join(i[:8] for i in ids)}; code "
          f"{', '.join(sorted({str(rows[i]['code']) for i in ids}))}")


if __name__ == "__main__":
    main()
