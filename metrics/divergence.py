"""Per-token divergence (JS, KL both ways, top-1 flips) between a dense and a pruned model on the same tokens."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from metrics.generation import cache_argument, left_padded, plain_cache
from metrics.heads import chunked_head_matches, head_inputs

LN2 = math.log(2.0)
MEMO_BYTES = 512 << 20  # the most a dense model's memo holds: prompt caches are kept only within it
CHUNK_BYTES = 4 << 20
MIN_CHUNK_ROWS = 16


@dataclass
class TokenDivergence:
    """One sequence's per-position divergences, one entry per scored position."""

    jsd: torch.Tensor
    kl_dense_pruned: torch.Tensor
    kl_pruned_dense: torch.Tensor
    flips: torch.Tensor


@dataclass
class DivergenceResult:
    """Per-sample divergences and their means over samples (samples with no scored token are left out)."""

    per_sample: list[dict]
    jsd: float
    kl_dense_pruned: float
    kl_pruned_dense: float
    flip_rate: float
    scored_tokens: int
    log2: bool
    skipped: int = 0
    samples: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(p || q) from log-probs, with 0 * log 0 taken as 0 so masked (-inf) entries are harmless."""
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros((), dtype=p.dtype, device=p.device))
    return terms.sum(dim=-1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise sum of a * b (a sum, not a matrix product: its pairwise float32 sum stays within 1e-6 over a
    vocabulary of 50k, a product's running sum does not)."""
    return (a * b).sum(dim=-1)


def chunk_rows(logits: torch.Tensor) -> int:
    """Positions per chunk of the divergence: on a CPU, as many as keep one chunk's float32 log-probs within
    CHUNK_BYTES, so each pass over them runs in cache (measured 3-4x faster than 1024 positions for a 49k
    vocabulary), and at least MIN_CHUNK_ROWS; on an accelerator, 1024. Positions are independent: the chunk moves
    no result beyond the order of a float sum (bitwise the same on a 2-core CPU)."""
    if logits.device.type != "cpu":
        return 1024
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * max(logits.shape[-1], 1)))


def divergence_from_logits(dense_logits: torch.Tensor, pruned_logits: torch.Tensor, log2: bool = False,
                           chunk: int | None = None) -> dict[str, torch.Tensor]:
    """Per-position JS, KL both ways and argmax flips from [positions, vocab] logits, in float32 chunk by chunk
    (`chunk` positions at a time; default `chunk_rows`). Finite log-probs (the usual case) take half the passes over
    the vocabulary of the masked-safe formulas: the probabilities and the log-ratios are computed once, not once
    per divergence."""
    if dense_logits.shape != pruned_logits.shape or dense_logits.dim() != 2:
        raise ValueError(f"logits must both be [positions, vocab]: got {tuple(dense_logits.shape)} "
                         f"and {tuple(pruned_logits.shape)}")
    chunk = chunk_rows(dense_logits) if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"chunk {chunk} is not allowed: use at least 1")
    parts: dict[str, list[torch.Tensor]] = {"jsd": [], "kl_dense_pruned": [], "kl_pruned_dense": [], "flip": []}
    for start in range(0, dense_logits.shape[0], chunk):
        logp = torch.log_softmax(dense_logits[start:start + chunk].float(), dim=-1)
        logq = torch.log_softmax(pruned_logits[start:start + chunk].float(), dim=-1)
        logm = torch.logaddexp(logp, logq) - LN2
        if logp.numel() and bool(logp.amin() > -math.inf) and bool(logq.amin() > -math.inf):
            p, q = logp.exp(), logq.exp()
            jsd = 0.5 * _dot(p, logp - logm) + 0.5 * _dot(q, logq - logm)
            del logm
            ratio = logp - logq
            kl_pq, kl_qp = _dot(p, ratio), -_dot(q, ratio)
            del p, q, ratio
        else:
            jsd = 0.5 * _kl(logp, logm) + 0.5 * _kl(logq, logm)
            del logm
            kl_pq, kl_qp = _kl(logp, logq), _kl(logq, logp)
        jsd = jsd.clamp_min(0.0)
        parts["jsd"].append(jsd / LN2 if log2 else jsd)
        parts["kl_dense_pruned"].append(kl_pq.clamp_min(0.0))
        parts["kl_pruned_dense"].append(kl_qp.clamp_min(0.0))
        parts["flip"].append(logp.argmax(dim=-1) != logq.argmax(dim=-1))
        del logp, logq
    if not parts["jsd"]:
        empty = torch.zeros(0, dtype=torch.float32, device=dense_logits.device)
        return {"jsd": empty, "kl_dense_pruned": empty.clone(), "kl_pruned_dense": empty.clone(),
                "flip": torch.zeros(0, dtype=torch.bool, device=dense_logits.device)}
    return {name: torch.cat(values) for name, values in parts.items()}


def _scored_rows(model: torch.nn.Module, batch: list[torch.Tensor], positions: list[torch.Tensor],
                 head_only: bool = False, memo: dict | None = None) -> torch.Tensor:
    """One right-padded forward pass; only the scored positions' logits of each sequence, concatenated. With
    `head_only` the output head runs on the scored positions' hidden states alone (prompt positions never get logits),
    and `memo` keeps those hidden states by the batch's tokens, so the same model on the same batch skips its forward."""
    device = next(model.parameters()).device
    key = _batch_key(batch, positions) if memo is not None and head_only else None
    if key is not None and key in memo:
        return model.get_output_embeddings()(memo[key].to(device))
    longest = max(len(seq) for seq in batch)
    ids = torch.zeros(len(batch), longest, dtype=torch.long)
    mask = torch.zeros(len(batch), longest, dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
    if head_only:
        hidden = head_inputs(model, ids.to(device), attention_mask=mask.to(device))
        picked = torch.cat([hidden[row, where.to(hidden.device)] for row, where in enumerate(positions)])
        if key is not None:
            memo[key] = picked
        return model.get_output_embeddings()(picked)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    rows = torch.cat([logits[row, where.to(logits.device)] for row, where in enumerate(positions)])
    del logits
    return rows


def _batch_key(batch: list[torch.Tensor], positions: list[torch.Tensor]) -> str:
    """A digest of a batch's token ids and scored positions, in order."""
    digest = hashlib.sha256()
    for seq, where in zip(batch, positions):
        digest.update(seq.numpy().tobytes() + b"|" + where.numpy().tobytes() + b"/")
    return digest.hexdigest()


def _sample_record(div: TokenDivergence) -> dict:
    """Means over one sample's scored tokens plus its per-token JS."""
    count = int(div.jsd.numel())
    if count == 0:
        return {"jsd": None, "kl_dense_pruned": None, "kl_pruned_dense": None, "flip_rate": None, "token_jsd": [],
                "scored_tokens": 0, "skipped": True}
    return {"jsd": div.jsd.mean().item(), "kl_dense_pruned": div.kl_dense_pruned.mean().item(),
            "kl_pruned_dense": div.kl_pruned_dense.mean().item(), "flip_rate": int(div.flips.sum()) / count,
            "token_jsd": div.jsd.tolist(), "scored_tokens": count, "skipped": False}


def model_divergence(dense: torch.nn.Module, pruned: torch.nn.Module, sequences: list[torch.Tensor],
                     scored: list[torch.Tensor], batch_size: int = 8, log2: bool = False, chunk: int | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     dense_memo: dict | None = None) -> DivergenceResult:
    """Dense vs pruned next-token distributions at the scored positions of each sequence, batched with right padding
    in order of length (so a batch carries little padding; per_sample stays in the sequences' order). `dense_memo`: a
    dict kept with THIS dense model (and given to no other), in which its hidden states at the scored positions are
    kept by batch, so evaluating several pruned models on the same sequences runs the dense model once (the logits,
    recomputed by its head from the very same states, are the same)."""
    if len(sequences) != len(scored):
        raise ValueError(f"{len(sequences)} sequences but {len(scored)} scored masks")
    for index, (seq, mask) in enumerate(zip(sequences, scored)):
        if seq.dim() != 1 or mask.shape != seq.shape:
            raise ValueError(f"sequence {index}: need 1-D token ids and a scored mask of the same length, "
                             f"got {tuple(seq.shape)} and {tuple(mask.shape)}")
    sequences = [seq.long().cpu() for seq in sequences]
    positions = [mask.bool().cpu().nonzero().flatten() for mask in scored]
    with torch.no_grad():
        probe = next((seq[None] for seq in sequences if len(seq) > 0), None)
        head_only = probe is not None and all(
            chunked_head_matches(m, probe.to(next(m.parameters()).device)) for m in (dense, pruned))

    def rows_of(batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs, where = [sequences[i] for i in batch], [positions[i] for i in batch]
        return (_scored_rows(dense, seqs, where, head_only, dense_memo), _scored_rows(pruned, seqs, where, head_only))

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    return _batched(order, [int(where.numel()) for where in positions], rows_of, batch_size, log2, chunk, progress)


def answer_divergence(dense: torch.nn.Module, pruned: torch.nn.Module, prompts: list[list[int]],
                      answers: list[list[int]], pruned_states: list[torch.Tensor] | None = None, batch_size: int = 8,
                      log2: bool = False, chunk: int | None = None, progress: Callable[[int, int], None] | None = None,
                      dense_memo: dict | None = None) -> DivergenceResult:
    """Dense vs pruned next-token distributions along answers the pruned model wrote after its prompts, at every
    position that predicts an answer token (the prompt's last one, then each answer token but the last).
    `pruned_states`: the pruned model's output-head inputs there, as its generation left them
    (generate_answers(keep_states=True)): its logits are then its head on them, the very logits it picked its tokens
    from. The dense model reads each batch of prompts (but their last token) into a KV cache, which `dense_memo` (a
    dict kept with THIS dense model) keeps for the next call on the same prompts, then only the answers after it."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("an empty prompt predicts no first answer token: every prompt needs at least one token")
    if pruned_states is not None and [len(s) for s in pruned_states] != [len(a) for a in answers]:
        raise ValueError(f"the pruned states' counts {[len(s) for s in pruned_states]} are not the answers' lengths "
                         f"{[len(a) for a in answers]}")
    with torch.no_grad():
        dense_head, pruned_head = (bool(prompts) and chunked_head_matches(
            m, torch.tensor([prompts[0]], device=next(m.parameters()).device)) for m in (dense, pruned))
    states = pruned_states if pruned_head else None

    def rows_of(batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        prompt, answer = [prompts[i] for i in batch], [answers[i] for i in batch]
        dense_rows = _continuation_rows(dense, prompt, answer, dense_head, dense_memo)
        if states is None:
            return dense_rows, _continuation_rows(pruned, prompt, answer, pruned_head)
        head = pruned.get_output_embeddings()
        return dense_rows, head(torch.cat([states[i] for i in batch]))

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return _batched(order, [len(answer) for answer in answers], rows_of, batch_size, log2, chunk, progress)


def _batched(order: list[int], counts: list[int], rows_of: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
             batch_size: int, log2: bool, chunk: int | None,
             progress: Callable[[int, int], None] | None) -> DivergenceResult:
    """Divergences of the samples taken `batch_size` at a time in `order`; `rows_of(batch)` gives the dense and pruned
    logits of the batch's samples that have scored positions (`counts` of them each), concatenated in its order."""
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} is not allowed: use at least 1")
    total = len(order)
    per_sample: list[dict | None] = [None] * total
    if progress:
        progress(0, total)
    with torch.no_grad():
        for start in range(0, total, batch_size):
            batch = order[start:start + batch_size]
            kept = [i for i in batch if counts[i]]
            if kept:
                dense_rows, pruned_rows = rows_of(kept)
                div = divergence_from_logits(dense_rows, pruned_rows.to(dense_rows.device), log2=log2, chunk=chunk)
                del dense_rows, pruned_rows
                div = {name: value.cpu() for name, value in div.items()}
            else:
                div = divergence_from_logits(torch.zeros(0, 1), torch.zeros(0, 1))
            offset = 0
            for index in batch:
                piece = {name: value[offset:offset + counts[index]] for name, value in div.items()}
                per_sample[index] = _sample_record(TokenDivergence(piece["jsd"], piece["kl_dense_pruned"],
                                                                   piece["kl_pruned_dense"], piece["flip"]))
                offset += counts[index]
            if progress:
                progress(min(start + batch_size, total), total)
    used = [sample for sample in per_sample if not sample["skipped"]]

    def mean(name: str) -> float:
        return sum(sample[name] for sample in used) / len(used) if used else float("nan")

    return DivergenceResult(per_sample=per_sample, jsd=mean("jsd"), kl_dense_pruned=mean("kl_dense_pruned"),
                            kl_pruned_dense=mean("kl_pruned_dense"), flip_rate=mean("flip_rate"),
                            scored_tokens=sum(sample["scored_tokens"] for sample in used), log2=log2,
                            skipped=len(per_sample) - len(used), samples=len(per_sample))


def _continuation_rows(model: torch.nn.Module, prompts: list[list[int]], answers: list[list[int]], head_only: bool,
                       memo: dict | None = None) -> torch.Tensor:
    """The model's logits at the positions that predict each answer token after its prompt, concatenated: the
    prompts but their last token go into a KV cache (kept in `memo` for the next call on the same prompts), then
    each prompt's last token and its answer but the last token are read after it, right-padded. A model whose cache
    keeps more than plain growing layers (a sliding window) reads each prompt + answer whole instead."""
    device = next(model.parameters()).device
    context = _context_cache(model, [prompt[:-1] for prompt in prompts], device, memo)
    if context is None:
        sequences = [torch.tensor(prompt + answer) for prompt, answer in zip(prompts, answers)]
        where = [torch.arange(len(p) - 1, len(p) + len(a) - 1) for p, a in zip(prompts, answers)]
        return _scored_rows(model, sequences, where, head_only)
    kv, context_mask = context
    width = max(len(answer) for answer in answers)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        ids[row, :len(answer)] = torch.tensor(prompt[-1:] + answer[:-1])
        mask[row, :len(answer)] = 1
    position = torch.tensor([len(prompt) - 1 for prompt in prompts])[:, None] + torch.arange(width)
    kwargs = {"attention_mask": torch.cat([context_mask, mask], dim=1).to(device),
              "position_ids": position.to(device), "use_cache": True, cache_argument(model): kv}
    if head_only:
        hidden = head_inputs(model, ids.to(device), **kwargs)
        return model.get_output_embeddings()(torch.cat([hidden[row, :len(a)] for row, a in enumerate(answers)]))
    logits = model(input_ids=ids.to(device), **kwargs).logits
    return torch.cat([logits[row, :len(answer)] for row, answer in enumerate(answers)])


def _context_cache(model: torch.nn.Module, contexts: list[list[int]], device: torch.device,
                   memo: dict | None) -> tuple[object, torch.Tensor] | None:
    """A fresh DynamicCache holding the left-padded `contexts` and their attention mask, read from `memo` when these
    very contexts were read before (their keys and values copied, so the memo stays as it was) and kept there when
    the memo stays within MEMO_BYTES; None when the model's cache is not made of plain growing layers."""
    from transformers import DynamicCache

    ids, mask = left_padded(contexts, 0)
    kv = DynamicCache(config=model.config)
    if not plain_cache(kv):
        return None
    if ids.shape[1] == 0:
        return kv, mask
    key = "context:" + hashlib.sha256(f"{tuple(ids.shape)}".encode() + ids.numpy().tobytes()
                                      + mask.numpy().tobytes()).hexdigest()
    if memo is not None and key in memo:
        for index, (keys, values) in enumerate(memo[key]):
            kv.update(keys, values, index)
        return kv, mask
    head_inputs(model, ids.to(device), attention_mask=mask.to(device),
                position_ids=(mask.cumsum(-1) - 1).clamp_min(0).to(device), use_cache=True,
                **{cache_argument(model): kv})
    if not kv.layers or not plain_cache(kv):
        return None
    kept = tuple((layer.keys, layer.values) for layer in kv.layers)
    if memo is not None and memo_bytes(memo) + memo_bytes({key: kept}) <= MEMO_BYTES:
        memo[key] = kept
    return kv, mask


def memo_bytes(memo: dict) -> int:
    """The bytes of the tensors a dense model's memo holds (kept states, kept prompt caches)."""
    def size(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        return sum(size(v) for v in value) if isinstance(value, (tuple, list)) else 0
    return sum(size(value) for value in memo.values())


def teacher_forced(records: list[dict], tokenizer, render_prompt: Callable[[dict], str], response_only: bool = True,
                   max_tokens: int = 1024) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prompt + reference answer (+ EOS) token ids and the positions scored: those predicting an answer token."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens {max_tokens} is not allowed: use at least 2")
    eos = tokenizer.eos_token_id
    sequences: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    for record in records:
        prompt = tokenizer(render_prompt(record), add_special_tokens=False).input_ids
        answer = tokenizer(record["output"], add_special_tokens=False).input_ids
        ids = (prompt + answer + ([eos] if eos is not None else []))[:max_tokens]
        mask = torch.zeros(len(ids), dtype=torch.bool)
        first = max(len(prompt) - 1, 0) if response_only else 0
        if len(ids) >= 2:
            mask[first:len(ids) - 1] = True
        sequences.append(torch.tensor(ids, dtype=torch.long))
        masks.append(mask)
    return sequences, masks
