"""Batched greedy generation with left padding, for task scores."""

from __future__ import annotations

from typing import Callable

import torch


def generate(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16,
             progress: Callable[[int, int], None] | None = None, min_new_tokens: int = 0) -> list[str]:
    """Greedy answers that stop at EOS. Prompts are sorted by length so each batch carries little padding; the
    answers come back in the prompts' order. Special tokens in a prompt's text (a chat template) are kept."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} and batch_size {batch_size} must both be at least 1")
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = [""] * len(prompts)
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
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=pad, top_p=None, top_k=None, temperature=None)
            for r, i in enumerate(rows):
                answers[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True)
            if progress:
                progress(min(start + batch_size, len(order)), len(order))
    return answers
