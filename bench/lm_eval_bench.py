"""lm-eval on the embedded model, as issue 15 asks: dense vs Wanda 50% vs SparseGPT 50% (C4 32 x 256, seed 0) on
PruneScope's own task (prunescope_facts, all 80 questions, 0-shot), each score with lm-eval's stderr and the change
against dense with its paired 95% interval over the questions; then the same three evaluations by lm-eval's own CLI
on the saved folders, one after another, to check the numbers and to time the in-process path against it.

In process, lm-eval scores the models already in memory (PruneScope's `metrics.harness.run_tasks`); the CLI starts a
Python, imports lm-eval, indexes its ~15k task YAMLs, loads the folder and then scores. Both use batch size 16.

    python bench/lm_eval_bench.py --data-dir ../shared/data [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend import api  # noqa: E402
from backend.sources.lm_tasks import SHIPPED, SHIPPED_TASK  # noqa: E402
from metrics.harness import lm_eval_version, metric_name, run_tasks  # noqa: E402
from metrics.intervals import paired_difference  # noqa: E402

BATCH = 16
METRICS = ("acc", "acc_norm")


def cli(folder: Path, out: Path) -> tuple[dict[str, float], float]:
    """lm-eval's CLI on a saved folder: its scores and its wall seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                    f"pretrained={folder},dtype=float32", "--tasks", SHIPPED_TASK, "--include_path", str(SHIPPED),
                    "--device", "cpu", "--batch_size", str(BATCH), "--output_path", str(out)],
                   cwd=SHIPPED, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    found = json.loads(next(out.rglob("results_*.json")).read_text())["results"][SHIPPED_TASK]
    return {metric_name(k): v for k, v in found.items() if "," in k}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lm-eval-bench-"))
    quiet = lambda _message: None  # noqa: E731
    dense = api.load(args.model, device="cpu", log=quiet)
    models = {"dense": (dense, Path(dense.path))}
    for method in ("wanda", "sparsegpt"):
        pruned = api.prune(args.model, method, 0.5, calibration="c4", nsamples=32, seqlen=256, seed=0,
                           data_dir=args.data_dir, device="cpu", log=quiet)
        models[f"{method} 50%"] = (pruned.lm, pruned.save(work / method))
    ours, seconds = {}, {}
    run_tasks(dense.model, dense.tokenizer, [SHIPPED_TASK], [SHIPPED], limit=1, batch_size=BATCH)  # import, warm up
    for name, (lm, _) in models.items():
        started = time.perf_counter()
        ours[name] = run_tasks(lm.model, lm.tokenizer, [SHIPPED_TASK], [SHIPPED], batch_size=BATCH)
        seconds[name] = time.perf_counter() - started
    theirs = {name: cli(folder, work / f"cli-{name.split()[0]}") for name, (_, folder) in models.items()}

    print(f"lm-eval {lm_eval_version()}, {SHIPPED_TASK} (80 four-way questions, 0-shot), {args.model}, CPU fp32; "
          f"pruned with C4 32 x 256, seed 0; ± is lm-eval's stderr, [ ] the paired 95% bootstrap interval of the "
          f"change vs dense over the 80 questions")
    print(f"{'model':<16}" + "".join(f"{m + ' ± stderr':>20}{m + ' - dense [95%]':>32}" for m in METRICS)
          + f"{'in process s':>14}{'CLI s':>8}{'CLI equal':>11}")
    for name, result in ours.items():
        scores, documents = result.scores[SHIPPED_TASK], result.documents[SHIPPED_TASK]
        cells = []
        for metric in METRICS:
            cells.append(f"{scores[metric]:.4f} ± {scores[metric + '_stderr']:.4f}")
            if name == "dense":
                cells.append("")
                continue
            base = ours["dense"].documents[SHIPPED_TASK][metric]
            low, high = paired_difference(base, documents[metric], "mean")
            cells.append(f"{scores[metric] - ours['dense'].scores[SHIPPED_TASK][metric]:+.4f} "
                         f"[{low:+.4f}, {high:+.4f}]")
        cli_scores, cli_seconds = theirs[name]
        equal = all(abs(scores[k] - cli_scores[k]) <= 1e-9 for k in ("acc", "acc_stderr", "acc_norm",
                                                                     "acc_norm_stderr"))
        print(f"{name:<16}" + "".join(f"{c:>20}" if i % 2 == 0 else f"{c:>32}" for i, c in enumerate(cells))
              + f"{seconds[name]:>14.1f}{cli_seconds:>8.1f}{'yes' if equal else 'NO':>11}")
    total, total_cli = sum(seconds.values()), sum(s for _, s in theirs.values())
    print(f"three evaluations: in process {total:.1f} s, lm-eval's CLI {total_cli:.1f} s "
          f"({total_cli / total:.1f}x; in process {total / total_cli:.2f}x the CLI's time)")


if __name__ == "__main__":
    main()
