"""Speed of the metrics on the embedded model, as ratios to the raw forward passes they are built on.

    python bench/metrics_bench.py --data-dir ../shared/data [--pruned FOLDER]

Prints: perplexity tokens/s vs raw forward tokens/s at the same batch shape; JS divergence seconds vs its two
forward passes; greedy generation tokens/s at batch 16 vs batch 1; peak RSS growth of JS over 200 Alpaca records.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.sources.datasets import load_source  # noqa: E402
from backend.sources.models import load  # noqa: E402
from metrics.divergence import model_divergence, teacher_forced  # noqa: E402
from metrics.generation import generate  # noqa: E402
from metrics.perplexity import perplexity, token_stream  # noqa: E402
from metrics.prompts import prompt_renderer  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("PRUNESCOPE_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--pruned", help="pruned folder for the divergence (default: the dense model twice)")
    parser.add_argument("--windows", type=int, default=12)
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--prompts", type=int, nargs="+", default=[16, 64],
                        help="prompt counts for generation: 16 fill one padded batch, more are sorted into batches "
                             "of similar length as the evaluation does with its 200 examples")
    parser.add_argument("--parts", nargs="+", choices=("ppl", "jsd", "gen"), default=["ppl", "jsd", "gen"])
    args = parser.parse_args()

    dense = load("smollm2-135m")
    pruned = load(args.pruned) if args.pruned else dense
    model, tok = dense.model, dense.tokenizer
    if "ppl" in args.parts:
        bench_perplexity(model, tok, args)
    if "jsd" in args.parts:
        bench_divergence(model, pruned.model, tok, args)
    if "gen" in args.parts:
        for count in args.prompts:
            bench_generation(model, tok, args.data_dir, count)


def bench_perplexity(model, tok, args) -> None:
    wiki = load_source("wikitext2", args.data_dir).items
    seqlen, batch = 512, 4
    ids = token_stream(wiki, tok)[: args.windows * seqlen].reshape(args.windows, seqlen)
    with torch.no_grad():
        model(input_ids=ids[:batch])
        raw = timed(lambda: [model(input_ids=ids[i:i + batch]).logits for i in range(0, args.windows, batch)])
    ppl_s = perplexity(model, tok, wiki, seqlen, args.windows, batch_size=batch).seconds
    print(f"perplexity: {args.windows * seqlen / ppl_s:.0f} tokens/s vs raw forward {args.windows * seqlen / raw:.0f} "
          f"tokens/s at batch {batch} x {seqlen}: ratio {raw / ppl_s:.2f} (target >= 0.9)")


def bench_divergence(model, pruned, tok, args) -> None:
    records = load_source("alpaca", args.data_dir, limit=args.records).items
    template = "chat" if tok.chat_template else "alpaca"
    sequences, scored = teacher_forced(records, tok, prompt_renderer(template, tok))
    before = rss_mb()
    with torch.no_grad():
        def forwards() -> None:
            for start in range(0, len(sequences), 8):
                chunk = sequences[start:start + 8]
                width = max(len(s) for s in chunk)
                padded = torch.zeros(len(chunk), width, dtype=torch.long)
                mask = torch.zeros(len(chunk), width, dtype=torch.long)
                for row, seq in enumerate(chunk):
                    padded[row, :len(seq)], mask[row, :len(seq)] = seq, 1
                model(input_ids=padded, attention_mask=mask).logits
                pruned(input_ids=padded, attention_mask=mask).logits
        two_passes = timed(forwards)
    jsd_s = timed(lambda: model_divergence(model, pruned, sequences, scored, batch_size=8))
    tokens = sum(len(s) for s in sequences)
    print(f"JS divergence over {len(sequences)} Alpaca records ({tokens} tokens, {int(sum(m.sum() for m in scored))} "
          f"scored): {jsd_s:.1f} s vs its two forward passes {two_passes:.1f} s: ratio {jsd_s / two_passes:.2f} "
          f"(target <= 1.25); peak RSS {rss_mb():.0f} MB ({rss_mb() - before:+.0f} MB over the forwards alone)")


def bench_generation(model, tok, data_dir: str, count: int) -> None:
    unnatural = load_source("unnatural", data_dir, limit=count).items
    prompts = [prompt_renderer("chat" if tok.chat_template else "unnatural", tok)(r) for r in unnatural]
    for label, forced in (("fixed 32 new tokens per answer", 32), ("real answers, EOS stops them", 0)):
        speeds = {}
        for size in (1, 16):
            start = time.perf_counter()
            answers = generate(model, tok, prompts, max_new_tokens=32, batch_size=size, min_new_tokens=forced)
            seconds = time.perf_counter() - start
            tokens = forced * len(answers) if forced else sum(len(tok(a).input_ids) + 1 for a in answers)
            speeds[size] = tokens / seconds
        print(f"greedy generation of {len(prompts)} Unnatural answers ({label}): batch 16 {speeds[16]:.0f} tokens/s "
              f"vs batch 1 {speeds[1]:.0f} tokens/s: {speeds[16] / speeds[1]:.2f}x (target >= 4x)")


if __name__ == "__main__":
    main()
