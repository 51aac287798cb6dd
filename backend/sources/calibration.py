"""Turn a calibration source name or path into token windows, choosing the recipe that fits the data."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from backend.sources.datasets import Dataset, is_generated, load_source
from compression.calibration import (
    check_shape,
    model_context,
    windows_from_documents,
    windows_from_file,
    windows_from_model,
    windows_from_records,
)
from metrics.prompts import full_text_renderer

TOKEN_FILE_SUFFIXES = (".pt", ".safetensors")
Source = Dataset | Path | str


def open_source(source: str, data_dir: str | None = None) -> Source:
    """Check and read a calibration source before any model is loaded: 'self', a saved-ids file, or data."""
    if is_generated(source):
        return source
    if Path(source).suffix in TOKEN_FILE_SUFFIXES:
        if not Path(source).is_file():
            raise ValueError(f"calibration file {source!r} does not exist")
        return Path(source)
    return load_source(source, data_dir)


def build_calibration(source: Source, model: torch.nn.Module, tokenizer, nsamples: int, seqlen: int, seed: int = 0,
                      template: str = "alpaca", progress: Callable[[int, int], None] | None = None,
                      streamer=None, held_out: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] token ids: C4-style windows from documents, packed rendered records (the first `held_out`
    never packed: an evaluation reads them), the model's own samples ('self', each decoding step handed to
    `streamer`), or saved token ids (.pt / .safetensors)."""
    check_shape(nsamples, seqlen, model_context(model.config))
    if isinstance(source, str):
        return windows_from_model(model, tokenizer, nsamples, seqlen, seed, progress=progress, streamer=streamer)
    if isinstance(source, Path):
        return windows_from_file(source, nsamples, seqlen)
    if source.kind == "records":
        return windows_from_records(source.items, tokenizer, full_text_renderer(template, tokenizer), nsamples,
                                    seqlen, seed, exclude=range(held_out))
    return windows_from_documents(source.items, tokenizer, nsamples, seqlen, seed)
