"""Cheap, torch-free fingerprints of a model's files and of a data source's contents, so a run id changes when
the weights or the data change and stays the same otherwise."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from backend.sources.datasets import HUB_IDS, is_generated, source_file
from backend.sources.names import EMBEDDED_PACKAGES

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def model_fingerprint(model: str) -> str:
    """Embedded: its package version. Folder: config.json's bytes and each weight file's name, size and mtime.
    Hub id: the cached snapshot's commit when there is one, else the id itself."""
    if model in EMBEDDED_PACKAGES:
        package = EMBEDDED_PACKAGES[model]
        try:
            return f"embedded:{package}=={metadata.version(package)}"
        except metadata.PackageNotFoundError:
            return f"embedded:{package} (not installed)"
    path = Path(model).expanduser()
    if path.is_dir():
        digest = hashlib.sha256()
        config = path / "config.json"
        if config.is_file():
            digest.update(config.read_bytes())
        for weight in sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES):
            stat = weight.stat()
            digest.update(f"{weight.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return f"folder:{digest.hexdigest()[:16]}"
    return f"hub:{model}@{hub_commit(model) or 'unknown'}"


def hub_commit(model_id: str) -> str | None:
    """The commit the local Hugging Face cache holds for a hub id (refs/main), read without importing the hub."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    cache = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    ref = cache / f"models--{model_id.replace('/', '--')}" / "refs" / "main"
    return ref.read_text().strip() if ref.is_file() else None


def data_fingerprint(source: str, data_dir: str | None = None) -> str:
    """'self': generated. A named source read from a local file, or any file: the file's sha256.
    A named source only on the hub: its dataset id."""
    if is_generated(source):
        return "generated"
    path = source_file(source, data_dir)
    if path is not None:
        stat = path.stat()
        return f"sha256:{file_sha256(str(path), stat.st_size, stat.st_mtime_ns)[:16]}"
    if source in HUB_IDS:
        return f"hub:{HUB_IDS[source]}"
    return f"missing:{source}"


def sha256(path: str | Path) -> str:
    """sha256 of a file's contents, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=64)
def file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, remembered per (path, size, mtime) within a process."""
    return sha256(path)
