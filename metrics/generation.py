"""Batched greedy generation with left padding, for task scores: the prompts' shared prefix through the model once,
their own tokens prefilled in small groups of similar length, then decoded together in a loop over transformers'
cache that drops a row from the batch as soon as its answer ends, so finished answers cost nothing while the others
go on."""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
from dataclasses import dataclass
from typing import Callable

import torch

from metrics.heads import HeadTap


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


DECODE_ROWS = 64
CACHE_BYTES = 1 << 30


@dataclass
class Prefilled:
    """A left-padded batch after its prompt forward: the prompts' indices, ids and attention mask, each row's last
    position, the KV cache, the first next-token logits and (when kept) the output head's input behind them."""
    rows: list[int]
    ids: torch.Tensor
    mask: torch.Tensor
    position: torch.Tensor
    kv: object
    logits: torch.Tensor
    hidden: torch.Tensor | None = None


@dataclass
class Answers:
    """Greedy answers in the prompts' order: each one's token ids and, when kept, the output head's inputs that
    predicted them ([len(ids), hidden]: the head of the model on them gives the very logits each token was picked
    from)."""
    ids: list[list[int]]
    states: list[torch.Tensor] | None = None


def generate_answers(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                     batch_size: int = 16, progress: Callable[[int, int], None] | None = None,
                     min_new_tokens: int = 0, streamer=None, decode_rows: int = DECODE_ROWS,
                     share_prefix: bool = True, keep_states: bool = False) -> Answers:
    """Greedy answers' token ids, stopping at any of `stop_ids`; each row keeps the stop token that ended it.

    The prompts' common first tokens (a chat template's system prompt, a task template's preamble) go through the
    model once (`share_prefix`); the rest of each prompt is sorted by length and prefilled at most `batch_size` and
    `prefill_tokens` padded tokens at a time, so each prompt forward carries little padding; consecutive prefilled
    groups are then decoded together, up to `decode_rows` rows (their caches left-padded into one, within
    CACHE_BYTES), since a decoding step costs little more for 64 rows than for 16 while a prompt forward gains little
    from more rows. Sliding-window and other stateful caches share no prefix and decode group by group. The answers
    come back in the prompts' order. Special tokens in a prompt's text (a chat template) are kept. `streamer` (a
    transformers streamer) sees every decoding step's tokens of the rows still answering; `progress(done, total)`
    counts the prompts answered. `keep_states` also keeps, for every generated token, the output head's input that
    predicted it, so a metric of the model's next-token distributions along its own answers needs no second pass."""
    if max_new_tokens < 1 or batch_size < 1 or decode_rows < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens}, batch_size {batch_size} and decode_rows {decode_rows} "
                         "must all be at least 1")
    device = next(model.parameters()).device
    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    if pad is None:
        raise ValueError("the tokenizer has no pad token and neither it nor the model names an EOS token to pad with")
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    states: list[list[torch.Tensor]] = [[] for _ in prompts]
    tap = HeadTap(model) if keep_states else None
    pending: list[Prefilled] = []
    answered = 0

    def decode_pending() -> None:
        nonlocal answered
        state = merged(pending, pad)
        pending.clear()
        if streamer is not None:
            streamer.put(state.ids)
        for row, answer, kept in zip(state.rows, *decode(model, state, max_new_tokens, min_new_tokens, stops,
                                                           streamer, tap)):
            answers[row], states[row] = answer, kept
        if streamer is not None:
            streamer.end()
        answered += len(state.rows)
        if progress:
            progress(answered, len(order))

    if progress:
        progress(0, len(order))
    with torch.no_grad(), tap or contextlib.nullcontext():
        prefix = shared_prefix(model, encoded, device) if share_prefix else None
        shared = 0 if prefix is None else prefix[0].shape[1]
        lengths = [len(ids) - shared for ids in encoded]
        for rows in prefill_groups(order, lengths, batch_size, prefill_tokens(device)):
            state = prefill(model, rows, encoded, pad, device, prefix, tap)
            if pending and not joins(pending, state, decode_rows, max_new_tokens):
                decode_pending()
            pending.append(state)
        if pending:
            decode_pending()
    return Answers(answers, [torch.stack(kept) for kept in states] if keep_states else None)


def prefill_tokens(device: torch.device) -> int:
    """Padded prompt tokens per prompt forward: a few hundred already keep a CPU busy (fewer rows, less padding), a
    GPU needs thousands."""
    return 1024 if device.type == "cpu" else 8192


def prefill_groups(order: list[int], lengths: list[int], rows: int, tokens: int) -> list[list[int]]:
    """Consecutive prompts of `order` (sorted by length) in groups of at most `rows` prompts and, past the first
    prompt, at most `tokens` padded tokens."""
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups[-1]) < rows and (len(groups[-1]) + 1) * lengths[i] <= tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def shared_prefix(model: torch.nn.Module, encoded: list[list[int]], device: torch.device):
    """The prompts' longest common first tokens (each prompt keeps at least one of its own) through one forward, as
    (ids, DynamicCache); None when fewer than two prompts share any, or when the model's cache is not made of plain
    growing layers (a sliding window or linear-attention layer keeps other state)."""
    from transformers import DynamicCache

    if len(encoded) < 2:
        return None
    length = min(len(os.path.commonprefix(encoded)), min(map(len, encoded)) - 1)
    if length < 1:
        return None
    kv = DynamicCache(config=model.config)
    if not plain_cache(kv):
        return None
    ids = torch.tensor([encoded[0][:length]], device=device)
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_argument(model): kv})
    return (ids, kv) if kv.layers and plain_cache(kv) else None


def plain_cache(kv) -> bool:
    """Whether every layer of a cache is a plain growing one, whose rows can be copied, padded and joined (a
    sliding-window or linear-attention layer keeps other state)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in kv.layers)


def prefill(model: torch.nn.Module, rows: list[int], encoded: list[list[int]], pad: int, device: torch.device,
            prefix=None, tap: HeadTap | None = None) -> Prefilled:
    """The prompts `rows` of `encoded` through one forward that fills a DynamicCache and keeps only the last
    position's logits: after the shared `prefix` (its cache copied to every row), if any, each prompt's own tokens
    left-padded to the longest (the padding sits between the prefix and them, masked, positions counted past it)."""
    from transformers import DynamicCache

    shared = 0 if prefix is None else prefix[0].shape[1]
    ids, mask = left_padded([encoded[i][shared:] for i in rows], pad)
    ids, mask = ids.to(device), mask.to(device)
    if prefix is None:
        kv = DynamicCache(config=model.config)
    else:
        kv = copy.deepcopy(prefix[1])
        kv.batch_repeat_interleave(len(rows))
        ids = torch.cat([prefix[0].expand(len(rows), -1), ids], dim=1)
        mask = torch.cat([mask.new_ones((len(rows), shared)), mask], dim=1)
    position = mask.cumsum(-1) - 1
    logits = model(input_ids=ids[:, shared:], attention_mask=mask, position_ids=position[:, shared:].clamp_min(0),
                   use_cache=True, logits_to_keep=1, **{cache_argument(model): kv}).logits[:, -1]
    return Prefilled(list(rows), ids, mask, position[:, -1], kv, logits, tap.last if tap else None)


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows padded on the left with `pad` to the longest, and their attention mask (0 on the padding)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[r, width - len(row):] = 1
    return ids, mask


def joins(pending: list[Prefilled], state: Prefilled, decode_rows: int, max_new_tokens: int) -> bool:
    """Whether `state` can be decoded together with `pending`: every cache layer a plain growing one (a sliding
    window or linear-attention layer keeps other state, so such batches decode alone), at most `decode_rows` rows,
    and the merged cache, grown by `max_new_tokens`, within CACHE_BYTES."""
    batches = [*pending, state]
    if not all(plain_cache(b.kv) and all(layer.is_initialized for layer in b.kv.layers) for b in batches):
        return False
    rows = sum(len(b.rows) for b in batches)
    width = max(b.mask.shape[1] for b in batches) + max_new_tokens
    row_token_bytes = sum(t.numel() * t.element_size() for layer in state.kv.layers
                          for t in (layer.keys, layer.values)) / state.mask.numel()
    return rows <= decode_rows and rows * width * row_token_bytes <= CACHE_BYTES


def merged(batches: list[Prefilled], pad: int) -> Prefilled:
    """Prefilled batches as one: ids, masks, keys and values left-padded to the widest (padding is masked out)."""
    if len(batches) == 1:
        return batches[0]
    width = max(b.mask.shape[1] for b in batches)
    left = lambda t, value=0: torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)
    along = lambda t: torch.nn.functional.pad(t, (0, 0, width - t.shape[-2], 0))
    kv = batches[0].kv
    for i, layer in enumerate(kv.layers):
        layer.keys = torch.cat([along(b.kv.layers[i].keys) for b in batches])
        layer.values = torch.cat([along(b.kv.layers[i].values) for b in batches])
    return Prefilled([r for b in batches for r in b.rows], torch.cat([left(b.ids, pad) for b in batches]),
                     torch.cat([left(b.mask) for b in batches]), torch.cat([b.position for b in batches]), kv,
                     torch.cat([b.logits for b in batches]),
                     None if batches[0].hidden is None else torch.cat([b.hidden for b in batches]))


def decode(model: torch.nn.Module, state: Prefilled, max_new_tokens: int, min_new_tokens: int, stops: list[int],
           streamer=None, tap: HeadTap | None = None) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Greedy decoding of a prefilled batch, a token per step for the rows still answering; a row whose token is a
    stop leaves the batch (its cache rows with it). Returns each row's tokens and, with a `tap`, the head inputs
    that predicted them."""
    kv, mask, position, logits, hidden = state.kv, state.mask, state.position, state.logits, state.hidden
    cache = {cache_argument(model): kv}
    answers: list[list[int]] = [[] for _ in state.rows]
    states: list[list[torch.Tensor]] = [[] for _ in state.rows]
    alive = torch.arange(len(state.rows), device=mask.device)
    stop = torch.tensor(stops, dtype=torch.long, device=mask.device)
    for step in range(max_new_tokens):
        if step < min_new_tokens and len(stops):
            logits[:, stop] = -float("inf")
        token = logits.argmax(-1)
        for i, (row, value) in enumerate(zip(alive.tolist(), token.tolist())):
            answers[row].append(value)
            if tap is not None:
                states[row].append(hidden[i])
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
        hidden = tap.last if tap is not None else None
    return answers, states


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which the model's forward takes its KV cache (transformers 5 renames past_key_values to
    cache; remote-code models may still use the old name)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def generate(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16,
             progress: Callable[[int, int], None] | None = None, min_new_tokens: int = 0,
             decode_rows: int = DECODE_ROWS) -> list[str]:
    """Greedy answers as text, from `generate_answers` in the prompts' order."""
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, progress, min_new_tokens,
                               decode_rows=decode_rows)
    return answer_texts(tokenizer, answers.ids, stop_ids(model, tokenizer))
