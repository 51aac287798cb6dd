"""Evaluate a dense and a pruned model side by side: perplexity, divergence, task scores and an optional judge."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from backend.log import Log
from backend.runs.progress import TokenSteps
from backend.runs.protocol import lm_key
from backend.runs.spec import EvalSettings
from backend.runs.uncertainty import uncertainty, units_of
from backend.sources.datasets import Dataset, load_source
from backend.sources.models import LoadedModel
from metrics.divergence import answer_divergence, model_divergence, teacher_forced
from metrics.generation import Answers, answer_texts, generate_answers, stop_ids
from metrics.judge import JudgeConfig, judge
from metrics.perplexity import perplexity
from metrics.prompts import full_text_renderer, prompt_renderer
from metrics.scoring import clean_output, compare_outputs

# (stage, done, total), called as each stage advances
StageProgress = Callable[[str, int, int], None]


def template_for(settings: EvalSettings, tokenizer, source: str) -> str:
    """'auto' is the chat template for chat models, else the paper's format for the data."""
    if settings.template != "auto":
        return settings.template
    if getattr(tokenizer, "chat_template", None):
        return "chat"
    return "unnatural" if source == "unnatural" else "alpaca"


def perplexity_texts(source: str, data_dir: str | None) -> tuple[Dataset, list[str]]:
    """The rows a perplexity runs on: plain texts as they are, instruction records as Alpaca prompt + answer."""
    dataset = load_source(source, data_dir)
    if dataset.kind == "texts":
        return dataset, dataset.items
    render = full_text_renderer("alpaca")
    return dataset, [render(r) for r in dataset.items]


def records_of(source: str, data_dir: str | None, limit: int) -> list[dict]:
    dataset = load_source(source, data_dir, limit=limit)
    if dataset.kind != "records":
        raise ValueError(f"source {source!r} holds plain texts; divergence and tasks need instruction records "
                         f"(alpaca, unnatural or a file with instruction/input/output)")
    return dataset.items


def task_prompts(settings: EvalSettings, tokenizer, records: list[dict]) -> list[str]:
    """The task prompts a model answers, rendered with the template the settings pick for this tokenizer."""
    render = prompt_renderer(template_for(settings, tokenizer, settings.tasks), tokenizer)
    return [render(r) for r in records]


def answers_with_progress(lm: LoadedModel, prompts: list[str], settings: EvalSettings, stage: str,
                          progress: StageProgress, keep_states: bool = False) -> Answers:
    """Greedy answers (see generate_answers), reporting every decoding step in generated tokens of one row, out of
    prompts x max new tokens (a batch that stops early counts its unused tokens as done)."""
    total = len(prompts) * settings.max_new_tokens
    answered = [0]

    def report(tokens: int) -> None:
        progress(stage, min(max(tokens, answered[0] * settings.max_new_tokens), total), total)

    def batch_done(done: int, _count: int) -> None:
        answered[0] = done
        report(steps.tokens)

    steps = TokenSteps(report)
    return generate_answers(lm.model, lm.tokenizer, prompts, settings.max_new_tokens, settings.batch_size,
                            progress=batch_done, streamer=steps, keep_states=keep_states)


def measure_side(lm: LoadedModel, settings: EvalSettings, side: str, data_dir: str | None = None,
                 log: Log = lambda _m: None, progress: StageProgress = lambda _stage, _done, _total: None,
                 judge_key: str | None = None, keep_states: bool = False) -> dict:
    """What one model scores on its own: perplexity, generated answers (cleaned text and the exact generated ids)
    and their judge verdicts. For the dense model this depends only on the model and the settings, so a store can
    compute it once and reuse it. `keep_states` also keeps the output head's inputs behind the answers' tokens
    ("answer_states", tensors: for the divergence along them, never stored)."""
    out: dict = {"seconds": {}}
    if settings.ppl:
        texts_source, texts = perplexity_texts(settings.ppl, data_dir)
        started = time.perf_counter()
        result = perplexity(lm.model, lm.tokenizer, texts, settings.ppl_seqlen, settings.ppl_windows,
                            source=f"{settings.ppl} ({texts_source.origin})",
                            progress=lambda d, n: progress(f"perplexity {side}", d, n))
        out["ppl"] = result.ppl
        out["ppl_protocol"] = {k: v for k, v in result.to_dict().items()
                               if k not in ("ppl", "nll", "seconds", "window_nll")}
        out["ppl_windows"] = result.window_nll
        out["seconds"][f"ppl_{side}"] = time.perf_counter() - started
        log(f"perplexity {side}: {result.ppl:.3f} ({result.windows} x {result.seqlen} tokens)")
    if settings.tasks:
        records = records_of(settings.tasks, data_dir, settings.limit)
        prompts = task_prompts(settings, lm.tokenizer, records)
        started = time.perf_counter()
        answers = answers_with_progress(lm, prompts, settings, f"answers {side}", progress, keep_states)
        texts = answer_texts(lm.tokenizer, answers.ids, stop_ids(lm.model, lm.tokenizer))
        out["outputs"] = [clean_output(text) for text in texts]
        out["output_ids"] = answers.ids
        if keep_states:
            out["answer_states"] = answers.states
        out["seconds"][f"generate_{side}"] = time.perf_counter() - started
        log(f"generated {len(prompts)} answers with the {side} model")
        if settings.judge_model:
            config = JudgeConfig(model=settings.judge_model, base_url=settings.judge_base_url, api_key=judge_key)
            started = time.perf_counter()
            verdict = judge([{"id": f"task-{i}", "instruction": r["instruction"], "input": r.get("input", ""),
                              "reference": r["output"], "response": answer}
                             for i, (r, answer) in enumerate(zip(records, out["outputs"]))], config,
                            progress=lambda d, n: progress(f"judge {side}", d, n))
            out["judge"] = {**verdict.means, "overall": verdict.overall, "judged": verdict.judged,
                            "failed": verdict.failed}
            out["judge_records"] = verdict.records
            out["seconds"][f"judge_{side}"] = time.perf_counter() - started
    if settings.lm_eval:
        from backend.sources.lm_tasks import include_roots
        from metrics.harness import run_tasks

        result = run_tasks(lm.model, lm.tokenizer, settings.lm_eval, include_roots(settings.lm_eval_include),
                           settings.lm_eval_limit, settings.lm_eval_fewshot, settings.batch_size,
                           progress=lambda d, n: progress(f"lm-eval {side}", d, n))
        out["lm_eval"] = result.to_dict()
        out["seconds"][f"lm_eval_{side}"] = result.seconds
        log(f"lm-eval {side}: " + "; ".join(f"{task} " + ", ".join(f"{m} {v:.4f}" for m, v in scores.items()
                                                                   if v is not None and not m.endswith("_stderr"))
                                            for task, scores in result.scores.items()))
    return out


def harness_summary(settings: EvalSettings, dense: dict, pruned: dict) -> tuple[dict, dict, dict]:
    """Each side's lm-eval scores as {'lm:task:metric': value} and their stderrs, and the protocol they share; two
    sides that did not read the same documents of the same task versions with the same shots are an error."""
    for part in ("versions", "examples", "fewshot"):
        if dense[part] != pruned[part]:
            raise ValueError(f"lm-eval's dense and pruned runs differ in {part} ({dense[part]} vs {pruned[part]}): "
                             f"their scores cannot be compared")
    sides = {}
    for side, found in (("dense", dense), ("pruned", pruned)):
        values = {lm_key(task, metric): value for task, scores in found["scores"].items()
                  for metric, value in scores.items() if not metric.endswith("_stderr")}
        errors = {lm_key(task, metric[:-len("_stderr")]): value for task, scores in found["scores"].items()
                  for metric, value in scores.items() if metric.endswith("_stderr")}
        sides[side] = {"lm_eval": values, "lm_eval_stderr": errors}
    protocol = {"tasks": list(settings.lm_eval), "limit": settings.lm_eval_limit, "fewshot": dense["fewshot"],
                "examples": dense["examples"], "original": dense["original"], "versions": dense["versions"],
                "higher_is_better": dense["higher_is_better"], "groups": dense["groups"],
                "lm_eval_version": dense["version"], "include": settings.lm_eval_include}
    return sides["dense"], sides["pruned"], protocol


def harness_documents(side: dict) -> dict[str, list[float]]:
    """A side's per-document values, keyed like its scores."""
    return {lm_key(task, metric): values for task, metrics in side["documents"].items()
            for metric, values in metrics.items()}


def scored_tokens(tokenizer, ids, mask) -> list[str]:
    """The text of each token predicted at a scored position (position p predicts token p + 1)."""
    targets = ids[1:][mask[:-1]].tolist()
    return [tokenizer.decode([t]) for t in targets]


def hidden_ids(lm: LoadedModel) -> set[int]:
    """The ids an answer's text leaves out: the tokenizer's special tokens and the model's stop tokens (what
    `answer_texts` drops from the dense answer), so the pages hide them on the scored tokens too."""
    return set(lm.tokenizer.all_special_ids) | set(stop_ids(lm.model, lm.tokenizer))


def scored_special(ids, mask, hidden: set[int]) -> list[bool]:
    """For each token of `scored_tokens`, in its order, whether it is one of the `hidden` ids."""
    return [t in hidden for t in ids[1:][mask[:-1]].tolist()]


@dataclass(frozen=True)
class AnswerDivergence:
    """Dense vs pruned next-token divergence along the pruned model's own answers."""

    jsd: float
    per_sample: list[dict]
    tokens: list[list[str]]
    special: list[list[bool]]


def divergence_on_answers(dense: LoadedModel, pruned: LoadedModel, records: list[dict], answers: list[list[int]],
                          settings: EvalSettings, progress: Callable[[int, int], None],
                          states: list | None = None, dense_memo: dict | None = None) -> AnswerDivergence:
    """The two models' predictions along the exact ids of each pruned answer (its stop token included) after its
    prompt, so every token the pruned model wrote carries their JS divergence there (the Generations page colours
    answers with it); re-tokenizing the decoded text could give other ids. `states`: the pruned model's head inputs
    from its generation (its own logits then cost no forward); `dense_memo` keeps the dense model's prompt cache."""
    tokenizer = pruned.tokenizer
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in task_prompts(settings, tokenizer, records)]
    result = answer_divergence(dense.model, pruned.model, prompts, answers, states, batch_size=8, log2=settings.log2,
                               progress=progress, dense_memo=dense_memo)
    hidden = hidden_ids(pruned)
    return AnswerDivergence(result.jsd, result.per_sample, [[tokenizer.decode([t]) for t in a] for a in answers],
                            [[t in hidden for t in a] for a in answers])


def evaluate(dense: LoadedModel, pruned: LoadedModel, settings: EvalSettings, data_dir: str | None = None,
             log: Log = lambda _m: None, progress: StageProgress = lambda _stage, _done, _total: None,
             dense_side: dict | None = None, judge_key: str | None = None,
             dense_memo: dict | None = None) -> tuple[dict, list[dict]]:
    """Returns the summary (dense and pruned metrics, divergences, seconds, and each metric's per-unit values with
    its 95% bootstrap interval, see backend/runs/uncertainty.py) and the per-example records;
    `progress(stage, done, total)` is called as each stage advances. `dense_side`, from `measure_side` on the
    dense model with the same settings, skips recomputing it; `dense_memo`, a dict kept with the dense model, lets
    the divergences reuse across calls what the dense model read: its states on the records, its cache of the task
    prompts (see model_divergence, answer_divergence)."""
    settings.check()
    if dense_side is None:
        dense_side = measure_side(dense, settings, "dense", data_dir, log, progress, judge_key)
    pruned_side = measure_side(pruned, settings, "pruned", data_dir, log, progress, judge_key, keep_states=True)
    summary: dict = {"dense": {}, "pruned": {}, "seconds": {**dense_side["seconds"], **pruned_side["seconds"]},
                     "protocol": {}}
    examples: list[dict] = []
    divergence_samples = task_examples = None
    tokenizer = dense.tokenizer

    if settings.ppl:
        summary["dense"]["ppl"], summary["pruned"]["ppl"] = dense_side["ppl"], pruned_side["ppl"]
        summary["protocol"]["ppl"] = pruned_side["ppl_protocol"]

    if settings.jsd:
        records = records_of(settings.jsd, data_dir, settings.jsd_records)
        template = template_for(settings, tokenizer, settings.jsd)
        sequences, scored = teacher_forced(records, tokenizer, prompt_renderer(template, tokenizer),
                                           settings.response_only)
        started = time.perf_counter()
        result = model_divergence(dense.model, pruned.model, sequences, scored, batch_size=8, log2=settings.log2,
                                  progress=lambda d, n: progress("divergence", d, n), dense_memo=dense_memo)
        summary["seconds"]["divergence"] = time.perf_counter() - started
        divergence_samples = result.per_sample
        for key in ("jsd", "kl_dense_pruned", "kl_pruned_dense", "flip_rate"):
            summary[key] = getattr(result, key)
        summary["protocol"]["divergence"] = {"source": settings.jsd, "samples": len(records), "template": template,
                                             "scored_tokens": result.scored_tokens, "log": "2" if settings.log2 else "e",
                                             "positions": "response" if settings.response_only else "all"}
        hidden = hidden_ids(dense)
        for i, (record, ids, mask, sample) in enumerate(zip(records, sequences, scored, result.per_sample)):
            examples.append({"id": f"jsd-{i}", "kind": "divergence", "instruction": record["instruction"],
                             "input": record.get("input", ""), "reference": record["output"],
                             "input_ids": ids.tolist(), "scored": mask.int().tolist(),
                             "tokens": scored_tokens(tokenizer, ids, mask),
                             "special": scored_special(ids, mask, hidden), **sample})
        log(f"divergence: JS {result.jsd:.4f}, flips {result.flip_rate:.3f} over {result.scored_tokens} tokens")

    if settings.tasks:
        records = records_of(settings.tasks, data_dir, settings.limit)
        compared = compare_outputs(records, dense_side["outputs"], pruned_side["outputs"])
        for side in ("dense", "pruned"):
            summary[side].update(compared[side])
        summary["flips_lost"], summary["flips_gained"] = compared["flips_lost"], compared["flips_gained"]
        summary["protocol"]["tasks"] = {"source": settings.tasks, "examples": compared["n"],
                                        "template": template_for(settings, tokenizer, settings.tasks),
                                        "max_new_tokens": settings.max_new_tokens, "decoding": "greedy"}
        task_examples = [{**e, "id": f"task-{i}", "kind": "task",
                          "dense": {m: e[f"{m}_dense"] for m in ("em", "f1", "rouge1")},
                          "pruned": {m: e[f"{m}_pruned"] for m in ("em", "f1", "rouge1")}}
                         for i, e in enumerate(compared["examples"])]
        answers = divergence_on_answers(dense, pruned, records, pruned_side["output_ids"], settings,
                                        lambda d, n: progress("divergence on answers", d, n),
                                        pruned_side["answer_states"], dense_memo)
        summary["answer_jsd"] = answers.jsd
        for example, tokens, special, sample in zip(task_examples, answers.tokens, answers.special,
                                                     answers.per_sample):
            example.update(pruned_tokens=tokens, pruned_special=special, pruned_token_jsd=sample["token_jsd"],
                           answer_jsd=sample["jsd"])
        if settings.judge_model:
            for side, measured in (("dense", dense_side), ("pruned", pruned_side)):
                summary[side]["judge"] = measured["judge"]
                for example, record in zip(task_examples, measured["judge_records"]):
                    example[f"judge_{side}"] = record
        examples.extend(task_examples)
    harness = None
    if settings.lm_eval:
        dense_scores, pruned_scores, summary["protocol"]["lm_eval"] = harness_summary(
            settings, dense_side["lm_eval"], pruned_side["lm_eval"])
        summary["dense"].update(dense_scores)
        summary["pruned"].update(pruned_scores)
        harness = (harness_documents(dense_side["lm_eval"]), harness_documents(pruned_side["lm_eval"]))
    judged = ({side: measured["judge_records"] for side, measured in (("dense", dense_side), ("pruned", pruned_side))}
              if settings.tasks and settings.judge_model else None)
    units = units_of(dense_side.get("ppl_windows"), pruned_side.get("ppl_windows"), divergence_samples, task_examples,
                     judged, harness)
    started = time.perf_counter()
    summary.update(uncertainty(units))
    summary["seconds"]["intervals"] = time.perf_counter() - started
    return summary, examples
