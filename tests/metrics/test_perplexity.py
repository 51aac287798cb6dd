"""Perplexity follows the reference protocol and equals a direct per-window computation."""

from __future__ import annotations

import math

import pytest
import torch

from metrics.perplexity import perplexity, token_stream
from tests.conftest import tiny_model

TEXTS = ["The quick brown fox jumps over the lazy dog.", "", "A second paragraph follows here, with more words."] * 20


def test_matches_direct_loss_and_reports_protocol(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    result = perplexity(model, tokenizer, TEXTS, seqlen=32, windows=5, batch_size=2)
    stream = token_stream(TEXTS, tokenizer)
    assert stream.tolist() == tokenizer("\n\n".join(TEXTS), add_special_tokens=False).input_ids
    with torch.no_grad():
        losses = [model(input_ids=stream[i * 32:(i + 1) * 32][None], labels=stream[i * 32:(i + 1) * 32][None]).loss
                  for i in range(5)]
    assert result.ppl == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)
    assert result.window_nll == pytest.approx([loss.item() for loss in losses], rel=1e-5)
    assert (result.windows, result.seqlen, result.scored_tokens) == (5, 32, 5 * 31)
    assert result.windows_available == stream.numel() // 32 and result.stream_tokens == stream.numel()


def test_all_windows_and_tail_dropped(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    result = perplexity(model, tokenizer, TEXTS, seqlen=50)
    assert result.windows == result.windows_available == token_stream(TEXTS, tokenizer).numel() // 50


def test_batching_does_not_change_the_number(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    one = perplexity(model, tokenizer, TEXTS, seqlen=32, windows=6, batch_size=1).ppl
    many = perplexity(model, tokenizer, TEXTS, seqlen=32, windows=6, batch_size=6).ppl
    assert one == pytest.approx(many, rel=1e-5)


def test_bad_arguments(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    with pytest.raises(ValueError, match="too little text"):
        perplexity(model, tokenizer, ["tiny"], seqlen=64)
    with pytest.raises(ValueError, match="seqlen 1"):
        perplexity(model, tokenizer, TEXTS, seqlen=1)


def test_chunked_head_equals_the_models_own_logits(tokenizer):
    from metrics.perplexity import chunked_head_matches, window_nll
    model = tiny_model("llama", vocab=len(tokenizer))
    ids = token_stream(TEXTS, tokenizer)[:96].reshape(3, 32)
    assert chunked_head_matches(model, ids)
    capped = tiny_model("gemma2", vocab=len(tokenizer))
    capped.config.final_logit_softcapping = 3.0  # the model's forward caps its logits after the head
    assert not chunked_head_matches(capped, ids) and not chunked_head_matches(capped, ids)
    with torch.no_grad():
        chunked, plain = window_nll(model, ids, chunked=True, rows=10), window_nll(model, ids, chunked=False)
    assert chunked.shape == (3,) and torch.allclose(chunked, plain, rtol=1e-5)
