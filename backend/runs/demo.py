"""The demo run: Wanda 50% on the embedded model, on the real data sets when a data folder has them, else on the
text that ships with PruneScope, sized to finish in about two minutes on a 2-core CPU. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from backend.runs.spec import DEFAULT_MODEL, EvalSettings, RunSpec

REAL_SETS = ("c4", "wikitext2", "alpaca", "unnatural")


@dataclass(frozen=True)
class Demo:
    """The demo's spec and one sentence saying what data it uses and why."""

    spec: RunSpec
    reason: str


def demo(status: dict[str, str]) -> Demo:
    """The demo for the sources that load now (`status` as service.source_status gives it): the paper's sets when
    all four are in the data folder, else the built-in texts (never text the model writes itself: far slower)."""
    offline = {name for name, state in status.items() if state == "offline"}
    if set(REAL_SETS) <= offline:
        spec = RunSpec(method="wanda", sparsity=0.5, model=DEFAULT_MODEL, calibration="c4", nsamples=32, seqlen=256,
                       evaluation=EvalSettings(ppl="wikitext2", ppl_windows=10, jsd="alpaca", tasks="unnatural",
                                               limit=32))
        return Demo(spec, "The data folder holds C4, WikiText-2, Alpaca and Unnatural Instructions, so the demo "
                          "calibrates on C4 and evaluates on the paper's sets.")
    missing = ", ".join(n for n in REAL_SETS if n not in offline)
    spec = RunSpec(method="wanda", sparsity=0.5, model=DEFAULT_MODEL, calibration="demo-calibration", nsamples=16,
                   seqlen=256, evaluation=EvalSettings(ppl="demo-prose", ppl_windows=5, jsd="demo", tasks="demo",
                                                       limit=20, max_new_tokens=24))
    return Demo(spec, f"No data folder with the paper's sets is set ({missing} not found offline), so the demo uses "
                      "the English texts and instruction tasks that ship with PruneScope: calibration on one text, "
                      "perplexity on another. Set a data folder on the Run page or PRUNESCOPE_DATA_DIR to use C4, "
                      "WikiText-2, Alpaca and Unnatural Instructions.")
