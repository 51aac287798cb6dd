"""The Runs page under AppTest over a real store: the filled store's four runs plus one whose job failed for real
in the worker (its calibration file was deleted after it was submitted)."""

from __future__ import annotations

import dataclasses
import fcntl
import os
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from backend.reports.rows import when
from backend.runs import cleanup, service
from backend.runs.protocol import protocol_label
from backend.runs.store import Store
from backend.runs.worker import stop_worker
from tests.conftest import ROOT, copy_store
from views.common import md_escape


@pytest.fixture(autouse=True)
def clear_caches():
    """AppTest instances share one session id: start each test with empty caches."""
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture(scope="module")
def store_with_failure(filled_store, tmp_path_factory) -> tuple[Path, str]:
    """The filled store plus a run that failed in the real worker; returns the store and the failed run's id."""
    root = copy_store(filled_store, tmp_path_factory.mktemp("runs-page") / "store")
    calibration = root.parent / "calibration.txt"
    calibration.write_text("A few sentences to calibrate on, soon gone. " * 100)
    db = Store(root)
    spec = dataclasses.replace(db.spec(db.runs()[0]["run_id"]), calibration=str(calibration))
    submitted = service.submit(db, spec, start_worker=False)
    calibration.unlink()
    service.start(root)
    try:
        service.wait(db, [submitted["run_id"]])
    finally:
        stop_worker(root)
    assert db.latest_job(submitted["run_id"])["state"] == "failed"
    db.close()
    return root, submitted["run_id"]


def open_runs(monkeypatch, store: Path, **params: str | list[str]) -> AppTest:
    monkeypatch.setenv("PRUNESCOPE_STORE", str(store))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.switch_page("views/runs.py")
    at.query_params.update(params)
    return at.run()


def links(at: AppTest) -> dict[str, str]:
    """The page links shown: page name -> query string."""
    return {link.proto.page: link.proto.query_string for link in at.get("page_link")}


def test_every_run_is_listed_with_its_state_protocol_and_error(monkeypatch, store_with_failure):
    root, failed = store_with_failure
    db = Store(root)
    rows = db.runs()
    message = db.latest_job(failed)["message"]
    db.close()
    assert "DataSourceError" in message and "calibration.txt" in message

    at = open_runs(monkeypatch, root)
    assert not at.exception, at.exception
    assert at.title[0].value == "🗂️ Runs"
    table = at.dataframe[0].value
    assert list(table["run"]) == [r["run_id"] for r in rows] and len(table) == 5   # newest first
    by_id = table.set_index("run")
    for r in rows:
        assert by_id.loc[r["run_id"], "state"] == r["state"]
        assert by_id.loc[r["run_id"], "protocol"] == protocol_label(r["protocol"])
        assert by_id.loc[r["run_id"], "created"] == when(r["created_at"])
    assert by_id.loc[failed, "state"] == "failed" and by_id.loc[failed, "message"] == message
    assert {by_id.loc[r["run_id"], "message"] for r in rows if r["run_id"] != failed} == {""}
    assert by_id.loc[failed, "protocol"].startswith("protocol unknown")
    done = [r for r in rows if r["state"] == "done"]
    assert len(done) == 4 and all(by_id.loc[r["run_id"], "protocol"].startswith("perplexity: demo-prose")
                                  for r in done)
    # the failed run's message in full, under the table and for the picked run
    assert at.expander[0].label == "Why 1 run(s) did not finish"
    assert message in [c.value for c in at.code]

    at = open_runs(monkeypatch, root, run=failed)
    assert not at.exception, at.exception
    assert at.error and "This run failed" in at.error[0].value
    assert message in [c.value for c in at.code]
    assert links(at) == {"run": f"run={failed}"}   # no layers or generations without results
    assert any("once it has finished" in c.value for c in at.caption)

    first = done[0]["run_id"]
    at = open_runs(monkeypatch, root, run=first)
    assert not at.exception, at.exception
    assert at.query_params["run"] == first
    assert links(at) == {page: f"run={first}" for page in ("run", "layers", "generations")}
    assert any(md_escape(protocol_label(done[0]["protocol"])) in c.value for c in at.caption)
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels == ["Metrics (.csv)", "Metrics (.json)", "Records (.jsonl)", "Report of this run (.html)",
                      "Report of the 4 run(s) with its protocol (.html)",
                      next(x for x in labels if x.startswith("Pruned model (.zip, about "))]
    assert str(root / "runs" / first / "model") in [c.value for c in at.code]


def test_the_state_filter_lives_in_the_url(monkeypatch, store_with_failure):
    root, failed = store_with_failure
    at = open_runs(monkeypatch, root, state="failed")
    assert not at.exception, at.exception
    assert list(at.dataframe[0].value["run"]) == [failed]
    assert at.selectbox(key="pick-run").value == failed

    at.multiselect(key="filter-state").set_value(["done"]).run()
    assert not at.exception, at.exception
    assert set(at.dataframe[0].value["state"]) == {"done"} and len(at.dataframe[0].value) == 4
    assert at.query_params["state"] == "done"
    at.multiselect(key="filter-state").set_value([]).run()
    assert len(at.dataframe[0].value) == 5 and "state" not in at.query_params


def test_a_missing_model_says_how_to_rebuild_it(monkeypatch, store_with_failure, tmp_path):
    root = copy_store(store_with_failure[0], tmp_path / "store")
    db = Store(root)
    newest = next(r["run_id"] for r in db.runs() if r["state"] == "done")
    cleanup.gc(db, keep_models=0)
    db.close()
    at = open_runs(monkeypatch, root, run=newest)
    assert not at.exception, at.exception
    assert at.warning and "has no pruned model in the store" in at.warning[0].value
    assert "submit the run again" in at.warning[0].value and "Rebuild the pruned model" in at.warning[0].value
    assert "Pruned model (.zip" not in " ".join(b.proto.label for b in at.get("download_button"))

    # Rebuild queues a job that prunes the run again, then the Run page follows it
    db = Store(root)
    try:
        at.button(key="rebuild").click().run()
        assert not at.exception, at.exception
        job = db.latest_job(newest)
        assert job["kind"] == "rebuild" and at.query_params["run"] == newest
        assert at.title[0].value.startswith("🚀 Run")   # switched to the Run page
        service.wait(db, [newest])
    finally:
        stop_worker(root)
    assert db.latest_job(newest)["state"] == "done" and db.artifact(newest, "model")["path"].is_dir()
    db.close()


def test_delete_needs_the_tick_and_refuses_an_active_run(monkeypatch, store_with_failure, tmp_path):
    root = copy_store(store_with_failure[0], tmp_path / "store")
    db = Store(root)
    ids = [r["run_id"] for r in db.runs()]
    gone, busy = ids[1], ids[2]   # ids[0] is the failed run
    assert db.run_folder(gone).is_dir()
    at = open_runs(monkeypatch, root, run=gone)
    at.button(key="runs-delete-button").click().run()
    assert at.warning and "Tick the confirmation" in at.warning[0].value
    assert [r["run_id"] for r in db.runs()] == ids and db.run_folder(gone).exists()

    at.checkbox(key="runs-delete-confirm-0").check()
    at.button(key="runs-delete-button").click().run()
    assert not at.exception, at.exception
    notice = at.success[0].value
    assert notice.startswith(f"Deleted run {gone}: ") and "freed (" in notice and "the store now holds 4 runs" in notice
    freed = int(notice.split("freed (")[1].split(" bytes")[0])
    assert freed > 0
    assert [r["run_id"] for r in db.runs()] == [rid for rid in ids if rid != gone]
    assert not db.run_folder(gone).exists()
    assert gone not in list(at.dataframe[0].value["run"]) and db.integrity() == "ok"

    # a running job (this process holds the worker lock and claimed it) is refused with the backend's message
    with open(root / "worker.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        db.submit(db.spec(busy), db.fingerprints(busy), busy, artifacts_ok=False)
        assert db.claim_next(pid=os.getpid())["run_id"] == busy
        db.progress(db.latest_job(busy)["job_id"], "pruning", 1, 2)
        at.selectbox(key="pick-run").set_value(busy).run()
        assert not at.exception, at.exception
        bars = at.get("progress")
        assert len(bars) == 2 and "pruning: 1/2 decoder layers" in bars[1].proto.text   # the overall bar, then the stage
        assert at.dataframe[0].value.set_index("run").loc[busy, "stage"] == "pruning 1/2"
        at.checkbox(key="runs-delete-confirm-1").check()
        at.button(key="runs-delete-button").click().run()
        assert at.error and "has a running job: cancel it first" in at.error[0].value
        assert db.latest_job(busy)["state"] == "running" and db.run_folder(busy).is_dir()
        assert busy in {r["run_id"] for r in db.runs()}
    db.close()
