"""Batched greedy generation: left padding, length sorting and dropping finished rows change nothing about the
answers, which equal transformers' own generate prompt by prompt."""

from __future__ import annotations

import os

import pytest
import torch

from metrics.generation import generate, generate_answers, prefill_groups, stop_ids
from metrics.heads import head_inputs
from tests.conftest import TINY, tiny_model

PROMPTS = ["Name a colour.", "The capital of France is", "1, 2, 3,", "Write one word that rhymes with cat, please:",
           "Hello"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_answers_equal_one_prompt_at_a_time_in_the_prompts_order(arch, tokenizer):
    model = tiny_model(arch, vocab=len(tokenizer), seed=1)
    alone = [generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    together = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=4)
    assert together == alone
    assert len({a for a in alone}) > 1


def ends_at_different_steps(model, eos: int, every: int = 3) -> None:
    """A row whose current input token id is a multiple of `every` answers EOS next, so a batch's answers end at
    different steps (the rule depends on the row's own tokens only, batched or not)."""
    last: dict = {}
    model.get_input_embeddings().register_forward_pre_hook(lambda _m, args: last.update(ids=args[0][:, -1]))

    def stop(_module, _inputs, logits):
        logits[last["ids"] % every == 0, -1, eos] = 1e4
        return logits

    model.get_output_embeddings().register_forward_hook(stop)


def library_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The oracle: transformers' generate, one prompt at a time (no padding), cut after the first stop token."""
    stops = stop_ids(model, tokenizer)
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=stops[0], top_p=None,
                             top_k=None, temperature=None)[0, ids.shape[1]:].tolist()
        end = next((i for i, t in enumerate(out) if t in stops), len(out) - 1)
        answers.append(out[:end + 1])
    return answers


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral", "gemma3", "qwen3_moe"])
def test_answers_that_end_at_different_steps_equal_the_librarys_generate(arch, tokenizer):
    """Rows leave the batch as their answers end (sliding-window caches, absolute positions and experts included);
    every answer equals transformers' own greedy generate of its prompt alone."""
    model = tiny_model(arch, vocab=len(tokenizer), seed=4)
    ends_at_different_steps(model, tokenizer.eos_token_id)
    prompts = PROMPTS + ["Count to ten:", "A long prompt that pads the others in its batch a fair amount, surely"]
    ours = generate_answers(model, tokenizer, prompts, max_new_tokens=12, batch_size=4).ids
    assert ours == library_greedy(model, tokenizer, prompts, 12)
    lengths = {len(a) for a in ours}
    assert len(lengths) > 2 and any(a[-1] == tokenizer.eos_token_id for a in ours), lengths


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3_moe"])
def test_batches_prefilled_apart_are_decoded_together_within_decode_rows(arch, tokenizer):
    """Seven prompts prefilled three at a time are decoded as one batch of seven (a forward of seven rows per step),
    or in groups of at most `decode_rows`; the answers equal the library's either way."""
    model = tiny_model(arch, vocab=len(tokenizer), seed=4)
    prompts = PROMPTS + ["Count to ten:", "A long prompt that pads the others in its batch a fair amount, surely"]
    expected = library_greedy(model, tokenizer, prompts, 12)
    assert all(len(answer) == 12 for answer in expected)
    steps: list[int] = []
    model.get_input_embeddings().register_forward_pre_hook(
        lambda _m, args: steps.append(args[0].shape[0]) if args[0].shape[1] == 1 else None)
    assert generate_answers(model, tokenizer, prompts, max_new_tokens=12, batch_size=3).ids == expected
    assert steps == [7] * 11
    steps.clear()
    assert generate_answers(model, tokenizer, prompts, max_new_tokens=12, batch_size=3, decode_rows=6).ids == expected
    assert steps == [6] * 11 + [1] * 11


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3_moe", "mistral", "gemma3"])
def test_a_prefix_every_prompt_shares_goes_through_the_model_once(arch, tokenizer):
    """Prompts that start alike (a template's preamble) share its forward: one forward of the common tokens, then
    each prompt's own tokens after it; answers equal the library's prompt by prompt (sliding-window caches share
    nothing and still answer the same)."""
    model = tiny_model(arch, vocab=len(tokenizer), seed=5)
    ends_at_different_steps(model, tokenizer.eos_token_id)
    preamble = "You are a careful assistant. Answer in one short line.\nQuestion: "
    prompts = [preamble + p for p in PROMPTS + ["Count to ten:", "Name two rivers of Europe, then stop."]]
    shared = len(os.path.commonprefix([tokenizer(p, add_special_tokens=False).input_ids for p in prompts]))
    expected = library_greedy(model, tokenizer, prompts, 12)
    shapes: list[tuple] = []
    model.get_input_embeddings().register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    assert generate_answers(model, tokenizer, prompts, max_new_tokens=12, batch_size=3).ids == expected
    sliding = arch in ("mistral", "gemma3")
    assert (shapes[0] == (1, shared)) != sliding, (shapes[:3], shared)
    assert sum(rows * length for rows, length in shapes if length > 1) \
        < sum(map(len, (tokenizer(p, add_special_tokens=False).input_ids for p in prompts))) or sliding


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "gemma3"])
def test_kept_states_are_what_the_head_read_for_each_generated_token(arch, tokenizer):
    """With keep_states, each answer comes with one state per token; the head on them picks exactly the tokens
    written, and they equal the head inputs of the model's own forward over that prompt + answer alone."""
    model = tiny_model(arch, vocab=len(tokenizer), seed=6)
    model.generation_config.eos_token_id = [generate_answers(model, tokenizer, PROMPTS[:1], max_new_tokens=3).ids[0][1]]
    made = generate_answers(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2, keep_states=True)
    assert made.ids == generate_answers(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2).ids
    assert len({len(a) for a in made.ids}) > 1
    with torch.no_grad():
        for prompt, answer, states in zip(PROMPTS, made.ids, made.states):
            assert states.shape == (len(answer), model.config.hidden_size)
            ids = tokenizer(prompt, add_special_tokens=False).input_ids
            whole = head_inputs(model, torch.tensor([ids + answer]))[0, len(ids) - 1:-1]
            torch.testing.assert_close(states, whole, rtol=0, atol=1e-5)
            assert model.get_output_embeddings()(states).argmax(-1).tolist() == answer


def test_prefill_groups_hold_at_most_rows_prompts_and_tokens_padded_tokens():
    assert prefill_groups([0, 1, 2, 3], [10, 10, 30, 40], rows=3, tokens=60) == [[0, 1], [2], [3]]
    assert prefill_groups([0, 1, 2, 3], [10, 10, 30, 40], rows=3, tokens=1000) == [[0, 1, 2], [3]]
    assert prefill_groups([2, 0], [50, 900, 3], rows=4, tokens=10) == [[2], [0]]  # past the budget: alone


def test_min_new_tokens_holds_eos_back_and_progress_counts_prompts(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer), seed=2)
    eos = torch.tensor([tokenizer.eos_token_id])
    model.lm_head.register_forward_hook(lambda _m, _i, logits: logits.index_fill(-1, eos, 1e4))
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=5) == [""] * len(PROMPTS)
    seen = []
    answers = generate(model, tokenizer, PROMPTS, max_new_tokens=5, min_new_tokens=3, batch_size=2, decode_rows=2,
                       progress=lambda done, total: seen.append((done, total)))
    assert all(answers)
    assert seen == [(0, 5), (2, 5), (4, 5), (5, 5)]
    seen.clear()
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=5, min_new_tokens=3, batch_size=2,
                    progress=lambda done, total: seen.append((done, total))) == answers
    assert seen == [(0, 5), (5, 5)]


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


def bigram_model(vocab: int, following: dict[int, int], seed: int = 0) -> torch.nn.Module:
    """A tiny Llama (untied head) whose argmax after token t is following[t] wherever t stands: t's embedding is a
    large unit direction of its own, which the output head reads as following[t]; the layers stay random."""
    from transformers import AutoConfig, AutoModelForCausalLM
    options = dict(TINY["llama"], tie_word_embeddings=False)
    config = AutoConfig.for_model(options.pop("model_type"), vocab_size=vocab, **options)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert len(following) <= config.hidden_size
    with torch.no_grad():
        for direction, (token, nxt) in enumerate(following.items()):
            model.get_input_embeddings().weight[token] = 0.0
            model.get_input_embeddings().weight[token, direction] = 10.0
            model.get_output_embeddings().weight[nxt, direction] = 3.0
    return model


def test_stop_ids_union_the_generation_config_and_the_tokenizer_in_order(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    model.generation_config.eos_token_id = [0, tokenizer.eos_token_id, 7, 0]
    assert stop_ids(model, tokenizer) == [0, tokenizer.eos_token_id, 7]
    model.generation_config.eos_token_id = 7
    assert stop_ids(model, tokenizer) == [7, tokenizer.eos_token_id]
    model.generation_config.eos_token_id = None
    assert stop_ids(model, tokenizer) == [tokenizer.eos_token_id]


def test_every_eos_of_a_llama3_style_generation_config_stops_the_answer(tokenizer):
    """Llama-3 lists <|end_of_text|> and <|eot_id|>; the tokenizer names only one. Here the config lists
    [<|im_end|>, <|endoftext|>] and the model ends one answer with <|endoftext|>, one with <|im_end|>, and runs
    the third to max_new_tokens: each stops where it should, keeps its stop token and drops the padding."""
    second_eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    a, b, c, d = (tokenizer(x, add_special_tokens=False).input_ids[0] for x in ("A", "B", "C", "D"))
    prompts = ["Say it once", "Say it twice, slowly and clearly", "Say it"]
    ends = [tokenizer(p, add_special_tokens=False).input_ids[-1] for p in prompts]
    assert len(set(ends) | {a, b, c, d}) == 7
    model = bigram_model(len(tokenizer), {ends[0]: a, a: b, b: second_eos, second_eos: a,
                                          ends[1]: c, c: tokenizer.eos_token_id,
                                          ends[2]: d, d: d}, seed=4)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, second_eos]
    ids = generate_answers(model, tokenizer, prompts, max_new_tokens=5, batch_size=3).ids
    assert ids == [[a, b, second_eos], [c, tokenizer.eos_token_id], [d] * 5]
    assert generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=3) == ["AB", "C", "DDDDD"]
    assert [generate_answers(model, tokenizer, [p], max_new_tokens=5).ids[0] for p in prompts] == ids


def test_bad_sizes_are_refused(tokenizer):
    with pytest.raises(ValueError, match="max_new_tokens 0"):
        generate(tiny_model("llama", vocab=len(tokenizer)), tokenizer, PROMPTS, max_new_tokens=0)
