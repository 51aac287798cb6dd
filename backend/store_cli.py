"""Store commands of the CLI: run, sweep, list, show, export, report, worker, cancel. Everything up to finding a
cached run is torch-free, so a finished run is served in well under a second."""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

from backend.artifacts import MODEL_ARTIFACT, intact, problems
from backend.service import start, submit
from backend.spec import EvalSettings, RunSpec
from backend.store import ACTIVE, Store, StoreError
from backend.worker import serve

POLL_S = 0.5


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help="results store folder (default: $PRUNESCOPE_STORE, else "
                                        "~/.local/share/prunescope/store)")


def add_parsers(sub, add_spec_arguments, add_calibration_arguments, add_eval_arguments) -> None:
    """Register the store commands on the CLI's subparsers."""
    run = sub.add_parser("run", help="prune and evaluate as one run in the store (cached when already done)")
    add_spec_arguments(run)
    add_run_options(run, add_eval_arguments)
    run.add_argument("--detach", action="store_true", help="return at once; the worker goes on in the background")

    sweep = sub.add_parser("sweep", help="a grid of runs: methods x sparsities x calibrations x patterns")
    sweep.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    sweep.add_argument("--sparsities", nargs="+", type=float, default=[0.5])
    sweep.add_argument("--calibrations", nargs="+", default=["c4"])
    sweep.add_argument("--patterns", nargs="+", default=["unstructured"])
    add_calibration_arguments(sweep)
    add_run_options(sweep, add_eval_arguments)
    sweep.add_argument("--detach", action="store_true", help="queue the grid and return at once")

    listing = sub.add_parser("list", help="one row per run in the store")
    show = sub.add_parser("show", help="a run's spec, state, metrics and per-layer report")
    show.add_argument("run", help="run id (or its first characters)")
    export = sub.add_parser("export", help="a run's pruned model folder, metrics.json, layers.csv and records.jsonl")
    export.add_argument("run", help="run id (or its first characters)")
    export.add_argument("--to", required=True, help="folder to write into")
    report = sub.add_parser("report", help="one self-contained HTML page comparing the runs")
    report.add_argument("--out", required=True, help="the .html file to write")
    worker = sub.add_parser("worker", help="run queued jobs (started on demand by run, sweep and the dashboard)")
    worker.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    worker.add_argument("--idle-exit", type=float, default=60.0, help="exit after this many idle seconds")
    cancel = sub.add_parser("cancel", help="cancel a run's queued or running job")
    cancel.add_argument("run", help="run id (or its first characters)")
    for parser in (run, sweep, listing, show, export, report, worker, cancel):
        add_store_argument(parser)
    for parser in (run, sweep, listing, show, export, report, cancel):
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_run_options(parser: argparse.ArgumentParser, add_eval_arguments) -> None:
    add_eval_arguments(parser, template_flag="--eval-template")
    parser.add_argument("--order", default="sequential", help="sequential (one pass per layer) or reference")
    parser.add_argument("--per-row", action="store_true", help="magnitude: one threshold per row")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="device of a worker started by this command")
    parser.add_argument("--data-dir", help="folder with local data files (default: $PRUNESCOPE_DATA_DIR)")


def evaluation_from(args: argparse.Namespace) -> EvalSettings:
    ppl, jsd, tasks = args.ppl, args.jsd, args.tasks
    if not (ppl or jsd or tasks):
        ppl, jsd, tasks = "wikitext2", "alpaca", "unnatural"
    return EvalSettings(ppl=ppl, ppl_seqlen=args.ppl_seqlen, ppl_windows=args.ppl_windows, jsd=jsd, tasks=tasks,
                        limit=args.limit, template=args.eval_template, response_only=not args.all_tokens,
                        log2=args.log2, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        judge_model=args.judge_model, judge_base_url=args.judge_base_url)


def spec_from(args: argparse.Namespace, method: str, sparsity: float, pattern: str, calibration: str) -> RunSpec:
    return RunSpec(method=method, sparsity=sparsity, model=args.model, pattern=pattern, calibration=calibration,
                   nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, template=args.template,
                   order=args.order, per_row=args.per_row, dtype=args.dtype,
                   evaluation=evaluation_from(args)).normalised()


def wait(store: Store, run_ids: list[str], quiet: bool = False) -> None:
    """Poll until every run's latest job is final, drawing one progress line on stderr."""
    from tqdm import tqdm

    bar = None if quiet else tqdm(total=len(run_ids), desc="runs", file=sys.stderr, unit="run", dynamic_ncols=True,
                                  leave=False)
    pending = set(run_ids)
    while pending:
        store.recover_stale()
        for rid in list(pending):
            job = store.latest_job(rid)
            if job is None or job["state"] not in ACTIVE:
                pending.discard(rid)
                if bar:
                    bar.update(1)
            elif bar and job["state"] == "running":
                step = f" {job['done']}/{job['total']}" if job["total"] else ""
                bar.set_postfix_str(f"{rid[:8]} {job['stage']}{step}"[:60])
        if pending:
            time.sleep(POLL_S)
    if bar:
        bar.close()


def outcome(store: Store, rid: str, cached: bool = False) -> dict:
    row = next(r for r in store.runs() if r["run_id"] == rid)
    metrics = store.metrics(rid)
    return {"run_id": rid, "state": row["state"], "cached": cached, "message": row["message"],
            "spec": store.spec(rid).to_dict(), **(metrics["summary"] if metrics else {}),
            "overall_sparsity": row["overall_sparsity"]}


def cmd_run(args: argparse.Namespace) -> dict:
    spec = spec_from(args, args.method, args.sparsity, args.pattern, args.calibration)
    store = Store(args.store)
    submitted = submit(store, spec, args.data_dir, args.device)
    if submitted["cached"]:
        return outcome(store, submitted["run_id"], cached=True)
    if args.detach:
        return {**submitted, "store": str(store.root)}
    wait(store, [submitted["run_id"]])
    result = outcome(store, submitted["run_id"])
    if result["state"] != "done":
        raise RunFailed(f"run {submitted['run_id']} {result['state']}: {result['message']}")
    return result


def cmd_sweep(args: argparse.Namespace) -> dict:
    specs = [spec_from(args, method, sparsity, pattern, calibration)
             for method, sparsity, calibration, pattern in itertools.product(
                 args.methods, args.sparsities, args.calibrations, args.patterns)]
    store = Store(args.store)
    submitted = [submit(store, spec, args.data_dir, args.device) for spec in specs]
    if not args.detach:
        wait(store, [s["run_id"] for s in submitted if not s["cached"]])
    ids = {s["run_id"] for s in submitted}
    rows = [r for r in store.runs() if r["run_id"] in ids]
    return {"runs": rows, "cached": sum(s["cached"] for s in submitted), "queued": len(submitted)}


def cmd_list(args: argparse.Namespace) -> dict:
    store = Store(args.store)
    store.recover_stale()
    return {"store": str(store.root), "runs": store.runs()}


def cmd_show(args: argparse.Namespace) -> dict:
    store = Store(args.store)
    rid = store.find(args.run)
    metrics = store.metrics(rid) or {}
    return {**outcome(store, rid), "job": store.latest_job(rid), "prune": metrics.get("prune"),
            "layers": store.layers(rid), "artifact": str(store.run_folder(rid) / MODEL_ARTIFACT)}


def cmd_export(args: argparse.Namespace) -> dict:
    """Copy out a finished run; a pruned model found missing or damaged is rebuilt first."""
    store = Store(args.store)
    rid = store.find(args.run)
    if store.metrics(rid) is None:
        raise StoreError(f"run {rid} has no results yet (state: {outcome(store, rid)['state']})")
    if not intact(store, rid, full=True):
        print(f"run {rid}: the pruned model is missing or damaged; rebuilding it", file=sys.stderr)
        spec = store.spec(rid)
        job = store.latest_job(rid)
        store.submit(spec, store.fingerprints(rid), rid, artifacts_ok=False, data_dir=job and job["data_dir"])
        start(store.root)
        wait(store, [rid])
        if not intact(store, rid, full=True):
            raise RunFailed(f"run {rid}: rebuilding the pruned model failed: {store.latest_job(rid)['message']}")
    target = Path(args.to).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    artifact = store.artifact(rid, MODEL_ARTIFACT)
    model_dir = target / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(artifact["path"], model_dir)
    copied = problems(model_dir, artifact["files"], full=True)
    if copied:
        raise RunFailed(f"copy to {model_dir} is damaged: {'; '.join(copied)}")
    (target / "metrics.json").write_text(json.dumps({**outcome(store, rid), **(store.metrics(rid) or {})}, indent=1))
    layers = store.layers(rid)
    with open(target / "layers.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[k for k in (layers[0] if layers else {}) if k != "run_id"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(layers)
    with open(target / "records.jsonl", "w", encoding="utf-8") as handle:
        for example in store.examples(rid):
            handle.write(json.dumps(example) + "\n")
    return {"run_id": rid, "to": str(target), "files": sorted(p.name for p in target.iterdir())}


def cmd_report(args: argparse.Namespace) -> dict:
    from backend.report import write_report

    store = Store(args.store)
    rows = store.runs()
    done = [r["run_id"] for r in rows if r["state"] == "done"]
    path = write_report(rows, Path(args.out).expanduser(), {rid: store.layers(rid) for rid in done})
    return {"out": str(path), "runs": len(rows), "done": len(done), "bytes": path.stat().st_size}


def cmd_worker(args: argparse.Namespace) -> dict:
    store = Store(args.store)
    root = store.root
    store.close()
    return {"jobs": serve(root, device=args.device, idle_exit=args.idle_exit)}


def cmd_cancel(args: argparse.Namespace) -> dict:
    store = Store(args.store)
    rid = store.find(args.run)
    state = store.cancel(rid)
    if state is None:
        raise StoreError(f"run {rid} has no queued or running job to cancel")
    return {"run_id": rid, "state": state}


class RunFailed(RuntimeError):
    """A run that ended failed, interrupted or cancelled."""


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def print_runs(rows: list[dict]) -> None:
    print(f"{'run_id':<17}{'model':<14}{'method':<10}{'sparsity':>9}{'pattern':>13} {'calibration':<12}"
          f"{'state':<12}{'progress':<22}{'pid':>7}{'ppl d/p':>16}{'JS':>7}{'F1 d/p':>13}")
    for r in rows:
        print(f"{r['run_id']:<17}{Path(r['model']).name[:13]:<14}{r['method']:<10}{r['sparsity']:>9.2f}"
              f"{r['pattern']:>13} {Path(r['calibration']).name[:11]:<12}{r['state']:<12}{r['progress'][:21]:<22}"
              f"{r['worker_pid'] or '-':>7}{fmt(r['dense_ppl'], '.2f') + '/' + fmt(r['pruned_ppl'], '.2f'):>16}"
              f"{fmt(r['jsd']):>7}{fmt(r['dense_f1']) + '/' + fmt(r['pruned_f1']):>13}")


def print_outcome(result: dict) -> None:
    if "summary" not in result and "dense" not in result:
        print(f"run {result['run_id']}: {result['state']}" + (f" ({result['store']})" if "store" in result else ""))
        return
    print(f"run {result['run_id']}: {result['state']}" + (" (from the store)" if result.get("cached") else ""))
    from backend.cli import print_eval

    print_eval(result)


COMMANDS = {
    "run": (cmd_run, print_outcome),
    "sweep": (cmd_sweep, lambda r: print_runs(r["runs"])),
    "list": (cmd_list, lambda r: print_runs(r["runs"])),
    "show": (cmd_show, lambda r: print(json.dumps(r, indent=1, default=str))),
    "export": (cmd_export, lambda r: print(f"run {r['run_id']} exported to {r['to']}: {', '.join(r['files'])}")),
    "report": (cmd_report, lambda r: print(f"wrote {r['out']} ({r['done']} finished runs of {r['runs']})")),
    "worker": (cmd_worker, lambda r: print(f"worker ran {r['jobs']} job(s)")),
    "cancel": (cmd_cancel, lambda r: print(f"run {r['run_id']}: {r['state']}")),
}
