"""A model larger than the memory it is given, as issue 16 asks: a random-init Llama of ~1.2B parameters (TinyLlama's
shape, fp32, the embedded tokenizer) pruned by the real CLI, each mode in its own process so that its peak RSS is its
own:

- resident:   the whole model in memory on the device (here the CPU), the baseline;
- offload:    the model kept in CPU memory, each decoder layer visiting the device while it is pruned (on a GPU
              machine this is what bounds device memory; on a CPU the model is still all in RAM);
- device-map: accelerate's device_map with CPU memory capped (--max-memory cpu=...), so most decoder layers stay on
              disk and each is loaded, pruned and written back to accelerate's offload folder in turn.

Printed: the model's size, each mode's wall time, peak RSS and its ratio to the model's size, the placement the
memory estimate reported, the final check against the model's own forward, and whether the saved pruned weights
equal the resident run's (every tensor, max absolute difference).

    python bench/offload_bench.py [--method wanda] [--nsamples 4] [--seqlen 512] [--cap 1GiB] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)


def build(folder: Path) -> int:
    """Write the random-init model once (fp32 safetensors) with the embedded model's tokenizer; its parameters."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from backend.sources.models import ensure_embedded

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded())
    config = LlamaConfig(vocab_size=len(tokenizer), **SHAPE)
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float32)
        model.save_pretrained(folder, max_shard_size="1GB")
        tokenizer.save_pretrained(folder)
        del model
    from compression.memory import dimensions
    return dimensions(config).parameters


def prune(folder: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """One CLI prune in a fresh process; its JSON result and whole-process wall seconds."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "backend", "prune", "--model", str(folder), "--method", args.method, "--sparsity",
           "0.5", "--calibration", "demo", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--device", "cpu", "--save", str(out), "--json", *extra]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ,
                                                                              "PRUNESCOPE_CACHE": str(args.work)})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(extra) or 'resident'} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout), "wall": time.perf_counter() - started}


def max_difference(a: Path, b: Path) -> tuple[int, float]:
    """Tensors compared and the largest absolute difference between two saved folders, one tensor at a time."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        return {k: f for f in folder.glob("*.safetensors") for k in safe_open(f, "pt").keys()}

    left, right = tensors(a), tensors(b)
    if left.keys() != right.keys():
        raise SystemExit(f"the saved folders hold different tensors: {sorted(left.keys() ^ right.keys())[:5]}")
    worst = 0.0
    for key in left:
        with safe_open(left[key], "pt") as x, safe_open(right[key], "pt") as y:
            worst = max(worst, float((x.get_tensor(key) - y.get_tensor(key)).abs().max()))
    return len(left), worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--cap", default="1GiB", help="CPU memory accelerate may use in the device-map mode")
    parser.add_argument("--work", type=Path, help="folder for the model and the outputs (default: a new temporary "
                                                  "one, removed at the end)")
    args = parser.parse_args()
    made = args.work is None
    args.work = args.work or Path(tempfile.mkdtemp(prefix="prunescope-offload-bench-"))
    try:
        folder = args.work / "llama-1b"
        started = time.perf_counter()
        parameters = build(folder)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"random-init Llama: {parameters / 1e9:.2f} B parameters, {size / 2 ** 30:.2f} GiB of fp32 safetensors "
              f"({time.perf_counter() - started:.0f} s to build); {args.method} 50%, calibration demo "
              f"{args.nsamples} x {args.seqlen}, CPU ({os.cpu_count()} cores)\n")
        modes = {"resident": [], "offload": ["--offload"],
                 "device-map": ["--device-map", "auto", "--max-memory", f"cpu={args.cap}"]}
        results = {name: prune(folder, args.work / name, args, extra) for name, extra in modes.items()}
        print(f"{'mode':<12}{'wall s':>8}{'peak RSS MiB':>14}{'RSS/model':>11}{'sparsity':>10}{'check':>10}"
              f"{'tensors equal to resident (max |diff|)':>42}")
        for name, result in results.items():
            count, diff = (max_difference(args.work / "resident", args.work / name) if name != "resident"
                           else (0, 0.0))
            same = f"{count} tensors, {diff:.1e}" if name != "resident" else "-"
            print(f"{name:<12}{result['wall']:>8.1f}{result['peak_rss_mb']:>14.0f}"
                  f"{result['peak_rss_mb'] * 2 ** 20 / size:>10.2f}x{result['pruned_sparsity']:>10.4f}"
                  f"{result['check']['relative_difference']:>10.1e}{same:>42}")
        print()
        for name, result in results.items():
            print(f"{name}: {result['placement']['reason']}")
            print("    stages: " + "  ".join(f"{k} {v:.1f}s" for k, v in result["stages"].items()))
    finally:
        if made:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
