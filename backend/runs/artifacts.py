"""Checksums of artifact folders: a quick check (sizes and times) for every lookup, a full sha256 check before
an artifact is handed out, so a missing or damaged file is found and the artifact rebuilt. An artifact at an fsspec
URL is checked the same way (sizes for the quick check, its files' sha256 read back for the full one)."""

from __future__ import annotations

from pathlib import Path

from backend.runs.identity import sha256
from backend.runs.locations import is_url, remote_sha256, remote_sizes
from backend.runs.store import Store

MODEL_ARTIFACT = "model"


def describe(folder: Path) -> dict[str, dict]:
    """Every file in the folder with its size, modification time and sha256."""
    return {p.name: {"bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns, "sha256": sha256(p)}
            for p in sorted(folder.iterdir()) if p.is_file()}


def problems(folder: Path | str, files: dict[str, dict], full: bool = False) -> list[str]:
    """What is wrong with an artifact folder: missing files, other sizes, and (full, or a file touched since it
    was written) other contents. Empty when intact."""
    if is_url(folder):
        return remote_problems(str(folder), files, full)
    found = []
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            found.append(f"{name} is missing")
            continue
        stat = path.stat()
        if stat.st_size != expected["bytes"]:
            found.append(f"{name} has {stat.st_size} bytes, expected {expected['bytes']}")
        elif (full or stat.st_mtime_ns != expected["mtime_ns"]) and sha256(path) != expected["sha256"]:
            found.append(f"{name} does not match its checksum")
    return found


def remote_problems(url: str, files: dict[str, dict], full: bool) -> list[str]:
    """problems() of an artifact at an fsspec URL."""
    sizes = remote_sizes(url)
    if sizes is None:
        return [f"{url} is missing"]
    found = []
    for name, expected in files.items():
        if name not in sizes:
            found.append(f"{name} is missing")
        elif sizes[name] != expected["bytes"]:
            found.append(f"{name} has {sizes[name]} bytes, expected {expected['bytes']}")
        elif full and remote_sha256(url, name) != expected["sha256"]:
            found.append(f"{name} does not match its checksum")
    return found


def intact(store: Store, run_id: str, name: str = MODEL_ARTIFACT, full: bool = False) -> bool | None:
    """Whether a run's artifact is on disk as written (None: never written)."""
    artifact = store.artifact(run_id, name)
    if artifact is None:
        return None
    return not problems(artifact["path"], artifact["files"], full=full)
