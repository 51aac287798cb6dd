"""A job's progress as one whole: its stages in order, each weighted by its estimated seconds (measured on the last
job of the same model and device when there is one, else a prior per unit of work), the overall fraction done and
the time left; and a generation streamer that reports every decoding step, so no counter sits still for minutes."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from backend.runs.spec import RunSpec
from backend.runs.store import Store

# prior seconds per unit of work for a 135M-parameter model on a 2-core CPU in fp32 (measured there on the demo);
# they scale with the parameter count and give way to the rate measured by an earlier job as soon as one exists
PRIOR_SECONDS = {
    "calibration": 0.02,            # per window, tokenizing text
    "calibration self": 0.017,      # per generated token of one row (batches of 16 rows)
    "pruning": 0.53 / 8192,         # per decoder layer and calibration token, times the method's cost
    "saving": 6.5,                  # per model
    "perplexity": 1.26 / 512,       # per token
    "answers": 0.008,               # per generated token of one row
    "judge": 1.0,                   # per answer (an API call)
    "divergence": 0.22,             # per record, both models
    "divergence on answers": 0.25,  # per answer, both models
    "lm-eval": 0.09,                # per document of a 4-way multiple-choice task
}
LM_EVAL_DOCUMENTS = 100  # documents assumed per lm-eval task without --lm-eval-limit, until one job has measured
PRIOR_PARAMS = 135e6
METHOD_COST = {"magnitude": 0.5, "wanda": 1.0, "sparsegpt": 1.6, "ria": 1.0}
OWL_PASS_COST = 0.5  # OWL's allocation pass: one dense forward of the calibration through every layer
CONFIDENCE_S = 10.0  # how many seconds of the plan the prior is worth against the pace measured so far


def rate_key(stage: str) -> str:
    """The work a stage does, shared by its dense and pruned sides ('perplexity dense' -> 'perplexity')."""
    return stage.removesuffix(" dense").removesuffix(" pruned")


@dataclass(frozen=True)
class Stage:
    """One stage of a job: its name as reported, its units of work and its estimated seconds."""

    name: str
    work: float
    seconds: float


def plan_for(spec: RunSpec, params: int, layers: int, dense_reused: bool, measured: dict[str, float]) -> list[Stage]:
    """The stages a full job goes through, in order, with their work and estimated seconds; `measured` maps a
    rate key to seconds per unit of work from an earlier job of the same model and device."""
    scale = params / PRIOR_PARAMS
    ev = spec.evaluation
    self_generated = spec.calibration == "self"

    def stage(name: str, work: float, prior: str | None = None) -> Stage:
        key = rate_key(name)
        rate = measured.get(key, PRIOR_SECONDS[prior or key] * scale)
        return Stage(name, work, work * rate)

    stages = [stage("calibration", spec.nsamples * (spec.seqlen if self_generated else 1),
                    "calibration self" if self_generated else None),
              stage("pruning", layers * spec.nsamples * spec.seqlen
                    * (METHOD_COST.get(spec.method, 1.0) + OWL_PASS_COST * (spec.targets.allocation == "owl"))),
              stage("saving", 1)]
    for side in ("pruned",) if dense_reused else ("dense", "pruned"):
        if ev.ppl:
            stages.append(stage(f"perplexity {side}", ev.ppl_windows * ev.ppl_seqlen))
        if ev.tasks:
            stages.append(stage(f"answers {side}", ev.limit * ev.max_new_tokens))
            if ev.judge_model:
                stages.append(stage(f"judge {side}", ev.limit))
        if ev.lm_eval:
            stages.append(stage(f"lm-eval {side}", len(ev.lm_eval) * (ev.lm_eval_limit or LM_EVAL_DOCUMENTS)))
    if ev.jsd:
        stages.append(stage("divergence", ev.jsd_records))
    if ev.tasks:
        stages.append(stage("divergence on answers", ev.limit))
    return stages


def self_calibration_seconds(nsamples: int, seqlen: int, params: float = PRIOR_PARAMS) -> float:
    """About how long the model takes to write its own calibration text on a 2-core CPU (the prior rate)."""
    return nsamples * seqlen * PRIOR_SECONDS["calibration self"] * params / PRIOR_PARAMS


def measured_rates(store: Store, model: str, device_type: str | None, calibration_self: bool) -> dict[str, float]:
    """Seconds per unit of work of each kind of stage, from the newest finished job of the same model on the same
    device type that ran it (calibration only from a job that calibrated the same way; a job that reused another
    run's evaluation ran no evaluation stage)."""
    rows = store.db.execute(
        "SELECT j.timings, r.fingerprints, r.calibration FROM jobs j JOIN runs r ON r.run_id = j.run_id "
        "WHERE r.model = ? AND j.state = 'done' AND j.timings IS NOT NULL ORDER BY j.job_id DESC LIMIT 20",
        (model,)).fetchall()
    found: dict[str, float] = {}
    for row in rows:
        origin = json.loads(row["fingerprints"]).get("provenance") or {}
        if origin.get("device_type") != device_type:
            continue
        rates = {rate_key(name): t["seconds"] / t["work"] for name, t in json.loads(row["timings"]).items()
                 if t.get("work")}
        if (row["calibration"] == "self") != calibration_self:
            rates.pop("calibration", None)
        for key, rate in rates.items():
            found.setdefault(key, rate)
    return found


class Cancelled(Exception):
    """The user asked to cancel the job."""


@dataclass
class Reporter:
    """Writes a job's stage, its progress and the whole job's fraction and time left to the store at most every
    `interval` seconds (always at a stage's start and end), times each stage, and turns a cancel request into
    Cancelled."""

    store: Store
    job_id: int
    interval: float = 0.5
    last: float = 0.0
    stage: str = ""
    plan: list[Stage] = field(default_factory=list)
    began: float | None = None
    timings: dict[str, dict] = field(default_factory=dict)
    _stage_began: float = 0.0

    def start_plan(self, plan: list[Stage]) -> None:
        self.plan, self.began = plan, time.monotonic()

    def _close_stage(self, now: float) -> None:
        planned = {s.name: s for s in self.plan}
        if self.stage in planned:
            self.timings[self.stage] = {"seconds": now - self._stage_began, "work": planned[self.stage].work}

    def overall(self, stage: str, done: int | None, total: int | None) -> tuple[float | None, float | None]:
        """(fraction of the planned seconds done, seconds left) at this report; (None, None) before a plan."""
        names = [s.name for s in self.plan]
        if not self.plan or stage not in names or self.began is None:
            return None, None
        index = names.index(stage)
        planned = sum(s.seconds for s in self.plan)
        current = self.plan[index].seconds * (min(done or 0, total) / total if total else 0.0)
        done_s = sum(s.seconds for s in self.plan[:index]) + current
        elapsed = time.monotonic() - self.began
        pace = (elapsed + CONFIDENCE_S) / (done_s + CONFIDENCE_S)
        return (done_s / planned if planned else None), max(planned - done_s, 0.0) * pace

    def __call__(self, stage: str, done: int | None = None, total: int | None = None, message: str | None = None,
                 ) -> None:
        now = time.monotonic()
        changed = stage != self.stage
        boundary = changed or (total is not None and done in (0, total))
        if not boundary and now - self.last < self.interval:
            return
        if changed:
            self._close_stage(now)
            self._stage_began = now
        self.stage, self.last = stage, now
        fraction, left = self.overall(stage, done, total)
        if self.store.progress(self.job_id, stage, done, total, message, fraction, left):
            raise Cancelled(f"cancelled during {stage}")

    def finish(self) -> None:
        """Close the last stage and keep every stage's measured seconds for the next jobs' estimates."""
        self._close_stage(time.monotonic())
        self.store.save_timings(self.job_id, self.timings)


class TokenSteps:
    """A streamer for transformers' `generate` (its put/end interface) that counts decoded tokens, one per row per
    step, across calls, so a long generation reports as it goes; the prompt each call first hands over is not
    counted. Torch-free, so pages can import this module."""

    def __init__(self, on_tokens) -> None:
        self.on_tokens, self.tokens, self._prompt_seen = on_tokens, 0, False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.tokens += int(value.shape[0])
        self.on_tokens(self.tokens)

    def end(self) -> None:
        self._prompt_seen = False
