"""The `python -m backend` command line: one parser for every command, and the loop that runs one and prints it."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from backend.cli import cleanup, findings, prune, runs
from backend.cli.arguments import (
    add_calibration_arguments,
    add_eval_arguments,
    add_run_options,
    add_spec_arguments,
    add_store_argument,
    add_target_arguments,
    common,
)
from backend.cli.render import (
    print_eval,
    print_outcome,
    print_ppl,
    print_prune_table,
    print_runs,
)

USAGE_ERRORS = (ValueError, FileNotFoundError)


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
    add_target_arguments(prune)
    prune.add_argument("--ria-a", type=float, default=0.5, help="RIA: the exponent of the input norms (default 0.5)")
    prune.add_argument("--batch-size", type=int, help="calibration windows per forward (default: all that fit)")
    prune.add_argument("--error-tokens", type=int, default=256, help="calibration tokens sampled to measure each "
                                                                     "matrix's reconstruction error (default 256)")
    prune.add_argument("--offload", action="store_true", help="keep the model on the CPU and move one layer at a "
                                                              "time to --device (default: the memory estimate "
                                                              "chooses; it says which and why)")
    prune.add_argument("--device-map", help="auto: accelerate places the layers (GPUs, then CPU memory, then disk) "
                                            "and each is pruned where it lies")
    prune.add_argument("--max-memory", help="with --device-map auto: a cap per device, e.g. cuda:0=20GiB,cpu=64GiB")
    prune.add_argument("--save", required=True, help="folder to write the pruned Hugging Face model into (new or "
                                                     "empty; see --overwrite)")
    prune.add_argument("--overwrite", action="store_true", help="replace a folder PruneScope saved before (any other "
                                                                "non-empty folder is always refused)")
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
    add_run_parsers(sub)
    findings.add_parsers(sub)
    return parser


def add_run_parsers(sub) -> None:
    """The store commands: run, sweep, list, show, export, report, worker, cancel."""
    run = sub.add_parser("run", help="prune and evaluate as one run in the store (cached when already done)")
    add_spec_arguments(run)
    add_target_arguments(run)
    add_run_options(run)
    run.add_argument("--detach", action="store_true", help="return at once; the worker goes on in the background")

    sweep = sub.add_parser("sweep", help="a grid of runs: methods x sparsities x calibrations x patterns x "
                                         "allocations")
    sweep.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    sweep.add_argument("--sparsities", nargs="+", type=float, default=[0.5])
    sweep.add_argument("--calibrations", nargs="+", default=["c4"])
    sweep.add_argument("--patterns", nargs="+", default=["unstructured"])
    add_calibration_arguments(sweep)
    add_target_arguments(sweep, grid=True)
    add_run_options(sweep)
    sweep.add_argument("--detach", action="store_true", help="queue the grid and return at once")

    listing = sub.add_parser("list", help="one row per run in the store")
    show = sub.add_parser("show", help="a run's spec, state, metrics and per-layer report")
    show.add_argument("run", help="run id (or its first characters)")
    export = sub.add_parser("export", help="a run's pruned model folder, metrics.json, layers.csv and records.jsonl")
    export.add_argument("run", help="run id (or its first characters)")
    export.add_argument("--to", required=True, help="folder to write into (other files in it are left alone)")
    export.add_argument("--overwrite", action="store_true", help="replace a model/, metrics.json, layers.csv and "
                                                                 "records.jsonl PruneScope exported there before")
    report = sub.add_parser("report", help="one self-contained HTML page comparing the runs")
    report.add_argument("--out", required=True, help="the .html file to write")
    worker = sub.add_parser("worker", help="run queued jobs (started on demand by run, sweep and the dashboard)")
    worker.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    worker.add_argument("--idle-exit", type=float, default=60.0, help="exit after this many idle seconds")
    worker.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: one job at a time in this process; ray: each job a Ray task on a cluster")
    worker.add_argument("--ray-address", help="the Ray cluster: auto, HOST:PORT (default: start a local instance)")
    worker.add_argument("--cpus-per-job", type=float, default=1.0, help="Ray: CPUs each job reserves (default 1)")
    worker.add_argument("--gpus-per-job", type=float, default=0.0, help="Ray: GPUs each job reserves, fractions "
                        "allowed (default 0)")
    worker.add_argument("--memory-per-job", help="Ray: memory each job reserves, e.g. 32GiB (Ray then places no more "
                                                 "jobs on a node than its memory holds; default: none reserved)")
    worker.add_argument("--max-retries", type=int, default=1, help="Ray: reruns of a job whose worker died")
    worker.add_argument("--artifacts", help="Ray: where the pruned models go, a folder every node can reach or an "
                        "fsspec URL such as s3://bucket/prefix (default: the store's runs/ folder)")
    cancel = sub.add_parser("cancel", help="cancel a run's queued or running job")
    cancel.add_argument("run", help="run id (or its first characters)")
    for parser in (run, sweep, listing, show, export, report, worker, cancel):
        add_store_argument(parser)
    for parser in (run, sweep, listing, show, export, report, cancel):
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    delete = sub.add_parser("delete", help="delete runs: their rows in the store and their run folders")
    delete.add_argument("runs", nargs="+", metavar="RUN", help="run id (or its first characters)")
    gc = sub.add_parser("gc", help="free space: old pruned models, dense results, leftover temporary folders")
    gc.add_argument("--keep-models", type=int, metavar="N", help="keep the N most recently written pruned models, "
                    "remove the others (their runs' metrics stay; export prunes again)")
    gc.add_argument("--older-than", type=float, metavar="DAYS", help="remove pruned models and cached dense "
                    "results older than DAYS (with --keep-models: only those both select)")
    gc.add_argument("--unused-dense", action="store_true", help="also remove every cached dense result no run "
                    "in the store uses")
    gc.add_argument("--no-vacuum", action="store_true", help="do not compact the database file afterwards")
    for parser in (delete, gc):
        parser.add_argument("--dry-run", action="store_true", help="print what would go, remove nothing")
        add_store_argument(parser)
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


COMMANDS = {
    "prune": (prune.cmd_prune, print_prune_table),
    "ppl": (prune.cmd_ppl, print_ppl),
    "eval": (prune.cmd_eval, print_eval),
    "run": (runs.cmd_run, print_outcome),
    "sweep": (runs.cmd_sweep, lambda r: print_runs(r["runs"])),
    "list": (runs.cmd_list, lambda r: print_runs(r["runs"])),
    "show": (runs.cmd_show, lambda r: print(json.dumps(r, indent=1, default=str))),
    "export": (runs.cmd_export, lambda r: print(f"run {r['run_id']} exported to {r['to']}: {', '.join(r['files'])}")),
    "report": (runs.cmd_report, lambda r: print(f"wrote {r['out']} ({r['done']} finished runs of {r['runs']})")),
    "worker": (runs.cmd_worker, lambda r: print(f"worker ran {r['jobs']} job(s)")),
    "cancel": (runs.cmd_cancel, lambda r: print(f"run {r['run_id']}: {r['state']}")),
    "delete": (cleanup.cmd_delete, cleanup.print_cleanup),
    "gc": (cleanup.cmd_gc, cleanup.print_cleanup),
    "findings": (findings.cmd_findings, findings.print_findings),
    "study": (findings.cmd_study, findings.print_study),
    "compare": (findings.cmd_compare, findings.print_compare),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a usage error is one line and exit 2, a failed run exit 1."""
    args = build_parser().parse_args(argv)
    run, show = COMMANDS[args.command]
    try:
        result = run(args)
    except USAGE_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except runs.RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(json.dumps(result, default=str))
    else:
        show(result)
    return 0
