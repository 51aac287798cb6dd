"""Calibration windows: the reference C4 recipe, packed instruction records, self-generated text and saved ids."""

from __future__ import annotations

import random

import pytest
import torch

from backend.sources.calibration import build_calibration, open_source
from backend.sources.datasets import load_source
from compression.calibration import (
    CalibrationError,
    windows_from_documents,
    windows_from_file,
    windows_from_model,
    windows_from_records,
)
from metrics.prompts import alpaca_prompt, full_text_renderer
from tests.conftest import SHARED_DATA, needs_shared, tiny_model


def reference_c4_windows(texts, tokenizer, nsamples, seqlen, seed):
    """The recipe as written in the SparseGPT/Wanda data utilities, spelled out independently."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(texts) - 1)
            enc = tokenizer(texts[i], return_tensors="pt")
            if enc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
        out.append(enc.input_ids[:, i:i + seqlen])
    return torch.cat(out)


@needs_shared
def test_documents_follow_the_reference_recipe(tokenizer):
    docs = load_source("c4", SHARED_DATA).items
    ours = windows_from_documents(docs, tokenizer, 8, 256, seed=0)
    assert torch.equal(ours, reference_c4_windows(docs, tokenizer, 8, 256, 0))
    assert ours.shape == (8, 256)
    assert not torch.equal(ours, windows_from_documents(docs, tokenizer, 8, 256, seed=1))


def test_documents_too_short_is_a_clear_error(tokenizer):
    with pytest.raises(CalibrationError, match="none of the 3 documents has more than 64 tokens"):
        windows_from_documents(["short one", "two", "three"], tokenizer, 2, 64)


@needs_shared
def test_records_are_rendered_shuffled_and_packed(tokenizer):
    records = load_source("alpaca", SHARED_DATA).items[:200]
    render = full_text_renderer("alpaca")
    windows = windows_from_records(records, tokenizer, render, 4, 128, seed=3)
    assert windows.shape == (4, 128)
    order = list(range(len(records)))
    random.Random(3).shuffle(order)
    first = tokenizer(render(records[order[0]]), add_special_tokens=False).input_ids
    assert windows.flatten()[: min(len(first), 128)].tolist() == first[:128]
    assert render(records[0]).startswith(alpaca_prompt(records[0])) and render(records[0]).endswith(records[0]["output"])


def test_records_too_few_tokens(tokenizer):
    records = [{"instruction": "Say hi.", "input": "", "output": "Hi."}]
    with pytest.raises(CalibrationError, match="too little text: 1 records give"):
        windows_from_records(records, tokenizer, full_text_renderer("alpaca"), 4, 128)


def test_self_generated_is_seeded(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    a = windows_from_model(model, tokenizer, 3, 16, seed=7, batch_size=2)
    b = windows_from_model(model, tokenizer, 3, 16, seed=7, batch_size=2)
    c = windows_from_model(model, tokenizer, 3, 16, seed=8, batch_size=2)
    assert a.shape == (3, 16) and torch.equal(a, b) and not torch.equal(a, c)


def test_saved_ids_round_trip(tmp_path):
    ids = torch.randint(0, 100, (6, 32))
    torch.save(ids, tmp_path / "w.pt")
    assert torch.equal(windows_from_file(tmp_path / "w.pt", 4, 32), ids[:4])
    with pytest.raises(CalibrationError, match=r"shape \(6, 32\)"):
        windows_from_file(tmp_path / "w.pt", 4, 64)


@needs_shared
def test_seqlen_is_capped_by_the_model_context(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    with pytest.raises(CalibrationError, match="seqlen 512 is beyond the model's context of 256"):
        build_calibration(open_source("c4", str(SHARED_DATA)), model, tokenizer, 4, 512)
    windows = build_calibration(open_source("unnatural", str(SHARED_DATA)), model, tokenizer, 2, 64)
    assert windows.shape == (2, 64)


@needs_shared
def test_held_out_records_are_never_packed_and_unreached_ones_change_nothing(tokenizer):
    records = load_source("alpaca", SHARED_DATA).items[:200]
    render = full_text_renderer("alpaca")
    order = list(range(len(records)))
    random.Random(3).shuffle(order)
    plain = windows_from_records(records, tokenizer, render, 2, 128, seed=3)
    assert torch.equal(windows_from_records(records, tokenizer, render, 2, 128, seed=3, exclude=order[-20:]), plain)
    first, second = order[0], order[1]
    held = windows_from_records(records, tokenizer, render, 2, 128, seed=3, exclude=[first])
    text = tokenizer.decode(held.flatten())
    assert records[first]["output"] not in text and records[second]["output"] in text
    again = tokenizer(render(records[second]), add_special_tokens=False).input_ids
    assert held.flatten()[: min(len(again), 256)].tolist() == again[:256]


def test_too_few_records_once_held_out_say_so(tokenizer):
    records = [{"instruction": f"Say {w}.", "input": "", "output": f"{w}."} for w in ("hi", "yes", "no")]
    with pytest.raises(CalibrationError, match=r"too little text: 1 records \(2 more held out: the evaluation reads "
                                               r"them\) give"):
        windows_from_records(records, tokenizer, full_text_renderer("alpaca"), 4, 128, exclude=range(2))
