"""Where lm-eval tasks come from: PruneScope's own task folder (always searched, so its tasks run offline), a user's
folder of task YAMLs, and lm-eval's built-in tasks (whose data is on the Hugging Face hub). Also what a run's
lm-eval results depend on beyond their names: the task files' contents and lm-eval's version."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from backend.sources.names import cache_dir

SHIPPED = Path(__file__).resolve().parent / "demo" / "lm_eval"
SHIPPED_TASK = "prunescope_facts"


def include_roots(include: str | None) -> list[Path]:
    """The folders lm-eval searches for task YAMLs: PruneScope's own, then the user's (later ones win a clash)."""
    return [SHIPPED, *([Path(include).expanduser().resolve()] if include else [])]


def include_problem(include: str | None) -> str | None:
    """Why a --lm-eval-include folder cannot be used (missing, not a folder, a malformed YAML, a data file that is
    not there); None when it can."""
    from metrics.harness import yaml_problem

    if include:
        path = Path(include).expanduser()
        if not path.is_dir():
            state = "is not a folder" if path.exists() else "does not exist"
            return f"--lm-eval-include {include} {state}: give a folder of lm-eval task YAMLs"
    for root in include_roots(include):
        problem = yaml_problem(root)
        if problem:
            return problem
    return None


def builtin_tasks() -> set[str]:
    """lm-eval's own task, group and tag names, indexed once per lm-eval version into the PruneScope cache (indexing
    its ~15k YAMLs takes about 12 s)."""
    from metrics.harness import lm_eval_version, task_index

    path = cache_dir() / "lm-eval" / f"tasks-{lm_eval_version()}.json"
    try:
        return set(json.loads(path.read_text()))
    except (OSError, ValueError):
        pass
    names = sorted(task_index([], defaults=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{id(names)}")
    tmp.write_text(json.dumps(names))
    tmp.replace(path)
    return set(names)


def local_tasks(include: str | None) -> dict[str, Path | None]:
    """The task names the include folders define, with their YAMLs."""
    from metrics.harness import task_index

    return task_index(include_roots(include), defaults=False)


def task_problem(names: Sequence[str], include: str | None, hub_answers: bool) -> str | None:
    """The first task that cannot run: not defined anywhere (with close names), or built into lm-eval while the hub,
    where its data is, does not answer. None when all can."""
    import difflib

    local = local_tasks(include)
    missing = [n for n in names if n not in local]
    if not missing:
        return None
    builtin = builtin_tasks()
    for name in missing:
        if name not in builtin:
            close = difflib.get_close_matches(name, [*local, *builtin], n=3, cutoff=0.75)
            where = f"{include} nor " if include else ""
            return (f"lm-eval task {name!r} is not defined in {where}PruneScope's tasks ({', '.join(sorted(local))}) "
                    f"nor among lm-eval's built-in tasks"
                    + (f": did you mean {', '.join(close)}?" if close else ": `lm_eval ls tasks` lists them"))
        if not hub_answers:
            return (f"lm-eval task {name!r} reads its data from the Hugging Face hub, which does not answer: run it "
                    f"where the hub is reachable, or use --lm-eval-include with a folder of local task YAMLs "
                    f"(dataset_path: json, dataset_kwargs.data_files)")
    return None


def fingerprint(include: str | None) -> str:
    """sha256 over every file of the include folders (task YAMLs, their data, their Python helpers) and every local
    data file a YAML names outside them, so a changed question is a new run, not a cached one."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from metrics.harness import local_data_files

    digest = hashlib.sha256()
    outside: set[Path] = set()
    for root in include_roots(include):
        for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            digest.update(f"{path.relative_to(root)}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
            if path.suffix == ".yaml":
                try:
                    config = load_yaml(path, resolve_func=False)
                except Exception:  # noqa: BLE001  (a malformed YAML is refused by include_problem, not here)
                    continue
                outside |= {(root / f).expanduser().resolve() for f in local_data_files(config)
                            if not (root / f).expanduser().resolve().is_relative_to(root)}
    for path in sorted(outside):
        digest.update(f"{path}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b"missing")
    return f"sha256:{digest.hexdigest()[:16]}"
