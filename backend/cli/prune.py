"""Commands on model folders: prune (and save), perplexity, and dense vs pruned evaluation."""

from __future__ import annotations

import argparse
import json
import os
import time

from backend.cli.arguments import evaluation_from, targets_from
from backend.cli.render import progress_bar
from backend.log import stderr_log
from compression.targets import Targets


def cmd_prune(args: argparse.Namespace) -> dict:
    """Prune with progress on stderr, save the folder, and return the spec, the stages and the per-matrix report."""
    from backend import api
    from backend.runs.checks import check_calibration
    from backend.runs.export import check_target
    from compression.report import peak_rss_mb

    check_target(args.save, args.overwrite)  # refused before minutes of pruning, not after
    targets = check_flags(args)
    check_calibration(args.model, args.calibration, args.nsamples, args.seqlen, args.template,
                      data_dir=args.data_dir, trust_remote_code=args.trust_remote_code)
    started = time.perf_counter()
    bar = progress_bar(0, f"{args.method} {args.sparsity:g}", unit="layer")

    def on_progress(event) -> None:
        if event.stage == "layer":
            bar.total = event.layers
            bar.update(1)
        else:
            bar.set_postfix_str(f"layer {event.layer}/{event.layers} {event.module}")

    try:
        pruned = api.prune(args.model, args.method, args.sparsity, pattern=args.pattern, calibration=args.calibration,
                           nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, template=args.template,
                           order=args.order, per_row=args.per_row, targets=targets, ria_a=args.ria_a,
                           batch_size=args.batch_size, error_tokens=args.error_tokens, data_dir=args.data_dir,
                           device=args.device, dtype=args.dtype, offload=args.offload, device_map=args.device_map,
                           max_memory=args.max_memory,
                           trust_remote_code=args.trust_remote_code, progress=on_progress)
    finally:
        bar.close()
    save_path = pruned.save(args.save, overwrite=args.overwrite)
    report = pruned.report
    return {"spec": pruned.spec, "seconds": time.perf_counter() - started, "stages": pruned.stages,
            "peak_rss_mb": peak_rss_mb(), "peak_device_mb": report.peak_device_mb, "save_path": str(save_path),
            "placement": pruned.spec["placement"],
            "overall_sparsity": report.overall_sparsity, "pruned_sparsity": report.pruned_sparsity,
            "model_sparsity": report.model_sparsity, "model_parameters": report.model_parameters,
            "kept": report.kept, "check": report.check, "allocation": report.allocation,
            "batch_size": report.batch_size,
            "error_tokens": report.error_tokens,
            "layers": [{k: v for k, v in row.items() if k != "note" or v} for row in report.to_dict()["layers"]]}


def check_flags(args: argparse.Namespace) -> Targets:
    """The checks api.prune makes first, of flags that need nothing read, made before the calibration check so that
    the one error line names a bad flag rather than what the calibration check found; returns the targets."""
    from compression.methods import create
    from compression.orders import check_order
    from compression.patterns import check_sparsity, parse_pattern

    pattern = parse_pattern(args.pattern)
    check_sparsity(args.sparsity, pattern)
    create(args.method, sparsity=args.sparsity, pattern=pattern, **({"a": args.ria_a} if args.method == "ria" else {}))
    check_order(args.order)
    targets = targets_from(args)
    targets.check(args.sparsity, pattern.structured)
    from backend.api import placement_of
    from backend.sources.models import parse_max_memory
    placement_of(args.offload, args.device_map, args.max_memory)
    parse_max_memory(args.max_memory)
    return targets


def cmd_ppl(args: argparse.Namespace) -> dict:
    from backend.runs.checks import check_perplexity
    from backend.runs.evaluate import perplexity_texts
    from backend.sources import models
    from metrics.perplexity import perplexity

    if args.windows < 0:
        raise ValueError(f"--windows {args.windows} is not allowed: use 0 (all) or a positive number")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} is not allowed: use a positive integer")
    check_perplexity(args.model, args.data, args.seqlen, args.data_dir, args.trust_remote_code, "data", "seqlen")
    dataset, texts = perplexity_texts(args.data, args.data_dir)
    lm = models.load(args.model, args.device, args.dtype, args.trust_remote_code, log=stderr_log)
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
    from backend.runs.checks import check_evaluation
    from backend.runs.evaluate import evaluate
    from backend.sources import models

    settings = evaluation_from(args)
    settings.check()
    if args.judge_model and not os.environ.get("OPENAI_API_KEY"):
        raise ValueError("--judge-model needs an API key: set OPENAI_API_KEY (it is never written anywhere)")
    for model in (args.dense, args.pruned):
        check_evaluation(model, settings, args.data_dir, args.trust_remote_code)
    started = time.perf_counter()
    dense = models.load(args.dense, args.device, args.dtype, args.trust_remote_code, log=stderr_log)
    pruned = models.load(args.pruned, args.device, args.dtype, args.trust_remote_code, log=stderr_log)
    bars: dict = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = progress_bar(total, stage)
        bar = bars[stage]
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    summary, examples = evaluate(dense, pruned, settings, args.data_dir, log=stderr_log, progress=on_progress)
    if args.records:
        with open(args.records, "w", encoding="utf-8") as out:
            for example in examples:
                out.write(json.dumps(example) + "\n")
    return {"dense_model": args.dense, "pruned_model": args.pruned, **summary,
            "total_seconds": time.perf_counter() - started, "records": args.records}
