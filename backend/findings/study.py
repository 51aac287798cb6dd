"""The paper study: the runs the three claims of arXiv 2409.11233 need (the three methods x C4 and Alpaca calibration
at 50%) plus a sparsity ladder for the predictor question, with the settings of a full and a quick study."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from backend.runs.spec import EvalSettings, RunSpec
from backend.sources.names import DEFAULT_MODEL

METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")  # methods whose masks read the calibration data
CLAIM_SPARSITY = 0.5
PATTERN = "unstructured"
GENERAL, TASK_SPECIFIC = "c4", "alpaca"


@dataclass(frozen=True, order=True)
class Cell:
    """One run of a study, by what sets it apart from the others: method, sparsity, pattern, calibration source."""

    method: str
    sparsity: float
    pattern: str = PATTERN
    calibration: str = GENERAL

    def label(self) -> str:
        return f"{self.method} {self.sparsity:.0%} {self.pattern} · {os.path.basename(self.calibration)} calibration"

    def of(self, base: RunSpec) -> RunSpec:
        """This cell with every other setting of `base` (so it joins base's cohort)."""
        return replace(base, method=self.method, sparsity=self.sparsity, pattern=self.pattern,
                       calibration=self.calibration, per_row=False).normalised()


CLAIM_CELLS = tuple(Cell(m, CLAIM_SPARSITY, PATTERN, c) for m in METHODS for c in (GENERAL, TASK_SPECIFIC))
LADDER = {"quick": (Cell("magnitude", 0.3), *(Cell(m, s) for s in (0.3, 0.6) for m in CALIBRATED)),
          "full": tuple(Cell(m, s) for s in (0.2, 0.3, 0.4, 0.6, 0.7) for m in METHODS)}
# the quick study fits in about half an hour on a 2-core CPU with the embedded model; the full one is the paper's
# protocol (128 x 2048 calibration, 2048-token perplexity windows), for a GPU
SETTINGS = {
    "quick": dict(nsamples=32, seqlen=256, evaluation=EvalSettings(
        ppl="wikitext2", ppl_seqlen=512, ppl_windows=10, jsd="alpaca", tasks="unnatural", limit=64, jsd_limit=32,
        max_new_tokens=16)),
    "full": dict(nsamples=128, seqlen=2048, evaluation=EvalSettings(
        ppl="wikitext2", ppl_seqlen=2048, ppl_windows=40, jsd="alpaca", tasks="unnatural", limit=200,
        max_new_tokens=32)),
}
STUDIES = ("paper",)


def cells(size: str = "quick") -> tuple[Cell, ...]:
    """Every run of the paper study: the claims' cells, then the ladder's."""
    return CLAIM_CELLS + LADDER[size]


def base_spec(model: str = DEFAULT_MODEL, size: str = "quick", **overrides) -> RunSpec:
    """The settings every run of a study shares; `overrides` change any RunSpec field (evaluation: EvalSettings
    fields by name)."""
    if size not in SETTINGS:
        raise ValueError(f"study size {size!r} is not allowed: use one of {', '.join(SETTINGS)}")
    settings = dict(SETTINGS[size])
    evaluation = replace(settings.pop("evaluation"), **{k: v for k, v in overrides.items()
                                                          if k in EvalSettings.__dataclass_fields__})
    spec = {**settings, **{k: v for k, v in overrides.items() if k in RunSpec.__dataclass_fields__}}
    return RunSpec(method=METHODS[0], sparsity=CLAIM_SPARSITY, model=model, evaluation=evaluation, **spec)


def specs(base: RunSpec, wanted: tuple[Cell, ...]) -> list[RunSpec]:
    """The runs of `wanted` with base's other settings."""
    return [cell.of(base) for cell in wanted]
