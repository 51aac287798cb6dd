"""Cheap, torch-free fingerprints of a model's files and of a data source's contents, so a run id changes when
the weights or the data change and stays the same otherwise."""

from __future__ import annotations

import hashlib
import os
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from backend.sources.datasets import HUB_IDS, is_generated, source_file
from backend.sources.names import EMBEDDED_PACKAGES

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
# files that change answers without changing weights: read in full (they are small)
BEHAVIOUR_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")
PROJECT = Path(__file__).resolve().parents[2]


class IdentityError(ValueError):
    """A run whose identity cannot be pinned down (a hub model with no known commit); one line for the user."""


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
        for name in BEHAVIOUR_FILES:
            if (path / name).is_file():
                digest.update(name.encode() + b"\0" + (path / name).read_bytes())
        for weight in sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES):
            stat = weight.stat()
            digest.update(f"{weight.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return f"folder:{digest.hexdigest()[:16]}"
    commit = hub_commit(model) or remote_commit(model)
    if commit is None:
        raise IdentityError(f"model {model!r} is not in the local Hugging Face cache and its commit cannot be read "
                            f"from the hub (offline?): download it once, or give a local folder")
    return f"hub:{model}@{commit}"


def remote_commit(model_id: str) -> str | None:
    """The hub's current commit of a model, when the hub answers; None offline."""
    from backend.sources.hub import hub_reachable
    if not hub_reachable():
        return None
    try:
        from huggingface_hub import model_info
        return model_info(model_id, timeout=10).sha
    except Exception:  # noqa: BLE001  (any hub failure means: not known)
        return None


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


@lru_cache(maxsize=1)
def code_version() -> str:
    """PruneScope's version, plus the git commit (and a digest of uncommitted changes) when run from a checkout."""
    from backend import __version__
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", "*.py"], cwd=PROJECT, capture_output=True,
                              timeout=10).stdout if commit else b""
    except (OSError, subprocess.SubprocessError):
        commit, diff = "", b""
    if not commit:
        return __version__
    return f"{__version__}+{commit[:12]}" + (f".dirty-{hashlib.sha256(diff).hexdigest()[:8]}" if diff else "")


def library_versions() -> dict[str, str]:
    """The versions of the libraries whose numerics the results depend on."""
    out = {}
    for name in ("torch", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_type(device: str = "auto") -> str:
    """The kind of device a worker started with `device` computes on, found without importing torch (the worker
    checks it again with torch before it runs the job)."""
    if device not in ("", "auto"):
        return device.split(":")[0]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return "cpu"
    return "cuda" if Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists() else "cpu"


def resolved_dtype(dtype: str, device: str) -> str:
    """What `auto` becomes: fp32 on a CPU, bf16 on CUDA (the worker refuses a GPU that has no bf16)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


def provenance(device: str = "auto", dtype: str = "auto") -> dict:
    """Everything beyond the spec and the files that decides a result: where and in what precision it is computed,
    and by which code."""
    kind = device_type(device)
    return {"device_type": kind, "dtype": resolved_dtype(dtype, kind), "code": code_version(), **library_versions()}
