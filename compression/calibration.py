"""Calibration windows: [nsamples, seqlen] token ids from documents, instruction records, the model itself, or a file."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Collection, Sequence

import torch


class CalibrationError(ValueError):
    """Calibration that cannot be built as asked; the message is one line for the user."""


def model_context(config) -> int | None:
    """The longest sequence the model's positions allow, if its config says."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_shape(nsamples: int, seqlen: int, context: int | None) -> None:
    """nsamples >= 1; 1 < seqlen <= the model's context (never silently the whole context)."""
    if nsamples < 1:
        raise CalibrationError(f"nsamples {nsamples} is not allowed: use at least 1 (128 in the papers)")
    if seqlen < 2:
        raise CalibrationError(f"seqlen {seqlen} is not allowed: use at least 2 tokens (2048 in the papers)")
    if context is not None and seqlen > context:
        raise CalibrationError(f"seqlen {seqlen} is beyond the model's context of {context} tokens: use at most {context}")


def windows_from_documents(texts: Sequence[str], tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """The SparseGPT/Wanda C4 recipe: seed Python's RNG, pick random documents until one has more than seqlen
    tokens, take a random window of it; the same seed and documents give the references' windows."""
    check_shape(nsamples, seqlen, None)
    if not texts:
        raise CalibrationError("no documents to calibrate from")
    random.seed(seed)
    lengths: dict[int, torch.Tensor] = {}
    windows = []
    for _ in range(nsamples):
        while True:
            index = random.randint(0, len(texts) - 1)
            if index not in lengths:
                lengths[index] = tokenizer(texts[index], return_tensors="pt").input_ids[0]
            ids = lengths[index]
            if ids.shape[0] > seqlen:
                break
            if len(lengths) == len(texts) and all(v.shape[0] <= seqlen for v in lengths.values()):
                longest = max(v.shape[0] for v in lengths.values())
                raise CalibrationError(f"too little text: none of the {len(texts)} documents has more than {seqlen} "
                                       f"tokens (the longest has {longest}); lower seqlen or use more text")
        start = random.randint(0, ids.shape[0] - seqlen - 1)
        windows.append(ids[start:start + seqlen])
    return torch.stack(windows)


def windows_from_records(records: Sequence[dict], tokenizer, render: Callable[[dict], str], nsamples: int,
                         seqlen: int, seed: int = 0, exclude: Collection[int] = ()) -> torch.Tensor:
    """Render instruction records with a prompt template (prompt + reference answer + EOS), shuffle them with the
    seed and pack the token stream into consecutive windows. Records at `exclude` (those an evaluation reads) are
    never packed; the others keep their shuffled order, so excluding records the packing never reached changes
    nothing."""
    check_shape(nsamples, seqlen, None)
    need = nsamples * seqlen
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    skipped = set(exclude)
    order = [i for i in order if i not in skipped]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for index in order:
        stream.extend(tokenizer(render(records[index]), add_special_tokens=False).input_ids + eos)
        if len(stream) >= need:
            break
    if len(stream) < need:
        held = f" ({len(records) - len(order)} more held out: the evaluation reads them)" if skipped else ""
        raise CalibrationError(f"too little text: {len(order)} records{held} give {len(stream)} tokens but "
                               f"{nsamples} x {seqlen} = {need} are needed; lower nsamples or seqlen")
    return torch.tensor(stream[:need]).reshape(nsamples, seqlen)


def windows_from_model(model: torch.nn.Module, tokenizer, nsamples: int, seqlen: int, seed: int = 0,
                       batch_size: int = 16, top_p: float = 0.95, temperature: float = 1.0,
                       progress: Callable[[int, int], None] | None = None, streamer=None) -> torch.Tensor:
    """Self-generated calibration: the model samples its own text from a start token, with a seed; `streamer` (a
    transformers streamer) sees every decoding step, for progress inside a batch."""
    check_shape(nsamples, seqlen, None)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    windows = []
    try:
        for done in range(0, nsamples, batch_size):
            count = min(batch_size, nsamples - done)
            prompt = torch.full((count, 1), start, dtype=torch.long, device=device)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_p=top_p,
                                 temperature=temperature, top_k=0, max_new_tokens=seqlen, min_new_tokens=seqlen,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, streamer=streamer)
            windows.append(out[:, 1:1 + seqlen].cpu())
            if progress:
                progress(done + count, nsamples)
    finally:
        torch.random.set_rng_state(generator_state)
    return torch.cat(windows)


def windows_from_file(path: str | Path, nsamples: int, seqlen: int) -> torch.Tensor:
    """Saved token ids (.pt via torch.save, or .safetensors with one tensor), for exact reproductions."""
    check_shape(nsamples, seqlen, None)
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        tensors = load_file(path)
        ids = tensors.get("input_ids", next(iter(tensors.values()), None))
    else:
        ids = torch.load(path, weights_only=True)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise CalibrationError(f"{path} must hold one [nsamples, seqlen] tensor of token ids")
    if ids.shape[1] != seqlen or ids.shape[0] < nsamples:
        raise CalibrationError(f"{path} holds windows of shape {tuple(ids.shape)}, but {nsamples} x {seqlen} were "
                               f"asked; use --nsamples <= {ids.shape[0]} --seqlen {ids.shape[1]}")
    return ids[:nsamples].long()
