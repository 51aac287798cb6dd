"""Fidelity and speed of pruning on the embedded model: whole-process wall time, stages, peak RSS, perplexity.

The task (issue 2): SmolLM2-135M, C4 calibration (c4_en_train_first1000.jsonl) 32 x 256 tokens, seed 0, 50%
unstructured; WikiText-2 test perplexity at seqlen 512, first 40 windows. Reference implementations on identical
windows give dense 29.19, Wanda 66.93, SparseGPT 64.29, magnitude (per matrix) 483.2.

    python bench/prune_bench.py --data-dir ../shared/data [--repeat 3] [--methods wanda sparsegpt magnitude]
        [--order sequential] [--peer-python /path/to/venv-with-llmcompressor/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE_PPL = {"dense": 29.19, "wanda": 66.93, "sparsegpt": 64.29, "magnitude": 483.2}
REFERENCE_SECONDS = {"wanda": 34.5, "sparsegpt": 65.0, "magnitude": 9.1}
TARGET_SECONDS = {"wanda": 20.0, "sparsegpt": 35.0, "magnitude": 6.0}


def run_json(cmd: list[str]) -> tuple[dict, float]:
    """Run a command that prints one JSON object; return it with the whole-process wall time."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def perplexity(model: str, data_dir: str) -> float:
    result, _ = run_json([sys.executable, "-m", "backend", "ppl", "--model", model, "--data", "wikitext2",
                          "--seqlen", "512", "--windows", "40", "--data-dir", data_dir, "--json"])
    return result["ppl"]


def write_windows(data_dir: str, path: Path) -> None:
    """The calibration windows of the task, for a peer tool that takes token ids."""
    import torch
    from transformers import AutoTokenizer

    from backend.sources.datasets import load_source
    from backend.sources.models import ensure_embedded
    from compression.calibration import windows_from_documents

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded())
    docs = load_source("c4", data_dir).items
    torch.save(windows_from_documents(docs, tokenizer, 32, 256, 0), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("PRUNESCOPE_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt", "magnitude"])
    parser.add_argument("--order", default="sequential")
    parser.add_argument("--repeat", type=int, default=3, help="whole-process runs per method (median reported)")
    parser.add_argument("--peer-python", help="interpreter of a venv with llmcompressor, to run it as a peer")
    parser.add_argument("--peer-repeat", type=int, default=1, help="whole-process runs per peer method")
    parser.add_argument("--skip-ppl", action="store_true")
    args = parser.parse_args()

    out = Path(tempfile.mkdtemp(prefix="prunescope-bench-"))
    rows = []
    if not args.skip_ppl:
        from backend.sources.models import ensure_embedded  # noqa: F401  (converts once before timing)
        rows.append({"method": "dense", "ppl": perplexity("smollm2-135m", args.data_dir)})
    for method in args.methods:
        walls, results = [], []
        for i in range(args.repeat):
            save = out / f"{method}-{i}"
            result, wall = run_json([sys.executable, "-m", "backend", "prune", "--method", method, "--sparsity", "0.5",
                                     "--calibration", "c4", "--nsamples", "32", "--seqlen", "256", "--seed", "0",
                                     "--order", args.order, "--data-dir", args.data_dir, "--save", str(save), "--json"])
            walls.append(wall)
            results.append(result)
            print(f"  {method} run {i + 1}: {wall:.1f} s", file=sys.stderr)
        best = results[walls.index(statistics.median(walls))] if args.repeat % 2 else results[0]
        rows.append({"method": method, "wall": statistics.median(walls), "walls": walls, "stages": best["stages"],
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                     "sparsity": best["overall_sparsity"],
                     "ppl": None if args.skip_ppl else perplexity(str(out / f"{method}-0"), args.data_dir)})

    peers = []
    if args.peer_python:
        windows = out / "windows.pt"
        write_windows(args.data_dir, windows)
        for method in [m for m in args.methods if m in ("wanda", "sparsegpt")]:
            walls = []
            for _ in range(args.peer_repeat):
                result, wall = run_json([args.peer_python, "bench/peer_llmcompressor.py", "--model",
                                         str(Path.home() / ".cache/prunescope/models/smollm2-135m"), "--windows",
                                         str(windows), "--method", method, "--sparsity", "0.5", "--json"])
                walls.append(wall)
            peers.append({"method": method, "wall": statistics.median(walls), "version": result.get("version"),
                          "peak_rss_mb": result.get("peak_rss_mb")})

    print(f"\nSmolLM2-135M (dense = dequantized GGUF), C4 32x256 seed 0, 50% unstructured, order {args.order}; "
          f"WikiText-2 test ppl, seqlen 512, first 40 windows; {os.cpu_count()} CPU cores")
    print(f"{'method':<10}{'ppl':>9}{'ref ppl':>9}{'diff':>8}{'wall s':>8}{'target':>8}{'ref s':>7}{'speedup':>9}"
          f"{'RSS MB':>8}  stages (s)")
    for row in rows:
        ref = REFERENCE_PPL[row["method"]]
        ppl = row.get("ppl")
        diff = f"{100 * (ppl / ref - 1):+.1f}%" if ppl else "-"
        line = f"{row['method']:<10}{ppl or float('nan'):>9.2f}{ref:>9.2f}{diff:>8}"
        if "wall" in row:
            ref_s = REFERENCE_SECONDS[row["method"]]
            stages = " ".join(f"{k}={v:.1f}" for k, v in row["stages"].items())
            line += (f"{row['wall']:>8.1f}{TARGET_SECONDS[row['method']]:>8.1f}{ref_s:>7.1f}"
                     f"{ref_s / row['wall']:>8.2f}x{row['peak_rss_mb']:>8.0f}  {stages}")
        print(line)
    for peer in peers:
        ours = next(r for r in rows if r["method"] == peer["method"])
        print(f"llmcompressor {peer['version']} {peer['method']}: {peer['wall']:.1f} s whole process, peak RSS "
              f"{peer['peak_rss_mb']:.0f} MB; PruneScope is {peer['wall'] / ours['wall']:.2f}x faster")


if __name__ == "__main__":
    main()
