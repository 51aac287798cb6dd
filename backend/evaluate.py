"""Evaluate a dense and a pruned model side by side: perplexity, divergence, task scores and an optional judge."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from backend.data import Dataset, load_source
from backend.models import LoadedModel
from metrics.divergence import model_divergence, teacher_forced
from metrics.generation import generate
from metrics.judge import JudgeConfig, judge
from metrics.perplexity import perplexity
from metrics.prompts import TEMPLATES, full_text_renderer, prompt_renderer
from metrics.scoring import clean_output, compare_outputs

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]


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

    def check(self) -> None:
        """Reject bad values with the field's name and what is allowed."""
        if self.template not in ("auto", *TEMPLATES):
            raise ValueError(f"template {self.template!r} is not allowed: use auto, {', '.join(TEMPLATES)}")
        for name in ("ppl_seqlen", "ppl_windows", "limit", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} {getattr(self, name)} is not allowed: use at least 1")
        if not (self.ppl or self.jsd or self.tasks):
            raise ValueError("nothing to evaluate: give at least one of --ppl, --jsd, --tasks")


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


def evaluate(dense: LoadedModel, pruned: LoadedModel, settings: EvalSettings, data_dir: str | None = None,
             log: Log = lambda _m: None, progress: Progress = lambda _stage, _done, _total: None
             ) -> tuple[dict, list[dict]]:
    """Returns the summary (dense and pruned metrics, divergences, seconds) and the per-example records;
    `progress(stage, done, total)` is called as each stage advances."""
    settings.check()
    summary: dict = {"dense": {}, "pruned": {}, "seconds": {}, "protocol": {}}
    examples: list[dict] = []
    tokenizer = dense.tokenizer

    if settings.ppl:
        texts_source, texts = perplexity_texts(settings.ppl, data_dir)
        for side, lm in (("dense", dense), ("pruned", pruned)):
            started = time.perf_counter()
            result = perplexity(lm.model, lm.tokenizer, texts, settings.ppl_seqlen, settings.ppl_windows,
                                source=f"{settings.ppl} ({texts_source.origin})",
                                progress=lambda d, n, side=side: progress(f"perplexity {side}", d, n))
            summary[side]["ppl"] = result.ppl
            summary["seconds"][f"ppl_{side}"] = time.perf_counter() - started
            log(f"perplexity {side}: {result.ppl:.3f} ({result.windows} x {result.seqlen} tokens)")
        summary["protocol"]["ppl"] = {k: v for k, v in result.to_dict().items() if k not in ("ppl", "nll", "seconds")}

    if settings.jsd:
        records = records_of(settings.jsd, data_dir, settings.limit)
        template = template_for(settings, tokenizer, settings.jsd)
        sequences, scored = teacher_forced(records, tokenizer, prompt_renderer(template, tokenizer),
                                           settings.response_only)
        started = time.perf_counter()
        result = model_divergence(dense.model, pruned.model, sequences, scored, batch_size=8, log2=settings.log2,
                                  progress=lambda d, n: progress("divergence", d, n))
        summary["seconds"]["divergence"] = time.perf_counter() - started
        for key in ("jsd", "kl_dense_pruned", "kl_pruned_dense", "flip_rate"):
            summary[key] = getattr(result, key)
        summary["protocol"]["divergence"] = {"source": settings.jsd, "samples": len(records), "template": template,
                                             "scored_tokens": result.scored_tokens, "log": "2" if settings.log2 else "e",
                                             "positions": "response" if settings.response_only else "all"}
        for i, (record, ids, mask, sample) in enumerate(zip(records, sequences, scored, result.per_sample)):
            examples.append({"id": f"jsd-{i}", "kind": "divergence", "instruction": record["instruction"],
                             "input": record.get("input", ""), "reference": record["output"],
                             "input_ids": ids.tolist(), "scored": mask.int().tolist(), **sample})
        log(f"divergence: JS {result.jsd:.4f}, flips {result.flip_rate:.3f} over {result.scored_tokens} tokens")

    if settings.tasks:
        records = records_of(settings.tasks, data_dir, settings.limit)
        template = template_for(settings, tokenizer, settings.tasks)
        prompts = [prompt_renderer(template, tokenizer)(r) for r in records]
        outputs = {}
        for side, lm in (("dense", dense), ("pruned", pruned)):
            started = time.perf_counter()
            raw = generate(lm.model, lm.tokenizer, prompts, settings.max_new_tokens, settings.batch_size,
                           progress=lambda d, n, side=side: progress(f"answers {side}", d, n))
            outputs[side] = [clean_output(text) for text in raw]
            summary["seconds"][f"generate_{side}"] = time.perf_counter() - started
            log(f"generated {len(prompts)} answers with the {side} model")
        compared = compare_outputs(records, outputs["dense"], outputs["pruned"])
        for side in ("dense", "pruned"):
            summary[side].update(compared[side])
        summary["flips_lost"], summary["flips_gained"] = compared["flips_lost"], compared["flips_gained"]
        summary["protocol"]["tasks"] = {"source": settings.tasks, "examples": compared["n"], "template": template,
                                        "max_new_tokens": settings.max_new_tokens, "decoding": "greedy"}
        task_examples = [{**e, "id": f"task-{i}", "kind": "task",
                          "dense": {m: e[f"{m}_dense"] for m in ("em", "f1", "rouge1")},
                          "pruned": {m: e[f"{m}_pruned"] for m in ("em", "f1", "rouge1")}}
                         for i, e in enumerate(compared["examples"])]
        if settings.judge_model:
            config = JudgeConfig(model=settings.judge_model, base_url=settings.judge_base_url)
            started = time.perf_counter()
            for side in ("dense", "pruned"):
                verdict = judge([{"id": e["id"], "instruction": e["instruction"], "input": e["input"],
                                  "reference": e["reference"], "response": e[f"output_{side}"]}
                                 for e in task_examples], config,
                                progress=lambda d, n, side=side: progress(f"judge {side}", d, n))
                summary[side]["judge"] = {**verdict.means, "overall": verdict.overall, "judged": verdict.judged,
                                          "failed": verdict.failed}
                for example, record in zip(task_examples, verdict.records):
                    example[f"judge_{side}"] = record
            summary["seconds"]["judge"] = time.perf_counter() - started
        examples.extend(task_examples)
    return summary, examples
