"""Checks of a run that need the model's config, its tokenizer or the data, made when it is submitted: a run that
would fail on them is refused with what to change instead of failing in the worker minutes later. Each check asks
exactly what the worker's code needs (the calibration recipes, the perplexity windows, the records of divergence
and tasks), so a run that passes is never refused by them. Torch and transformers are imported only when a check
runs, so a finished run is still served without them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TypeVar

from backend.runs.identity import IdentityError, model_fingerprint
from backend.runs.spec import EvalSettings, RunSpec, SpecError
from backend.sources.datasets import (
    HUB_IDS,
    LOCAL_FILES,
    hub_reachable,
    offline_sources,
    source_file,
)
from compression.targets import Targets

# the perplexity stream is counted on a growing prefix of its texts: a prefix this many tokens past what is needed
# has enough whatever its last, cut word becomes in the whole stream
PREFIX_MARGIN = 16
FIRST_BATCH, BATCH = 8, 256

T = TypeVar("T")


@dataclass
class ModelFacts:
    """What the checks read of a model, each only when a check needs it: its context (config) and its tokenizer."""

    name: str
    trust_remote_code: bool = False

    @cached_property
    def context(self) -> int | None:
        from backend.sources.models import context_length
        return guarded("model", lambda: context_length(self.name, self.trust_remote_code))

    @cached_property
    def layers(self) -> int | None:
        from backend.sources.models import layer_count
        return guarded("model", lambda: layer_count(self.name, self.trust_remote_code))

    @cached_property
    def tokenizer(self):
        from backend.sources.models import load_tokenizer
        return guarded("model", lambda: load_tokenizer(self.name, self.trust_remote_code))


def model_facts(model: str, trust_remote_code: bool = False) -> ModelFacts:
    """The model's facts, shared by the checks of one process while its files stay the same (a sweep reads the
    tokenizer once)."""
    try:
        stamp = model_fingerprint(model)
    except IdentityError:
        return ModelFacts(model, trust_remote_code)
    return _cached_facts(model, trust_remote_code, stamp)


@lru_cache(maxsize=8)
def _cached_facts(model: str, trust_remote_code: bool, _stamp: str) -> ModelFacts:
    return ModelFacts(model, trust_remote_code)


def guarded(label: str, load: Callable[[], T]) -> T:
    """`load()`, its ValueError (a data or model error) turned into a SpecError that names what it was for."""
    try:
        return load()
    except ValueError as err:
        raise SpecError(f"{label}: {err}") from None


def hub_only(source: str, data_dir: str | None) -> bool:
    """A named source with no local file while the hub answers: the worker downloads it, so nothing is read here."""
    return source in HUB_IDS and source_file(source, data_dir) is None and hub_reachable()


def check_spec(spec: RunSpec, data_dir: str | None = None) -> None:
    """Everything about a normalised spec that the model's config, its tokenizer and the data can tell before the
    run is queued; SpecError names the bad value, the limit and what to change."""
    check_specs([spec], data_dir)


def check_specs(specs: Sequence[RunSpec], data_dir: str | None = None) -> None:
    """check_spec for each spec, every calibration and evaluation setting checked once (the runs of a sweep share
    most of them)."""
    seen: set[tuple] = set()
    for spec in specs:
        check_targets(spec.model, spec.targets)
        calibration = (spec.model, spec.calibration, spec.nsamples, spec.seqlen, spec.template,
                       spec.held_out_records())
        if calibration not in seen:
            seen.add(calibration)
            check_calibration(*calibration, data_dir=data_dir)
        if (spec.model, spec.evaluation) not in seen:
            seen.add((spec.model, spec.evaluation))
            check_evaluation(spec.model, spec.evaluation, data_dir)


def check_targets(model: str, targets: Targets, trust_remote_code: bool = False) -> None:
    """One sparsity per decoder layer needs as many values as the model's config declares layers."""
    if not targets.layers:
        return
    count = model_facts(model, trust_remote_code).layers
    if count is not None and count != len(targets.layers):
        raise SpecError(f"--layer-sparsity gives {len(targets.layers)} sparsities but {model} has {count} decoder "
                        f"layers: give one per layer, or a JSON file of name patterns")


def check_calibration(model: str, calibration: str, nsamples: int, seqlen: int, template: str = "alpaca",
                      held_out: int = 0, data_dir: str | None = None, trust_remote_code: bool = False) -> None:
    """What building the calibration windows needs (backend/sources/calibration.py): nsamples x seqlen within the
    model's context, a source that exists and loads offline, and enough tokens for the recipe its kind picks (for
    records, without the first `held_out`, which the evaluation reads)."""
    from backend.sources.calibration import open_source
    from compression.calibration import CalibrationError, check_shape, windows_from_file
    from metrics.prompts import full_text_renderer

    facts = model_facts(model, trust_remote_code)
    try:
        check_shape(nsamples, seqlen, facts.context)
    except CalibrationError as err:
        raise SpecError(f"calibration {err}") from None
    if hub_only(calibration, data_dir):
        return
    source = guarded("calibration", lambda: open_source(calibration, data_dir))
    if isinstance(source, str):
        return
    if isinstance(source, Path):
        guarded("calibration", lambda: windows_from_file(source, nsamples, seqlen))
        return
    tokenizer = facts.tokenizer
    if source.kind == "records":
        need = nsamples * seqlen
        kept = source.items[held_out:]
        have = record_tokens(kept, tokenizer, full_text_renderer(template, tokenizer), need)
        if have < need:
            fixes = ([f"nsamples to at most {have // seqlen}"] if have // seqlen >= 1 else []) + \
                    ([f"seqlen to at most {have // nsamples}"] if have // nsamples >= 2 else [])
            held = f" ({held_out} more held out: the evaluation reads them)" if held_out else ""
            raise SpecError(f"calibration {calibration!r}: its {len(kept)} records{held} give {have} tokens but "
                            f"nsamples x seqlen = {nsamples} x {seqlen} = {need} are needed: "
                            + (f"lower {' or '.join(fixes)}, or use more text" if fixes else "use more text"))
        return
    longest = longest_document(source.items, tokenizer, seqlen)
    if longest is not None:
        fix = f"use a seqlen of at most {longest - 1} or more text" if longest - 1 >= 2 else "use more text"
        raise SpecError(f"calibration {calibration!r}: none of its {len(source.items)} documents has more than seqlen "
                        f"{seqlen} tokens (the longest has {longest}): {fix}")


def check_evaluation(model: str, settings: EvalSettings, data_dir: str | None = None,
                     trust_remote_code: bool = False) -> None:
    """What the evaluation needs: a perplexity text with one window of ppl-seqlen tokens within the model's context,
    and instruction records for divergence and tasks, each loadable offline."""
    if settings.ppl:
        check_perplexity(model, settings.ppl, settings.ppl_seqlen, data_dir, trust_remote_code)
    for label, source, count in (("jsd", settings.jsd, settings.jsd_records), ("tasks", settings.tasks, settings.limit)):
        if source:
            check_records(label, source, count, data_dir)
    if settings.lm_eval:
        check_harness(settings)


def check_harness(settings: EvalSettings) -> None:
    """lm-eval's tasks: the include folder readable (every YAML parses, its local data files exist) and every task
    defined there or built into lm-eval, with the hub answering for the built-in ones (their data is there)."""
    from backend.sources.lm_tasks import include_problem, task_problem

    try:
        problem = (include_problem(settings.lm_eval_include)
                   or task_problem(settings.lm_eval, settings.lm_eval_include, hub_reachable()))
    except ImportError as err:
        raise SpecError(f"--lm-eval needs lm-eval ({err}): pip install -r requirements.txt") from None
    if problem:
        raise SpecError(problem)


def check_perplexity(model: str, source: str, seqlen: int, data_dir: str | None = None,
                     trust_remote_code: bool = False, label: str = "ppl", name: str = "ppl-seqlen") -> None:
    """What metrics/perplexity.py needs: 2 <= seqlen <= the model's context, and at least one window of seqlen
    tokens in the source's token stream (its texts, or its records rendered as the worker renders them). `label`
    and `name` are what the caller calls the source and the length (the ppl command: data, seqlen)."""
    from backend.runs.evaluate import perplexity_texts
    from compression.calibration import CalibrationError, check_shape

    facts = model_facts(model, trust_remote_code)
    try:
        check_shape(1, seqlen, facts.context)
    except CalibrationError as err:
        raise SpecError(str(err).replace("seqlen", name, 1)) from None
    if hub_only(source, data_dir):
        return
    _, texts = guarded(label, lambda: perplexity_texts(source, data_dir))
    have = stream_tokens(texts, facts.tokenizer, seqlen)
    if have < seqlen:
        fix = f"use a {name} of at most {have}, or a longer text" if have >= 2 else "use a longer text"
        raise SpecError(f"{label} {source!r} gives {have} tokens with this model's tokenizer, fewer than one window "
                        f"of {name} {seqlen}: {fix}")


def check_records(label: str, source: str, limit: int, data_dir: str | None = None) -> None:
    """Divergence and tasks read instruction records: a source of plain texts, or one that cannot load, is refused."""
    from backend.runs.evaluate import records_of

    if not hub_only(source, data_dir):
        guarded(label, lambda: records_of(source, data_dir, limit))


def data_dir_sources(folder: str) -> list[str]:
    """The named sources a data folder holds; SpecError naming the folder and the files looked for when it does not
    exist or holds none of them."""
    path = Path(folder).expanduser()
    wanted = ", ".join(LOCAL_FILES.values())
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "does not exist"
        raise SpecError(f"data folder {folder} {state}: give a folder holding any of {wanted}")
    found = [name for name in offline_sources(path) if name in LOCAL_FILES]
    if not found:
        raise SpecError(f"data folder {folder} holds none of the expected files {wanted}: give a folder laid out "
                        f"like ../shared/data")
    return found


def chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """A few items first, then batches: a check that passes early tokenizes little, one that fails tokenizes all."""
    if items:
        yield items[:FIRST_BATCH]
    for start in range(FIRST_BATCH, len(items), BATCH):
        yield items[start:start + BATCH]


def stream_tokens(texts: Sequence[str], tokenizer, need: int) -> int:
    """Tokens in the perplexity stream of the texts (metrics.perplexity.token_stream), counted on a doubling prefix
    of them until there are `need` (plus PREFIX_MARGIN); exact when fewer."""
    from metrics.perplexity import token_stream

    count = 1
    while True:
        have = token_stream(texts[:count], tokenizer).numel()
        if count >= len(texts) or have >= need + PREFIX_MARGIN:
            return have
        count *= 2


def record_tokens(records: Sequence[dict], tokenizer, render: Callable[[dict], str], need: int) -> int:
    """Tokens the records give compression.calibration.windows_from_records (each rendered, no special tokens,
    then EOS), counted until there are `need`."""
    eos = 1 if tokenizer.eos_token_id is not None else 0
    have = 0
    for batch in chunks(records):
        have += sum(len(ids) + eos for ids in tokenizer([render(r) for r in batch], add_special_tokens=False).input_ids)
        if have >= need:
            break
    return have


def longest_document(texts: Sequence[str], tokenizer, seqlen: int) -> int | None:
    """None when a document has more than seqlen tokens, as compression.calibration.windows_from_documents needs
    (special tokens counted, as it counts them), else the longest document's tokens; the longest texts go first."""
    longest = 0
    for batch in chunks(sorted(texts, key=len, reverse=True)):
        counts = [len(ids) for ids in tokenizer(list(batch)).input_ids]
        if counts and max(counts) > seqlen:
            return None
        longest = max([longest, *counts])
    return longest
