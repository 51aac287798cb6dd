"""lm-eval as a first-class evaluation, against lm-eval's own code as the oracle: the scores PruneScope computes in
process (the tiny model through the store's worker, the embedded model through api.evaluate) equal those lm-eval's
own evaluator computes on the saved dense and pruned folders (the simple_evaluate call `python -m lm_eval --model
hf` makes; bench/lm_eval_bench.py runs that CLI itself on saved folders and compares), to 1e-9; the run's progress
counted lm-eval's requests; bad task settings are refused in one line with nothing queued."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from backend import api
from backend.runs.protocol import protocol_label
from backend.runs.store import Store
from backend.sources.lm_tasks import SHIPPED, SHIPPED_TASK
from metrics.harness import metric_name
from tests.conftest import error_line, run_cli

TINY_LIMIT, EMBEDDED_LIMIT = 24, 32
METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
ORACLE = Path(__file__).with_name("lm_eval_oracle.py")


class Oracle:
    """lm_eval_oracle.py in its own process, asked folder after folder while this process computes its own scores."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, str(ORACLE), str(SHIPPED), SHIPPED_TASK], cwd=SHIPPED,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.asked: list[int] = []

    def ask(self, folder: Path, limit: int) -> None:
        self.process.stdin.write(json.dumps({"folder": str(folder), "limit": limit}) + "\n")
        self.process.stdin.flush()
        self.asked.append(limit)

    def answers(self) -> list[dict[str, float]]:
        out, err = self.process.communicate(timeout=600)
        assert self.process.returncode == 0, err[-3000:]
        lines = [json.loads(line) for line in out.splitlines()]
        assert [line["effective"] for line in lines] == self.asked
        return [{metric_name(k): v for k, v in line["results"].items() if "," in k} for line in lines]


@pytest.fixture(scope="module")
def oracle(request, tiny_folder, embedded_folder, tmp_path_factory) -> dict:
    """PruneScope's scores and lm-eval's for four folders: the tiny dense model and its Wanda run from the store, the
    embedded model and its magnitude 50% pruned in process. lm-eval's own evaluator (lm_eval_oracle.py) scores the
    folders in a process of its own as they are written, beside this one."""
    root = tmp_path_factory.mktemp("lm-oracle")
    lm_eval = Oracle()
    lm_eval.ask(tiny_folder, TINY_LIMIT)
    lm_eval.ask(embedded_folder, EMBEDDED_LIMIT)
    store = Store(request.getfixturevalue("lm_store"))
    wanda = next(r for r in store.runs() if r["method"] == "wanda")
    tiny = store.metrics(wanda["run_id"])["summary"]
    lm_eval.ask(store.artifact(wanda["run_id"], "model")["path"], TINY_LIMIT)
    pruned = api.prune("smollm2-135m", "magnitude", 0.5, calibration="demo-prose", nsamples=1, seqlen=64,
                       device="cpu")
    lm_eval.ask(pruned.save(root / "embedded-magnitude"), EMBEDDED_LIMIT)
    dense = api.load("smollm2-135m", device="cpu")
    embedded, _ = api.evaluate(dense, pruned, ppl=None, jsd=None, tasks=None, lm_eval=(SHIPPED_TASK,),
                               lm_eval_limit=EMBEDDED_LIMIT, device="cpu")
    scores = dict(zip(("tiny dense", "embedded dense", "tiny pruned", "embedded pruned"), lm_eval.answers()))
    return {"ours": {"tiny": tiny, "embedded": embedded}, "run": wanda, "store": store, "lm_eval": scores}


@pytest.mark.parametrize("model", ["tiny", "embedded"])
def test_scores_equal_lm_evals_own_evaluator_on_the_saved_folders(oracle, model):
    summary = oracle["ours"][model]
    for side in ("dense", "pruned"):
        theirs = oracle["lm_eval"][f"{model} {side}"]
        for metric in METRICS:
            name = metric.removesuffix("_stderr")
            part = "lm_eval_stderr" if metric.endswith("_stderr") else "lm_eval"
            ours = summary[side][part][f"lm:{SHIPPED_TASK}:{name}"]
            assert abs(ours - theirs[metric]) <= 1e-9, (model, side, metric, ours, theirs[metric])
    protocol = summary["protocol"]["lm_eval"]
    limit = TINY_LIMIT if model == "tiny" else EMBEDDED_LIMIT
    assert protocol["examples"] == {SHIPPED_TASK: limit} and protocol["versions"] == {SHIPPED_TASK: "1.0"}
    assert protocol["fewshot"] == {SHIPPED_TASK: 0} and protocol["lm_eval_version"] == "0.4.13"
    # the paired interval of the change is drawn from the per-document values, which average to lm-eval's scores
    units = summary["units"]["lm_eval"]
    for side in ("dense", "pruned"):
        documents = units[side][f"lm:{SHIPPED_TASK}:acc"]
        assert len(documents) == limit
        assert abs(sum(documents) / limit - summary[side]["lm_eval"][f"lm:{SHIPPED_TASK}:acc"]) < 1e-12
    key = f"lm:{SHIPPED_TASK}:acc"
    low, high = summary["intervals"][f"delta.{key}"]
    assert low <= summary["pruned"]["lm_eval"][key] - summary["dense"]["lm_eval"][key] <= high


def test_the_run_counted_lm_evals_requests_and_its_row_carries_the_scores(oracle):
    store, run = oracle["store"], oracle["run"]
    job = store.latest_job(run["run_id"])
    assert (job["stage"], job["done"], job["total"]) == ("lm-eval pruned", 4 * TINY_LIMIT, 4 * TINY_LIMIT)
    row = next(r for r in store.runs() if r["run_id"] == run["run_id"])
    key = f"lm:{SHIPPED_TASK}:acc"
    assert row["lm_eval"] == [key, f"lm:{SHIPPED_TASK}:acc_norm"]
    assert row[f"pruned_{key}"] == oracle["lm_eval"]["tiny pruned"]["acc"]
    assert row[f"dense_{key}_stderr"] == pytest.approx(oracle["lm_eval"]["tiny dense"]["acc_stderr"], abs=1e-9)
    assert "lm-eval 0.4.13: prunescope_facts v1.0 (24 docs, 0-shot)" in protocol_label(row["protocol"])
    # the dense side is scored once for the two runs of the sweep, and both carry the same dense numbers
    summaries = [store.metrics(r["run_id"])["summary"] for r in store.runs()]
    assert sorted("lm_eval_dense" in s["seconds"] for s in summaries) == [False, True]
    assert summaries[0]["dense"] == summaries[1]["dense"]


@pytest.mark.parametrize("flags, said", [
    (["--lm-eval", "prunescope_fact"], "lm-eval task 'prunescope_fact' is not defined in PruneScope's tasks "
                                       "(prunescope_facts) nor among lm-eval's built-in tasks: did you mean "
                                       "prunescope_facts?"),
    (["--lm-eval", "arc_easy"], "lm-eval task 'arc_easy' reads its data from the Hugging Face hub, which does not "
                                "answer: run it where the hub is reachable, or use --lm-eval-include"),
    (["--lm-eval", "ten", "--lm-eval-include", "{broken}"], "lm-eval task file {broken}/ten.yaml, line 2:"),
    (["--lm-eval-limit", "5", "--ppl", "demo-prose"], "--lm-eval-limit, --lm-eval-fewshot and --lm-eval-include need "
                                                     "--lm-eval TASKS"),
])
def test_bad_lm_eval_settings_are_refused_in_one_line_with_nothing_queued(flags, said, tiny_folder, tmp_path,
                                                                           capsys):
    broken = tmp_path / "tasks"
    broken.mkdir()
    (broken / "ten.yaml").write_text("task: ten\n dataset_path: [json\n")
    flags = [f.format(broken=broken) for f in flags]
    code, _, err = run_cli(["run", "--model", str(tiny_folder), "--method", "wanda", "--sparsity", "0.5",
                            "--calibration", "demo-prose", "--nsamples", "4", "--seqlen", "64", *flags,
                            "--store", str(tmp_path / "store"), "--detach"], capsys)
    assert code == 2
    assert said.format(broken=broken) in error_line(err), err
    assert not (tmp_path / "store").exists() or Store(tmp_path / "store").runs() == []
