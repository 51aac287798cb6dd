"""Run one job of the store: prune a copy of the dense model, save it as an artifact, evaluate it against the
dense model (whose own side is computed once per model and setting), and record everything."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field, replace

import psutil
import torch

from backend.log import Log, stderr_log
from backend.runs import keys
from backend.runs.artifacts import MODEL_ARTIFACT, describe
from backend.runs.evaluate import evaluate, measure_side
from backend.runs.export import save_pruned
from backend.runs.progress import (
    Reporter,
    TokenSteps,
    measured_rates,
    plan_for,
)
from backend.runs.spec import RunSpec, dense_key, prune_key
from backend.runs.store import Store
from backend.sources import models
from backend.sources.calibration import build_calibration, open_source
from compression.driver import prune_model
from compression.methods import create
from compression.patterns import parse_pattern
from compression.report import Progress, PruneReport, peak_rss_mb
from metrics.divergence import MEMO_BYTES, memo_bytes
from metrics.judge import configured_endpoint, same_endpoint


@dataclass
class KeptPrune:
    """A job's pruned model and its report, kept so that a next job that would prune the very same weights with the
    very same calibration (equal prune_key), such as the same pruning under other evaluation settings, evaluates it
    without pruning again."""

    key: str
    run_id: str
    lm: models.LoadedModel = field(repr=False)
    engine: PruneReport = field(repr=False)
    prune: dict = field(repr=False)
    layers: list[dict] = field(repr=False)


@dataclass
class ModelCache:
    """Keeps the dense model of the last job loaded, so jobs on the same model skip loading it again, and that
    job's pruned model, so a next job that would prune the very same weights skips pruning."""

    device: str = "auto"
    log: Log = stderr_log
    key: tuple | None = None
    dense: models.LoadedModel | None = field(default=None, repr=False)
    memo: dict = field(default_factory=dict, repr=False)  # what the dense model computed that jobs share
    pruned: KeptPrune | None = field(default=None, repr=False)

    def get(self, spec: RunSpec) -> models.LoadedModel:
        key = (spec.model, spec.dtype, self.device)
        if key != self.key:
            self.dense, self.key, self.pruned = None, None, None
            self.memo.clear()
            self.dense = models.load(spec.model, self.device, spec.dtype, log=self.log)
            self.key = key
        return self.dense

    def kept_prune(self, key: str) -> KeptPrune | None:
        """The kept pruned model when its weights are the ones `key` names; any other is let go first, so its memory
        is free before the next working copy is made."""
        if self.pruned is not None and self.pruned.key != key:
            self.pruned = None
        return self.pruned

    def working_copy(self, spec: RunSpec) -> models.LoadedModel:
        """A copy of the dense model to prune in place: copied in memory when it fits, else loaded again (a model
        accelerate placed always is: its weights may live on disk, in an offload folder of its own)."""
        dense = self.get(spec)
        if dense.placement is not None and dense.placement.mode != "device":
            return models.load(spec.model, self.device, spec.dtype, log=self.log)
        size = sum(p.numel() * p.element_size() for p in dense.model.parameters())
        fits = (psutil.virtual_memory().available if dense.device.type == "cpu"
                else torch.cuda.mem_get_info(dense.device)[0]) > 1.3 * size
        if fits:
            return replace(dense, model=copy.deepcopy(dense.model))
        return models.load(spec.model, self.device, spec.dtype, log=self.log)


def offered_judge_key(store: Store, run_id: str, spec: RunSpec) -> str | None:
    """The key typed in the dashboard for a judge endpoint that is not the server's own (None: the endpoint is the
    server's, whose OPENAI_API_KEY the judge uses)."""
    url = spec.evaluation.judge_base_url
    if not spec.evaluation.judge_model or not url or same_endpoint(url, configured_endpoint()):
        return None
    if store.root is None:
        raise RuntimeError(f"the judge endpoint {url} needs the key typed with the run, which stays on the machine "
                           f"that holds the store: run this job on the local executor")
    key = keys.fetch(store.root, run_id)
    if key is None:
        raise RuntimeError(f"the judge endpoint {url} needs the key typed with the run, and no dashboard holds it any "
                           f"more (restarted?): submit the run again with its key")
    return key


def check_provenance(expected: dict | None, lm) -> None:
    """The run's id promises a device type and dtype: a worker that would compute it otherwise refuses, so a result
    is never filed under another experiment's id."""
    if not expected:
        return
    actual = {"device_type": lm.device.type, "dtype": str(lm.dtype).removeprefix("torch.")}
    wrong = {k: (expected[k], v) for k, v in actual.items() if expected.get(k) != v}
    if wrong:
        said = ", ".join(f"{k} {want} was asked for but this worker computes in {got}" for k, (want, got) in wrong.items())
        raise RuntimeError(f"{said}: submit the run again with --device/--dtype set to what this worker uses, or "
                           f"start the worker on the device the run asks for")


def decoder_layers(model: torch.nn.Module) -> int:
    """How many decoder layers the driver will prune, for the plan (the config's count, else 1)."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    return int(getattr(config, "num_hidden_layers", 0) or 1)


def execute(store: Store, job: dict, cache: ModelCache, log: Log = stderr_log, rates: dict | None = None) -> None:
    """Run a queued job to the end; raises Cancelled or the error that stopped it. `rates`: the stage rates that
    estimate its time left (default: measured on the store's last job of this model and device)."""
    run_id, report = job["run_id"], Reporter(store, job["job_id"])
    spec, prints = store.spec(run_id), store.fingerprints(run_id)
    data_dir = job.get("data_dir")
    report("loading model", message=f"loading {spec.model}")
    dense = cache.get(spec)
    check_provenance(prints.get("provenance"), dense)
    key = dense_key(spec, prints)
    params = sum(p.numel() for p in dense.model.parameters())
    plan = plan_for(spec, params, decoder_layers(dense.model), store.dense_result(key) is not None,
                    measured_rates(store, spec.model, dense.device.type, spec.calibration == "self")
                    if rates is None else rates)
    report.start_plan(plan if job["kind"] == "full" else plan[:3])
    pruning = prune_key(spec, prints)
    kept = cache.kept_prune(pruning)
    if kept is None:
        working, engine, prune = prune_working_copy(spec, cache, dense, report, data_dir)
        layers = prune.pop("layers")
        cache.pruned = KeptPrune(pruning, run_id, working, engine, prune, layers)
    else:
        working, engine, layers = kept.lm, kept.engine, kept.layers
        prune = {**kept.prune, "reused_from": kept.run_id}
        log(f"run {run_id}: pruned as run {kept.run_id} was (same model, method, settings and calibration), whose "
            f"pruned model this worker still holds: not pruned again")
    report("saving", 0, 1, message="writing the pruned model")
    folder = save_pruned(working.model, working.tokenizer, store.run_folder(run_id) / MODEL_ARTIFACT,
                         {"run_id": run_id, "spec": spec.to_dict(), "report": engine.to_dict()}, overwrite=True,
                         owned=True)
    files = describe(folder)
    store.save_artifact(run_id, MODEL_ARTIFACT, folder, files)
    if job["kind"] == "rebuild":
        report("saving", 1, 1)
        report.finish()
        store.save_layers(run_id, layers)
        log(f"run {run_id}: pruned model rebuilt in {folder}")
        return
    twin_key = evaluation_key(key, files)
    twin = evaluated_twin(store, twin_key, run_id)
    if twin is not None:
        summary, examples = twin
        log(f"run {run_id}: its pruned weights equal those of run {summary['evaluation_reused_from']}, evaluated with "
            f"the same settings, data and code: that evaluation is reused")
        report.finish()
        store.save_results(run_id, prune, layers, summary, examples)
        log(f"run {run_id}: done")
        return
    judge_key = offered_judge_key(store, run_id, spec)
    dense_side = store.dense_result(key)
    reused = dense_side is not None
    if not reused:
        dense_side = measure_side(dense, spec.evaluation, "dense", data_dir, log, report, judge_key)
        store.save_dense_result(key, spec.model, dense_side)
    else:
        dense_side = {**dense_side, "seconds": {}}
        log(f"dense side of the evaluation reused ({key})")
    if memo_bytes(cache.memo) > MEMO_BYTES:
        cache.memo.clear()
    lm = replace(working, path=str(folder), name=f"{spec.model} ({spec.summary()})")
    summary, examples = evaluate(dense, lm, spec.evaluation, data_dir, log, report, dense_side=dense_side,
                                 judge_key=judge_key, dense_memo=cache.memo)
    summary["dense_reused"] = reused
    report.finish()
    summary["evaluation_key"] = twin_key
    store.save_results(run_id, prune, layers, summary, examples)
    log(f"run {run_id}: done")


def prune_working_copy(spec: RunSpec, cache: ModelCache, dense: models.LoadedModel, report: Reporter,
                       data_dir: str | None) -> tuple[models.LoadedModel, PruneReport, dict]:
    """Build the run's calibration and prune a copy of the dense model with it; returns the pruned copy, the
    engine's report, and the run's prune record (the report with its time, peak memory, placement and held-out
    records)."""
    held_out = spec.held_out_records()
    report("calibration", 0, spec.nsamples, message=f"{spec.calibration}: {spec.nsamples} x {spec.seqlen} tokens"
           + (f", its first {held_out} records held out (the evaluation reads them)" if held_out else ""))
    source = open_source(spec.calibration, data_dir)
    if spec.calibration == "self":
        tokens = spec.nsamples * spec.seqlen
        steps = TokenSteps(lambda n: report("calibration", n, tokens, message=f"the model writes {spec.nsamples} x "
                                            f"{spec.seqlen} tokens: {n} of {tokens}"))
    else:
        steps = None
    calibration = build_calibration(source, dense.model, dense.tokenizer, spec.nsamples, spec.seqlen, spec.seed,
                                    spec.template, progress=None if steps else
                                    lambda d, n: report("calibration", d, n), streamer=steps, held_out=held_out)
    working = cache.working_copy(spec)
    method = create(spec.method, sparsity=spec.sparsity, pattern=parse_pattern(spec.pattern),
                    **({"per_row": True} if spec.per_row else {}))

    def on_layer(event: Progress) -> None:
        if event.stage == "allocation":
            report("pruning", 0, event.layers, message=f"OWL allocation pass (dense outlier ratios): layer "
                                                        f"{event.layer} of {event.layers}")
            return
        done = event.layer if event.stage == "layer" else event.layer - 1
        report("pruning", done, event.layers, message=f"layer {event.layer} of {event.layers} {event.module}".strip())

    started = time.perf_counter()
    pruned = prune_model(working.model, calibration, method, order=spec.order, targets=spec.targets,
                         device=working.device, progress=on_layer)
    prune = {**pruned.to_dict(), "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(),
             **({"placement": working.placement.to_dict()} if working.placement else {}),
             "calibration_held_out": held_out}
    return working, pruned, prune


def evaluation_key(dense: str, files: dict[str, dict]) -> str:
    """Identifies an evaluation by its dense side (model, settings, data, provenance and code) and the pruned
    weights themselves (the sha256 of the saved weight files): two runs with equal keys measure the very same
    thing, as magnitude pruning does for every calibration set."""
    weights = sorted((name, f["sha256"]) for name, f in files.items() if name.endswith(".safetensors"))
    words = json.dumps({"dense": dense, "weights": weights}, sort_keys=True)
    return hashlib.sha256(words.encode()).hexdigest()[:16]


def evaluated_twin(store: Store, key: str, run_id: str) -> tuple[dict, list[dict]] | None:
    """The summary and records of another finished run whose evaluation had this key (None when there is none),
    marked as reused from it."""
    source = store.evaluated(key, other_than=run_id)
    if source is None:
        return None
    summary = store.metrics(source)["summary"]
    return {**summary, "evaluation_reused_from": summary.get("evaluation_reused_from", source)}, store.examples(source)
