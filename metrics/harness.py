"""EleutherAI's lm-evaluation-harness on a model already in memory: its tasks scored by its own code (no re-save, no
re-load), its requests counted as progress, and each score kept with lm-eval's stderr and, where the score is a mean
over documents, the per-document values behind it. lm-eval is imported only when a task runs (it takes seconds)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

# (requests done, requests in this phase)
Progress = Callable[[int, int], None]
MEAN_TOLERANCE = 1e-9


class HarnessError(ValueError):
    """A task that cannot be found, read or loaded; one line naming it and what to do."""


def lm_eval_version() -> str:
    """The installed lm-eval's version, read without importing it."""
    try:
        return metadata.version("lm-eval")
    except metadata.PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class HarnessResult:
    """One model's lm-eval results: per task, each metric's value and lm-eval's stderr ('acc', 'acc_stderr'; a
    filter other than 'none' is named as 'metric (filter)'), the task's version, examples used and of the whole set,
    shots, which metrics are better higher, and per-document values where their mean is the task's score."""

    scores: dict[str, dict[str, float | None]]
    versions: dict[str, str]
    examples: dict[str, int]
    original: dict[str, int]
    fewshot: dict[str, int]
    higher_is_better: dict[str, dict[str, bool]]
    documents: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    groups: tuple[str, ...] = ()
    version: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"scores": self.scores, "versions": self.versions, "examples": self.examples,
                "original": self.original, "fewshot": self.fewshot, "higher_is_better": self.higher_is_better,
                "documents": self.documents, "groups": list(self.groups), "version": self.version,
                "seconds": self.seconds}


def metric_name(key: str) -> str:
    """lm-eval's 'acc,none' as 'acc', 'exact_match,strict-match' as 'exact_match (strict-match)'."""
    metric, _, kind = key.partition(",")
    return metric if kind in ("", "none") else f"{metric} ({kind})"


def yaml_files(root: Path) -> list[Path]:
    """The task YAMLs lm-eval indexes under a folder (it reads '*.yaml' only, at any depth)."""
    return sorted(p for p in root.glob("**/*.yaml") if "__pycache__" not in p.parts)


def yaml_problem(root: Path) -> str | None:
    """The first task YAML under `root` that lm-eval cannot read (lm-eval skips it silently, so its task would only
    be 'not found'), or a local data file one names that does not exist; None when all are fine."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for path in yaml_files(root):
        try:
            config = load_yaml(path, resolve_func=False)
        except Exception as err:  # noqa: BLE001  (yaml, include and value errors alike are the file's problem)
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark is not None else ""
            reason = getattr(err, "problem", None) or str(err).splitlines()[0]
            return f"lm-eval task file {path}{where}: {reason}"
        for data_file in local_data_files(config):
            if not (root / data_file).expanduser().is_file():
                return (f"lm-eval task file {path} reads {data_file}, which does not exist (a relative path is read "
                        f"from {root})")
    return None


def local_data_files(config: dict) -> list[str]:
    """The local files a task config reads through `dataset_kwargs: {data_files: ...}`."""
    files = ((config.get("dataset_kwargs") or {}) if isinstance(config, dict) else {}).get("data_files")
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        files = [f for value in files.values() for f in ([value] if isinstance(value, str) else value or [])]
    return [f for f in files or [] if isinstance(f, str) and "://" not in f]


def task_index(roots: Sequence[Path], defaults: bool) -> dict[str, Path | None]:
    """Every task, group and tag name lm-eval finds in `roots` (and in its own tasks when `defaults`), with the YAML
    that defines it (None for tags)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(r) for r in roots] or None, include_defaults=defaults)
    return {name: entry.yaml_path for name, entry in manager.task_index.items()}


def _root_of(path: Path | None, roots: Sequence[Path]) -> Path | None:
    """The include folder a task's YAML lies in, so its relative data files are read from there."""
    for root in roots:
        if path is not None and Path(path).resolve().is_relative_to(root):
            return root
    return None


def load_tasks(names: Sequence[str], roots: Sequence[Path]) -> tuple[object, list]:
    """lm-eval's TaskManager and the Task/Group objects for `names`, each built (its data read) from the folder
    holding its YAML. Only the local folders are indexed when they define every name (seconds faster than lm-eval's
    ~15k tasks); a task that cannot be found or whose data cannot be reached is a HarnessError naming it."""
    from lm_eval.tasks import TaskManager

    roots = [Path(r).expanduser().resolve() for r in roots]
    manager = TaskManager(include_path=[str(r) for r in roots] or None, include_defaults=False)
    if not set(names) <= set(manager.task_index):
        manager = TaskManager(include_path=[str(r) for r in roots] or None)
    built = []
    for name in names:
        entry = manager.task_index.get(name)
        if entry is None:
            raise HarnessError(f"lm-eval task {name!r} is not known to lm-eval {lm_eval_version()} nor defined in "
                               f"{', '.join(map(str, roots)) or 'any include folder'}")
        root = _root_of(entry.yaml_path, roots)
        try:
            with contextlib.chdir(root) if root else contextlib.nullcontext():
                loaded = manager.load([name])
        except ConnectionError as err:
            raise HarnessError(f"lm-eval task {name!r} could not reach its data ({str(err).splitlines()[0]}): the "
                               f"Hugging Face hub is unreachable; use --lm-eval-include with a folder of local task "
                               f"YAMLs (dataset_path: json, dataset_kwargs.data_files)") from None
        built.extend([*loaded["groups"].values()] if name in loaded["groups"] else loaded["tasks"].values())
    return manager, built


@contextlib.contextmanager
def counted_requests(progress: Progress):
    """Reports lm-eval's own request count as (done, total) of the current phase (loglikelihood, generation): HFLM
    ticks a progress bar per request, including those it answers from a shared context, which the batches it runs
    do not show. The bar's class is swapped for a counting subclass for the duration, then put back."""
    from lm_eval.models import huggingface
    from tqdm import tqdm

    class Counted(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            progress(0, int(self.total or 0))

        def update(self, n: int = 1) -> None:
            super().update(n)
            progress(int(self.n), int(self.total or 0))

    original = huggingface.tqdm
    huggingface.tqdm = Counted
    try:
        yield
    finally:
        huggingface.tqdm = original


def run_tasks(model, tokenizer, names: Sequence[str], roots: Sequence[Path] = (), limit: int | None = None,
              fewshot: int | None = None, batch_size: int = 16,
              progress: Progress = lambda _done, _total: None) -> HarnessResult:
    """lm_eval.simple_evaluate on the model in memory, with lm-eval's defaults (seeds, stderr bootstrap) so the
    numbers equal its CLI's on the same model saved to a folder."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    started = time.perf_counter()
    manager, tasks = load_tasks(names, roots)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with counted_requests(progress):
        found = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=fewshot, limit=limit,
                                        task_manager=manager, log_samples=True)
    return result_of(found, time.perf_counter() - started)


def result_of(found: dict, seconds: float) -> HarnessResult:
    """The parts of simple_evaluate's output PruneScope keeps."""
    groups = tuple(found.get("groups") or ())
    scores: dict[str, dict[str, float | None]] = {}
    for task, values in found["results"].items():
        kept = {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            value = float(value)
            kept[metric_name(key)] = value if math.isfinite(value) else None
        scores[task] = kept
    documents: dict[str, dict[str, list[float]]] = {}
    for task, samples in (found.get("samples") or {}).items():
        ordered = sorted((s for s in samples if s.get("filter", "none") == "none"), key=lambda s: s["doc_id"])
        per_metric = {}
        for metric in (m for m in scores.get(task, {}) if not m.endswith("_stderr") and " (" not in m):
            values = [s.get(metric) for s in ordered]
            if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                mean = sum(values) / len(values)
                if scores[task][metric] is not None and abs(mean - scores[task][metric]) <= MEAN_TOLERANCE:
                    per_metric[metric] = [float(v) for v in values]
        if per_metric:
            documents[task] = per_metric
    samples = found.get("n-samples") or {}
    return HarnessResult(
        scores=scores, versions={t: str(v) for t, v in (found.get("versions") or {}).items()},
        examples={t: int(n.get("effective", 0)) for t, n in samples.items()},
        original={t: int(n.get("original", 0)) for t, n in samples.items()},
        fewshot={t: int(n) for t, n in (found.get("n-shot") or {}).items() if isinstance(n, (int, float))},
        higher_is_better={t: {metric_name(m): bool(b) for m, b in v.items()}
                          for t, v in (found.get("higher_is_better") or {}).items()},
        documents=documents, groups=groups, version=lm_eval_version(), seconds=seconds)
