"""A run id means exactly one experiment: it changes with everything that changes results (dtype, device type,
code, libraries, tokenizer, chat template, generation config) and not with what does not (the order of flags)."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace

import pytest

from backend.runs.identity import code_version, device_type, provenance
from backend.runs.spec import (
    EvalSettings,
    RunSpec,
    SpecError,
    fingerprints,
    prune_key,
    run_id,
)
from backend.runs.store import Store
from tests.conftest import ROOT

EVAL = EvalSettings(ppl="demo-prose", ppl_seqlen=64, ppl_windows=2, jsd=None, tasks=None)


def identity(spec: RunSpec, device: str = "auto") -> str:
    spec = spec.normalised()
    return run_id(spec, fingerprints(spec, device=device))


@pytest.fixture
def folder(tiny_folder, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_folder, copy)
    return copy


def spec_of(folder, **changes) -> RunSpec:
    return replace(RunSpec(method="wanda", sparsity=0.5, model=str(folder), calibration="demo-prose", nsamples=4,
                           seqlen=64, evaluation=EVAL), **changes)


def test_the_id_changes_with_dtype_and_device_type(folder):
    base = identity(spec_of(folder))
    assert identity(spec_of(folder, dtype="bfloat16")) != base
    assert identity(spec_of(folder), device="cuda") != base
    assert identity(spec_of(folder), device="cpu") == base == identity(spec_of(folder))
    assert provenance("cuda:1", "auto")["dtype"] == "bfloat16" and provenance("cpu")["dtype"] == "float32"
    assert device_type("cuda:1") == "cuda"


@pytest.mark.parametrize("name,change", [
    ("tokenizer_config.json", lambda d: {**d, "model_max_length": 77}),
    ("tokenizer_config.json", lambda d: {**d, "chat_template": "{{ messages[0]['content'] }}"}),
    ("generation_config.json", lambda d: {**d, "eos_token_id": [1, 2]}),
])
def test_the_id_changes_with_tokenizer_chat_template_and_generation_config(folder, name, change):
    before = identity(spec_of(folder))
    path = folder / name
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(change(data)))
    assert identity(spec_of(folder)) != before


def test_the_id_carries_the_code_and_library_versions():
    prints = fingerprints(RunSpec(method="wanda", sparsity=0.5, calibration="demo-prose", evaluation=EVAL).normalised())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert prints["provenance"]["code"] == code_version() and commit[:12] in code_version()
    from importlib import metadata
    assert prints["provenance"]["torch"] == metadata.version("torch")
    assert prints["provenance"]["transformers"] == metadata.version("transformers")


def test_the_order_of_cli_flags_does_not_change_the_id(tiny_folder, tmp_path):
    """The CLI's own parser and submission (no worker started: only the ids matter) in two flag orders."""
    from backend.cli.arguments import spec_from
    from backend.cli.parser import build_parser
    from backend.runs.service import submit

    flags = [["--method", "wanda", "--sparsity", "0.5"], ["--calibration", "demo-prose", "--nsamples", "4"],
             ["--seqlen", "64", "--model", str(tiny_folder)], ["--ppl", "demo-prose", "--ppl-seqlen", "64"]]
    ids = []
    for order in (flags, flags[::-1]):
        args = build_parser().parse_args(["run", *sum(order, []), "--store", str(tmp_path)])
        spec = spec_from(args, args.method, args.sparsity, args.pattern, args.calibration)
        ids.append(submit(Store(args.store), spec, args.data_dir, args.device, start_worker=False)["run_id"])
    assert ids[0] == ids[1] and Store(tmp_path).db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1


def test_a_hub_model_with_no_known_commit_is_refused_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(SpecError, match="'org/never-downloaded' is not in the local Hugging Face cache"):
        fingerprints(RunSpec(method="wanda", sparsity=0.5, model="org/never-downloaded", evaluation=EVAL))
    ref = tmp_path / "hub" / "models--org--cached" / "refs"
    ref.mkdir(parents=True)
    (ref / "main").write_text("abc123")
    prints = fingerprints(RunSpec(method="wanda", sparsity=0.5, model="org/cached", evaluation=EVAL))
    assert prints["model"] == "hub:org/cached@abc123"


def test_a_run_made_by_other_code_is_labelled_and_a_new_submission_computes_it_again(folder, tmp_path):
    store = Store(tmp_path / "store")
    spec = spec_of(folder).normalised()
    prints = fingerprints(spec)
    old = {**prints, "provenance": {**prints["provenance"], "code": "0.3.0+0123456789ab"}}
    old_id = run_id(spec, old)
    store.submit(spec, old, old_id)
    job = store.claim_next(pid=1)
    store.save_results(old_id, {"overall_sparsity": 0.5}, [], {"dense": {"ppl": 3.0}, "pruned": {"ppl": 4.0}}, [])
    assert store.finish(job["job_id"], "done", worker_pid=1)
    row = next(r for r in store.runs() if r["run_id"] == old_id)
    assert row["other_code"] and row["code"] == "0.3.0+0123456789ab"
    new_id = run_id(spec, prints)
    assert new_id != old_id
    again = store.submit(spec, prints, new_id)
    assert not again.cached and again.state == "queued"


def test_lm_eval_settings_split_ids_only_when_set_and_follow_the_task_files(folder, tmp_path):
    base = spec_of(folder)
    assert "lm_eval" not in base.to_dict()["evaluation"]  # runs stored before lm-eval existed keep their ids
    tasks = tmp_path / "tasks"
    shutil.copytree(ROOT / "backend" / "sources" / "demo" / "lm_eval", tasks)
    scored = spec_of(folder, evaluation=replace(EVAL, lm_eval=["prunescope_facts"], lm_eval_include=str(tasks)))
    assert RunSpec.from_dict(json.loads(json.dumps(scored.normalised().to_dict()))) == scored.normalised()
    first = identity(scored)
    assert first != identity(base)
    assert identity(spec_of(folder, evaluation=replace(scored.evaluation, lm_eval_limit=10))) != first
    data = tasks / "prunescope_facts.jsonl"
    data.write_text(data.read_text().replace("Paris", "Lutetia"))  # one answer changed: a new experiment
    assert identity(scored) != first
    with pytest.raises(SpecError, match="need --lm-eval TASKS"):
        spec_of(folder, evaluation=replace(EVAL, lm_eval_fewshot=2)).check()


def test_the_prune_key_changes_with_what_the_weights_read_and_not_with_what_is_evaluated(folder):
    """Runs that differ only in their evaluation prune the same weights (one prune key); the method's settings, the
    calibration's seed, size and source, and records held out of it for the evaluation each make other weights."""
    def key(spec: RunSpec) -> str:
        spec = spec.normalised()
        return prune_key(spec, fingerprints(spec))

    base = key(spec_of(folder))
    assert key(spec_of(folder, evaluation=replace(EVAL, ppl_windows=3))) == base
    assert key(spec_of(folder, evaluation=replace(EVAL, tasks="demo", limit=4))) == base
    for changed in ({"seed": 1}, {"nsamples": 8}, {"calibration": "demo"}, {"sparsity": 0.6}, {"method": "magnitude"},
                    {"pattern": "2:4"}, {"order": "reference"},
                    {"calibration": "demo", "evaluation": replace(EVAL, tasks="demo", limit=4)}):
        assert key(spec_of(folder, **changed)) != base, changed
    held_out = spec_of(folder, calibration="demo", evaluation=replace(EVAL, tasks="demo", limit=4))
    assert held_out.held_out_records() == 4
    assert key(held_out) != key(spec_of(folder, calibration="demo"))
