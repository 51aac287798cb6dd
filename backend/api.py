"""PruneScope from Python: prune a model, evaluate dense vs pruned, submit runs to the store and read them back.

    from backend import api
    pruned = api.prune("smollm2-135m", "wanda", 0.5, calibration="c4", nsamples=32, seqlen=256, data_dir="../shared/data")
    pruned.save("out/wanda50")
    summary, examples = api.evaluate("smollm2-135m", pruned, ppl="wikitext2", jsd="alpaca", tasks="unnatural", limit=50)
    queued = api.submit(api.RunSpec(method="sparsegpt", sparsity=0.5, nsamples=32, seqlen=256))  # the worker runs it
    api.wait(queued["run_id"])
    rows = api.load_runs()

The command line and the dashboard are built on the same functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from backend.log import Log, stderr_log
from backend.runs.identity import code_version, library_versions
from backend.runs.spec import CALIBRATION_TEMPLATES, EvalSettings, RunSpec
from backend.runs.store import Store
from backend.sources.names import DEFAULT_MODEL
from compression.targets import Targets

__all__ = ["EvalSettings", "Pruned", "RunSpec", "Targets", "evaluate", "findings", "load", "load_runs", "prune",
           "submit", "wait"]


@dataclass
class Pruned:
    """A pruned model in memory (`lm.model`, `lm.tokenizer`), the engine's report and the settings that made it."""

    lm: Any
    report: Any
    spec: dict
    stages: dict[str, float] = field(default_factory=dict)

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write a normal Hugging Face folder (safetensors) with `prunescope.json` holding the spec and report.

        `folder` must be new, empty, or (with `overwrite=True`) a folder PruneScope saved before, which is replaced
        atomically; any other folder is refused with a ValueError and left untouched."""
        from backend.runs.export import save_pruned
        started = time.perf_counter()
        sidecar = {"spec": self.spec, "report": self.report.to_dict()}
        path = save_pruned(self.lm.model, self.lm.tokenizer, folder, sidecar, overwrite=overwrite)
        self.stages["save"] = time.perf_counter() - started
        return path


def load(model: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
         log: Log = stderr_log):
    """A model and its tokenizer: the embedded default, a hub id or a local folder (safetensors only)."""
    from backend.sources import models
    return models.load(model, device, dtype, trust_remote_code, log=log)


def prune(model: str = DEFAULT_MODEL, method: str = "wanda", sparsity: float = 0.5, *, pattern: str = "unstructured",
          calibration: str = "c4", nsamples: int = 128, seqlen: int = 2048, seed: int = 0, template: str = "alpaca",
          order: str = "sequential", per_row: bool = False, targets: Targets | None = None, ria_a: float = 0.5,
          batch_size: int | None = None, error_tokens: int = 256, data_dir: str | None = None, device: str = "auto",
          dtype: str = "auto", offload: bool = False, device_map: str | None = None, max_memory: str | None = None,
          trust_remote_code: bool = False, progress: Callable | None = None, log: Log = stderr_log) -> Pruned:
    """Load `model`, build its calibration windows and prune it layer by layer; every argument is checked, with a
    message naming the bad value, before the model is loaded. `targets` chooses the matrices (include/exclude on
    full names) and spreads the sparsity (uniform, OWL, explicit per layer); `ria_a` is RIA's exponent. Where the
    weights live is the memory estimate's choice unless `offload` (layers visit the device one at a time) or
    `device_map="auto"` (accelerate's placement, capped per device by `max_memory`, e.g. "cuda:0=20GiB,cpu=64GiB")
    asks."""
    from backend.sources import models
    from backend.sources.calibration import build_calibration, open_source
    from compression.driver import prune_model
    from compression.methods import create
    from compression.orders import check_order
    from compression.patterns import check_sparsity, parse_pattern

    parsed = parse_pattern(pattern)
    check_sparsity(sparsity, parsed)
    if per_row and method != "magnitude":
        raise ValueError(f"per_row applies to magnitude only, not {method!r}")
    engine = create(method, sparsity=sparsity, pattern=parsed, **({"per_row": True} if per_row else {}),
                    **({"a": ria_a} if method == "ria" else {}))
    check_order(order)
    targets = targets or Targets()
    targets.check(sparsity, parsed.structured)
    for name, value in (("batch_size", batch_size), ("error_tokens", error_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{name} {value} is not allowed: use a positive integer")
    if template not in CALIBRATION_TEMPLATES:
        raise ValueError(f"template {template!r} is not allowed for calibration: use "
                         f"{' or '.join(CALIBRATION_TEMPLATES)}")
    placement = placement_of(offload, device_map, max_memory)
    limits = models.parse_max_memory(max_memory)
    stages: dict[str, float] = {}
    source = open_source(calibration, data_dir)
    started = time.perf_counter()
    compute = models.pick_device(device)
    lm = models.load(model, device, models.pick_dtype(dtype, compute), trust_remote_code, log=log,
                     placement=placement, max_memory=limits)
    stages["load"] = time.perf_counter() - started
    started = time.perf_counter()
    windows = build_calibration(source, lm.model, lm.tokenizer, nsamples, seqlen, seed, template)
    stages["calibration"] = time.perf_counter() - started
    report = prune_model(lm.model, windows, engine, order=order, targets=targets, batch_size=batch_size,
                         error_tokens=error_tokens, device=compute, offload=lm.placement.mode == "offload",
                         progress=progress)
    if not report.layers:
        raise ValueError(f"no weight matrix matched include {list(targets.include)} exclude {list(targets.exclude)}")
    stages.update(report.stages)
    spec = {"model": model, "model_path": lm.path, "method": method, "sparsity": sparsity, "pattern": str(parsed),
            "calibration": calibration, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "template": template,
            "order": order, "per_row": per_row, "targets": targets.to_dict(),
            **({"ria_a": ria_a} if method == "ria" else {}),
            "dtype": str(lm.dtype).removeprefix("torch."), "device": str(compute),
            "offload": lm.placement.mode == "offload", "placement": lm.placement.to_dict(),
            "provenance": {"device_type": compute.type, "dtype": str(lm.dtype).removeprefix("torch."),
                           "code": code_version(), **library_versions()}}
    return Pruned(lm, report, spec, stages)


def placement_of(offload: bool, device_map: str | None, max_memory: str | None) -> str:
    """The placement asked for by prune's flags (auto when none is given)."""
    if device_map not in (None, "auto"):
        raise ValueError(f"device_map {device_map!r} is not allowed: use auto (accelerate's placement) or leave it out")
    if offload and (device_map or max_memory):
        raise ValueError("offload and device_map/max_memory are two ways to place the model: choose one")
    if max_memory and not device_map:
        raise ValueError("max_memory caps accelerate's placement: give it with device_map='auto' (--device-map auto)")
    return "offload" if offload else "device-map" if device_map else "auto"


def evaluate(dense, pruned, settings: EvalSettings | None = None, *, data_dir: str | None = None,
             device: str = "auto", dtype: str = "auto", log: Log = stderr_log,
             progress: Callable[[str, int, int], None] | None = None, **options) -> tuple[dict, list[dict]]:
    """Dense vs pruned: perplexity, teacher-forced JS/KL/flips and task scores, as `EvalSettings` (or its fields
    as keyword arguments) asks. Either side may be a model name or folder, a loaded model or a `Pruned`."""
    from backend.runs.evaluate import evaluate as run_evaluation

    settings = settings or EvalSettings(**options)
    settings.check()
    sides = [side.lm if isinstance(side, Pruned) else load(side, device, dtype, log=log) if isinstance(side, str)
             else side for side in (dense, pruned)]
    return run_evaluation(sides[0], sides[1], settings, data_dir, log=log,
                          progress=progress or (lambda _stage, _done, _total: None))


def submit(spec: RunSpec, store: str | Path | None = None, data_dir: str | None = None, device: str = "auto",
           judge_key: str | None = None) -> dict:
    """Queue a run for the store's worker (started if needed); a finished identical run is answered at once.
    `judge_key`: the key of a judge endpoint other than OPENAI_BASE_URL's, held in this process's memory only."""
    from backend.runs.service import submit as submit_run
    return submit_run(Store(store), spec.normalised(), data_dir, device, judge_key=judge_key)


def wait(run_ids: list[str] | str, store: str | Path | None = None) -> list[dict]:
    """Block until the runs are finished (done, failed, interrupted or cancelled); returns their rows."""
    from backend.runs.service import wait as wait_for
    ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
    opened = Store(store)
    wait_for(opened, ids)
    return [r for r in opened.runs() if r["run_id"] in ids]


def load_runs(store: str | Path | None = None) -> list[dict]:
    """Every run in the store as one dict of plain values (spec, state, key metrics), newest first."""
    return Store(store).runs()


def findings(store: str | Path | None = None, model: str | None = None, cohort: str | None = None,
             task: str = "f1"):
    """The paper's three claims tested on a cohort of the store's finished runs: `.claims` (each a verdict, its rule,
    numbers with intervals, the runs used), `.missing` (the runs it lacks) and `.to_dict()`."""
    from backend.findings.service import build
    return build(Store(store), model, cohort, task)
