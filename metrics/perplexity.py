"""Perplexity with the SparseGPT/Wanda protocol, returned with the protocol so numbers can be compared."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Perplexity:
    """exp(mean NLL) over every scored token, and the protocol behind it."""

    ppl: float
    nll: float
    scored_tokens: int
    seqlen: int
    windows: int
    windows_available: int
    stream_tokens: int
    source: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def token_stream(texts: Sequence[str], tokenizer) -> torch.Tensor:
    """Rows joined with blank lines and tokenized as one stream with no special tokens added."""
    return torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False).input_ids, dtype=torch.long)


def perplexity(model: torch.nn.Module, tokenizer, texts: Sequence[str], seqlen: int, windows: int | None = None,
               batch_size: int = 4, logits_budget_bytes: int = 1 << 30, source: str = "",
               progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Non-overlapping windows of `seqlen` tokens (the tail dropped), batched; the first `windows` if given.

    The batch shrinks so that one batch's full-vocabulary fp32 logits stay within `logits_budget_bytes`."""
    if seqlen < 2:
        raise ValueError(f"seqlen {seqlen} is not allowed: use at least 2")
    if windows is not None and windows < 1:
        raise ValueError(f"windows {windows} is not allowed: use at least 1, or all")
    stream = token_stream(texts, tokenizer)
    available = stream.numel() // seqlen
    if available == 0:
        raise ValueError(f"too little text for perplexity: {stream.numel()} tokens, fewer than one window of {seqlen}")
    count = available if windows is None else min(windows, available)
    ids = stream[: count * seqlen].reshape(count, seqlen)
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = max(1, min(batch_size, logits_budget_bytes // (seqlen * vocab * 4)))
    device = next(model.parameters()).device
    total = 0.0
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, count, batch):
            chunk = ids[start:start + batch].to(device)
            logits = model(input_ids=chunk, use_cache=False).logits
            labels = F.pad(chunk[:, 1:], (0, 1), value=-100)
            total += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                     reduction="sum").item()
            del logits
            if progress:
                progress(min(start + batch, count), count)
    scored = count * (seqlen - 1)
    nll = total / scored
    return Perplexity(math.exp(nll), nll, scored, seqlen, count, available, stream.numel(), source,
                      time.perf_counter() - started)
