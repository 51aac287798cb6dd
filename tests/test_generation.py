"""Batched greedy generation: left padding and length sorting change nothing about the answers."""

from __future__ import annotations

import pytest
import torch

from metrics.generation import generate
from tests.conftest import tiny_model

PROMPTS = ["Name a colour.", "The capital of France is", "1, 2, 3,", "Write one word that rhymes with cat, please:",
           "Hello"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_answers_equal_one_prompt_at_a_time_in_the_prompts_order(arch, tokenizer):
    model = tiny_model(arch, vocab=len(tokenizer), seed=1)
    alone = [generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    together = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=4)
    assert together == alone
    assert len({a for a in alone}) > 1


def test_min_new_tokens_holds_eos_back_and_progress_counts_prompts(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer), seed=2)
    eos = torch.tensor([tokenizer.eos_token_id])
    model.lm_head.register_forward_hook(lambda _m, _i, logits: logits.index_fill(-1, eos, 1e4))
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=5) == [""] * len(PROMPTS)
    seen = []
    answers = generate(model, tokenizer, PROMPTS, max_new_tokens=5, min_new_tokens=3, batch_size=2,
                       progress=lambda done, total: seen.append((done, total)))
    assert all(answers)
    assert seen == [(2, 5), (4, 5), (5, 5)]


def test_generation_stops_at_eos(tokenizer):
    """The model says 'A', 'A', EOS, then 'A' forever: the answer must end at the EOS."""
    model = tiny_model("llama", vocab=len(tokenizer), seed=3)
    letter = tokenizer("A", add_special_tokens=False).input_ids[0]
    calls = []

    def scripted(_module, _inputs, logits):
        calls.append(1)
        favourite = tokenizer.eos_token_id if len(calls) == 3 else letter
        return logits.index_fill(-1, torch.tensor([favourite]), 1e4)

    model.lm_head.register_forward_hook(scripted)
    assert generate(model, tokenizer, PROMPTS[:1], max_new_tokens=8) == ["AA"]


def test_bad_sizes_are_refused(tokenizer):
    with pytest.raises(ValueError, match="max_new_tokens 0"):
        generate(tiny_model("llama", vocab=len(tokenizer)), tokenizer, PROMPTS, max_new_tokens=0)
