"""Argument builders shared by the commands, and the one place that turns flags into evaluation settings and run specs."""

from __future__ import annotations

import argparse

from backend.runs.spec import EvalSettings, RunSpec
from compression.methods import METHOD_NAMES
from compression.targets import ALLOCATIONS, Targets, parse_layer_sparsity


def parse_fraction(text: str) -> float:
    """A sparsity flag as a number, with a one-line error."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity {text!r} is not a number: use a fraction in [0, 1), such as 0.5")


def common(parser: argparse.ArgumentParser) -> None:
    """Data folder, device, dtype, remote code and JSON output: shared by prune, ppl and eval."""
    parser.add_argument("--data-dir", help="folder with local data files (default: $PRUNESCOPE_DATA_DIR)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16/fp16 on CUDA), float32, bfloat16, float16")
    parser.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a hub model (off by default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """What to prune and how to calibrate; shared by prune and run."""
    parser.add_argument("--method", required=True, help=", ".join(METHOD_NAMES))
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


def add_target_arguments(parser: argparse.ArgumentParser, grid: bool = False) -> None:
    """Which matrices are pruned and how the sparsity is spread over them; shared by prune, run and sweep (where
    the allocation is a grid dimension)."""
    parser.add_argument("--include", action="append", help="fnmatch pattern of matrices to prune, on full names "
                        "('model.layers.0.*', '*.mlp.down_proj', 'model.layers.1[0-5].*') or names inside a layer "
                        "('mlp.*'); repeatable, default all")
    parser.add_argument("--exclude", action="append", help="fnmatch pattern of matrices to leave dense (repeatable)")
    if grid:
        parser.add_argument("--allocations", nargs="+", default=["uniform"], metavar="ALLOCATION",
                            help=f"per-layer allocations to sweep: {', '.join(ALLOCATIONS)}")
    else:
        parser.add_argument("--allocation", default="uniform", help="uniform (every matrix at --sparsity) or owl "
                            "(outlier-weighted: layers with more outliers pruned less, mean kept at --sparsity)")
    parser.add_argument("--owl-m", type=float, default=5.0, help="OWL: a score is an outlier above M x the layer's "
                                                                 "mean score (default 5)")
    parser.add_argument("--owl-lambda", type=float, default=0.08, help="OWL: layer sparsities stay within "
                                                                       "--sparsity +/- lambda (default 0.08)")
    parser.add_argument("--layer-sparsity", help="explicit sparsities: one per decoder layer ('0.3,0.4,...') or a JSON "
                        "file of {full-name pattern: sparsity}; matrices no pattern names get --sparsity")


def targets_from(args: argparse.Namespace, allocation: str | None = None) -> Targets:
    """The targets the flags ask for, with the grid's allocation when one is given."""
    layers, patterns = parse_layer_sparsity(args.layer_sparsity)
    return Targets(include=tuple(args.include or ()), exclude=tuple(args.exclude or ()),
                   allocation=allocation or args.allocation, owl_m=args.owl_m, owl_lambda=args.owl_lambda,
                   layers=layers, patterns=patterns)


def add_eval_arguments(parser: argparse.ArgumentParser, template_flag: str) -> None:
    """What to evaluate; shared by eval, run and sweep (where --template names the calibration template)."""
    parser.add_argument("--ppl", help="perplexity data, e.g. wikitext2")
    parser.add_argument("--ppl-seqlen", type=int, default=512)
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument("--jsd", help="instruction records for teacher-forced divergence, e.g. alpaca")
    parser.add_argument("--tasks", help="instruction records for generated answers and EM/F1/ROUGE-1, e.g. unnatural")
    parser.add_argument("--limit", type=int, default=100, help="records for divergence and for tasks (default 100)")
    parser.add_argument("--jsd-limit", type=int, help="records for divergence when they should differ from --limit")
    parser.add_argument(template_flag, dest="eval_template", default="auto",
                        help="auto (chat template if the model has one), alpaca, unnatural (the paper's "
                             "'{instruction} ###{input} ###Response:'), chat")
    parser.add_argument("--all-tokens", action="store_true", help="divergence over every position, not only the response")
    parser.add_argument("--log2", action="store_true", help="divergences in bits (JS bounded by 1) instead of nats")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    parser.add_argument("--judge-model", help="LLM judge model name at an OpenAI-compatible endpoint (key: OPENAI_API_KEY)")
    parser.add_argument("--judge-base-url", help="endpoint, default $OPENAI_BASE_URL or OpenAI")
    parser.add_argument("--lm-eval", metavar="TASK[,TASK...]", help="lm-evaluation-harness tasks scored on both "
                        "models, e.g. prunescope_facts (ships with PruneScope, runs offline) or "
                        "arc_easy,boolq (data from the hub)")
    parser.add_argument("--lm-eval-limit", type=int, help="documents per lm-eval task (default: all)")
    parser.add_argument("--lm-eval-fewshot", type=int, help="lm-eval shots (default: each task's own)")
    parser.add_argument("--lm-eval-include", metavar="DIR", help="folder of local lm-eval task YAMLs "
                        "(dataset_path: json, dataset_kwargs.data_files; relative files are read from DIR)")


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    """Where the results store is."""
    parser.add_argument("--store", help="results store folder (default: $PRUNESCOPE_STORE, else "
                                        "~/.local/share/prunescope/store)")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Evaluation, order, dtype and where to find data: shared by run and sweep."""
    add_eval_arguments(parser, template_flag="--eval-template")
    parser.add_argument("--order", default="sequential", help="sequential (one pass per layer) or reference")
    parser.add_argument("--per-row", action="store_true", help="magnitude: one threshold per row")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="device of a worker started by this command")
    parser.add_argument("--executor", choices=("local", "ray"), help="how a worker started by this command runs "
                        "jobs: local (one at a time, here) or ray (each a Ray task; default $PRUNESCOPE_EXECUTOR, "
                        "else local)")
    parser.add_argument("--ray-address", help="with --executor ray: the cluster (auto, HOST:PORT; default a local "
                        "Ray instance)")
    parser.add_argument("--artifacts", help="with --executor ray: where the pruned models go, a folder every node "
                        "reaches or an fsspec URL (s3://bucket/prefix, ...; default: the store's runs/ folder)")
    parser.add_argument("--data-dir", help="folder with local data files (default: $PRUNESCOPE_DATA_DIR)")


def evaluation_from(args: argparse.Namespace) -> EvalSettings:
    """The evaluation the flags ask for (perplexity, divergence and tasks on the paper's sets when none of them and
    no lm-eval task is named)."""
    ppl, jsd, tasks = args.ppl, args.jsd, args.tasks
    harness = tuple(t.strip() for t in (args.lm_eval or "").split(",") if t.strip())
    if not (ppl or jsd or tasks or harness):
        ppl, jsd, tasks = "wikitext2", "alpaca", "unnatural"
    return EvalSettings(ppl=ppl, ppl_seqlen=args.ppl_seqlen, ppl_windows=args.ppl_windows, jsd=jsd, tasks=tasks,
                        limit=args.limit, template=args.eval_template, response_only=not args.all_tokens,
                        log2=args.log2, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        judge_model=args.judge_model, judge_base_url=args.judge_base_url, jsd_limit=args.jsd_limit,
                        lm_eval=harness, lm_eval_limit=args.lm_eval_limit, lm_eval_fewshot=args.lm_eval_fewshot,
                        lm_eval_include=args.lm_eval_include)


def spec_from(args: argparse.Namespace, method: str, sparsity: float, pattern: str, calibration: str,
              allocation: str | None = None) -> RunSpec:
    """One run of a command's flags, with the grid's method, sparsity, pattern, calibration and allocation."""
    return RunSpec(method=method, sparsity=sparsity, model=args.model, pattern=pattern, calibration=calibration,
                   nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, template=args.template,
                   order=args.order, per_row=args.per_row, dtype=args.dtype, evaluation=evaluation_from(args),
                   targets=targets_from(args, allocation)).normalised()
