"""PruneScope from a notebook or a script, offline: prune the embedded SmolLM2 with Wanda at 50% on the built-in
prose, compare dense and pruned, and keep the run in a results store.

    python examples/notebook.py [--model FOLDER] [--store DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend import api  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="the embedded default, a hub id or a folder")
    parser.add_argument("--store", help="a results store folder (default: the user's store)")
    args = parser.parse_args()

    # 1. Prune in memory: 8 windows of 64 tokens of the built-in prose, Wanda, half of every row.
    pruned = api.prune(args.model, "wanda", 0.5, calibration="demo-prose", nsamples=8, seqlen=64)
    report = pruned.report
    print(f"pruned {len(report.layers)} matrices: sparsity {report.overall_sparsity:.3f} in the decoder layers, "
          f"{report.model_sparsity:.3f} model-wide; check {report.check['relative_difference']:.1e}")

    # 2. Dense vs pruned on the built-in data: perplexity, JS divergence, task scores.
    summary, examples = api.evaluate(args.model, pruned, ppl="demo-prose", ppl_seqlen=64, ppl_windows=4,
                                     jsd="demo", tasks="demo", limit=8, max_new_tokens=8)
    print(f"perplexity {summary['dense']['ppl']:.2f} -> {summary['pruned']['ppl']:.2f}, JS {summary['jsd']:.4f}, "
          f"F1 {summary['dense']['f1']:.3f} -> {summary['pruned']['f1']:.3f}; {len(examples)} example records")
    low, high = summary["intervals"]["ratio.ppl"]
    print(f"perplexity ratio {summary['pruned']['ppl'] / summary['dense']['ppl']:.3f}, 95% interval [{low:.3f}, "
          f"{high:.3f}] paired over {len(summary['units']['ppl']['dense'])} windows")

    # 3. The same experiment as a run in the store, done by the worker; a second submit is answered from the store.
    spec = api.RunSpec(model=args.model, method="wanda", sparsity=0.5, calibration="demo-prose", nsamples=8,
                       seqlen=64, evaluation=api.EvalSettings(ppl="demo-prose", ppl_seqlen=64, ppl_windows=4,
                                                              jsd=None, tasks=None))
    submitted = api.submit(spec, args.store)
    row = api.wait(submitted["run_id"], args.store)[0]
    print(f"run {row['run_id']}: {row['state']}, perplexity {row['dense_ppl']:.2f} -> {row['pruned_ppl']:.2f}"
          + (" (from the store)" if submitted["cached"] else ""))
    print(f"{len(api.load_runs(args.store))} run(s) in the store")


if __name__ == "__main__":
    main()
