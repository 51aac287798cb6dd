"""A judge key typed for another endpoint stays in the submitting process's memory and reaches only the worker of
that run; the server's key never goes to that endpoint; no key is written anywhere."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import replace

import pytest

from backend.runs import keys
from backend.runs.service import submit, wait
from backend.runs.spec import EvalSettings, RunSpec, SpecError
from backend.runs.store import Store
from backend.runs.worker import stop_worker
from tests.conftest import ROOT
from tests.metrics.test_judge import server  # noqa: F401  (the local chat-completions fixture)


def fetch_in_another_process(store, run_id) -> str:
    code = "import sys; from backend.runs import keys; print(keys.fetch(sys.argv[1], sys.argv[2]))"
    return subprocess.run([sys.executable, "-c", code, str(store), run_id], cwd=ROOT, capture_output=True,
                          text=True, timeout=60).stdout.strip()


def test_an_offered_key_is_served_to_this_users_processes_until_withdrawn(tmp_path):
    keys.offer(tmp_path, "run-a", "FORM-KEY-1")
    try:
        path = keys._socket_path(tmp_path, "run-a")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert fetch_in_another_process(tmp_path, "run-a") == "FORM-KEY-1"
        assert keys.fetch(tmp_path, "run-b") is None
    finally:
        keys.withdraw(tmp_path, "run-a")
    assert fetch_in_another_process(tmp_path, "run-a") == "None"


def test_a_run_judged_at_another_endpoint_uses_only_the_key_typed_for_it(tmp_path, tiny_folder, server,  # noqa: F811
                                                                       monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "SERVER-KEY-9")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    store = Store(tmp_path / "store")
    spec = RunSpec(method="magnitude", sparsity=0.5, model=str(tiny_folder), calibration="demo-prose", nsamples=2,
                   seqlen=32, evaluation=EvalSettings(ppl=None, jsd=None, tasks="demo", limit=3, max_new_tokens=4,
                                                      judge_model="judge-test", judge_base_url=server.url))
    with pytest.raises(SpecError, match="is not the server's .* whose key is never sent elsewhere: give its own key"):
        submit(store, spec, start_worker=False)
    try:
        queued = submit(store, spec, judge_key="FORM-KEY-7")
        wait(store, [queued["run_id"]])
    finally:
        stop_worker(store.root)
        keys.withdraw(store.root, queued["run_id"])
    row = next(r for r in store.runs() if r["run_id"] == queued["run_id"])
    assert row["state"] == "done", row["message"]
    assert row["pruned_judge"] is not None and row["dense_judge"] is not None
    sent = {request["headers"]["authorization"] for request in server.requests}
    assert sent == {"Bearer FORM-KEY-7"}
    for folder, _, files in os.walk(store.root):
        for name in files:
            data = open(os.path.join(folder, name), "rb").read()
            assert b"FORM-KEY-7" not in data and b"SERVER-KEY-9" not in data, name
    again = replace(spec, seed=1)
    with pytest.raises(SpecError, match="give its own key"):
        submit(store, again, start_worker=False)
