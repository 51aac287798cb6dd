"""Findings and studies: the paper's three claims with their verdicts, and the study that queues what they need."""

from __future__ import annotations

import argparse
import shlex
import time

from backend.findings import study
from backend.runs.service import submit_many
from backend.runs.store import Store

TASK_CHOICES = ("em", "f1", "rouge1", "judge")


def task_score(text: str) -> str:
    """--task: an instruction-task score or an lm-eval score such as lm:prunescope_facts:acc."""
    if text in TASK_CHOICES or (text.startswith("lm:") and text.count(":") >= 2):
        return text
    raise argparse.ArgumentTypeError(f"task score {text!r} is not allowed: use {', '.join(TASK_CHOICES)} or an "
                                     f"lm-eval score lm:TASK:METRIC (as `show` lists them)")


def add_parsers(sub) -> None:
    """The `findings` and `study` commands."""
    findings = sub.add_parser("findings", help="the paper's three claims tested on the store's runs, with verdicts")
    findings.add_argument("--model", help="only this model's runs (default: the largest cohort of any model)")
    findings.add_argument("--cohort", help="the cohort id to use (default: the one with the most runs)")
    findings.add_argument("--task", default="f1", type=task_score, help="task score the claims use: em, f1, rouge1, "
                          "judge or an lm-eval score lm:TASK:METRIC (default f1)")
    findings.add_argument("--close-ppl", type=float, default=None, metavar="RATIO",
                          help="claim 1: a pruned / dense perplexity ratio below this is 'close to dense' (1.5)")
    findings.add_argument("--queue", action="store_true", help="queue exactly the runs missing to decide the claims")
    compare = sub.add_parser("compare", help="two runs measured with one protocol: each pruned metric's difference "
                                             "(B - A) with a paired 95% interval over the same units")
    compare.add_argument("a", metavar="RUN_A", help="run id (or its first characters)")
    compare.add_argument("b", metavar="RUN_B", help="run id (or its first characters)")
    compare.add_argument("--store", help="results store folder (default: $PRUNESCOPE_STORE, else "
                                         "~/.local/share/prunescope/store)")
    compare.add_argument("--json", action="store_true", help="print JSON instead of text")
    study_parser = sub.add_parser("study", help="queue (and wait for) every run a study needs; resumable")
    study_parser.add_argument("name", choices=study.STUDIES, help="paper: the runs arXiv 2409.11233's claims need")
    study_parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a hub id or a local folder")
    study_parser.add_argument("--quick", action="store_true", help="32 x 256 calibration, 64 examples, a short "
                              "ladder: about 33 minutes on a 2-core CPU with the embedded model")
    for name, kind in (("nsamples", int), ("seqlen", int), ("limit", int), ("jsd_limit", int), ("ppl_windows", int),
                       ("ppl_seqlen", int), ("max_new_tokens", int), ("seed", int)):
        study_parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help="override the study's setting")
    study_parser.add_argument("--detach", action="store_true", help="queue the runs and return at once")
    study_parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    for parser in (findings, study_parser):
        parser.add_argument("--data-dir", help="folder with local data files (default: $PRUNESCOPE_DATA_DIR)")
        parser.add_argument("--device", default="auto", help="device of a worker started by this command")
        parser.add_argument("--store", help="results store folder (default: $PRUNESCOPE_STORE, else "
                                            "~/.local/share/prunescope/store)")
        parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _queue_command(args: argparse.Namespace, cohort: str | None) -> str:
    words = ["python", "-m", "backend", "findings", "--queue"]
    for flag, value in (("--store", args.store), ("--model", args.model), ("--cohort", cohort),
                        ("--data-dir", args.data_dir)):
        if value:
            words += [flag, str(value)]
    return shlex.join(words)


def cmd_findings(args: argparse.Namespace) -> dict:
    from backend.findings.claims import CLOSE_PPL
    from backend.findings.service import build, queue

    store = Store(args.store)
    close = CLOSE_PPL if args.close_ppl is None else args.close_ppl
    if close <= 1:
        raise ValueError(f"--close-ppl {close} is not allowed: use a ratio above 1, such as 1.5")
    found = build(store, args.model, args.cohort, args.task, close)
    result = found.to_dict()
    if args.queue:
        result["queued"] = queue(store, found, args.data_dir, args.device) if found.missing else []
    elif found.missing:
        result["queue_command"] = _queue_command(args, found.cohort.key if found.cohort else None)
    return result


def cmd_compare(args: argparse.Namespace) -> dict:
    """Run B minus run A, every pruned metric both measured, each paired over the units both were scored on."""
    from backend.findings.between import compare_runs
    from backend.findings.evidence import cell_of

    store = Store(args.store)
    a, b, found = compare_runs(store, store.find(args.a), store.find(args.b))
    return {"a": a.run_id, "b": b.run_id, "a_label": cell_of(a.row).label(), "b_label": cell_of(b.row).label(),
            "differences": [{**vars(d), "reading": d.reading()} for d in found]}


def print_compare(result: dict) -> None:
    print(f"B - A, pruned metrics, each with its paired 95% bootstrap interval over the units both runs scored\n"
          f"A {result['a'][:8]}: {result['a_label']}\nB {result['b'][:8]}: {result['b_label']}")
    for d in result["differences"]:
        print(f"  {d['metric']:<16} {_cell(d['point'], d['interval'], '+.4f'):<34} over {d['units']} {d['unit']} "
              f"({d['reading']})")


def cmd_study(args: argparse.Namespace) -> dict:
    """Queue the study's runs (finished ones are served from the store), wait with progress, then the findings."""
    from backend.cli.runs import wait
    from backend.findings.evidence import cohort_key
    from backend.findings.service import build

    size = "quick" if args.quick else "full"
    overrides = {k: getattr(args, k) for k in ("nsamples", "seqlen", "limit", "jsd_limit", "ppl_windows",
                                               "ppl_seqlen", "max_new_tokens", "seed") if getattr(args, k) is not None}
    base = study.base_spec(args.model, size, dtype=args.dtype, **overrides).normalised()
    specs = study.specs(base, study.cells(size))
    store = Store(args.store)
    started = time.perf_counter()
    submitted = submit_many(store, specs, args.data_dir, args.device)
    ids = [s["run_id"] for s in submitted]
    result = {"study": args.name, "size": size, "runs": len(ids), "cached": sum(s["cached"] for s in submitted),
              "run_ids": ids, "store": str(store.root)}
    if args.detach:
        return result
    wait(store, [s["run_id"] for s in submitted if not s["cached"]])
    rows = [r for r in store.runs() if r["run_id"] in ids]
    result["seconds"] = time.perf_counter() - started
    result["states"] = {state: sum(r["state"] == state for r in rows) for state in {r["state"] for r in rows}}
    done = [r for r in rows if r["state"] == "done"]
    if done:
        result["findings"] = build(store, cohort=cohort_key(done[0]), size=size).to_dict()
    return result


def _cell(value, interval, spec: str = ".3f") -> str:
    if value is None or value != value:
        return "-"
    return format(value, spec) + (f" [{format(interval[0], spec)}, {format(interval[1], spec)}]" if interval else "")


def print_findings(result: dict) -> None:
    """The three claims as text: verdict, the paper's words, the rule, each part's numbers, what is missing."""
    boot = result["bootstrap"]
    print(f"Findings on {result['cohort'] or 'an empty store'}" + (f" (cohort {result['cohort_key']})"
                                                                   if result["cohort_key"] else ""))
    print(f"task score: {result['task']}; [low, high]: {boot['confidence']:.0%} {boot['method']} bootstrap intervals, "
          f"{boot['resamples']} resamples, seed {boot['seed']}")
    for left in result["left_out"]:
        print(f"left out: {left['run_id'][:8]}: {left['why']}")
    for claim in result["claims"]:
        print(f"\nClaim {claim['claim']}: {claim['verdict'].upper()}")
        print(f"  paper: {claim['statement']}")
        print(f"  rule: {claim['rule']}")
        for part in claim["parts"]:
            print(f"  - {part['name']}: {part['verdict']} ({part['why']})" + ("" if part["counted"] else
                                                                               " [not counted]"))
            for number in part["numbers"]:
                runs = (", ".join(r[:8] for r in number["runs"]) if len(number["runs"]) <= 3
                        else f"{len(number['runs'])} runs")
                print(f"      {number['label']:<44} {_cell(number['value'], number['interval']):<28} {runs}")
        if "predictors" in claim:
            print(f"  predictors: {claim['predictors']['sentence']}")
        for need in claim["needs"]:
            print(f"  to decide: {need}")
        if claim["missing"]:
            print("  missing runs: " + "; ".join(
                f"{m['method']} {m['sparsity']:.0%} {m['pattern']} {m['calibration']}" for m in claim["missing"]))
    if result.get("queued") is not None:
        print(f"\nqueued {len(result['queued'])} run(s): " + ", ".join(q["run_id"][:8] for q in result["queued"]))
    elif result["missing"]:
        labels = "; ".join(m["label"] for m in result["missing"])
        print(f"\n{len(result['missing'])} run(s) missing to decide: {labels}")
        print(f"queue exactly these: {result['queue_command']}")


def print_study(result: dict) -> None:
    if "seconds" not in result:
        print(f"study {result['study']} ({result['size']}): {result['runs']} runs, {result['cached']} already in the "
              f"store {result['store']}; the worker goes on in the background")
        return
    states = ", ".join(f"{n} {state}" for state, n in sorted(result["states"].items()))
    print(f"study {result['study']} ({result['size']}): {result['runs']} runs ({states}; {result['cached']} were "
          f"already in the store) in {result['seconds'] / 60:.1f} min")
    if "findings" in result:
        print()
        print_findings(result["findings"])

