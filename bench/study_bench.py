"""A fixed small study timed on this commit and on an older one, in one invocation, as issue 17 asks.

The study: the embedded model, magnitude / Wanda / SparseGPT at 50% x calibrations C4 and Alpaca (16 x 512 tokens),
each run evaluated on WikiText-2 perplexity (512 x 5), JS divergence on 20 Alpaca records and greedy answers to 20
Unnatural Instructions (EOS stops them, 32 new tokens at most). Each side runs it through its own CLI
(`python -m backend sweep`) into a fresh store, old and new alternating for --rounds rounds; the old side runs from
a git worktree of --old (removed at the end). Printed: each side's whole-study wall seconds and per-stage seconds
summed over the study's jobs (from the store's job timings), and new/old ratios; whether both studies measured the
same numbers; then, on this commit: propagation tokens/s inside pruning against the raw forward of the same decoder
layers on the same tokens, and greedy generation of 64 Unnatural answers against one prompt at a time; then the
study's floor: the seconds of the forwards it cannot do without and of SparseGPT's reference arithmetic, each timed
bare, and of the rest of the work its numbers and artifacts need (saving, the final check, layer errors, masks, the
dense model reading the pruned answers, starting a worker), against the old study's time when the study part ran.

    python bench/study_bench.py --old COMMIT [COMMIT ...] [--rounds 1] [--only study propagation generation floor]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = ("--model", "smollm2-135m", "--methods", "magnitude", "wanda", "sparsegpt", "--sparsities", "0.5",
         "--calibrations", "c4", "alpaca", "--nsamples", "16", "--seqlen", "512", "--ppl", "wikitext2",
         "--ppl-seqlen", "512", "--ppl-windows", "5", "--jsd", "alpaca", "--tasks", "unnatural", "--limit", "20",
         "--max-new-tokens", "32")
PARTS = ("study", "propagation", "generation", "floor")
SAME = ("overall_sparsity", "dense_ppl", "pruned_ppl", "jsd", "flip_rate", "dense_f1", "pruned_f1")


def study(tree: Path, data_dir: str, store: Path) -> dict:
    """The study through `tree`'s own CLI into a new store: wall seconds, per-stage seconds, each run's numbers."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PRUNESCOPE_EXECUTOR": "local"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "backend", "sweep", *STUDY, "--data-dir", data_dir, "--store",
                           str(store), "--json"], cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the study failed in {tree}:\n{done.stderr[-3000:]}")
    subprocess.run([sys.executable, "-m", "backend", "worker", "--store", str(store), "--idle-exit", "0"], cwd=tree,
                   env=env, capture_output=True)
    db = sqlite3.connect(store / "prunescope.db")
    stages: dict[str, float] = defaultdict(float)
    ended = db.execute("SELECT state, message FROM jobs WHERE state != 'done'").fetchall()
    timed = "timings" in {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    jobs = db.execute(f"SELECT {'timings' if timed else 'NULL'} FROM jobs WHERE state = 'done'").fetchall()
    for (timings,) in jobs:
        for stage, value in json.loads(timings or "{}").items():
            stages[stage] += value["seconds"]
    db.close()
    runs = {r["run_id"]: r for r in json.loads(done.stdout)["runs"]}
    if len(jobs) != len(runs) or not all(r["state"] == "done" for r in runs.values()):
        raise SystemExit(f"the study in {tree} ended with {len(jobs)} finished jobs for {len(runs)} runs; the others: "
                         + "; ".join(f"{state}: {message}" for state, message in ended[:4]))
    return {"wall": wall, "stages": dict(stages), "runs": runs, "jobs": len(jobs)}


def cell(run: dict) -> tuple[str, str]:
    """What matches a run across the two studies: its method and calibration (the run ids differ, since an id
    includes the code's version)."""
    return run["method"], run["calibration"]


def compare(old: dict, new: dict) -> list[str]:
    """Where the two studies measured different numbers, run by run (matched by `cell`)."""
    olds = {cell(r): r for r in old["runs"].values()}
    found = []
    for run in new["runs"].values():
        other = olds.get(cell(run))
        if other is None:
            found.append(f"{cell(run)} only on the new side")
            continue
        for key in SAME:
            a, b = other.get(key), run.get(key)
            if (a is None) != (b is None) or (a is not None and abs(a - b) > 1e-6 * max(1.0, abs(a))):
                found.append(f"{' x '.join(cell(run))} {key}: old {a} new {b}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", nargs="+", help="the commit(s) to compare the study with (a git worktree of "
                                                 "each is made); needed for the study part")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--data-dir", default=os.environ.get("PRUNESCOPE_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--only", nargs="+", choices=PARTS, default=PARTS, help="the parts to run (default: all)")
    parser.add_argument("--generation-rounds", type=int, default=3, help="alternating rounds of the generation "
                                                                          "figure (the fastest of each is kept)")
    args = parser.parse_args()
    for flag in ("rounds", "generation_rounds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not allowed: use at least 1")
    walls: dict[str, float] = {}
    if "study" in args.only:
        if not args.old:
            parser.error("--old COMMIT is needed for the study")
        walls = compare_studies(args.old, args.rounds, args.data_dir)
    if "propagation" in args.only:
        propagation_ratio(args.data_dir)
    if "generation" in args.only:
        generation_ratio(args.data_dir, rounds=args.generation_rounds)
    if "floor" in args.only:
        study_floor(args.data_dir, walls)


def compare_studies(olds: list[str], rounds: int, data_dir: str) -> dict[str, float]:
    """The study on each old commit and on this one, alternating for `rounds` rounds, then each old one against it.
    Returns each side's mean wall seconds ("new" for this commit)."""
    work = Path(tempfile.mkdtemp(prefix="prunescope-study-bench-"))
    trees = {commit: work / f"old-{i}" for i, commit in enumerate(olds)}
    for commit, tree in trees.items():
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), commit], cwd=ROOT, check=True)
    try:
        sides: dict[str, list[dict]] = {name: [] for name in [*trees, "new"]}
        for round_ in range(rounds):
            for name, tree in [*trees.items(), ("new", ROOT)]:
                result = study(tree, data_dir, work / f"{tree.name}-{round_}")
                sides[name].append(result)
                print(f"round {round_ + 1} {name}: {result['wall']:.1f} s, {result['jobs']} jobs, stages summed "
                      f"{sum(result['stages'].values()):.1f} s", flush=True)
        for commit in trees:
            report({"old": sides[commit], "new": sides["new"]}, commit)
        return {name: sum(r["wall"] for r in runs) / len(runs) for name, runs in sides.items()}
    finally:
        for tree in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
        subprocess.run(["rm", "-rf", str(work)])


def propagation_ratio(data_dir: str) -> None:
    """Propagation inside pruning (the layers' forwards, the hooks' own seconds excluded) against a plain forward of
    the same decoder layers on the same calibration tokens, mini-batches and arguments, in this process."""
    import torch

    from backend.sources.calibration import build_calibration, open_source
    from backend.sources.models import load
    from compression.driver import auto_batch_size, prune_model
    from compression.layers import call_layer, capture_layer_inputs, decoder_layers
    from compression.methods import create

    lm = load("smollm2-135m", "cpu", "float32")
    windows = build_calibration(open_source("c4", data_dir), lm.model, lm.tokenizer, 16, 512, 0, "alpaca")
    _, layers = decoder_layers(lm.model)
    batch = auto_batch_size(lm.model, 16, 512, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        inputs = capture_layer_inputs(lm.model, layers, list(windows.split(batch)), torch.device("cpu"))
        hidden = inputs.hidden
        started = time.perf_counter()
        for i, layer in enumerate(layers):
            hidden = [call_layer(layer, h, a, k) for h, a, k in zip(hidden, inputs.args[i], inputs.kwargs[i])]
        raw = time.perf_counter() - started
    tokens = windows.numel() * len(layers)
    print(f"\nraw forward of the {len(layers)} decoder layers on 16 x 512 C4 tokens (mini-batches of {batch}): "
          f"{raw:.1f} s, {tokens / raw:.0f} layer-tokens/s")
    for method in ("wanda", "sparsegpt"):
        model = load("smollm2-135m", "cpu", "float32").model
        report = prune_model(model, windows, create(method, sparsity=0.5), batch_size=batch)
        seconds = report.stages["propagation"]
        print(f"{method} sequential: propagation {seconds:.1f} s, {tokens / seconds:.0f} layer-tokens/s = "
              f"{raw / seconds:.2f}x raw forward (target >= 0.8x); statistics {report.stages.get('statistics', 0):.1f} "
              f"s, pruning {report.stages.get('pruning', 0):.1f} s")


def generation_ratio(data_dir: str, count: int = 64, rounds: int = 3) -> None:
    """Greedy answers to `count` Unnatural prompts, EOS stopping them: tokens/s of batches of 16, of batches prefilled
    apart and decoded together, and of the evaluation's path (the prompts' shared prefix once, then that), against one
    prompt at a time. The ways alternate for `rounds` rounds and each keeps its fastest (this machine's speed drifts
    by tens of percent within minutes)."""
    from backend.sources.datasets import load_source
    from backend.sources.models import load
    from metrics.generation import DECODE_ROWS, generate_answers
    from metrics.prompts import prompt_renderer

    lm = load("smollm2-135m", "cpu", "float32")
    records = load_source("unnatural", data_dir, limit=count).items
    prompts = [prompt_renderer("chat" if lm.tokenizer.chat_template else "unnatural", lm.tokenizer)(r)
               for r in records]
    ways = {"one at a time": (1, 1, False), "batches of 16": (16, 16, False),
            "prefill 16, decode together": (16, DECODE_ROWS, False),
            "prefill 16 after the shared prefix, decode together (the evaluation's path)": (16, DECODE_ROWS, True)}
    seconds: dict[str, list[float]] = defaultdict(list)
    answers = {}
    for _ in range(rounds):
        for way, (size, rows, share) in ways.items():
            started = time.perf_counter()
            answers[way] = generate_answers(lm.model, lm.tokenizer, prompts, max_new_tokens=32, batch_size=size,
                                            decode_rows=rows, share_prefix=share).ids
            seconds[way].append(time.perf_counter() - started)
    tokens = sum(map(len, answers["one at a time"]))
    alone = min(seconds["one at a time"])
    print(f"greedy generation of {count} Unnatural answers ({tokens} tokens; EOS stops them, 32 new tokens at most), "
          f"fastest of {rounds} alternating rounds; one prompt at a time: {alone:.1f} s, {tokens / alone:.1f} tokens/s "
          f"(rounds: {', '.join(f'{s:.1f}' for s in seconds['one at a time'])} s)")
    for way in list(ways)[1:]:
        best = min(seconds[way])
        print(f"  {way}: {best:.1f} s = {alone / best:.2f}x (target >= 4x; rounds: "
              f"{', '.join(f'{alone_s / s:.2f}x' for alone_s, s in zip(seconds['one at a time'], seconds[way]))}); "
              f"the same answers: {'yes' if answers[way] == answers['one at a time'] else 'NO'}")


def study_floor(data_dir: str, walls: dict[str, float]) -> None:
    """A lower bound of the study's seconds that keeps its numbers: the forwards it cannot do without, each timed bare
    on the dense model (a pruned model of the same shapes costs the same), and SparseGPT's reference arithmetic, timed
    inside its pruning. Per calibration: Wanda and SparseGPT each propagate its 16 x 512 tokens through the decoder
    layers, magnitude only its 512-token error sample (its masks need no calibration). Per model evaluated (the dense
    one and the 5 distinct pruned ones): the perplexity windows with the head at every position, each JS record alone
    with the head at its scored positions, and each task prompt alone followed by its greedy answer (the dense
    model's), the head at the answer's positions: no decoding computes less. Left out, so the bound stays below what
    any implementation needs: tokenizing, loading, the JS arithmetic, masks and layer errors, saving, the final check,
    the dense model reading the pruned answers for the JS along them. Most of those are then timed bare as well
    (`required_work`), for a second bound: what the study's numbers and artifacts need at the least."""
    import torch
    from metrics_bench import timed

    from backend.runs.evaluate import perplexity_texts, records_of, task_prompts, template_for
    from backend.runs.spec import EvalSettings
    from backend.sources.calibration import build_calibration, open_source
    from backend.sources.models import load
    from compression.driver import auto_batch_size, prune_model
    from compression.layers import call_layer, capture_layer_inputs, decoder_layers
    from compression.methods import create
    from metrics.divergence import teacher_forced
    from metrics.generation import generate_answers
    from metrics.heads import head_inputs
    from metrics.perplexity import token_stream
    from metrics.prompts import prompt_renderer

    lm = load("smollm2-135m", "cpu", "float32")
    model, tokenizer = lm.model, lm.tokenizer
    head = model.get_output_embeddings()
    _, layers = decoder_layers(model)
    settings = EvalSettings(ppl="wikitext2", ppl_seqlen=512, ppl_windows=5, jsd="alpaca", tasks="unnatural", limit=20,
                            max_new_tokens=32)
    models = 6
    parts: dict[str, float] = defaultdict(float)

    with torch.no_grad():
        for source in ("c4", "alpaca"):
            windows = build_calibration(open_source(source, data_dir), model, tokenizer, 16, 512, 0, "alpaca")
            batches = list(windows.split(auto_batch_size(model, 16, 512, torch.device("cpu"), torch.float32)))
            inputs = capture_layer_inputs(model, layers, batches, torch.device("cpu"))

            def through(count: int) -> None:
                hidden = inputs.hidden[:count]
                for i, layer in enumerate(layers):
                    hidden = [call_layer(layer, h, a, k) for h, a, k in
                              zip(hidden, inputs.args[i][:count], inputs.kwargs[i][:count])]

            propagation = timed(lambda: through(len(batches)))
            parts["propagation: 2 methods x 16 x 512 tokens, per calibration"] += 2 * propagation
            inputs = capture_layer_inputs(model, layers, [batches[0][:1]], torch.device("cpu"))
            parts["magnitude's error sample: 1 x 512 tokens, per calibration"] += timed(lambda: through(1))
            pruned = load("smollm2-135m", "cpu", "float32").model
            stages = prune_model(pruned, windows, create("sparsegpt", sparsity=0.5)).stages
            parts["SparseGPT's statistics and sweep, per calibration"] += stages.get("statistics", 0) + stages.get(
                "pruning", 0)
            del pruned
        _, texts = perplexity_texts("wikitext2", data_dir)
        ids = token_stream(texts, tokenizer)[:5 * 512].reshape(5, 512)
        parts[f"perplexity: 5 x 512 tokens, head everywhere, x {models} models"] = models * timed(
            lambda: [head(head_inputs(model, ids[i:i + 1])) for i in range(5)])
        records = records_of("alpaca", data_dir, settings.jsd_records)
        sequences, scored = teacher_forced(records, tokenizer, prompt_renderer(
            template_for(settings, tokenizer, "alpaca"), tokenizer), settings.response_only)
        parts[f"JS records: {sum(map(len, sequences))} tokens, head at {sum(int(m.sum()) for m in scored)}, "
              f"x {models} models"] = models * timed(
            lambda: [head(head_inputs(model, seq[None])[0, mask]) for seq, mask in zip(sequences, scored)])
        prompts = task_prompts(settings, tokenizer, records_of("unnatural", data_dir, settings.limit))
        encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens=32).ids
        parts[f"task answers: {sum(map(len, encoded))} prompt + {sum(map(len, answers))} answer tokens, "
              f"x {models} models"] = models * timed(
            lambda: [head(head_inputs(model, torch.tensor([p + a]))[0, len(p) - 1:]) for p, a in zip(encoded, answers)])
        required = required_work(lm, data_dir, encoded, answers, sum(int(m.sum()) for m in scored))
    floor = sum(parts.values())
    show("the study's floor (bare forwards and SparseGPT's reference arithmetic, nothing else):", parts, floor, walls,
         "the floor")
    show("what the study must also do, each timed bare (what its numbers and artifacts need beyond the floor):",
         required, floor + sum(required.values()), walls, "the floor with required work")


def show(title: str, parts: dict[str, float], bound: float, walls: dict[str, float], what: str) -> None:
    """Print a bound's parts and total, then each study's wall seconds against the bound (`what` names it)."""
    print(f"\n{title}")
    for name, seconds in parts.items():
        print(f"  {name}: {seconds:.1f} s")
    total = sum(parts.values())
    print(f"  total: {total:.1f} s" + ("" if bound == total else f"; with the floor: {bound:.1f} s"))
    for name, wall in walls.items():
        if name == "new":
            print(f"  the new study ({wall:.1f} s) spends {wall - bound:.1f} s beyond {what}")
        else:
            print(f"  old {name[:10]} ({wall:.1f} s): {what} is {bound / wall:.2f}x of it; 0.5x ({wall / 2:.1f} s) "
                  f"leaves {wall / 2 - bound:+.1f} s beyond {what}")


def required_work(lm, data_dir: str, prompts: list[list[int]], answers: list[list[int]],
                  scored: int) -> dict[str, float]:
    """Seconds of the work the study needs beyond its floor, each part timed bare on the dense model, counted as
    often as the study needs it at the least: the dense model reading each pruned answer after its prompt (for the
    JS along it; one at a time or 8 at a time as the study does, the faster; the prompts' caches are left out, as
    the dense model's own answers could leave them), writing each distinct pruned model (safetensors, fsync, sha256
    read back), each run's final check (the model's own forward on one 512-token sample), each run's per-matrix
    errors (dense and pruned outputs of every matrix on 256 tokens), the masks (exact selection: Wanda per row per
    calibration, magnitude per matrix once), the JS arithmetic at every scored position, tokenizing each calibration
    source once, and one process that starts and loads the model."""
    import hashlib

    import torch
    from metrics_bench import timed
    from safetensors.torch import save_model
    from transformers import DynamicCache

    from backend.sources.calibration import build_calibration, open_source
    from compression.driver import decoder_layers
    from compression.masks import per_matrix_mask, per_row_mask
    from compression.scope import layer_scope
    from metrics.divergence import _continuation_rows, divergence_from_logits
    from metrics.heads import head_inputs

    model, runs, pruned_models = lm.model, 6, 5
    head = model.get_output_embeddings()
    parts: dict[str, float] = {}
    caches = []

    def read_prompts() -> None:
        for prompt in prompts:
            cache = DynamicCache(config=model.config)
            head_inputs(model, torch.tensor([prompt[:-1]]), use_cache=True, past_key_values=cache)
            caches.append(cache)

    def read_answers() -> None:
        for prompt, answer, cache in zip(prompts, answers, caches):
            ids = torch.tensor([prompt[-1:] + answer[:-1]])
            head(head_inputs(model, ids, use_cache=True, past_key_values=cache)[0])
            cache.crop(-len(answer))

    memo: dict = {}

    def read_batched() -> None:
        for start in range(0, len(prompts), 8):
            _continuation_rows(model, prompts[start:start + 8], answers[start:start + 8], True, memo)

    with torch.no_grad():
        read_prompts()
        read_batched()
        parts[f"dense model reading the pruned answers (prompts cached), x {pruned_models} models"] = (
            pruned_models * min(timed(read_answers), timed(read_batched)))
        folder = Path(tempfile.mkdtemp(prefix="prunescope-floor-"))
        try:
            def write() -> None:
                path = folder / "model.safetensors"
                save_model(model, str(path))
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
                    hashlib.file_digest(handle, "sha256")

            parts[f"writing a pruned model, x {pruned_models}"] = pruned_models * min(timed(write) for _ in range(2))
        finally:
            subprocess.run(["rm", "-rf", str(folder)])
        sample = torch.randint(0, model.config.vocab_size, (1, 512))
        parts[f"final check (own forward, 1 x 512 tokens), x {runs} runs"] = runs * timed(
            lambda: model.model(input_ids=sample, use_cache=False))
        prefix, layers = decoder_layers(model)
        weights = [w for i, layer in enumerate(layers)
                   for w in layer_scope(layer, None, None, f"{prefix}.{i}").targets.values()]
        inputs = {d: torch.randn(256, d) for d in {w.shape[1] for w in weights}}
        parts[f"per-matrix errors (256 tokens), x {runs} runs"] = runs * timed(
            lambda: [(inputs[w.shape[1]] @ w.t(), inputs[w.shape[1]] @ w.t()) for w in weights])
        norms = {d: torch.rand(d) for d in inputs}
        parts["masks: Wanda per row x 2 calibrations, magnitude per matrix once"] = 2 * timed(
            lambda: [per_row_mask(w.abs() * norms[w.shape[1]], 0.5) for w in weights]) + timed(
            lambda: [per_matrix_mask(w.abs(), 0.5) for w in weights])
        vocab = head.weight.shape[0]
        rows = [torch.randn(scored, vocab) for _ in range(2)] + [torch.randn(sum(map(len, answers)), vocab)
                                                                 for _ in range(2)]
        parts[f"JS arithmetic at {scored} record + {sum(map(len, answers))} answer positions, x {pruned_models} "
              f"models"] = pruned_models * timed(lambda: (divergence_from_logits(*rows[:2]),
                                                          divergence_from_logits(*rows[2:])))
        parts["tokenizing the calibration, once per source"] = sum(timed(
            lambda: build_calibration(open_source(source, data_dir), model, lm.tokenizer, 16, 512, 0, "alpaca"))
            for source in ("c4", "alpaca"))
    start = [sys.executable, "-c", "import backend.runs.worker; from backend.sources.models import load; "
                                   "load('smollm2-135m', 'cpu', 'float32')"]
    parts["a process that starts and loads the model, once"] = timed(
        lambda: subprocess.run(start, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                               check=True))
    return parts


def report(sides: dict[str, list[dict]], old: str) -> None:
    mean = lambda values: sum(values) / len(values)
    old_wall, new_wall = mean([r["wall"] for r in sides["old"]]), mean([r["wall"] for r in sides["new"]])
    print(f"\nthe study (6 runs; mean of {len(sides['new'])} round(s)): old {old[:10]} {old_wall:.1f} s, new "
          f"{new_wall:.1f} s: new/old {new_wall / old_wall:.2f}x (target <= 0.5x)")
    stages = sorted({s for side in sides.values() for r in side for s in r["stages"]},
                    key=lambda s: -mean([r["stages"].get(s, 0.0) for r in sides["old"]]))
    if not any(r["stages"] for r in sides["old"]):
        print(f"(no per-stage timings: {old[:10]}'s store does not keep them)")
    print(f"{'stage (summed over jobs)':<28}{'old s':>9}{'new s':>9}{'new/old':>9}")
    for stage in stages:
        a = mean([r["stages"].get(stage, 0.0) for r in sides["old"]])
        b = mean([r["stages"].get(stage, 0.0) for r in sides["new"]])
        print(f"{stage:<28}{a:>9.1f}{b:>9.1f}{(b / a if a else float('nan')):>9.2f}")
    different = compare(sides["old"][0], sides["new"][0])
    print("same numbers on both sides (sparsity, perplexities, JS, flips, F1): "
          + ("yes" if not different else "NO: " + "; ".join(different[:6])))
    moved = largest_change(sides["old"][0], sides["new"][0], "answer_jsd")
    if moved is not None:
        print(f"JS along the pruned answers (now from the generation's own states and a cached dense prompt): "
              f"largest |new - old| over the runs {moved:.1e}")


def largest_change(old: dict, new: dict, key: str) -> float | None:
    """The largest absolute difference of one number between the runs of two studies (matched as in compare); None
    when neither side has it."""
    olds = {cell(r): r.get(key) for r in old["runs"].values()}
    pairs = [(olds.get(cell(r)), r.get(key)) for r in new["runs"].values()]
    found = [abs(a - b) for a, b in pairs if a is not None and b is not None]
    return max(found) if found else None


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(Path(__file__).parent))
    main()
