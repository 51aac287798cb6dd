"""SQuAD v2 EM/F1, ROUGE-1 from rouge-score, dense-vs-pruned comparison and output cleaning."""

from __future__ import annotations

import json

import pytest
from rouge_score import rouge_scorer

from metrics.scoring import (
    clean_output,
    compare_outputs,
    exact_match,
    normalize_answer,
    rouge1,
    score_pair,
    token_f1,
)
from tests.conftest import SHARED_DATA, needs_shared


def test_normalisation_and_exact_match():
    assert normalize_answer("  The   Paris!  ") == "paris"
    assert exact_match("The Paris", "paris") == 1.0
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("an apple, a pear", "apple pear") == 1.0
    assert exact_match("theory", "ory") == 0.0
    assert exact_match("New\tYork\n", "new york") == 1.0
    assert exact_match("No", "Yes") == 0.0


def test_token_f1_by_hand():
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(2 * (3 / 4) * 1 / (3 / 4 + 1))
    assert token_f1("red red blue", "red green") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert token_f1("", "") == 1.0
    assert token_f1("the", "a") == 1.0
    assert token_f1("", "yes") == 0.0
    assert token_f1("yes", "!!") == 0.0
    assert token_f1("alpha", "beta") == 0.0


@needs_shared
def test_rouge1_matches_package_on_real_pairs():
    lines = (SHARED_DATA / "unnatural" / "unnatural_core_1050.jsonl").read_text().splitlines()[:8]
    records = [json.loads(line) for line in lines]
    scorer = rouge_scorer.RougeScorer(["rouge1"])
    pairs = [(r["output"], r["instruction"]) for r in records]
    pairs += [(r["output"], r["output"] + " extra words here") for r in records]
    pairs += [(records[0]["output"], records[1]["output"]), ("", records[2]["output"])]
    for reference, prediction in pairs:
        assert rouge1(prediction, reference) == scorer.score(reference, prediction)["rouge1"].fmeasure
    assert rouge1(records[3]["output"], records[3]["output"]) == 1.0


def test_compare_outputs_counts_flips():
    records = [{"instruction": "Capital of France?", "input": "", "output": "Paris"},
               {"instruction": "2+2?", "input": "Sum", "output": "4"},
               {"instruction": "Colour of sky?", "input": "", "output": "blue"},
               {"instruction": "Is it hot?", "input": "", "output": "Yes"}]
    dense = ["The Paris.", "5", "blue sky", "yes"]
    pruned = ["Lyon", "4", "blue sky", "Yes!"]
    result = compare_outputs(records, dense, pruned)
    assert result["n"] == 4 and result["flips_lost"] == 1 and result["flips_gained"] == 1
    assert [e["flip"] for e in result["examples"]] == ["lost", "gained", "", ""]
    first = result["examples"][0]
    assert (first["id"], first["instruction"], first["input"], first["reference"]) == (0, "Capital of France?", "",
                                                                                     "Paris")
    assert (first["output_dense"], first["output_pruned"]) == ("The Paris.", "Lyon")
    assert {k: first[f"{k}_dense"] for k in ("em", "f1", "rouge1")} == score_pair("The Paris.", "Paris")
    assert result["dense"]["em"] == 0.5 and result["pruned"]["em"] == 0.5
    assert result["dense"]["f1"] == pytest.approx((1 + 0 + 2 / 3 + 1) / 4)
    assert result["pruned"]["rouge1"] == pytest.approx(sum(rouge1(p, r["output"]) for p, r in zip(pruned, records)) / 4)
    with pytest.raises(ValueError):
        compare_outputs(records, dense, pruned[:3])


def test_clean_output_cuts_at_new_section():
    assert clean_output("  Yes\n### Instruction: more\nstuff") == "Yes"
    assert clean_output("Line one\nline two\n  ###Response: again") == "Line one\nline two"
    assert clean_output("C# ### is kept inline\n") == "C# ### is kept inline"
    assert clean_output("###Response:") == ""
