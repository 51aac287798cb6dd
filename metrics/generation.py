"""Batched greedy generation with left padding, for task scores: a decode loop over transformers' cache that drops
a row from the batch as soon as its answer ends, so finished answers cost nothing while the others go on."""

from __future__ import annotations

import inspect
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


def answer_texts(tokenizer, answers: list[list[int]], stops: list[int]) -> list[str]:
    """Generated ids as text, without the stop token that ended them (even one the tokenizer does not call special)
    and without special tokens."""
    stop_set = set(stops)
    return [tokenizer.decode(ids[:-1] if ids and ids[-1] in stop_set else ids, skip_special_tokens=True)
            for ids in answers]


def generate_ids(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                 batch_size: int = 16, progress: Callable[[int, int], None] | None = None,
                 min_new_tokens: int = 0, streamer=None) -> list[list[int]]:
    """Greedy answers' token ids, stopping at any of `stop_ids`; each row keeps the stop token that ended it. Prompts
    are sorted by length so each batch carries little padding; the answers come back in the prompts' order.
    Special tokens in a prompt's text (a chat template) are kept. `streamer` (a transformers streamer) sees every
    decoding step's tokens of the rows still answering, for progress inside a batch."""
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
            if streamer is not None:
                streamer.put(ids)
            for r, answer in enumerate(greedy(model, ids.to(device), mask.to(device), max_new_tokens, min_new_tokens,
                                              stops, streamer)):
                answers[rows[r]] = answer
            if streamer is not None:
                streamer.end()
            if progress:
                progress(min(start + batch_size, len(order)), len(order))
    return answers


def greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, min_new_tokens: int,
           stops: list[int], streamer=None) -> list[list[int]]:
    """One left-padded batch decoded greedily over a DynamicCache: the prompt in one forward, then a token per step
    for the rows still answering; a row whose token is a stop leaves the batch (its cache rows with it)."""
    from transformers import DynamicCache

    kv = DynamicCache(config=model.config)
    cache = {cache_argument(model): kv}
    answers: list[list[int]] = [[] for _ in range(ids.shape[0])]
    alive = torch.arange(ids.shape[0], device=ids.device)
    stop = torch.tensor(stops, dtype=torch.long, device=ids.device)
    position = mask.long().cumsum(-1) - 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position.clamp_min(0), use_cache=True,
                   logits_to_keep=1, **cache).logits[:, -1]
    position = position[:, -1]
    for step in range(max_new_tokens):
        if step < min_new_tokens and len(stops):
            logits[:, stop] = -float("inf")
        token = logits.argmax(-1)
        for row, value in zip(alive.tolist(), token.tolist()):
            answers[row].append(value)
        if streamer is not None:
            streamer.put(token)
        if step == max_new_tokens - 1:
            break
        going = ~torch.isin(token, stop)
        if not bool(going.any()):
            break
        if not bool(going.all()):
            keep = going.nonzero()[:, 0]
            kv.batch_select_indices(keep)
            alive, token, mask, position = alive[keep], token[keep], mask[keep], position[keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        position = position + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None], use_cache=True,
                       **cache).logits[:, -1]
    return answers


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which the model's forward takes its KV cache (transformers 5 renames past_key_values to
    cache; remote-code models may still use the old name)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def generate(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16,
             progress: Callable[[int, int], None] | None = None, min_new_tokens: int = 0) -> list[str]:
    """Greedy answers as text, from `generate_ids` in the prompts' order."""
    answers = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, progress, min_new_tokens)
    return answer_texts(tokenizer, answers, stop_ids(model, tokenizer))
