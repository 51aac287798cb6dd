"""What a run's downloads hold, built from the store: its metrics as CSV and JSON, its records as JSONL, the HTML
report, and its pruned model folder as a zip archive (streamed through a temporary file, checked as it is read)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from backend.findings.evidence import units_of_run
from backend.reports.html import build_html
from backend.runs.artifacts import MODEL_ARTIFACT, problems
from backend.runs.locations import copy_folder, is_url
from backend.runs.protocol import protocol_label
from backend.runs.service import start
from backend.runs.store import Store, StoreError
from backend.sources.names import cache_dir

CHUNK = 1 << 20


class ModelMissing(StoreError):
    """A run's pruned model is not on disk as it was written (never written, removed by gc, or damaged)."""


@dataclass(frozen=True)
class ModelFolder:
    """A run's pruned model folder as the store recorded it: where it is, its files (bytes, sha256), its size."""

    run_id: str
    path: Path
    files: dict[str, dict]

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())


def run_row(store: Store, run_id: str) -> dict:
    """The flat row of one run (as `Store.runs()` gives it); an error names a run the store does not hold."""
    row = next((r for r in store.runs() if r["run_id"] == run_id), None)
    if row is None:
        raise StoreError(f"run {run_id!r} is not in the store {store.root} (see `python -m backend list`)")
    return row


def _flat(row: dict) -> dict:
    """The row's plain values (its nested provenance and protocol left out) and its protocol as one line."""
    flat = {k: v for k, v in row.items() if not isinstance(v, (dict, list, tuple))}
    return {**flat, "protocol": protocol_label(row.get("protocol") or {})}


def metrics_csv(row: dict) -> bytes:
    """A run's metrics as a CSV of one row: every plain value of its flat row, then its protocol label."""
    flat = _flat(row)
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(flat))
    writer.writeheader()
    writer.writerow(flat)
    return out.getvalue().encode("utf-8")


def metrics_json(store: Store, run_id: str) -> bytes:
    """A run's results as JSON: state, spec, protocol (with its label and key), provenance, the evaluation's
    summary and the prune report."""
    row = run_row(store, run_id)
    metrics = store.metrics(run_id) or {}
    doc = {"run_id": run_id, "state": row["state"], "message": row["message"], "spec": store.spec(run_id).to_dict(),
           "protocol_label": protocol_label(row["protocol"]), "protocol_key": row["protocol_key"],
           "protocol": row["protocol"], "provenance": row["provenance"], "summary": metrics.get("summary"),
           "prune": metrics.get("prune")}
    return json.dumps(doc, indent=1, default=str).encode("utf-8")


def records_jsonl(store: Store, run_id: str) -> bytes:
    """Every example record of a run, one JSON object a line, in the order they were written."""
    return "".join(json.dumps(example) + "\n" for example in store.examples(run_id)).encode("utf-8")


def report_rows(store: Store, run_id: str, same_protocol: bool = False) -> list[dict]:
    """The rows a run's report covers: the run alone, or every finished run measured with its protocol."""
    row = run_row(store, run_id)
    if not same_protocol:
        return [row]
    return [r for r in store.runs() if r["state"] == "done" and r["protocol_key"] == row["protocol_key"]] or [row]


def report_html(store: Store, run_id: str, same_protocol: bool = False) -> bytes:
    """The self-contained HTML report of one run, or of the finished runs sharing its protocol."""
    rows = report_rows(store, run_id, same_protocol)
    layers = {r["run_id"]: store.layers(r["run_id"]) for r in rows if r["state"] == "done"}
    what = f"runs measured like {run_id[:8]}" if same_protocol else f"run {run_id[:8]}"
    units = {rid: units_of_run(store, rid) for rid in layers}
    return build_html(rows, layers, title=f"PruneScope report: {what}", units_by_run=units).encode("utf-8")


def model_folder(store: Store, run_id: str) -> ModelFolder:
    """A run's pruned model folder, checked against its recorded sizes; ModelMissing says why it is not there and
    how to get it back."""
    artifact = store.artifact(run_id, MODEL_ARTIFACT)
    rebuild = (f"submit the run again to rebuild it: 'Rebuild the pruned model' on the Runs page, or "
               f"`python -m backend export {run_id[:8]} --to FOLDER` (it prunes the model again and exports it)")
    if artifact is None:
        raise ModelMissing(f"run {run_id} has no pruned model in the store (never written, or removed by "
                           f"`python -m backend gc`): {rebuild}")
    path = artifact["path"]
    found = problems(path, artifact["files"]) if is_url(path) or path.is_dir() else ["the folder is missing"]
    if found:
        raise ModelMissing(f"the pruned model of run {run_id} at {path} is not as it was written "
                           f"({'; '.join(found[:3])}): {rebuild}")
    if is_url(path):  # a copy on this machine, which the archive's checksums then check
        local = cache_dir() / "artifacts" / run_id
        if problems(local, artifact["files"], full=True):
            copy_folder(path, local, list(artifact["files"]))
        path = local
    return ModelFolder(run_id, path, artifact["files"])


def archive_name(run_id: str) -> str:
    """The folder the archive unpacks into, and (with .zip) its file name."""
    return f"prunescope-{run_id[:12]}-model"


def write_model_zip(folder: ModelFolder, out: BinaryIO) -> None:
    """Stream the model folder's recorded files into a zip archive on `out`, a chunk at a time, each checked against
    its recorded sha256 as it is read; ModelMissing when a file changed since it was written."""
    top = archive_name(folder.run_id)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, expected in sorted(folder.files.items()):
            path = folder.path / name
            info = zipfile.ZipInfo.from_file(path, f"{top}/{name}")
            info.compress_type = zipfile.ZIP_DEFLATED
            digest = hashlib.sha256()
            try:
                with open(path, "rb") as source, archive.open(info, "w") as target:
                    while chunk := source.read(CHUNK):
                        digest.update(chunk)
                        target.write(chunk)
            except FileNotFoundError:
                raise ModelMissing(f"{path} disappeared while it was archived: rebuild the run's model") from None
            if digest.hexdigest() != expected["sha256"]:
                raise ModelMissing(f"{path} does not match the checksum recorded when it was written: rebuild the "
                                   f"run's model (`python -m backend export {folder.run_id[:8]} --to FOLDER`)")


def model_zip(folder: ModelFolder, scratch: str | Path | None = None) -> bytes:
    """The model folder as zip bytes: written to an unnamed temporary file (in `scratch`, default the system's),
    then read back once, so the archive is held in memory once and nothing is left on disk."""
    with tempfile.TemporaryFile(dir=scratch) as handle:
        write_model_zip(folder, handle)
        handle.seek(0)
        return handle.read()


def rebuild_model(store: Store, run_id: str, start_worker: bool = True) -> int:
    """Queue a job that prunes a finished run again with its own spec, data fingerprints and data folder, to write
    its pruned model back (its results stay); starts the worker. Returns the job id (the active one when a job
    already runs)."""
    if store.metrics(run_id) is None:
        raise StoreError(f"run {run_id} has no results yet: submit it on the Run page instead of rebuilding it")
    job = store.latest_job(run_id)
    submission = store.submit(store.spec(run_id), store.fingerprints(run_id), run_id, artifacts_ok=False,
                              data_dir=job and job["data_dir"])
    if start_worker:
        start(store.root)
    return submission.job_id
