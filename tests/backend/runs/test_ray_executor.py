"""The Ray executor with a real local Ray instance (the dispatcher's own `ray.init`): a sweep of four tiny-model
runs gives the same metrics as the local executor; progress reaches the store; a task whose worker process is
killed is retried (or ends interrupted) with the store intact; cancel stops a running task."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import torch

from backend.runs.store import Store
from backend.runs.worker import stop_worker
from tests.backend.runs.test_worker import wait_for
from tests.conftest import TINY_EVAL, backend_cli, error_line, run_cli

SWEEP = ("--methods", "wanda", "magnitude", "--sparsities", "0.5", "--calibrations", "demo-prose", "demo",
         "--nsamples", "4", "--seqlen", "64", *TINY_EVAL)
# long enough on the tiny model to be caught answering: 48 answers of up to 64 tokens, twice
LONG = ("--method", "wanda", "--sparsity", "0.4", "--calibration", "demo-prose", "--nsamples", "4", "--seqlen", "64",
        "--ppl", "demo-prose", "--ppl-seqlen", "64", "--ppl-windows", "2", "--tasks", "demo", "--limit", "48",
        "--max-new-tokens", "64")
# the stages of a job's own work: one short stage alone (a tiny model's answers) can come and go between two polls
WORKING = ("pruning", "saving", "perplexity", "answers", "divergence")


@pytest.fixture(scope="module")
def bucket(tmp_path_factory) -> str:
    """An fsspec URL as the artifact root (file://, the one scheme every machine has)."""
    return (tmp_path_factory.mktemp("bucket") / "models").as_uri()


@pytest.fixture(scope="module")
def ray_store(tmp_path_factory, tiny_folder, bucket) -> Path:
    """A store whose worker is a Ray dispatcher with its own local Ray instance, holding the sweep's four runs,
    whose pruned models went to an fsspec URL."""
    root = tmp_path_factory.mktemp("ray-store")
    backend_cli(root, "sweep", "--model", str(tiny_folder), *SWEEP, "--executor", "ray", "--artifacts", bucket)
    yield root
    stop_worker(root)


def task_processes() -> list[psutil.Process]:
    """The Ray worker processes running a PruneScope job (Ray titles them after the task)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any("ray::run_job" in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


def test_a_sweep_through_ray_gives_the_local_executors_metrics(ray_store, filled_store):
    ours = {r["run_id"]: r for r in Store(ray_store).runs()}
    local = {r["run_id"]: r for r in Store(filled_store).runs()}
    assert len(ours) == 4 and set(ours) == set(local)  # one experiment, one id, whichever executor ran it
    for rid, row in ours.items():
        assert row["state"] == "done", row["message"]
        for metric in ("overall_sparsity", "pruned_ppl", "dense_ppl", "jsd", "flip_rate", "pruned_f1", "dense_f1"):
            assert row[metric] == pytest.approx(local[rid][metric], rel=1e-6, abs=1e-9), (rid, metric)
        job = Store(ray_store).latest_job(rid)
        assert job["timings"] and job["stage"] == "divergence on answers" and job["done"] == job["total"]
    store = Store(ray_store)
    assert len(store.db.execute("SELECT * FROM dense_results").fetchall()) == 1  # the dense side once


def test_pruned_models_go_to_the_fsspec_root_checked_and_exported_from_there(ray_store, filled_store, bucket, tmp_path):
    """Each run's model lies at URL/run_id/model with the checksums the store holds; export reads it back from
    there into a folder whose weights equal the local executor's pruned model."""
    from safetensors.torch import load_file

    from backend.runs.artifacts import intact
    from backend.runs.locations import filesystem
    store, local = Store(ray_store), Store(filled_store)
    fs, root = filesystem(bucket)
    for rid in (r["run_id"] for r in store.runs()):
        artifact = store.artifact(rid, "model")
        assert artifact["path"] == f"{bucket}/{rid}/model" and intact(store, rid, full=True)
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{rid}/model")) == sorted(artifact["files"])
    rid = store.runs()[0]["run_id"]
    backend_cli(ray_store, "export", rid, "--to", str(tmp_path / "out"))
    exported = load_file(tmp_path / "out" / "model" / "model.safetensors")
    theirs = load_file(local.artifact(rid, "model")["path"] / "model.safetensors")
    assert exported.keys() == theirs.keys() and all(torch.equal(exported[k], theirs[k]) for k in theirs)
    fs.rm(f"{root}/{rid}/model/model.safetensors")
    assert not intact(store, rid)  # a file gone from the bucket is seen


def test_a_killed_task_is_retried_and_the_store_stays_intact(ray_store, tiny_folder):
    submitted = backend_cli(ray_store, "run", "--model", str(tiny_folder), *LONG, "--executor", "ray", "--detach")
    store = Store(ray_store)
    wait_for(lambda: (store.latest_job(submitted["run_id"]) or {}).get("stage", "").startswith(WORKING),
             timeout=240, step=0.2)
    victims = wait_for(task_processes, timeout=60, step=0.2)
    for process in victims:
        process.kill()
    row = wait_for(lambda: next((r for r in Store(ray_store).runs() if r["run_id"] == submitted["run_id"]
                                 and r["state"] not in ("queued", "running")), None), timeout=400, step=0.2)
    assert row["state"] in ("done", "interrupted"), row["message"]
    assert Store(ray_store).integrity() == "ok"
    if row["state"] == "interrupted":
        again = backend_cli(ray_store, "run", "--model", str(tiny_folder), *LONG, "--executor", "ray")
        assert again["state"] == "done"


def test_cancel_stops_a_running_task(ray_store, tiny_folder):
    submitted = backend_cli(ray_store, "run", "--model", str(tiny_folder), *LONG, "--seed", "1", "--executor", "ray",
                            "--detach")
    store = Store(ray_store)
    wait_for(lambda: (store.latest_job(submitted["run_id"]) or {}).get("stage", "").startswith(WORKING),
             timeout=240, step=0.2)
    backend_cli(ray_store, "cancel", submitted["run_id"])
    row = wait_for(lambda: next((r for r in Store(ray_store).runs() if r["run_id"] == submitted["run_id"]
                                 and r["state"] not in ("queued", "running")), None), timeout=120, step=0.2)
    assert row["state"] == "cancelled"
    assert not task_processes() or wait_for(lambda: not task_processes(), timeout=30, step=0.2)


@pytest.mark.parametrize("flag, value, said", [("--cpus-per-job", "0", "--cpus-per-job 0 is not allowed: use a number "
                                                                       "above 0"),
                                               ("--gpus-per-job", "-1", "--gpus-per-job -1 is not allowed"),
                                               ("--max-retries", "-2", "--max-retries -2 is not allowed"),
                                               ("--memory-per-job", "lots", "--memory-per-job 'lots' is not a size"),
                                               ("--ray-address", "127.0.0.1:1", "--ray-address 127.0.0.1:1: no Ray "
                                                                                "cluster answers at 127.0.0.1:1")])
def test_bad_ray_resources_are_refused_in_one_line(flag, value, said, tmp_path, capsys):
    code, _, err = run_cli(["worker", "--executor", "ray", flag, value, "--store", str(tmp_path)], capsys)
    assert code == 2 and said in error_line(err)


@pytest.mark.parametrize("extra, said", [
    (["--executor", "ray", "--ray-address", "127.0.0.1:1"], "no Ray cluster answers at 127.0.0.1:1 (Connection refused)"),
    (["--executor", "ray", "--ray-address", "head-node"], "--ray-address 'head-node' is not an address: use auto or "
                                                          "HOST:PORT"),
    (["--ray-address", "127.0.0.1:6379"], "--ray-address is a setting of --executor ray: give both"),
])
def test_a_cluster_that_does_not_answer_is_refused_before_anything_is_queued(extra, said, tmp_path, capsys):
    code, _, err = run_cli(["run", "--method", "magnitude", "--sparsity", "0.5", "--store", str(tmp_path), *extra],
                           capsys)
    assert code == 2 and said in error_line(err)
    assert Store(tmp_path).runs() == []
