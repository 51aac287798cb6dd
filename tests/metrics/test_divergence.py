"""Per-token divergence equals a direct float64 computation, stays bounded, and ignores batching and padding."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from backend.runs.evaluate import evaluate, records_of, task_prompts
from backend.runs.spec import EvalSettings
from backend.sources.models import LoadedModel
from metrics.divergence import (
    answer_divergence,
    chunk_rows,
    divergence_from_logits,
    model_divergence,
    teacher_forced,
)
from metrics.generation import generate_answers
from metrics.prompts import unnatural_prompt
from tests.conftest import tiny_model
from tests.metrics.test_generation import PROMPTS, bigram_model


def tiny_llama(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256)).eval()


def direct(dense_logits: torch.Tensor, pruned_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Textbook float64 formulas, all positions at once."""
    p = torch.softmax(dense_logits.double(), dim=-1)
    q = torch.softmax(pruned_logits.double(), dim=-1)
    m = (p + q) / 2
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    return {"jsd": 0.5 * kl(p, m) + 0.5 * kl(q, m), "kl_dense_pruned": kl(p, q), "kl_pruned_dense": kl(q, p),
            "flip": p.argmax(-1) != q.argmax(-1)}


def random_logits(positions: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(positions, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def test_self_divergence_is_zero():
    logits = random_logits(50, 257, 0)
    result = divergence_from_logits(logits, logits.clone())
    for name in ("jsd", "kl_dense_pruned", "kl_pruned_dense"):
        assert result[name].abs().max().item() <= 1e-7
    assert not result["flip"].any()


def test_matches_float64_across_chunks_and_is_symmetric():
    dense, pruned = random_logits(2500, 257, 1, scale=1.0), random_logits(2500, 257, 2, scale=1.0)
    result = divergence_from_logits(dense, pruned, chunk=1000)
    expected = direct(dense, pruned)
    for name in ("jsd", "kl_dense_pruned", "kl_pruned_dense"):
        assert result[name].shape == (2500,) and result[name].dtype == torch.float32
        torch.testing.assert_close(result[name].double(), expected[name], rtol=0, atol=1e-6)
    sharp = divergence_from_logits(dense[:300] * 4, pruned[:300] * 4, chunk=128)
    for name, value in direct(dense[:300] * 4, pruned[:300] * 4).items():
        torch.testing.assert_close(sharp[name].double() if name != "flip" else sharp[name], value, rtol=1e-6,
                                   atol=1e-6)
    assert torch.equal(result["flip"], expected["flip"])
    assert result["flip"].float().mean().item() == pytest.approx(expected["flip"].double().mean().item(), abs=1e-6)
    swapped = divergence_from_logits(pruned, dense, chunk=1000)
    torch.testing.assert_close(swapped["jsd"], result["jsd"], rtol=0, atol=1e-7)
    torch.testing.assert_close(swapped["kl_dense_pruned"], result["kl_pruned_dense"])
    log2 = divergence_from_logits(dense.half(), pruned.half(), log2=True, chunk=1000)
    expected_half = direct(dense.half(), pruned.half())
    torch.testing.assert_close(log2["jsd"].double(), expected_half["jsd"] / math.log(2), rtol=0, atol=1e-6)


def test_bounded_for_extreme_and_masked_logits():
    vocab = 64
    dense = torch.full((4, vocab), -1e4)
    pruned = torch.full((4, vocab), -1e4)
    dense[:, 0] = pruned[:, 1] = 1e4
    dense[1], pruned[1] = random_logits(1, vocab, 3)[0], random_logits(1, vocab, 4)[0]
    dense[2, 10:] = float("-inf")
    pruned[2, :10] = float("-inf")
    dense[3, :] = float("-inf")
    dense[3, 5] = 0.0
    pruned[3] = -dense[3].clamp_min(-1.0)
    natural = divergence_from_logits(dense, pruned)
    base2 = divergence_from_logits(dense, pruned, log2=True)
    assert torch.isfinite(natural["jsd"]).all() and (natural["jsd"] >= 0).all()
    assert (natural["jsd"] <= math.log(2) + 1e-6).all() and (base2["jsd"] <= 1 + 1e-6).all()
    assert natural["jsd"][0].item() == pytest.approx(math.log(2), abs=1e-6)
    assert natural["jsd"][2].item() == pytest.approx(math.log(2), abs=1e-6)
    assert base2["jsd"][0].item() == pytest.approx(1.0, abs=1e-6)
    assert natural["flip"][0] and natural["flip"][2]
    assert math.isinf(natural["kl_dense_pruned"][2].item())


SEQ_LENGTHS = (7, 19, 3, 12, 1, 15)


def sequences_and_masks() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    sequences = [torch.randint(1, 300, (n,), generator=generator) for n in SEQ_LENGTHS]
    masks = [torch.rand(n, generator=generator) < 0.6 for n in SEQ_LENGTHS]
    masks[2][:] = False
    masks[4][:] = True
    return sequences, masks


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    return tiny_llama(0), tiny_llama(1)


def test_model_against_itself_is_zero(models):
    dense, _ = models
    sequences, masks = sequences_and_masks()
    result = model_divergence(dense, dense, sequences, masks, batch_size=4)
    assert result.jsd <= 1e-7 and result.flip_rate == 0.0
    assert result.kl_dense_pruned <= 1e-6 and result.kl_pruned_dense <= 1e-6


def test_model_divergence_matches_unbatched_float64(models):
    dense, pruned = models
    sequences, masks = sequences_and_masks()
    calls = []
    result = model_divergence(dense, pruned, sequences, masks, batch_size=3, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(0, 6), (3, 6), (6, 6)]
    assert [s["scored_tokens"] for s in result.per_sample] == [int(m.sum()) for m in masks]
    assert result.per_sample[2]["skipped"] and result.skipped == 1 and result.samples == 6
    used = []
    with torch.no_grad():
        for seq, mask, sample in zip(sequences, masks, result.per_sample):
            if not mask.any():
                continue
            rows = mask.nonzero().flatten()
            expected = direct(dense(input_ids=seq[None]).logits[0, rows], pruned(input_ids=seq[None]).logits[0, rows])
            assert len(sample["token_jsd"]) == int(mask.sum())
            assert sample["token_jsd"] == pytest.approx(expected["jsd"].tolist(), abs=1e-5)
            for name in ("jsd", "kl_dense_pruned", "kl_pruned_dense"):
                assert sample[name] == pytest.approx(expected[name].mean().item(), abs=1e-5)
            assert sample["flip_rate"] == pytest.approx(expected["flip"].double().mean().item(), abs=1e-9)
            used.append(sample)
    assert result.jsd == pytest.approx(sum(s["jsd"] for s in used) / len(used), abs=1e-9)
    assert result.scored_tokens == sum(int(m.sum()) for m in masks)
    assert result.jsd > 1e-4


def test_a_dense_memo_runs_the_dense_model_once_and_changes_no_number(models):
    """Two pruned models against one dense model on the same sequences, with a memo: the dense body runs on the
    batches for the first only, and each result equals the one computed without the memo, bit for bit."""
    dense, pruned = models
    sequences, masks = sequences_and_masks()
    forwards: list[int] = []
    handle = dense.model.register_forward_hook(lambda *_: forwards.append(1))
    memo: dict = {}
    counts = []
    try:
        for other in (pruned, tiny_llama(2)):
            plain = model_divergence(dense, other, sequences, masks, batch_size=4)
            forwards.clear()
            kept = model_divergence(dense, other, sequences, masks, batch_size=4, dense_memo=memo)
            assert kept.per_sample == plain.per_sample and kept.jsd == plain.jsd
            counts.append(len(forwards))
        assert counts[1] == counts[0] - 2 and len(memo) == 2  # two batches of four, run once
        model_divergence(dense, pruned, sequences, masks, batch_size=3, dense_memo=memo)
        assert len(memo) == 4  # other batches are other keys, never a stale match
    finally:
        handle.remove()


def test_padding_does_not_change_results(models):
    dense, pruned = models
    sequences, masks = sequences_and_masks()
    one = model_divergence(dense, pruned, sequences, masks, batch_size=1, log2=True)
    four = model_divergence(dense, pruned, sequences, masks, batch_size=4, log2=True)
    assert one.log2 and four.log2
    for a, b in zip(one.per_sample, four.per_sample):
        assert a["token_jsd"] == pytest.approx(b["token_jsd"], abs=1e-6)
        assert a["flip_rate"] == b["flip_rate"]
    assert one.jsd == pytest.approx(four.jsd, abs=1e-7)


RECORDS = [
    {"instruction": "Is this list a palindrome?", "input": "Words: ['b', 'a', 'n', 'a', 'n', 'a'].",
     "output": "Yes"},
    {"instruction": "Translate to French.", "input": "", "output": "Le chat dort sur le canapé, près de la fenêtre."},
]


def test_teacher_forced_scores_exactly_the_response(tokenizer):
    sequences, masks = teacher_forced(RECORDS, tokenizer, unnatural_prompt)
    for record, ids, mask in zip(RECORDS, sequences, masks):
        prompt = tokenizer(unnatural_prompt(record), add_special_tokens=False).input_ids
        answer = tokenizer(record["output"], add_special_tokens=False).input_ids
        assert ids.tolist() == prompt + answer + [tokenizer.eos_token_id]
        assert not mask[-1]
        rows = mask.nonzero().flatten()
        assert rows[0].item() == len(prompt) - 1 and rows.tolist() == list(range(rows[0], len(ids) - 1))
        assert tokenizer.decode(ids[rows + 1]) == record["output"] + tokenizer.eos_token
    _, every = teacher_forced(RECORDS, tokenizer, unnatural_prompt, response_only=False)
    assert all(m[:-1].all() and not m[-1] for m in every)
    short, short_masks = teacher_forced(RECORDS, tokenizer, unnatural_prompt, max_tokens=8)
    assert all(len(ids) == 8 for ids in short) and not any(m.any() for m in short_masks)


def space_and_letter(tokenizer) -> tuple[int, int]:
    """Two ids whose decoded text, ' A', re-tokenizes to one other id."""
    (space,), (letter,) = (tokenizer(x, add_special_tokens=False).input_ids for x in (" ", "A"))
    assert tokenizer(tokenizer.decode([space, letter]), add_special_tokens=False).input_ids != [space, letter]
    return space, letter


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3_moe", "mistral", "gemma2"])
def test_divergence_along_generated_answers_equals_float64_on_each_sequence_alone(arch, tokenizer):
    """Along the answers the pruned model wrote (ending at different steps), the pruned logits taken from its
    generation's states and the dense ones read after a cached prompt give, token by token, the float64 divergence
    of each model's own forward over that prompt + answer alone. A second call reads the dense prompts from the memo
    (its forwards then see only the answers) and gives the very same numbers, as without the memo; without states,
    the same within rounding. Sliding windows (Mistral, Gemma 2) and a soft-capped head (Gemma 2) take the
    whole-sequence path."""
    dense, pruned = tiny_model(arch, vocab=len(tokenizer), seed=0), tiny_model(arch, vocab=len(tokenizer), seed=1)
    with torch.no_grad():  # sharper attention than at init (near uniform there), so a position read wrong shows
        for name, weight in [*dense.named_parameters(), *pruned.named_parameters()]:
            if "attn" in name and weight.dim() == 2:
                weight.mul_(8.0)
    texts = PROMPTS + ["A long prompt that pads the others in its batch a fair amount, surely"]
    pruned.generation_config.eos_token_id = [generate_answers(pruned, tokenizer, texts[:1], max_new_tokens=3).ids[0][2]]
    made = generate_answers(pruned, tokenizer, texts, max_new_tokens=7, batch_size=2, keep_states=True)
    assert len({len(a) for a in made.ids}) > 1, made.ids
    prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    memo: dict = {}
    result = answer_divergence(dense, pruned, prompts, made.ids, made.states, batch_size=3, dense_memo=memo)
    with torch.no_grad():
        for prompt, answer, sample in zip(prompts, made.ids, result.per_sample):
            ids = torch.tensor([prompt + answer])
            rows = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
            expected = direct(dense(input_ids=ids).logits[0, rows], pruned(input_ids=ids).logits[0, rows])
            assert sample["scored_tokens"] == len(answer)
            assert sample["token_jsd"] == pytest.approx(expected["jsd"].tolist(), abs=1e-6)
            assert sample["kl_pruned_dense"] == pytest.approx(expected["kl_pruned_dense"].mean().item(), rel=1e-4)
            assert sample["flip_rate"] == expected["flip"].double().mean().item()
    widths: list[int] = []
    dense.get_input_embeddings().register_forward_pre_hook(lambda _m, args: widths.append(args[0].shape[1]))
    again = answer_divergence(dense, pruned, prompts, made.ids, made.states, batch_size=3, dense_memo=memo)
    assert again.per_sample == result.per_sample
    cached = arch not in ("mistral", "gemma2")
    assert bool(memo) == cached
    assert (max(widths) == max(map(len, made.ids))) == cached, widths
    assert answer_divergence(dense, pruned, prompts, made.ids, made.states, batch_size=3).per_sample == result.per_sample
    without = answer_divergence(dense, pruned, prompts, made.ids, None, batch_size=3)
    for ours, theirs in zip(without.per_sample, result.per_sample):
        assert ours["token_jsd"] == pytest.approx(theirs["token_jsd"], abs=1e-6)


def test_prompt_caches_are_kept_only_within_the_memo_budget(tokenizer, monkeypatch):
    """A memo at its budget keeps no prompt cache (a big task set on a big model would otherwise hold gigabytes) and
    the numbers are the same."""
    import metrics.divergence as divergence
    dense, pruned = tiny_model("llama", vocab=len(tokenizer), seed=0), tiny_model("llama", vocab=len(tokenizer), seed=1)
    made = generate_answers(pruned, tokenizer, PROMPTS, max_new_tokens=3, keep_states=True)
    prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in PROMPTS]
    roomy: dict = {}
    kept = answer_divergence(dense, pruned, prompts, made.ids, made.states, batch_size=2, dense_memo=roomy)
    monkeypatch.setattr(divergence, "MEMO_BYTES", divergence.memo_bytes(roomy) - 1)
    tight: dict = {}
    assert answer_divergence(dense, pruned, prompts, made.ids, made.states, batch_size=2,
                             dense_memo=tight).per_sample == kept.per_sample
    assert len(roomy) == 3 and len(tight) == 2 and divergence.memo_bytes(tight) < divergence.memo_bytes(roomy)


def test_answer_divergence_refuses_what_does_not_line_up(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        answer_divergence(model, model, [[5, 6], [7]], [[1]])
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        answer_divergence(model, model, [[5, 6], []], [[1], [2]])
    with pytest.raises(ValueError, match=r"counts \[1, 1\] are not the answers' lengths \[1, 2\]"):
        answer_divergence(model, model, [[5, 6], [7]], [[1], [2, 3]], [torch.zeros(1, 64), torch.zeros(1, 64)])


@pytest.mark.parametrize("stops", [True, False], ids=["stops-at-eos", "runs-to-max-new-tokens"])
def test_answer_divergence_is_scored_on_the_ids_the_pruned_model_generated(tokenizer, stops):
    """The pruned model writes ' ' then 'A' (re-tokenized, ' A' is one other id) and then EOS, or goes on to
    max_new_tokens: the JS along its answer covers exactly those ids, its stop token but no appended EOS."""
    space, letter = space_and_letter(tokenizer)
    eos = tokenizer.eos_token_id
    settings = EvalSettings(ppl=None, jsd=None, tasks="demo", limit=3, template="unnatural", max_new_tokens=5)
    prompts = [tokenizer(p, add_special_tokens=False).input_ids
               for p in task_prompts(settings, tokenizer, records_of("demo", None, 3))]
    ends = {prompt[-1] for prompt in prompts}
    assert not ends & {space, letter}
    dense = tiny_model("llama", vocab=len(tokenizer), seed=0)
    pruned = bigram_model(len(tokenizer), {**{end: space for end in ends}, space: letter,
                                           letter: eos if stops else space}, seed=1)
    generated = [space, letter, eos] if stops else [space, letter, space, letter, space]

    def loaded(model: torch.nn.Module, name: str) -> LoadedModel:
        return LoadedModel(model, tokenizer, name, name, torch.device("cpu"), torch.float32)

    summary, examples = evaluate(loaded(dense, "dense"), loaded(pruned, "pruned"), settings)
    assert len(examples) == 3
    with torch.no_grad():
        for prompt, example in zip(prompts, examples):
            assert example["output_pruned"] == ("A" if stops else "A A")
            assert example["pruned_tokens"] == [tokenizer.decode([t]) for t in generated]
            assert len(example["pruned_token_jsd"]) == len(generated)
            ids = torch.tensor([prompt + generated])
            rows = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
            expected = direct(dense(input_ids=ids).logits[0, rows], pruned(input_ids=ids).logits[0, rows])
            assert example["pruned_token_jsd"] == pytest.approx(expected["jsd"].tolist(), abs=1e-5)
            assert example["answer_jsd"] == pytest.approx(expected["jsd"].mean().item(), abs=1e-5)
    assert summary["answer_jsd"] == pytest.approx(sum(e["answer_jsd"] for e in examples) / 3, abs=1e-9)


def test_cache_sized_chunks_give_the_values_of_one_chunk():
    dense, pruned = random_logits(100, 49152, 5), random_logits(100, 49152, 6)
    assert chunk_rows(dense) < 100
    whole, chunked = divergence_from_logits(dense, pruned, chunk=100), divergence_from_logits(dense, pruned)
    for name in ("jsd", "kl_dense_pruned", "kl_pruned_dense"):
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-6, atol=1e-7)
    assert torch.equal(chunked["flip"], whole["flip"])
