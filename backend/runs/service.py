"""What the CLI and the dashboard ask of the backend: submit a spec (starting the worker when needed), what data is
available offline, and a run's full picture. Torch-free, so pages answer at once."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from backend.runs import keys
from backend.runs.artifacts import intact
from backend.runs.checks import check_specs
from backend.runs.lock import lock_holder
from backend.runs.spec import RunSpec, SpecError, fingerprints, run_id
from backend.runs.store import ACTIVE, Store, StoreError
from backend.runs.worker import EXECUTOR_ENV, LOG_NAME, cluster_address, ensure_worker
from backend.sources.datasets import (
    BUILTIN_FILES,
    HUB_IDS,
    LOCAL_FILES,
    SOURCE_KINDS,
    hub_reachable,
    offline_sources,
)

_children: dict[Path, subprocess.Popen] = {}  # the workers this process started, by store


@dataclass(frozen=True)
class Planned:
    """A submission before it reaches the store: the normalised spec, its fingerprints and id, and whether its judge
    endpoint is the server's."""

    spec: RunSpec
    prints: dict
    run_id: str
    artifacts_ok: bool | None
    own_endpoint: bool


def submit(store: Store, spec: RunSpec, data_dir: str | None = None, device: str = "auto",
           start_worker: bool = True, judge_key: str | None = None, executor: str | None = None) -> dict:
    """Queue a spec, or find it already done; returns run_id, state, cached and job_id. A spec that would queue
    work is checked first against the model's config, its tokenizer and the data (backend/runs/checks.py), so a
    run that would fail on them is refused with a SpecError and nothing is queued. Starts a worker (its own
    program, never a fork of the caller) when there is work and none runs. `judge_key`: the key of a judge endpoint
    that is not the server's; it stays in this process's memory and is handed only to the worker of this run.
    `executor`: local or ray, for a worker started now (default: PRUNESCOPE_EXECUTOR)."""
    return submit_many(store, [spec], data_dir, device, start_worker, judge_key, executor)[0]


def submit_many(store: Store, specs: list[RunSpec], data_dir: str | None = None, device: str = "auto",
                start_worker: bool = True, judge_key: str | None = None,
                executor: str | None = None) -> list[dict]:
    """submit for each spec (a sweep's grid), all of them checked before any is queued: one bad spec queues none."""
    check_executor(executor)
    planned = [plan(store, spec, data_dir, device, judge_key) for spec in specs]
    work = [p for p in planned if not served(store, p) and not joined(store, p)]
    if work:
        early = start(store.root, device, executor) if start_worker else None  # it loads torch while the checks run
        try:
            check_specs([p.spec for p in work], data_dir)
        except BaseException:
            if early is not None:
                stand_down(store, early, device)
            raise
    return [hand_in(store, p, data_dir, device, start_worker, judge_key, executor) for p in planned]


def check_executor(executor: str | None) -> None:
    """The executor is local or ray, and a ray cluster named for this machine's workers answers."""
    if executor not in (None, "local", "ray"):
        raise SpecError(f"executor {executor!r} is not known: use local or ray")
    if (executor or os.environ.get(EXECUTOR_ENV)) == "ray":
        from backend.runs.dispatch import address_problem
        problem = address_problem(cluster_address())
        if problem:
            raise SpecError(problem)


def plan(store: Store, spec: RunSpec, data_dir: str | None, device: str, judge_key: str | None) -> Planned:
    """Validate a spec and its judge's key, and pin down its identity; queues nothing."""
    spec = spec.normalised()
    own_endpoint = True
    if spec.evaluation.judge_model:
        own_endpoint = judge_endpoint_is_configured(spec.evaluation.judge_base_url)
        if own_endpoint and not os.environ.get("OPENAI_API_KEY"):
            raise SpecError("judge_model needs an API key: set OPENAI_API_KEY (it is never written anywhere)")
        if not own_endpoint and not (judge_key or "").strip():
            raise SpecError(f"the judge endpoint {spec.evaluation.judge_base_url} is not the server's "
                            f"({configured_judge_endpoint()}), whose key is never sent elsewhere: give its own key (the Run page's "
                            f"key field), or set OPENAI_BASE_URL to it with its OPENAI_API_KEY")
    prints = fingerprints(spec, data_dir, device)
    rid = run_id(spec, prints)
    return Planned(spec, prints, rid, intact(store, rid), own_endpoint)


def served(store: Store, planned: Planned) -> bool:
    """Whether the store serves this run as it is (finished, its pruned model intact), as Store.submit decides; such
    a run needs no checks, and stays torch-free."""
    return store.metrics(planned.run_id) is not None and planned.artifacts_ok is not False


def joined(store: Store, planned: Planned) -> bool:
    """Whether the run is queued or running already: it was checked when it was queued, so a submission that joins
    it needs no checks again, and stays torch-free."""
    job = store.latest_job(planned.run_id)
    return job is not None and job["state"] in ACTIVE


def hand_in(store: Store, planned: Planned, data_dir: str | None, device: str, start_worker: bool,
            judge_key: str | None, executor: str | None = None) -> dict:
    """Hand a planned run to the store, the judge's own key to its worker, and start a worker when there is work."""
    spec, rid = planned.spec, planned.run_id
    submission = store.submit(spec, planned.prints, rid, artifacts_ok=planned.artifacts_ok, data_dir=data_dir)
    if spec.evaluation.judge_model and not planned.own_endpoint and not submission.cached:
        keys.offer(store.root, rid, judge_key.strip())
    if start_worker and not submission.cached:
        start(store.root, device, executor)
    return {"run_id": rid, "state": submission.state, "cached": submission.cached, "job_id": submission.job_id}


def start(root: Path, device: str = "auto", executor: str | None = None) -> subprocess.Popen | None:
    """Start a worker unless one runs or the one this process started for the store is still starting (a sweep's
    runs would otherwise each start one before the first takes the lock); reap those that have exited. Returns the
    worker started now, if any."""
    for path, child in list(_children.items()):
        if child.poll() is not None:
            del _children[path]
    root = Path(root).resolve()
    if root in _children:
        return None
    child = ensure_worker(root, device, executor)
    if child is not None:
        _children[root] = child
    return child


def stand_down(store: Store, child: subprocess.Popen, device: str) -> None:
    """Stop a worker started for a submission its checks refused, unless it already claimed a job someone else
    queued: while this holds the store's write lock no job can be claimed, so the look and the stop are one step.
    Jobs queued in the meantime get a worker of their own."""
    with store.write() as db:
        if db.execute("SELECT 1 FROM jobs WHERE worker_pid = ? AND state = 'running'", (child.pid,)).fetchone():
            return
        child.terminate()
        child.wait(timeout=30)
    if store.has_queued():
        start(store.root, device)


def source_status(data_dir: str | None = None) -> dict[str, str]:
    """Each named source and whether it can load now: 'offline', 'hub' (needs the internet) or 'unavailable'."""
    local = set(offline_sources(data_dir))
    online = hub_reachable()
    status = {}
    for name in (*LOCAL_FILES, *BUILTIN_FILES):
        status[name] = "offline" if name in local else ("hub" if online and name in HUB_IDS else "unavailable")
    return status


def sources_of_kind(kind: str) -> list[str]:
    """Named sources holding 'texts' or 'records'."""
    return [name for name, k in SOURCE_KINDS.items() if k == kind]


def run_detail(store: Store, rid: str) -> dict:
    """Everything a page shows about one run: the flat row, spec, latest job, metrics and the prune report."""
    row = next((r for r in store.runs() if r["run_id"] == rid), None)
    if row is None:
        raise SpecError(f"run {rid!r} is not in the store {store.root}")
    metrics = store.metrics(rid) or {}
    return {"row": row, "spec": store.spec(rid), "job": store.latest_job(rid), "summary": metrics.get("summary"),
            "prune": metrics.get("prune"), "active": row["state"] in ACTIVE}


def wait(store: Store, run_ids: list[str], on_update: Callable[[str, dict | None], None] = lambda _rid, _job: None,
         poll_s: float = 0.5, no_worker_s: float = 30.0) -> None:
    """Poll until every run's latest job is final; `on_update(run_id, job)` sees each poll of a pending run. Gives
    up with the log's path when no worker has served the store for `no_worker_s` (one that cannot start)."""
    pending = set(run_ids)
    served = time.monotonic()
    while pending:
        if lock_holder(store.root) is not None:
            served = time.monotonic()
        elif time.monotonic() - served > no_worker_s:
            raise StoreError(f"no worker has served {store.root} for {no_worker_s:.0f} s while runs wait: see "
                             f"{store.root / LOG_NAME} for why it did not start")
        store.recover_stale()
        for rid in list(pending):
            job = store.latest_job(rid)
            on_update(rid, job)
            if job is None or job["state"] not in ACTIVE:
                pending.discard(rid)
        if pending:
            time.sleep(poll_s)


def configured_judge_endpoint() -> str:
    """The judge endpoint the server's key belongs to (OPENAI_BASE_URL or OpenAI's), without the key."""
    from metrics.judge import configured_endpoint, public_url
    return public_url(configured_endpoint())


def judge_endpoint_is_configured(url: str) -> bool:
    """Whether a typed judge endpoint is the one the server's key belongs to."""
    from metrics.judge import configured_endpoint, same_endpoint
    return same_endpoint(url, configured_endpoint())
