"""No evaluation twice: two runs whose pruned weights are the same bytes (magnitude ignores the calibration set) share
one evaluation, each keeping its own per-layer report."""

from __future__ import annotations

from backend.runs.store import Store


def test_magnitude_under_two_calibrations_is_evaluated_once(filled_store):
    store = Store(filled_store)
    runs = [r for r in store.runs() if store.spec(r["run_id"]).method == "magnitude"]
    assert len(runs) == 2 and {store.spec(r["run_id"]).calibration for r in runs} == {"demo-prose", "demo"}
    weights = [{n: f["sha256"] for n, f in store.artifact(r["run_id"], "model")["files"].items()
                if n.endswith(".safetensors")} for r in runs]
    assert weights[0] == weights[1]
    summaries = {r["run_id"]: store.metrics(r["run_id"])["summary"] for r in runs}
    reused = [rid for rid, s in summaries.items() if s.get("evaluation_reused_from")]
    assert len(reused) == 1
    source = summaries[reused[0]]["evaluation_reused_from"]
    assert source in summaries and source != reused[0]
    strip = lambda s: {k: v for k, v in s.items() if k != "evaluation_reused_from"}
    assert strip(summaries[reused[0]]) == strip(summaries[source])
    assert store.examples(reused[0]) == store.examples(source)
    own = [[row["rel_error"] for row in store.layers(r["run_id"])] for r in runs]
    assert own[0] != own[1]  # each run's reconstruction errors are measured on its own calibration tokens
    wanda = [store.metrics(r["run_id"])["summary"] for r in store.runs() if store.spec(r["run_id"]).method == "wanda"]
    assert not any(s.get("evaluation_reused_from") for s in wanda)
