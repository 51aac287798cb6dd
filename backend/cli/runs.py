"""Store commands: run, sweep, list, show, export, report, worker, cancel. Everything up to finding a cached run is
torch-free, so a finished run is served in well under a second."""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import sys
from pathlib import Path

from backend.cli.arguments import spec_from
from backend.runs.artifacts import MODEL_ARTIFACT, intact, problems
from backend.runs.locations import copy_folder
from backend.runs.service import start, submit, submit_many
from backend.runs.service import wait as wait_for
from backend.runs.store import ACTIVE, Store, StoreError
from backend.runs.worker import ARTIFACTS_ENV, EXECUTOR_ENV, RAY_ADDRESS_ENV, serve

POLL_S = 0.5


def wait(store: Store, run_ids: list[str], quiet: bool = False) -> None:
    """Wait for the runs, drawing one progress line on stderr."""
    from tqdm import tqdm

    bar = None if quiet else tqdm(total=len(run_ids), desc="runs", file=sys.stderr, unit="run", dynamic_ncols=True,
                                  leave=False)

    def on_update(rid: str, job: dict | None) -> None:
        if bar is None:
            return
        if job is None or job["state"] not in ACTIVE:
            bar.update(1)
        elif job["state"] == "running":
            step = f" {job['done']}/{job['total']}" if job["total"] else ""
            bar.set_postfix_str(f"{rid[:8]} {job['stage']}{step}"[:60])

    wait_for(store, run_ids, on_update, POLL_S)
    if bar:
        bar.close()


def outcome(store: Store, rid: str, cached: bool = False) -> dict:
    """A run's state, spec and summary (its intervals, not the per-unit values behind them: `export` writes those)."""
    row = next(r for r in store.runs() if r["run_id"] == rid)
    metrics = store.metrics(rid)
    summary = {k: v for k, v in (metrics["summary"] if metrics else {}).items() if k != "units"}
    return {"run_id": rid, "state": row["state"], "cached": cached, "message": row["message"],
            "spec": store.spec(rid).to_dict(), **summary,
            "overall_sparsity": row["overall_sparsity"], "provenance": row["provenance"],
            "other_code": row["other_code"]}


def use_executor(args: argparse.Namespace) -> None:
    """--executor/--ray-address for the worker this command may start (it reads them from the environment); a
    cluster that does not answer is refused before anything is queued."""
    for flag, value in (("--ray-address", args.ray_address), ("--artifacts", args.artifacts)):
        if value and args.executor != "ray":
            raise ValueError(f"{flag} is a setting of --executor ray: give both")
    if args.executor == "ray":
        from backend.runs.dispatch import address_problem, artifacts_problem
        problem = address_problem(args.ray_address) or artifacts_problem(args.artifacts)
        if problem:
            raise ValueError(problem)
    if args.artifacts:
        os.environ[ARTIFACTS_ENV] = args.artifacts
    if args.executor:
        os.environ[EXECUTOR_ENV] = args.executor
    if args.ray_address:
        os.environ[RAY_ADDRESS_ENV] = args.ray_address


def cmd_run(args: argparse.Namespace) -> dict:
    use_executor(args)
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
    use_executor(args)
    specs = [spec_from(args, method, sparsity, pattern, calibration, allocation)
             for method, sparsity, calibration, pattern, allocation in itertools.product(
                 args.methods, args.sparsities, args.calibrations, args.patterns, args.allocations)]
    store = Store(args.store)
    submitted = submit_many(store, specs, args.data_dir, args.device)
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


EXPORT_FILES = ("metrics.json", "layers.csv", "records.jsonl")


def check_export(to: str, overwrite: bool) -> tuple[Path, Path]:
    """The export folder and its model/ folder, checked before any work: model/ must be new, empty or (with
    --overwrite) one PruneScope wrote; the three files are replaced only with --overwrite. Other files in the
    folder are left alone."""
    from backend.runs.export import check_target

    target = Path(to).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file, not a folder: give a folder to export into")
    model_dir = check_target(target / MODEL_ARTIFACT, overwrite)
    existing = [name for name in EXPORT_FILES if os.path.lexists(target / name)]
    for name in existing:
        if (target / name).is_dir() or (target / name).is_symlink():
            raise ValueError(f"{target / name} is not a plain file: pick another folder to export into")
    if existing and not overwrite:
        raise ValueError(f"{target} already holds {', '.join(existing)}: add --overwrite to replace them, or pick "
                         f"another folder")
    return target, model_dir


def cmd_export(args: argparse.Namespace) -> dict:
    """Copy out a finished run; a pruned model found missing or damaged is rebuilt first. Nothing already in the
    folder is removed: model/ is swapped in atomically and the three files are each replaced atomically."""
    from backend.runs.export import write_folder, write_text

    store = Store(args.store)
    rid = store.find(args.run)
    if store.metrics(rid) is None:
        raise StoreError(f"run {rid} has no results yet (state: {outcome(store, rid)['state']})")
    target, model_dir = check_export(args.to, args.overwrite)
    if not intact(store, rid, full=True):
        print(f"run {rid}: the pruned model is missing or damaged; rebuilding it", file=sys.stderr)
        spec = store.spec(rid)
        job = store.latest_job(rid)
        store.submit(spec, store.fingerprints(rid), rid, artifacts_ok=False, data_dir=job and job["data_dir"])
        start(store.root)
        wait(store, [rid])
        if not intact(store, rid, full=True):
            raise RunFailed(f"run {rid}: rebuilding the pruned model failed: {store.latest_job(rid)['message']}")
    artifact = store.artifact(rid, MODEL_ARTIFACT)

    def copy_model(tmp: Path) -> None:
        copy_folder(artifact["path"], tmp, list(artifact["files"]))
        copied = problems(tmp, artifact["files"], full=True)
        if copied:
            raise RunFailed(f"copy to {model_dir} is damaged: {'; '.join(copied)}")

    write_folder(model_dir, copy_model, overwrite=args.overwrite,
                 needed_bytes=sum(f["bytes"] for f in artifact["files"].values()))
    write_text(target / "metrics.json", json.dumps({**outcome(store, rid), **(store.metrics(rid) or {})}, indent=1))
    layers = store.layers(rid)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=[k for k in (layers[0] if layers else {}) if k != "run_id"],
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(layers)
    write_text(target / "layers.csv", table.getvalue())
    write_text(target / "records.jsonl", "".join(json.dumps(example) + "\n" for example in store.examples(rid)))
    return {"run_id": rid, "to": str(target), "files": sorted((MODEL_ARTIFACT, *EXPORT_FILES))}


def cmd_report(args: argparse.Namespace) -> dict:
    """Write the HTML report of every run; the result names the protocol groups and which runs each holds."""
    from backend.findings.evidence import units_of_run
    from backend.reports.html import protocol_groups, write_report

    store = Store(args.store)
    rows = store.runs()
    done = [r["run_id"] for r in rows if r["state"] == "done"]
    path = write_report(rows, Path(args.out).expanduser(), {rid: store.layers(rid) for rid in done},
                        units_by_run={rid: units_of_run(store, rid) for rid in done})
    return {"out": str(path), "runs": len(rows), "done": len(done), "bytes": path.stat().st_size,
            "groups": protocol_groups(rows)}


def cmd_worker(args: argparse.Namespace) -> dict:
    store = Store(args.store)
    root = store.root
    store.close()
    if args.executor == "ray":
        from backend.runs.dispatch import (
            Resources,
            address_problem,
            artifacts_problem,
            serve_ray,
        )
        from backend.sources.models import parse_size
        problem = address_problem(args.ray_address) or artifacts_problem(args.artifacts)
        if problem:
            raise ValueError(problem)
        for flag, value, least in (("--cpus-per-job", args.cpus_per_job, "above 0"),
                                   ("--gpus-per-job", args.gpus_per_job, "of at least 0"),
                                   ("--max-retries", args.max_retries, "of at least 0")):
            if value < 0 or (value == 0 and least == "above 0"):
                raise ValueError(f"{flag} {value:g} is not allowed: use a number {least}")
        memory = parse_size(args.memory_per_job, "--memory-per-job") if args.memory_per_job else None
        resources = Resources(num_cpus=args.cpus_per_job, num_gpus=args.gpus_per_job, memory=memory,
                              max_retries=args.max_retries)
        return {"jobs": serve_ray(root, address=args.ray_address, device=args.device, idle_exit=args.idle_exit,
                                  resources=resources, artifacts=args.artifacts)}
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
