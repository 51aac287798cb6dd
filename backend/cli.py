"""Command line: `python -m backend prune|ppl|eval ...`, and the store commands (run, sweep, list, show, export,
report, worker, cancel) from backend.store_cli."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from typing import Sequence

from backend import store_cli

USAGE_ERRORS = (ValueError, FileNotFoundError)


def parse_fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity {text!r} is not a number: use a fraction in [0, 1), such as 0.5")


def common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="folder with local data files (default: $PRUNESCOPE_DATA_DIR)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16/fp16 on CUDA), float32, bfloat16, float16")
    parser.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a hub model (off by default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """What to prune and how to calibrate; shared by prune and run."""
    parser.add_argument("--method", required=True, help="magnitude, wanda or sparsegpt")
    parser.add_argument("--sparsity", type=parse_fraction, required=True, help="fraction of weights to remove, in [0, 1)")
    parser.add_argument("--pattern", default="unstructured", help="unstructured or N:M such as 2:4, 4:8")
    parser.add_argument("--calibration", default="c4", help="c4, c4-validation, alpaca, unnatural, wikitext2, demo, "
                                                           "demo-prose, self, a .jsonl/.json/.txt/.parquet file, "
                                                           "or saved ids (.pt)")
    add_calibration_arguments(parser)


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and the calibration set's size, seed and template; shared by prune, run and sweep."""
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), a hub id, or a local folder")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048; more than the "
                                                                "model's context is an error)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template", default="alpaca", help="prompt template for instruction records: alpaca or chat")


def add_eval_arguments(parser: argparse.ArgumentParser, template_flag: str) -> None:
    """What to evaluate; shared by eval, run and sweep (where --template names the calibration template)."""
    parser.add_argument("--ppl", help="perplexity data, e.g. wikitext2")
    parser.add_argument("--ppl-seqlen", type=int, default=512)
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument("--jsd", help="instruction records for teacher-forced divergence, e.g. alpaca")
    parser.add_argument("--tasks", help="instruction records for generated answers and EM/F1/ROUGE-1, e.g. unnatural")
    parser.add_argument("--limit", type=int, default=100, help="records for divergence and for tasks (default 100)")
    parser.add_argument(template_flag, dest="eval_template", default="auto",
                        help="auto (chat template if the model has one), alpaca, unnatural (the paper's "
                             "'{instruction} ###{input} ###Response:'), chat")
    parser.add_argument("--all-tokens", action="store_true", help="divergence over every position, not only the response")
    parser.add_argument("--log2", action="store_true", help="divergences in bits (JS bounded by 1) instead of nats")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    parser.add_argument("--judge-model", help="LLM judge model name at an OpenAI-compatible endpoint (key: OPENAI_API_KEY)")
    parser.add_argument("--judge-base-url", help="endpoint, default $OPENAI_BASE_URL or OpenAI")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump) and exits 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m backend", description="PruneScope: prune causal LMs and measure what it does.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    prune = sub.add_parser("prune", help="prune a model layer by layer and save it")
    add_spec_arguments(prune)
    prune.add_argument("--order", default="sequential", help="sequential (one pass per layer) or reference (two passes)")
    prune.add_argument("--per-row", action="store_true", help="magnitude: one threshold per row instead of per matrix")
    prune.add_argument("--include", action="append", help="fnmatch pattern of matrix names inside a layer to "
                        "prune (repeatable; default all), e.g. 'mlp.*' or 'mlp.experts.*.down_proj'")
    prune.add_argument("--exclude", action="append", help="fnmatch pattern of matrix names to leave dense "
                                                          "(repeatable)")
    prune.add_argument("--batch-size", type=int, help="calibration windows per forward (default: all that fit)")
    prune.add_argument("--error-tokens", type=int, default=256, help="calibration tokens sampled to measure each "
                                                                     "matrix's reconstruction error (default 256)")
    prune.add_argument("--offload", action="store_true", help="keep the model on the CPU and move one layer at a "
                                                              "time to --device")
    prune.add_argument("--save", required=True, help="folder to write the pruned Hugging Face model into")
    common(prune)

    ppl = sub.add_parser("ppl", help="perplexity with the SparseGPT/Wanda protocol")
    ppl.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a hub id, or a (pruned) local folder")
    ppl.add_argument("--data", default="wikitext2", help="wikitext2, c4-validation, c4, or a local text file")
    ppl.add_argument("--seqlen", type=int, default=512)
    ppl.add_argument("--windows", type=int, default=40, help="first N windows (0 = all)")
    ppl.add_argument("--batch-size", type=int, default=4, help="windows per forward (default 4)")
    common(ppl)

    ev = sub.add_parser("eval", help="dense vs pruned: perplexity, JS/KL/flips, task scores, optional LLM judge")
    ev.add_argument("--dense", default="smollm2-135m", help="the dense model: smollm2-135m, a hub id or a folder")
    ev.add_argument("--pruned", required=True, help="the pruned model folder (from prune --save)")
    add_eval_arguments(ev, template_flag="--template")
    ev.add_argument("--records", help="write one JSON line per example to this file")
    common(ev)
    store_cli.add_parsers(sub, add_spec_arguments, add_calibration_arguments, add_eval_arguments)
    return parser


def progress_bar(total: int, desc: str, unit: str = "item"):
    """A tqdm bar on stderr."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, unit=unit, dynamic_ncols=True, leave=False)


def cmd_prune(args: argparse.Namespace) -> dict:
    from backend import models
    from backend.calibrate import build_calibration, open_source
    from backend.export import save_pruned
    from compression.driver import ORDERS, peak_rss_mb, prune_model
    from compression.patterns import check_sparsity, parse_pattern
    from compression.methods import create

    pattern = parse_pattern(args.pattern)
    check_sparsity(args.sparsity, pattern)
    options = {"per_row": True} if args.per_row else {}
    if args.per_row and args.method != "magnitude":
        raise ValueError(f"--per-row applies to magnitude only, not {args.method!r}")
    method = create(args.method, sparsity=args.sparsity, pattern=pattern, **options)
    if args.order not in ORDERS:
        raise ValueError(f"order {args.order!r} is not allowed: use one of {', '.join(ORDERS)}")
    for name, value in (("--batch-size", args.batch_size), ("--error-tokens", args.error_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{name} {value} is not allowed: use a positive integer")
    if args.template not in ("alpaca", "chat"):
        raise ValueError(f"template {args.template!r} is not allowed for calibration: use alpaca or chat")
    started = time.perf_counter()
    stages: dict[str, float] = {}
    source = open_source(args.calibration, args.data_dir)
    t = time.perf_counter()
    compute = models.pick_device(args.device)
    dtype = models.pick_dtype(args.dtype, compute)
    lm = models.load(args.model, "cpu" if args.offload else args.device, dtype, args.trust_remote_code,
                     log=models.stderr_log)
    stages["load"] = time.perf_counter() - t
    t = time.perf_counter()
    calibration = build_calibration(source, lm.model, lm.tokenizer, args.nsamples, args.seqlen, args.seed,
                                    args.template)
    stages["calibration"] = time.perf_counter() - t
    bar = progress_bar(0, f"{args.method} {args.sparsity:g}", unit="layer")

    def on_progress(event) -> None:
        if event.stage == "layer":
            bar.total = event.layers
            bar.update(1)
        else:
            bar.set_postfix_str(f"layer {event.layer}/{event.layers} {event.module}")

    report = prune_model(lm.model, calibration, method, order=args.order, include=args.include, exclude=args.exclude,
                         batch_size=args.batch_size, error_tokens=args.error_tokens, device=compute,
                         offload=args.offload, progress=on_progress)
    bar.close()
    if not report.layers:
        raise ValueError(f"no weight matrix matched --include {args.include} --exclude {args.exclude}")
    stages.update(report.stages)
    spec = {"model": args.model, "model_path": lm.path, "method": args.method, "sparsity": args.sparsity,
            "pattern": str(pattern), "calibration": args.calibration, "nsamples": args.nsamples,
            "seqlen": args.seqlen, "seed": args.seed, "template": args.template, "order": args.order,
            "per_row": args.per_row, "include": args.include, "exclude": args.exclude,
            "dtype": str(lm.dtype).removeprefix("torch."), "device": str(compute), "offload": args.offload}
    t = time.perf_counter()
    save_path = save_pruned(lm.model, lm.tokenizer, args.save, {"spec": spec, "report": report.to_dict()})
    stages["save"] = time.perf_counter() - t
    return {"spec": spec, "seconds": time.perf_counter() - started, "stages": stages,
            "peak_rss_mb": peak_rss_mb(), "peak_device_mb": report.peak_device_mb, "save_path": str(save_path),
            "overall_sparsity": report.overall_sparsity, "pruned_sparsity": report.pruned_sparsity,
            "model_sparsity": report.model_sparsity, "model_parameters": report.model_parameters,
            "kept": report.kept, "check": report.check, "batch_size": report.batch_size,
            "error_tokens": report.error_tokens,
            "layers": [{k: v for k, v in row.items() if k != "note" or v} for row in report.to_dict()["layers"]]}


def cmd_ppl(args: argparse.Namespace) -> dict:
    from backend import models
    from backend.evaluate import perplexity_texts
    from compression.calibration import check_shape, model_context
    from metrics.perplexity import perplexity

    if args.windows < 0:
        raise ValueError(f"--windows {args.windows} is not allowed: use 0 (all) or a positive number")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} is not allowed: use a positive integer")
    dataset, texts = perplexity_texts(args.data, args.data_dir)
    lm = models.load(args.model, args.device, args.dtype, args.trust_remote_code, log=models.stderr_log)
    check_shape(1, args.seqlen, model_context(lm.model.config))
    bar = progress_bar(0, "perplexity", unit="window")

    def on_progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    result = perplexity(lm.model, lm.tokenizer, texts, args.seqlen, args.windows or None, args.batch_size,
                        source=f"{args.data} ({dataset.origin})", progress=on_progress)
    bar.close()
    return {"model": args.model, **result.to_dict(), "tokens_per_s": result.windows * result.seqlen / result.seconds}


def cmd_eval(args: argparse.Namespace) -> dict:
    from backend import models
    from backend.evaluate import evaluate
    from backend.spec import EvalSettings

    if not (args.ppl or args.jsd or args.tasks):
        args.ppl, args.jsd, args.tasks = "wikitext2", "alpaca", "unnatural"
    settings = EvalSettings(ppl=args.ppl, ppl_seqlen=args.ppl_seqlen, ppl_windows=args.ppl_windows, jsd=args.jsd,
                            tasks=args.tasks, limit=args.limit, template=args.eval_template,
                            response_only=not args.all_tokens, log2=args.log2, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, judge_model=args.judge_model,
                            judge_base_url=args.judge_base_url)
    settings.check()
    if args.judge_model and not os.environ.get("OPENAI_API_KEY"):
        raise ValueError("--judge-model needs an API key: set OPENAI_API_KEY (it is never written anywhere)")
    started = time.perf_counter()
    dense = models.load(args.dense, args.device, args.dtype, args.trust_remote_code, log=models.stderr_log)
    pruned = models.load(args.pruned, args.device, args.dtype, args.trust_remote_code, log=models.stderr_log)
    bars: dict = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = progress_bar(total, stage)
        bar = bars[stage]
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    summary, examples = evaluate(dense, pruned, settings, args.data_dir, log=models.stderr_log, progress=on_progress)
    if args.records:
        with open(args.records, "w", encoding="utf-8") as out:
            for example in examples:
                out.write(json.dumps(example) + "\n")
    return {"dense_model": args.dense, "pruned_model": args.pruned, **summary,
            "total_seconds": time.perf_counter() - started, "records": args.records}


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"prune": (cmd_prune, print_prune_table), "ppl": (cmd_ppl, print_ppl), "eval": (cmd_eval, print_eval),
                **store_cli.COMMANDS}
    run, show = commands[args.command]
    try:
        result = run(args)
    except USAGE_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except store_cli.RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(json.dumps(result, default=str))
    else:
        show(result)
    return 0
