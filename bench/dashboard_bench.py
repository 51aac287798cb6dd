"""Server-side render time of every dashboard page with a store of 200 finished runs.

    python bench/dashboard_bench.py [--from-store DIR] [--runs 200] [--layers 30] [--repeats 5] [--keep DIR]

The 200 runs are made without running a model: the finished runs of an existing store (`--from-store`, else one
tiny Llama run made here by `python -m backend sweep`, ~1 min on a CPU) are copied under distinct specs (method x
sparsity x calibration x pattern x seed) through the real Store API (submit, claim_next, save_results, finish), with
their numbers moved plausibly by each spec (more damage for magnitude, higher sparsity, N:M patterns) plus noise, so
the charts have something to draw. `--layers N` spreads the per-layer report over N decoder layers (SmolLM2-135M
has 30; 0 keeps the source's). Each page (Home, Run and Layers and Generations of a done run, Compare) is then
rendered `--repeats` times by `streamlit.testing.v1.AppTest`, each time as a fresh session, after one untimed
render that pays the imports; printed: the first and the median seconds per page, whether the median is under
1 s, and how many Plotly charts the page drew; also the time of `Store.runs()`. Figures only: nothing here asserts
on time.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from backend.runs.spec import RunSpec, run_id  # noqa: E402
from backend.runs.store import Store  # noqa: E402
from backend.runs.worker import stop_worker  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt")
SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7)
CALIBRATIONS = ("c4", "alpaca", "wikitext2", "self")
PATTERNS = ("unstructured", "2:4", "4:8")
DAMAGE = {"magnitude": 2.5, "wanda": 1.0, "sparsegpt": 0.8}
CALIBRATION_DAMAGE = {"c4": 1.0, "alpaca": 1.15, "wikitext2": 1.05, "self": 1.3}
PATTERN_DAMAGE = {"unstructured": 1.0, "2:4": 1.8, "4:8": 1.4}
LN2 = math.log(2)
PAGES = {"Home": ("views/home.py", False), "Run": ("views/run.py", True), "Compare": ("views/compare.py", False),
         "Layers": ("views/layers.py", True), "Generations": ("views/generations.py", True)}


def tiny_source_store(folder: Path) -> Path:
    """One finished run of a tiny random Llama (the embedded tokenizer, 2 layers), made by the real CLI and worker."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from backend.sources.models import ensure_embedded
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded())
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    model_dir, store_dir = folder / "tiny-llama", folder / "source-store"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "backend", "sweep", "--model", str(model_dir), "--methods", "wanda",
                           "--sparsities", "0.5", "--calibrations", "demo-prose", "--nsamples", "4", "--seqlen", "64",
                           "--ppl", "demo-prose", "--ppl-seqlen", "64", "--ppl-windows", "2", "--jsd", "demo",
                           "--tasks", "demo", "--limit", "40", "--max-new-tokens", "8", "--store", str(store_dir),
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    stop_worker(store_dir)
    if done.returncode != 0:
        sys.exit(f"making the source run failed:\n{done.stderr[-3000:]}")
    print(f"source run: a tiny Llama pruned and evaluated by the worker in {time.perf_counter() - started:.1f} s")
    return store_dir


def finished_runs(root: Path) -> list[dict]:
    """Spec, fingerprints, metrics, per-layer report and examples of every done run of a store."""
    store = Store(root)
    runs = []
    for row in store.runs():
        metrics = store.metrics(row["run_id"])
        if row["state"] != "done" or not metrics:
            continue
        layers = [{"name": r["name"], "layer": r["layer"], "module": r["module"], "sparsity": r["sparsity"],
                   "rel_error": r["rel_error"], "seconds": r["seconds"], "shape": [r["rows"], r["cols"]],
                   "tokens": r["tokens"]} for r in store.layers(row["run_id"])]
        runs.append({"spec": store.spec(row["run_id"]), "prints": store.fingerprints(row["run_id"]),
                     "summary": metrics["summary"], "prune": metrics["prune"], "layers": layers,
                     "examples": store.examples(row["run_id"])})
    store.close()
    return runs


def grid(count: int) -> list[tuple[str, float, str, str, int]]:
    """`count` distinct (method, sparsity, calibration, pattern, seed), N:M patterns at their own sparsity."""
    cells = []
    for seed in itertools.count():
        for method, calibration, pattern in itertools.product(METHODS, CALIBRATIONS, PATTERNS):
            if pattern == "unstructured":
                cells += [(method, s, calibration, pattern, seed) for s in SPARSITIES]
            else:
                n, m = map(int, pattern.split(":"))
                cells.append((method, n / m, calibration, pattern, seed))
        if len(cells) >= count:
            return cells[:count]
    raise AssertionError("unreachable")


def deeper(layers: list[dict], depth: int, rng: random.Random) -> list[dict]:
    """The per-layer report spread over `depth` decoder layers, each copy's values moved a little."""
    if depth <= 0 or not layers:
        return layers
    modules = {}
    for row in layers:
        modules.setdefault(row["module"], row)
    out = []
    for layer in range(depth):
        for module, row in modules.items():
            out.append({**row, "layer": layer, "name": f"model.layers.{layer}.{module}",
                        "rel_error": (row["rel_error"] or 0.05) * (0.6 + 0.8 * layer / max(depth - 1, 1))
                        * rng.lognormvariate(0, 0.15)})
    return out


def perturbed(source: dict, cell: tuple, depth: int, rng: random.Random) -> tuple[RunSpec, dict, dict, list, list]:
    """The source run's results as if run with this cell's settings: damage grows with the settings, plus noise."""
    method, sparsity, calibration, pattern, seed = cell
    spec = replace(source["spec"], method=method, sparsity=sparsity, calibration=calibration, pattern=pattern,
                   seed=seed).normalised()
    damage = (DAMAGE[method] * CALIBRATION_DAMAGE[calibration] * PATTERN_DAMAGE[pattern]
              * math.exp(6 * (sparsity - 0.5)) * rng.lognormvariate(0, 0.2))
    summary = copy.deepcopy(source["summary"])
    dense, pruned = summary.setdefault("dense", {}), summary.setdefault("pruned", {})
    dense_ppl = dense.get("ppl") or 20.0
    dense["ppl"], pruned["ppl"] = dense_ppl, dense_ppl * (1 + 0.12 * damage)
    for metric, base in (("em", 0.45), ("f1", 0.62), ("rouge1", 0.65)):
        dense[metric] = dense.get(metric) or base  # a random tiny model scores 0: give the charts a dense score
        pruned[metric] = dense[metric] * math.exp(-0.25 * damage * rng.lognormvariate(0, 0.3))
    summary["jsd"] = min(LN2, 0.03 * damage)
    summary["kl_dense_pruned"] = 2.1 * summary["jsd"] * rng.lognormvariate(0, 0.1)
    summary["kl_pruned_dense"] = 1.9 * summary["jsd"] * rng.lognormvariate(0, 0.1)
    summary["flip_rate"] = min(0.95, 0.08 * damage)
    summary["answer_jsd"] = min(LN2, 0.035 * damage)
    prune = {**source["prune"], "method": method, "sparsity": sparsity, "pattern": pattern,
             "overall_sparsity": sparsity * (1 + rng.uniform(-0.002, 0.002))}
    layers = [{**row, "sparsity": sparsity * (1 + rng.uniform(-0.01, 0.01)),
               "rel_error": (row["rel_error"] or 0.05) * damage} for row in deeper(source["layers"], depth, rng)]
    scale = summary["jsd"] / max(source["summary"].get("jsd") or 1e-4, 1e-9)
    examples = []
    for example in copy.deepcopy(source["examples"]):
        for key in ("token_jsd", "pruned_token_jsd"):
            if isinstance(example.get(key), list):
                example[key] = [min(LN2, v * scale * rng.lognormvariate(0, 0.5)) for v in example[key]]
        for key in ("jsd", "answer_jsd"):
            if isinstance(example.get(key), (int, float)):
                example[key] = min(LN2, example[key] * scale)
        examples.append(example)
    return spec, summary, prune, layers, examples


def fill(root: Path, sources: list[dict], count: int, depth: int) -> list[str]:
    """`count` finished runs through the real Store API; returns their ids."""
    store, rng, ids = Store(root), random.Random(0), []
    for i, cell in enumerate(grid(count)):
        source = sources[i % len(sources)]
        spec, summary, prune, layers, examples = perturbed(source, cell, depth, rng)
        rid = run_id(spec, source["prints"])
        submission = store.submit(spec, source["prints"], rid)
        job = store.claim_next(pid=os.getpid())
        assert job is not None and job["job_id"] == submission.job_id, "the store had other queued work"
        store.save_results(rid, prune, layers, summary, examples)
        store.finish(job["job_id"], "done", worker_pid=os.getpid())
        ids.append(rid)
    store.close()
    return ids


def render(page: str, rid: str | None, repeats: int) -> tuple[list[float], list[str], int]:
    """Seconds of `repeats` renders of one page, each by a fresh AppTest session; any exception texts; and how many
    Plotly charts the last render drew."""
    import logging

    from streamlit.testing.v1 import AppTest
    # AppTest's "missing ScriptRunContext" warnings, one per session
    logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context").setLevel(logging.ERROR)
    seconds, errors, charts = [], [], 0
    for _ in range(repeats):
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        at.switch_page(page)
        if rid:
            at.query_params["run"] = rid
        started = time.perf_counter()
        at.run()
        seconds.append(time.perf_counter() - started)
        errors += [e.value for e in at.exception]
        charts = len(at.get("plotly_chart"))
    return seconds, errors, charts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-store", type=Path, help="copy this store's finished runs (default: make one)")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--layers", type=int, default=30, help="decoder layers per run's report (0: the source's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="build the store here and keep it (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as tmp:
        work = Path(tmp)
        sources = finished_runs(args.from_store or tiny_source_store(work))
        if not sources:
            sys.exit(f"no finished runs in {args.from_store}")
        root = args.keep or work / "store"
        if (root / "prunescope.db").exists():
            sys.exit(f"{root} already holds a store: give an empty folder")
        started = time.perf_counter()
        ids = fill(root, sources, args.runs, args.layers)
        size = (root / "prunescope.db").stat().st_size / 2**20
        print(f"store: {len(ids)} finished runs from {len(sources)} source run(s), "
              f"{sum(len(s['examples']) for s in sources) / len(sources):.0f} examples and "
              f"{len(ids) and len(Store(root).layers(ids[0]))} layer rows per run, {size:.1f} MiB, "
              f"built in {time.perf_counter() - started:.1f} s at {root}")

        store = Store(root)
        times = []
        for _ in range(max(args.repeats, 5)):
            started = time.perf_counter()
            rows = store.runs()
            times.append(time.perf_counter() - started)
        store.close()
        print(f"Store.runs(): {len(rows)} rows, median {statistics.median(times) * 1000:.1f} ms "
              f"(min {min(times) * 1000:.1f} ms)")

        os.environ["PRUNESCOPE_STORE"] = str(root)
        os.environ.pop("PRUNESCOPE_DATA_DIR", None)
        rid = ids[len(ids) // 2]
        warm_up, _, _ = render("views/home.py", None, 1)
        print(f"warm-up: one untimed Home render, {warm_up[0]:.2f} s (imports streamlit, pandas, plotly once)")
        print(f"pages, {args.repeats} renders each by AppTest (a fresh session each), run {rid} where one is shown:")
        print(f"  {'page':<12} {'first s':>8} {'median s':>9} {'min s':>7} {'max s':>7} {'charts':>7}  median < 1 s")
        for name, (page, with_run) in PAGES.items():
            seconds, errors, charts = render(page, rid if with_run else None, args.repeats)
            median = statistics.median(seconds)
            print(f"  {name:<12} {seconds[0]:8.3f} {median:9.3f} {min(seconds):7.3f} {max(seconds):7.3f} {charts:7d}  "
                  f"{'yes' if median < 1 else 'NO'}" + (f"  EXCEPTION: {errors[0][:200]}" if errors else ""),
                  flush=True)
        print(f"(load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
