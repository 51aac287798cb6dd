"""Task scores for generated answers: SQuAD v2 exact match and token F1, ROUGE-1, and dense-vs-pruned comparison."""

from __future__ import annotations

import collections
import functools
import re
import string

ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v2 normalisation: lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in s.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD v2 token-overlap F1 over normalised tokens; two empty answers score 1, one empty scores 0."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = sum((collections.Counter(pred_tokens) & collections.Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


@functools.cache
def _rouge_scorer():
    """The one ROUGE-1 scorer (default tokenizer, no stemming), built on first use."""
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)


def rouge1(prediction: str, reference: str) -> float:
    """ROUGE-1 F-measure from the rouge-score package, as in the paper."""
    return _rouge_scorer().score(target=reference, prediction=prediction)["rouge1"].fmeasure


def score_pair(prediction: str, reference: str) -> dict:
    """EM, F1 and ROUGE-1 of one prediction against its reference."""
    return {"em": exact_match(prediction, reference), "f1": token_f1(prediction, reference),
            "rouge1": rouge1(prediction, reference)}


def _flip(em_dense: float, em_pruned: float) -> str:
    """'lost' when only dense is exactly right, 'gained' when only pruned is, else ''."""
    if em_dense == 1.0 and em_pruned == 0.0:
        return "lost"
    if em_dense == 0.0 and em_pruned == 1.0:
        return "gained"
    return ""


def compare_outputs(records: list[dict], dense_outputs: list[str], pruned_outputs: list[str]) -> dict:
    """Per-example dense and pruned scores against the reference, their means and the EM flips between them."""
    if not len(records) == len(dense_outputs) == len(pruned_outputs):
        raise ValueError(f"lengths differ: {len(records)} records, {len(dense_outputs)} dense outputs, "
                         f"{len(pruned_outputs)} pruned outputs")
    if not records:
        raise ValueError("no records to compare")
    examples = []
    for index, (record, dense, pruned) in enumerate(zip(records, dense_outputs, pruned_outputs)):
        reference = record["output"]
        dense_scores = score_pair(dense, reference)
        pruned_scores = score_pair(pruned, reference)
        examples.append({
            "id": index, "instruction": record.get("instruction", ""), "input": record.get("input", ""),
            "reference": reference, "output_dense": dense, "output_pruned": pruned,
            **{f"{name}_dense": value for name, value in dense_scores.items()},
            **{f"{name}_pruned": value for name, value in pruned_scores.items()},
            "flip": _flip(dense_scores["em"], pruned_scores["em"]),
        })
    n = len(examples)

    def means(side: str) -> dict:
        return {name: sum(example[f"{name}_{side}"] for example in examples) / n for name in ("em", "f1", "rouge1")}

    return {"examples": examples, "dense": means("dense"), "pruned": means("pruned"),
            "flips_lost": sum(example["flip"] == "lost" for example in examples),
            "flips_gained": sum(example["flip"] == "gained" for example in examples), "n": n}


def clean_output(text: str) -> str:
    """A generation up to the first line opening a new '###' section (the Unnatural template's marker), stripped.

    Only whole lines are cut; a '###' inside a line is kept, since the answer itself may contain it."""
    kept = []
    for line in text.strip().splitlines():
        if line.lstrip().startswith("###"):
            break
        kept.append(line)
    return "\n".join(kept).strip()
