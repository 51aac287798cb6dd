"""Typed run specs (what to prune, how to evaluate), their validation and stable run ids. Torch-free, so a
cached run is found without loading any model library."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from backend.runs.identity import (
    IdentityError,
    data_fingerprint,
    model_fingerprint,
    provenance,
)
from backend.sources.names import DEFAULT_MODEL, DTYPE_NAMES, model_problem
from compression.methods import METHOD_NAMES as METHODS
from compression.orders import ORDERS
from compression.patterns import check_sparsity, parse_pattern
from compression.targets import (  # noqa: F401  (the pages see only the backend: re-exported for them)
    ALLOCATIONS,
    Targets,
    layer_sparsity_text,
    parse_layer_sparsity,
)
from metrics.prompts import TEMPLATES

CALIBRATION_TEMPLATES = ("alpaca", "chat")


class SpecError(ValueError):
    """An invalid spec; the message names the field, the bad value and what is allowed."""


@dataclass(frozen=True)
class EvalSettings:
    """What to measure; a source of None skips that part."""

    ppl: str | None = "wikitext2"
    ppl_seqlen: int = 512
    ppl_windows: int = 40
    jsd: str | None = "alpaca"
    tasks: str | None = "unnatural"
    limit: int = 100
    template: str = "auto"
    response_only: bool = True
    log2: bool = False
    max_new_tokens: int = 32
    batch_size: int = 16
    judge_model: str | None = None
    judge_base_url: str | None = None
    jsd_limit: int | None = None  # records for the divergence; None: as many as `limit`
    lm_eval: tuple[str, ...] = ()  # lm-evaluation-harness tasks (or groups) scored on both models
    lm_eval_limit: int | None = None  # documents per task; None: all
    lm_eval_fewshot: int | None = None  # shots; None: each task's own default
    lm_eval_include: str | None = None  # a folder of local task YAMLs (PruneScope's own tasks are always found)

    def __post_init__(self) -> None:
        if isinstance(self.lm_eval, list):  # from JSON or a caller's list: a tuple keeps the settings hashable
            object.__setattr__(self, "lm_eval", tuple(self.lm_eval))

    @property
    def jsd_records(self) -> int:
        """How many records the divergence reads."""
        return self.jsd_limit or self.limit

    def check(self) -> None:
        """Reject bad values with the field's name and what is allowed."""
        if self.template not in ("auto", *TEMPLATES):
            raise SpecError(f"template {self.template!r} is not allowed: use auto, {', '.join(TEMPLATES)}")
        for name in ("ppl_seqlen", "ppl_windows", "limit", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpecError(f"{name.replace('_', '-')} {value!r} is not allowed: use an integer of at least 1")
        if self.jsd_limit is not None and (not isinstance(self.jsd_limit, int) or isinstance(self.jsd_limit, bool)
                                           or self.jsd_limit < 1):
            raise SpecError(f"jsd-limit {self.jsd_limit!r} is not allowed: use an integer of at least 1, or none "
                            f"(as many as --limit)")
        self.check_lm_eval()
        if not (self.ppl or self.jsd or self.tasks or self.lm_eval):
            raise SpecError("nothing to evaluate: give at least one of --ppl, --jsd, --tasks, --lm-eval")

    def check_lm_eval(self) -> None:
        """The lm-eval settings' own values; whether the tasks exist is checked on submit (backend/runs/checks.py)."""
        if isinstance(self.lm_eval, str) or not all(isinstance(t, str) and t.strip() and "," not in t
                                                     for t in self.lm_eval):
            raise SpecError(f"lm-eval tasks {self.lm_eval!r} are not allowed: give task names, such as "
                            f"--lm-eval prunescope_facts,arc_easy")
        for name, least in (("lm_eval_limit", 1), ("lm_eval_fewshot", 0)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise SpecError(f"{name.replace('_', '-')} {value!r} is not allowed: use an integer of at least "
                                f"{least}, or leave it out")
        if not self.lm_eval and (self.lm_eval_limit is not None or self.lm_eval_fewshot is not None
                                 or self.lm_eval_include):
            raise SpecError("--lm-eval-limit, --lm-eval-fewshot and --lm-eval-include need --lm-eval TASKS")

    def sources(self) -> list[str]:
        """The data sources this evaluation reads (lm-eval's tasks read their own)."""
        return [s for s in (self.ppl, self.jsd, self.tasks) if s]

    def to_dict(self) -> dict:
        """Plain JSON values. The lm-eval settings came after runs were first stored: without lm-eval tasks they
        are left out, so those runs keep their ids and their dense results."""
        out = asdict(self)
        if not self.lm_eval:
            for name in LM_EVAL_FIELDS:
                del out[name]
        else:
            out["lm_eval"] = list(self.lm_eval)
        return out


LM_EVAL_FIELDS = ("lm_eval", "lm_eval_limit", "lm_eval_fewshot", "lm_eval_include")



def _same_source(a: str, b: str) -> bool:
    """One named source, or one local file however its path is spelled."""
    if a.strip() == b.strip():
        return True
    first, second = Path(a.strip()).expanduser(), Path(b.strip()).expanduser()
    return first.is_file() and second.is_file() and first.resolve() == second.resolve()


@dataclass(frozen=True)
class RunSpec:
    """One experiment: a model pruned by a method at a sparsity with a calibration set, then evaluated."""

    method: str
    sparsity: float
    model: str = DEFAULT_MODEL
    pattern: str = "unstructured"
    calibration: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    template: str = "alpaca"
    order: str = "sequential"
    per_row: bool = False
    dtype: str = "auto"
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    targets: Targets = field(default_factory=Targets)  # which matrices, and each one's sparsity

    def normalised(self) -> RunSpec:
        """Validate, then canonical spellings (lower-case method, '2:4', absolute local paths, rounded sparsity)."""
        self.check()
        model = self.model.strip()
        if Path(model).expanduser().exists():
            model = str(Path(model).expanduser().resolve())
        calibration = self.calibration.strip()
        if Path(calibration).expanduser().is_file():
            calibration = str(Path(calibration).expanduser().resolve())
        evaluation = self.evaluation
        if evaluation.judge_model:
            from metrics.judge import configured_endpoint, public_url
            evaluation = replace(evaluation, judge_base_url=public_url(evaluation.judge_base_url or configured_endpoint()))
        if evaluation.lm_eval:
            include = evaluation.lm_eval_include
            evaluation = replace(evaluation, lm_eval=tuple(dict.fromkeys(t.strip() for t in evaluation.lm_eval)),
                                 lm_eval_include=str(Path(include).expanduser().resolve()) if include else None)
        targets = self.targets
        owl = targets.allocation == "owl"  # OWL's settings mean nothing otherwise, so they must not split run ids
        targets = replace(targets, include=tuple(targets.include), exclude=tuple(targets.exclude),
                          owl_m=float(targets.owl_m) if owl else Targets.owl_m,
                          owl_lambda=float(targets.owl_lambda) if owl else Targets.owl_lambda,
                          layers=tuple(round(float(v), 6) for v in targets.layers),
                          patterns=tuple((p, round(float(v), 6)) for p, v in targets.patterns))
        return replace(self, method=self.method.strip().lower(), model=model, calibration=calibration,
                       pattern=str(parse_pattern(self.pattern.strip())), sparsity=round(float(self.sparsity), 6),
                       evaluation=evaluation, targets=targets)

    def held_out_records(self) -> int:
        """How many leading records of the calibration source the evaluation reads (divergence, tasks): calibration
        leaves them out, so no metric is measured on the text the masks were fitted to."""
        ev = self.evaluation
        return max([count for source, count in ((ev.jsd, ev.jsd_records), (ev.tasks, ev.limit))
                    if source and _same_source(source, self.calibration)], default=0)

    def check(self) -> None:
        """Raise SpecError naming the first bad field."""
        if not isinstance(self.model, str) or not self.model.strip():
            raise SpecError(f"model is empty: give {DEFAULT_MODEL}, a Hugging Face id or a local folder")
        problem = model_problem(self.model.strip())
        if problem:
            raise SpecError(problem)
        if not isinstance(self.method, str) or self.method.strip().lower() not in METHODS:
            raise SpecError(f"method {self.method!r} is not allowed: use one of {', '.join(METHODS)}")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise SpecError(f"sparsity {self.sparsity!r} is not a number: use a fraction in [0, 1), such as 0.5")
        try:
            pattern = parse_pattern(self.pattern.strip() if isinstance(self.pattern, str) else str(self.pattern))
            check_sparsity(float(self.sparsity), pattern)
        except ValueError as err:
            raise SpecError(str(err)) from None
        if not isinstance(self.calibration, str) or not self.calibration.strip():
            raise SpecError("calibration is empty: give c4, alpaca, wikitext2, unnatural, demo-prose, self or a file")
        for name in ("nsamples", "seqlen"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"{name} {value!r} is not allowed: use an integer of at least 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SpecError(f"seed {self.seed!r} is not allowed: use a non-negative integer")
        if self.template not in CALIBRATION_TEMPLATES:
            raise SpecError(f"template {self.template!r} is not allowed for calibration: use alpaca or chat")
        if self.order not in ORDERS:
            raise SpecError(f"order {self.order!r} is not allowed: use one of {', '.join(ORDERS)}")
        if self.per_row and self.method.strip().lower() != "magnitude":
            raise SpecError(f"per_row applies to magnitude only, not {self.method!r}")
        if self.dtype not in DTYPE_NAMES:
            raise SpecError(f"dtype {self.dtype!r} is not allowed: use one of {', '.join(DTYPE_NAMES)}")
        if not isinstance(self.evaluation, EvalSettings):
            raise SpecError("evaluation must be EvalSettings")
        self.evaluation.check()
        if not isinstance(self.targets, Targets):
            raise SpecError("targets must be Targets")
        try:
            self.targets.check(float(self.sparsity), pattern.structured)
        except ValueError as err:
            raise SpecError(str(err)) from None

    def to_dict(self) -> dict:
        """Plain JSON values: what the store keeps and the run id hashes."""
        return {**asdict(self), "evaluation": self.evaluation.to_dict(), "targets": self.targets.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> RunSpec:
        """A spec from its dict form; unknown fields are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown spec field(s) {', '.join(unknown)}: allowed are {', '.join(sorted(known))}")
        evaluation = data.get("evaluation") or {}
        if isinstance(evaluation, dict):
            allowed = {f.name for f in fields(EvalSettings)}
            bad = sorted(set(evaluation) - allowed)
            if bad:
                raise SpecError(f"unknown evaluation field(s) {', '.join(bad)}: allowed are {', '.join(sorted(allowed))}")
            evaluation = EvalSettings(**evaluation)
        targets = data.get("targets") or {}
        if isinstance(targets, dict):
            try:
                targets = Targets.from_dict(targets)
            except ValueError as err:
                raise SpecError(str(err)) from None
        return cls(**{**data, "evaluation": evaluation, "targets": targets})

    def summary(self) -> str:
        """A short label such as 'wanda 50% unstructured, c4 32x256'."""
        targets = "" if self.targets == Targets() else f" ({self.targets.describe()})"
        return (f"{self.method} {self.sparsity:.0%} {self.pattern}{targets}, {Path(self.calibration).name} "
                f"{self.nsamples}x{self.seqlen}")


def fingerprints(spec: RunSpec, data_dir: str | None = None, device: str = "auto") -> dict:
    """What the results depend on beyond the spec's words: the model's files (weights, config, tokenizer, chat
    template, generation config), the data's contents, and the provenance (device type, resolved dtype, code and
    library versions) of a worker started with `device`."""
    sources = {spec.calibration, *spec.evaluation.sources()}
    try:
        model = model_fingerprint(spec.model)
    except IdentityError as err:
        raise SpecError(str(err)) from None
    prints = {"model": model, "data": {s: data_fingerprint(s, data_dir) for s in sorted(sources)},
              "provenance": provenance(device, spec.dtype)}
    if spec.evaluation.lm_eval:
        from backend.sources.lm_tasks import fingerprint
        from metrics.harness import lm_eval_version
        prints["lm_eval"] = {"version": lm_eval_version(), "tasks": fingerprint(spec.evaluation.lm_eval_include)}
    return prints


def run_id(spec: RunSpec, prints: dict) -> str:
    """The same experiment on the same model files and data gets the same id. Targets came after runs were first
    stored: left at their default they are left out, so those runs keep their ids."""
    words = spec.to_dict()
    if spec.targets == Targets():
        del words["targets"]
    canonical = json.dumps({"spec": words, "fingerprints": prints}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def dense_key(spec: RunSpec, prints: dict) -> str:
    """Identifies the dense side of an evaluation: one model, one evaluation setting (the batch size included: left
    padding in half precision changes greedy answers), the same data, the same provenance."""
    data = {s: prints["data"].get(s) for s in spec.evaluation.sources()}
    words = {"model": spec.model, "model_fp": prints["model"], "dtype": spec.dtype,
             "evaluation": spec.evaluation.to_dict(), "data": data, "provenance": prints.get("provenance")}
    if spec.evaluation.lm_eval:
        words["lm_eval"] = prints.get("lm_eval")
    canonical = json.dumps(words, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def prune_key(spec: RunSpec, prints: dict) -> str:
    """Identifies a run's pruned weights and per-layer report: the model's files, dtype and provenance, the method
    with every setting, and the calibration (source and data, size, seed, template, records held out). Runs that
    differ only in what they evaluate have equal keys: a worker prunes those weights once."""
    calibration = {"source": spec.calibration, "data": prints["data"].get(spec.calibration), "nsamples": spec.nsamples,
                   "seqlen": spec.seqlen, "seed": spec.seed, "template": spec.template,
                   "held_out": spec.held_out_records()}
    words = {"model": spec.model, "model_fp": prints["model"], "dtype": spec.dtype,
             "provenance": prints.get("provenance"), "method": spec.method, "sparsity": spec.sparsity,
             "pattern": spec.pattern, "order": spec.order, "per_row": spec.per_row, "targets": spec.targets.to_dict(),
             "calibration": calibration}
    canonical = json.dumps(words, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def run_id_of(spec: RunSpec, data_dir: str | None = None, device: str = "auto") -> str:
    """The id a submission of this spec gets now (normalised, with today's model files, data and provenance)."""
    spec = spec.normalised()
    return run_id(spec, fingerprints(spec, data_dir, device))
