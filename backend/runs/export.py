"""Write a pruned model as a Hugging Face folder (safetensors) with a JSON sidecar describing how it was made."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

SIDECAR = "prunescope.json"


def save_pruned(model, tokenizer, folder: str | os.PathLike, sidecar: dict) -> Path:
    """Save into a temporary sibling folder, then rename, so a crash never leaves a half-written model."""
    target = Path(folder).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"--save {str(folder)!r} is a file: give a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1, default=str))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def read_sidecar(folder: str | os.PathLike) -> dict | None:
    """The sidecar of a pruned folder, or None for a model PruneScope did not write."""
    path = Path(folder) / SIDECAR
    return json.loads(path.read_text()) if path.is_file() else None
