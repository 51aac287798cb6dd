"""Hand-made stores for findings tests: real SQLite stores whose finished runs hold per-unit values made to order
(each run: a perplexity ratio, a task-score drop and a JS level, with chosen noise), so a verdict is known."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np

from backend.findings.study import Cell
from backend.runs.spec import EvalSettings, RunSpec
from backend.runs.store import Store
from backend.runs.uncertainty import DIVERGENCES, uncertainty

WINDOWS, SAMPLES, EXAMPLES = 10, 24, 48
PROTOCOL = {"ppl": {"source": "wikitext2", "seqlen": 512, "windows": WINDOWS, "windows_available": 40,
                    "scored_tokens": WINDOWS * 511, "stream_tokens": 20480},
            "divergence": {"source": "alpaca", "samples": SAMPLES, "template": "chat", "scored_tokens": 2000,
                           "log": "e", "positions": "response"},
            "tasks": {"source": "unnatural", "examples": EXAMPLES, "template": "chat", "max_new_tokens": 16,
                      "decoding": "greedy"}}
PRINTS = {"model": "embedded:test", "data": {"wikitext2": "sha256:w", "alpaca": "sha256:a", "unnatural": "sha256:u",
                                             "c4": "sha256:c"},
          "provenance": {"device_type": "cpu", "dtype": "float32", "code": "handmade"}}


def units(ratio: float, drop: float, jsd: float, noise: float = 0.01, seed: int = 0, base_seed: int = 99) -> dict:
    """Per-unit values of one run: windows whose pruned NLL is the dense one + log(ratio), samples around `jsd`,
    examples whose pruned F1 is the dense one - `drop`; each with Gaussian noise of `noise` (scaled per metric)."""
    base = np.random.default_rng(base_seed)
    dense_nll, dense_f1 = base.normal(3.0, 0.2, WINDOWS), base.uniform(0.5, 1.0, EXAMPLES)
    rng = np.random.default_rng(seed)
    pruned_nll = dense_nll + math.log(ratio) + rng.normal(0, noise, WINDOWS)
    samples = np.clip(jsd + rng.normal(0, noise / 10, SAMPLES), 0, None)
    pruned_f1 = np.clip(dense_f1 - drop + rng.normal(0, noise, EXAMPLES), 0, 1)
    tasks = {"dense": {"em": [float(round(v)) for v in dense_f1], "f1": dense_f1.tolist(), "rouge1": dense_f1.tolist()},
             "pruned": {"em": [float(round(v)) for v in pruned_f1], "f1": pruned_f1.tolist(),
                        "rouge1": pruned_f1.tolist()},
             "answer_jsd": samples[:EXAMPLES].tolist() + [None] * (EXAMPLES - min(EXAMPLES, SAMPLES))}
    return {"ppl": {"dense": dense_nll.tolist(), "pruned": pruned_nll.tolist()},
            "divergence": {k: (samples * (i + 1)).tolist() for i, k in enumerate(DIVERGENCES)}, "tasks": tasks}


EVALUATION = EvalSettings(ppl_windows=WINDOWS, limit=EXAMPLES, jsd_limit=SAMPLES, max_new_tokens=16)


def add_run(store: Store, cell: Cell, made: dict, model: str = "org/handmade", finished_at: float | None = None,
            evaluation: EvalSettings = EVALUATION, **spec_fields) -> str:
    """A finished run of `cell` holding `made` units, through the store's own submit / claim / finish."""
    spec = RunSpec(method=cell.method, sparsity=cell.sparsity, pattern=cell.pattern, calibration=cell.calibration,
                   model=model, evaluation=evaluation, **{"nsamples": 32, "seqlen": 256, **spec_fields})
    rid = hashlib.sha256(repr((spec, made["ppl"]["pruned"][:2], finished_at)).encode()).hexdigest()[:16]
    store.submit(spec, PRINTS, rid)
    job = store.claim_next(os.getpid())
    summary = {side: {"ppl": math.exp(np.mean(made["ppl"][side])),
                      **{t: float(np.mean(made["tasks"][side][t])) for t in ("em", "f1", "rouge1")}}
               for side in ("dense", "pruned")}
    summary.update({k: float(np.mean(made["divergence"][k])) for k in DIVERGENCES}, protocol=PROTOCOL, seconds={},
                   answer_jsd=float(np.mean([v for v in made["tasks"]["answer_jsd"] if v is not None])))
    summary.update(uncertainty(made))
    store.save_results(rid, {"overall_sparsity": cell.sparsity}, [], summary, [])
    assert store.finish(job["job_id"], "done", worker_pid=os.getpid())
    return rid


def handmade_store(root: Path, runs: dict[Cell, dict], **fields) -> Store:
    store = Store(root)
    for cell, made in runs.items():
        add_run(store, cell, made, **fields)
    return store
