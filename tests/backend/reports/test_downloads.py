"""A run's downloads built from a real store (made by the real CLI and worker), parsed back and checked against it."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
import zipfile

import pytest

from backend.reports import downloads
from backend.runs import cleanup, service
from backend.runs.protocol import protocol_label
from backend.runs.store import Store
from backend.runs.worker import stop_worker
from tests.conftest import copy_store


@pytest.fixture(scope="module")
def db(filled_store, tmp_path_factory):
    store = Store(copy_store(filled_store, tmp_path_factory.mktemp("downloads") / "store"))
    yield store
    store.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_metrics_csv_is_the_flat_row_and_its_protocol(db):
    for row in db.runs():
        parsed = list(csv.DictReader(io.StringIO(downloads.metrics_csv(row).decode("utf-8"))))
        assert len(parsed) == 1
        line = parsed[0]
        assert line["protocol"] == protocol_label(row["protocol"]) and line["protocol"].startswith("perplexity: ")
        plain = {k: v for k, v in row.items() if not isinstance(v, (dict, list))}
        assert set(line) == set(plain) | {"protocol"}
        for key, value in plain.items():
            if value is None:
                assert line[key] == "", key
            elif isinstance(value, float):
                assert float(line[key]) == value, key
            else:
                assert line[key] == str(value), key
        assert float(line["jsd"]) == row["jsd"] and float(line["pruned_ppl"]) == row["pruned_ppl"]


def test_metrics_json_holds_summary_prune_spec_protocol_provenance(db):
    row = db.runs()[0]
    rid = row["run_id"]
    doc = json.loads(downloads.metrics_json(db, rid))
    stored = db.metrics(rid)
    assert doc["summary"] == stored["summary"] and doc["prune"] == stored["prune"]
    assert doc["spec"] == db.spec(rid).to_dict()
    assert doc["protocol"] == row["protocol"] and doc["protocol_key"] == row["protocol_key"]
    assert doc["protocol_label"] == protocol_label(row["protocol"])
    assert doc["provenance"] == row["provenance"] and doc["provenance"]["code"]
    assert doc["run_id"] == rid and doc["state"] == "done"


def test_records_jsonl_holds_every_example_record(db):
    rid = db.runs()[-1]["run_id"]
    text = downloads.records_jsonl(db, rid).decode("utf-8")
    records = [json.loads(line) for line in text.splitlines()]
    assert records == db.examples(rid)
    assert {r["kind"] for r in records} >= {"task", "divergence"} and text.endswith("\n")


def test_html_report_of_a_run_or_of_its_protocol(db):
    rows = db.runs()
    rid, others = rows[0]["run_id"], [r["run_id"] for r in rows[1:]]
    alone = downloads.report_html(db, rid).decode("utf-8")
    assert alone.startswith("<!DOCTYPE html>") and rid in alone and not any(o in alone for o in others)
    assert "Protocol 1 of 1: " in alone and "· 1 run(s)" in alone
    peers = downloads.report_html(db, rid, same_protocol=True).decode("utf-8")
    assert all(r["run_id"] in peers for r in rows) and "· 4 run(s)" in peers


def test_model_zip_holds_the_folder_byte_for_byte(db, tmp_path):
    rid = db.runs()[1]["run_id"]
    folder = downloads.model_folder(db, rid)
    on_disk = {p.name: p.read_bytes() for p in folder.path.iterdir() if p.is_file()}
    assert set(on_disk) == set(folder.files) and folder.bytes == sum(len(b) for b in on_disk.values())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    data = downloads.model_zip(folder, scratch)
    assert list(scratch.iterdir()) == []   # the temporary archive is gone
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.testzip() is None
    top = downloads.archive_name(rid)
    assert sorted(archive.namelist()) == sorted(f"{top}/{name}" for name in on_disk)
    for name, content in on_disk.items():
        unpacked = archive.read(f"{top}/{name}")
        assert unpacked == content and sha(unpacked) == folder.files[name]["sha256"]


def test_a_changed_model_file_is_refused(db, tmp_path):
    root = copy_store(db.root, tmp_path / "store")
    copy = Store(root)
    rid = copy.runs()[0]["run_id"]
    folder = downloads.model_folder(copy, rid)
    weights = next(folder.path / n for n in folder.files if n.endswith(".safetensors"))
    stat = weights.stat()
    content = bytearray(weights.read_bytes())
    content[-1] ^= 0xFF
    weights.write_bytes(bytes(content))
    with pytest.raises(downloads.ModelMissing, match="does not match its checksum"):
        downloads.model_folder(copy, rid)   # touched since written: the quick check reads the checksum
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    same_size_and_time = downloads.model_folder(copy, rid)
    with pytest.raises(downloads.ModelMissing, match="does not match the checksum recorded"):
        downloads.model_zip(same_size_and_time)   # the archive checks every byte it reads
    copy.close()


def test_a_model_removed_by_gc_is_named_and_rebuilt(db, tmp_path):
    root = copy_store(db.root, tmp_path / "store")
    copy = Store(root)
    rid = copy.runs()[0]["run_id"]
    before = copy.metrics(rid)
    cleanup.gc(copy, keep_models=0)
    with pytest.raises(downloads.ModelMissing) as missing:
        downloads.model_folder(copy, rid)
    text = str(missing.value)
    assert rid in text and "removed by `python -m backend gc`" in text and "submit the run again" in text
    try:
        assert downloads.rebuild_model(copy, rid) == copy.latest_job(rid)["job_id"]
        service.wait(copy, [rid])
    finally:
        stop_worker(root)
    assert copy.latest_job(rid)["state"] == "done" and copy.latest_job(rid)["kind"] == "rebuild"
    folder = downloads.model_folder(copy, rid)
    assert zipfile.ZipFile(io.BytesIO(downloads.model_zip(folder))).testzip() is None
    assert copy.metrics(rid)["summary"] == before["summary"]
    copy.close()


def test_unknown_run_and_unfinished_rebuild_are_refused(db, tmp_path):
    with pytest.raises(downloads.StoreError, match="run 'nope' is not in the store"):
        downloads.metrics_json(db, "nope")
    root = tmp_path / "store"
    shutil.copytree(db.root, root, ignore=shutil.ignore_patterns("*.lock", "runs"))
    copy = Store(root)
    rid = copy.runs()[0]["run_id"]
    spec = dataclasses.replace(copy.spec(rid), seed=7)
    queued = copy.submit(spec, copy.fingerprints(rid), "queued0000000000")
    assert queued.state == "queued"
    with pytest.raises(downloads.StoreError, match="run queued0000000000 has no results yet"):
        downloads.rebuild_model(copy, "queued0000000000", start_worker=False)
    assert copy.latest_job("queued0000000000")["job_id"] == queued.job_id   # nothing else queued
    copy.close()
