"""Perplexity with the SparseGPT/Wanda protocol, returned with the protocol so numbers can be compared."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from metrics.heads import chunked_head_matches, head_inputs


@dataclass(frozen=True)
class Perplexity:
    """exp(mean NLL) over every scored token (every window scores seqlen - 1), and the protocol behind it."""

    ppl: float
    nll: float
    scored_tokens: int
    seqlen: int
    windows: int
    windows_available: int
    stream_tokens: int
    source: str
    seconds: float
    window_nll: list[float] = field(default_factory=list)  # each window's mean NLL, the unit of its interval

    def to_dict(self) -> dict:
        return asdict(self)


_STREAMS: list[tuple[object, str, torch.Tensor]] = []  # the last few (tokenizer, text digest, ids)


def token_stream(texts: Sequence[str], tokenizer) -> torch.Tensor:
    """Rows joined with blank lines and tokenized as one stream with no special tokens added; the last few streams
    are kept, so a worker scoring many models on one text with one tokenizer tokenizes it once."""
    text = "\n\n".join(texts)
    digest = hashlib.sha256(text.encode()).hexdigest()
    for kept, known, ids in _STREAMS:
        if kept is tokenizer and known == digest:
            return ids
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    _STREAMS[:] = [(tokenizer, digest, ids), *_STREAMS[:3]]
    return ids


def window_nll(model: torch.nn.Module, ids: torch.Tensor, chunked: bool, rows: int = 256) -> torch.Tensor:
    """Summed next-token NLL of each window of a batch, in float64. Chunked: the head runs on `rows` positions at a
    time so the logits stay in cache and the full [batch, seqlen, vocab] tensor is never written (measured faster
    than the plain forward)."""
    batch, seqlen = ids.shape
    labels = F.pad(ids[:, 1:], (0, 1), value=-100).flatten()
    if not chunked:
        logits = model(input_ids=ids, use_cache=False).logits
        losses = F.cross_entropy(logits.flatten(0, 1).float(), labels, ignore_index=-100, reduction="none")
        return losses.double().view(batch, seqlen).sum(dim=1).cpu()
    hidden = head_inputs(model, ids).flatten(0, 1)
    head = model.get_output_embeddings()
    losses = torch.empty(hidden.shape[0], dtype=torch.float64)
    for start in range(0, hidden.shape[0], rows):
        logits = head(hidden[start:start + rows]).float()
        losses[start:start + rows] = F.cross_entropy(logits, labels[start:start + rows], ignore_index=-100,
                                                     reduction="none").double().cpu()
    return losses.view(batch, seqlen).sum(dim=1)


def perplexity(model: torch.nn.Module, tokenizer, texts: Sequence[str], seqlen: int, windows: int | None = None,
               batch_size: int = 4, logits_budget_bytes: int = 1 << 30, source: str = "",
               progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Non-overlapping windows of `seqlen` tokens (the tail dropped), batched; the first `windows` if given.

    The batch shrinks so that one batch's full-vocabulary fp32 logits would stay within `logits_budget_bytes`
    (models whose logits must come from their own forward materialise them)."""
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
    sums = []
    started = time.perf_counter()
    if progress:
        progress(0, count)
    with torch.no_grad():
        chunked = chunked_head_matches(model, ids.to(device))
        for start in range(0, count, batch):
            sums.append(window_nll(model, ids[start:start + batch].to(device), chunked))
            if progress:
                progress(min(start + batch, count), count)
    per_window = (torch.cat(sums) / (seqlen - 1)).tolist()
    nll = sum(per_window) / count
    return Perplexity(math.exp(nll), nll, count * (seqlen - 1), seqlen, count, available, stream.numel(), source,
                      time.perf_counter() - started, per_window)
