"""Peer benchmark: prune a local causal LM with vllm-project/llm-compressor on given calibration windows.

Run it with the interpreter of a separate environment that has `llmcompressor` installed (it pins its own
transformers, so it is not a dependency of PruneScope), e.g.

    /work/peer-venv/bin/python bench/peer_llmcompressor.py --model DIR --windows W.pt --method wanda --json

`--windows` is a `torch.save`d int64 tensor [nsamples, seqlen] of token ids; every window is used as given
(no shuffling, no re-tokenisation), on the CPU in float32. With `--json`, stdout carries exactly one JSON
object and everything else (llmcompressor's and transformers' logs, progress bars) goes to stderr.
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any, Iterator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compression.timing import Stopwatch  # noqa: E402  (torch-free; interpreter start-up to here is stdlib only)

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

METHODS = ("wanda", "sparsegpt")
LM_HEAD_IGNORE = "re:.*lm_head"


def log(message: str) -> None:
    """Write one progress line to stderr."""
    print(f"[peer_llmcompressor] {message}", file=sys.stderr, flush=True)


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to file descriptor 1 (Python or native code) to stderr while active."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local Hugging Face model folder")
    parser.add_argument("--windows", required=True, help="torch.save'd int64 tensor [nsamples, seqlen] of token ids")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity per Linear (default 0.5)")
    parser.add_argument("--block-size", type=int, default=128, help="SparseGPT column block size (default 128)")
    parser.add_argument("--dampening", type=float, default=0.01, help="SparseGPT dampening fraction (default 0.01)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--save", default=None, help="folder to save the pruned model to (dense safetensors)")
    parser.add_argument("--save-compressed", action="store_true",
                        help="save in compressed-tensors' sparse format instead of dense")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    if not 0.0 < args.sparsity < 1.0:
        parser.error(f"--sparsity must lie in (0, 1), got {args.sparsity}")
    if not os.path.isdir(args.model):
        parser.error(f"--model {args.model!r} is not a folder")
    if not os.path.isfile(args.windows):
        parser.error(f"--windows {args.windows!r} is not a file")
    return args


def import_stack() -> dict[str, str]:
    """Import torch, transformers, datasets and llmcompressor; return their versions."""
    import datasets
    import llmcompressor
    import torch
    import transformers
    from llmcompressor import oneshot  # noqa: F401
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier  # noqa: F401

    return {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__, "datasets": datasets.__version__}


def load_windows(path: str) -> torch.Tensor:
    """Load and check the [nsamples, seqlen] int64 calibration windows."""
    import torch

    windows = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.numel() == 0:
        raise ValueError(f"{path}: expected a non-empty 2-D tensor, got {type(windows).__name__} "
                         f"{tuple(getattr(windows, 'shape', ()))}")
    if windows.dtype != torch.int64:
        raise ValueError(f"{path}: expected int64 token ids, got {windows.dtype}")
    return windows


def load_model(folder: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model in float32 on the CPU, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map=None)
    model.eval()
    return model, tokenizer


def windows_dataset(windows: torch.Tensor) -> Dataset:
    """Turn the windows into a datasets.Dataset with input_ids and an all-ones attention_mask."""
    from datasets import Dataset

    ids = windows.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})


def decoder_layer_classes(model: PreTrainedModel) -> list[str]:
    """Class names of the model's decoder layers (from `_no_split_modules`)."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    names = [n for n in names if n in present]
    if not names:
        raise ValueError(f"{type(model).__name__} declares no decoder-layer class in _no_split_modules")
    return names


def build_modifier(method: str, sparsity: float, targets: list[str], block_size: int, dampening: float) -> Any:
    """Make the llmcompressor pruning modifier for `method` (unstructured, lm_head ignored)."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    common: dict[str, Any] = {"sparsity": sparsity, "mask_structure": "0:0", "targets": targets,
                              "ignore": [LM_HEAD_IGNORE]}
    if method == "wanda":
        return WandaPruningModifier(**common)
    return SparseGPTModifier(**common, block_size=block_size, dampening_frac=dampening)


def run_oneshot(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, modifier: Any,
                nsamples: int, seqlen: int) -> PreTrainedModel:
    """Run llmcompressor's one-shot calibration and pruning over the windows, in their order."""
    from llmcompressor import oneshot

    return oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=modifier,
                   num_calibration_samples=nsamples, max_seq_length=seqlen, shuffle_calibration_samples=False,
                   batch_size=1, pipeline="sequential", output_dir=None)


def decoder_linear_sparsity(model: PreTrainedModel, layer_classes: list[str]) -> tuple[float, float, float, int]:
    """Overall, minimum and maximum zero fraction of the decoder layers' Linear weights, and their count."""
    import torch

    zeros = total = count = 0
    low, high = 1.0, 0.0
    for module in model.modules():
        if type(module).__name__ not in layer_classes:
            continue
        for linear in module.modules():
            if isinstance(linear, torch.nn.Linear):
                weight = linear.weight.detach()
                nz = int((weight == 0).sum())
                zeros, total, count = zeros + nz, total + weight.numel(), count + 1
                low, high = min(low, nz / weight.numel()), max(high, nz / weight.numel())
    if total == 0:
        raise ValueError("found no Linear weights inside the decoder layers")
    return zeros / total, low, high, count


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str, compressed: bool) -> None:
    """Save the pruned model and tokenizer to `folder`."""
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, save_compressed=compressed)
    tokenizer.save_pretrained(folder)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Do the whole benchmark and return the result record."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # llmcompressor would warn and set it anyway
    timings = Stopwatch({"import": time.perf_counter() - _T_START, "load": 0.0, "oneshot": 0.0, "save": 0.0})
    with timings("import"):
        versions = import_stack()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    log(f"llmcompressor {versions['llmcompressor']}, transformers {versions['transformers']}, "
        f"torch {versions['torch']}, {torch.get_num_threads()} threads")

    windows = load_windows(args.windows)
    nsamples, seqlen = (int(d) for d in windows.shape)
    with timings("load"):
        model, tokenizer = load_model(args.model)
    layer_classes = decoder_layer_classes(model)
    log(f"loaded {type(model).__name__} ({layer_classes}), {nsamples} windows x {seqlen} tokens")

    dataset = windows_dataset(windows)
    modifier = build_modifier(args.method, args.sparsity, layer_classes, args.block_size, args.dampening)
    with timings("oneshot"):
        model = run_oneshot(model, tokenizer, dataset, modifier, nsamples, seqlen)

    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    if dtypes != ["float32"]:
        log(f"WARNING: parameters are {dtypes} after oneshot, not float32")
    sparsity, low, high, linears = decoder_linear_sparsity(model, layer_classes)
    log(f"sparsity {sparsity:.6f} over {linears} decoder Linear weights (per module {low:.4f}..{high:.4f})")

    if args.save:
        with timings("save"):
            save_model(model, tokenizer, args.save, args.save_compressed)

    seconds = {k: round(v, 3) for k, v in timings.stages.items()}
    return {"tool": "llmcompressor", "version": versions["llmcompressor"], "method": args.method,
            "seconds_total": round(time.perf_counter() - _T_START, 3), "seconds": seconds,
            "peak_rss_mb": round(peak_rss_mb(), 1), "sparsity": round(sparsity, 6), "nsamples": nsamples,
            "seqlen": seqlen, "sparsity_target": args.sparsity, "linears": linears,
            "sparsity_min": round(low, 6), "sparsity_max": round(high, 6), "dtype": ",".join(dtypes),
            "threads": torch.get_num_threads(), "transformers": versions["transformers"],
            "torch": versions["torch"], "saved_to": args.save}


def summary(result: dict[str, Any]) -> str:
    """A short human-readable summary of a result record."""
    s = result["seconds"]
    return (f"llmcompressor {result['version']} (transformers {result['transformers']}) {result['method']}: "
            f"{result['nsamples']}x{result['seqlen']} windows, sparsity {result['sparsity']:.4f}\n"
            f"  total {result['seconds_total']:.2f}s = import {s['import']:.2f}s + load {s['load']:.2f}s + "
            f"oneshot {s['oneshot']:.2f}s + save {s['save']:.2f}s (+ rest); peak RSS {result['peak_rss_mb']:.0f} MB")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the benchmark and report on stdout."""
    args = parse_args(argv)
    with stdout_to_stderr():
        result = run(args)
    print(json.dumps(result) if args.json else summary(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
