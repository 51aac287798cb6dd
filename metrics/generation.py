"""Batched greedy generation with left padding, for task scores."""

from __future__ import annotations

from typing import Callable

import torch


def stop_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Every end-of-sequence id to stop on: the model's generation config ones (a chat model such as Llama-3 lists
    several) then the tokenizer's, deduplicated in that order."""
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    if isinstance(configured, torch.Tensor):
        configured = configured.flatten().tolist()
    candidates = [configured] if isinstance(configured, int) else list(configured or [])
    candidates.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(i) for i in candidates if i is not None))


def trim_answer(ids: list[int], stops: list[int]) -> list[int]:
    """A generated row up to and including its first stop token (what follows is padding), or whole if none."""
    stop_set = set(stops)
    for index, token in enumerate(ids):
        if token in stop_set:
            return ids[:index + 1]
    return list(ids)


def answer_texts(tokenizer, answers: list[list[int]], stops: list[int]) -> list[str]:
    """Generated ids as text, without the stop token that ended them (even one the tokenizer does not call special)
    and without special tokens."""
    stop_set = set(stops)
    return [tokenizer.decode(ids[:-1] if ids and ids[-1] in stop_set else ids, skip_special_tokens=True)
            for ids in answers]


def generate_ids(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                 batch_size: int = 16, progress: Callable[[int, int], None] | None = None,
                 min_new_tokens: int = 0, streamer=None) -> list[list[int]]:
    """Greedy answers' token ids, stopping at any of `stop_ids`; each row keeps the stop token that ended it and
    drops the padding after it. Prompts are sorted by length so each batch carries little padding; the answers come
    back in the prompts' order. Special tokens in a prompt's text (a chat template) are kept. `streamer` (a
    transformers streamer) sees every decoding step, for progress inside a batch."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} and batch_size {batch_size} must both be at least 1")
    device = next(model.parameters()).device
    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    if pad is None:
        raise ValueError("the tokenizer has no pad token and neither it nor the model names an EOS token to pad with")
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                 eos_token_id=stops or None, pad_token_id=pad, top_p=None, top_k=None,
                                 temperature=None, streamer=streamer)
            for r, i in enumerate(rows):
                answers[i] = trim_answer(out[r, width:].tolist(), stops)
            if progress:
                progress(min(start + batch_size, len(order)), len(order))
    return answers


def generate(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16,
             progress: Callable[[int, int], None] | None = None, min_new_tokens: int = 0) -> list[str]:
    """Greedy answers as text, from `generate_ids` in the prompts' order."""
    answers = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, progress, min_new_tokens)
    return answer_texts(tokenizer, answers, stop_ids(model, tokenizer))
