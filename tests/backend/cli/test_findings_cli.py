"""`findings` and `study` on the command line: verdicts as text and JSON, one clear line for bad input, and the
quick paper study end to end on a tiny model (queued, resumed from the store, then its findings)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from backend.findings.study import Cell, cells
from backend.runs.store import Store
from backend.runs.worker import stop_worker
from tests.backend.findings.handmade import EVALUATION, add_run, handmade_store, units
from tests.backend.findings.test_claims import FAILS
from tests.conftest import SHARED_DATA, backend_cli, error_line, needs_shared, run_cli


@pytest.fixture
def failing_store(tmp_path):
    runs = {Cell(m, s, "unstructured", c): units(r, d, jsd=0.5 - d, seed=i)
            for i, ((m, s, c), (r, d)) in enumerate(FAILS.items())}
    handmade_store(tmp_path, runs)
    return tmp_path


def test_findings_as_text_and_json(failing_store, capsys):
    code, out, _ = run_cli(["findings", "--store", str(failing_store)], capsys)
    assert code == 0
    for claim in (1, 2, 3):
        assert f"Claim {claim}: NOT HELD" in out
    assert out.count("  rule: ") == 3 and "perplexity ratio (pruned / dense)" in out and "predictors:" in out
    code, out, _ = run_cli(["findings", "--store", str(failing_store), "--json", "--close-ppl", "6"], capsys)
    result = json.loads(out)
    assert [c["verdict"] for c in result["claims"]] == ["held", "not held", "not held"]
    assert result["close_ppl_ratio"] == 6 and result["bootstrap"]["resamples"] == 2000
    assert result["missing"] == [] and "queue_command" not in result


def test_an_empty_store_names_the_missing_runs_and_the_command_that_queues_them(tmp_path, capsys):
    code, out, _ = run_cli(["findings", "--store", str(tmp_path)], capsys)
    assert code == 0 and out.count(": INCONCLUSIVE") == 3
    assert f"{len(cells('quick'))} run(s) missing to decide" in out
    assert f"queue exactly these: python -m backend findings --queue --store {tmp_path}" in out


@pytest.mark.parametrize("args,expected", [
    (["--close-ppl", "0.9"], "--close-ppl 0.9 is not allowed: use a ratio above 1"),
    (["--task", "bleu"], "argument --task: task score 'bleu' is not allowed: use em, f1, rouge1, judge or an lm-eval "
                         "score lm:TASK:METRIC"),
    (["--cohort", "nope"], "cohort 'nope' is not among this store's finished runs: use no --cohort"),
])
def test_bad_findings_arguments_give_one_line(args, expected, tmp_path, capsys):
    code, _, err = run_cli(["findings", "--store", str(tmp_path), *args], capsys)
    assert code == 2 and expected in error_line(err)


def test_a_study_that_cannot_run_queues_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PRUNESCOPE_DATA_DIR", raising=False)
    code, _, err = run_cli(["study", "paper", "--quick", "--store", str(tmp_path), "--data-dir", str(tmp_path)],
                           capsys)
    assert code == 2 and "not available offline" in error_line(err)
    assert Store(tmp_path).runs() == []
    code, _, err = run_cli(["study", "paper", "--quick", "--limit", "0", "--store", str(tmp_path)], capsys)
    assert code == 2 and "limit 0 is not allowed" in error_line(err)


TINY_STUDY = ("--nsamples", "2", "--seqlen", "32", "--limit", "4", "--jsd-limit", "4", "--ppl-windows", "2",
              "--ppl-seqlen", "32", "--max-new-tokens", "2")


@pytest.mark.slow
@needs_shared
@pytest.mark.timeout(600)
def test_the_quick_paper_study_end_to_end_and_resumed(tmp_path, tiny_folder, capsys):
    store = tmp_path / "store"
    try:
        first = backend_cli(store, "study", "paper", "--quick", "--model", str(tiny_folder), *TINY_STUDY,
                            "--data-dir", str(SHARED_DATA), "--detach")
        assert first["runs"] == len(cells("quick")) and first["cached"] == 0
        done = backend_cli(store, "study", "paper", "--quick", "--model", str(tiny_folder), *TINY_STUDY,
                           "--data-dir", str(SHARED_DATA))
        assert done["run_ids"] == first["run_ids"] and done["states"] == {"done": len(cells("quick"))}
        findings = done["findings"]
        assert len(findings["claims"]) == 3 and findings["missing"] == []
        assert all(c["verdict"] in ("held", "not held", "inconclusive") for c in findings["claims"])
        db = Store(store)
        made = sorted(Cell(r["method"], r["sparsity"], r["pattern"], r["calibration"]) for r in db.runs())
        assert made == sorted(cells("quick"))
        assert all(r["intervals"] and r["nsamples"] == 2 for r in db.runs())
        code, out, _ = run_cli(["study", "paper", "--quick", "--model", str(tiny_folder), *TINY_STUDY, "--data-dir",
                                str(SHARED_DATA), "--detach", "--store", str(store), "--json"], capsys)
        assert code == 0 and json.loads(out)["cached"] == len(cells("quick"))  # resumed: every run from the store
    finally:
        stop_worker(store)


def test_compare_two_runs_paired_over_their_units(failing_store, capsys):
    rows = {(r["method"], r["sparsity"], r["calibration"]): r["run_id"] for r in Store(failing_store).runs()}
    a, b = rows["wanda", 0.5, "c4"], rows["wanda", 0.5, "alpaca"]
    code, out, _ = run_cli(["compare", a[:8], b[:8], "--store", str(failing_store)], capsys)
    assert code == 0 and "A " + a[:8] in out and "wanda 50% unstructured · alpaca calibration" in out
    code, out, _ = run_cli(["compare", a, b, "--store", str(failing_store), "--json"], capsys)
    found = {d["metric"]: d for d in json.loads(out)["differences"]}
    assert set(found) == {"ppl", "jsd", "kl_dense_pruned", "kl_pruned_dense", "flip_rate", "em", "f1", "rouge1"}
    assert found["f1"]["point"] == pytest.approx(-0.10, abs=0.01) and found["f1"]["reading"] == "B lower"
    assert found["f1"]["units"] == 48 and found["f1"]["unit"] == "examples" and found["ppl"]["unit"] == "windows"


def test_compare_refuses_runs_of_two_protocols(failing_store, capsys):
    db = Store(failing_store)
    other = add_run(db, Cell("wanda", 0.5), units(1.2, 0.1, 0.1), evaluation=replace(EVALUATION, max_new_tokens=8))
    with db.write() as conn:  # its measured protocol says so too
        summary = json.loads(conn.execute("SELECT summary FROM metrics WHERE run_id = ?", (other,)).fetchone()[0])
        summary["protocol"]["tasks"]["max_new_tokens"] = 8
        conn.execute("UPDATE metrics SET summary = ? WHERE run_id = ?", (json.dumps(summary), other))
    first = next(r["run_id"] for r in db.runs() if r["run_id"] != other)
    code, _, err = run_cli(["compare", first, other, "--store", str(failing_store)], capsys)
    assert code == 2 and "measured with different protocols" in error_line(err)
