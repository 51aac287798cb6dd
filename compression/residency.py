"""Where a decoder layer's weights live while the engine works on it, and on which device it is computed.

Three cases, one interface (`enter` a layer: its weights are real tensors on the returned device; `leave` it: they
go back where they live, pruned):
- resident: the whole model is on the compute device;
- offload: the model stays on the CPU and each decoder layer visits the accelerator while it is processed;
- dispatched: accelerate placed the model (`device_map="auto"`: layers on several GPUs, on the CPU or on disk). Each
  layer is computed on the device accelerate gave it; offloaded weights are loaded from accelerate's store on entry
  and the pruned ones written back to it on exit (a CPU copy, or a file in accelerate's offload folder: the model's
  own checkpoint files are never written), so the model's own forward, and `save_pretrained`, see the pruned weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def move(value, device: torch.device):
    """Tensors inside nested tuples, lists and dicts moved to `device` (other values as they are)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    return value


class Resident:
    """The whole model is on the compute device: nothing moves."""

    mode = "resident"

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        home = next(model.parameters()).device
        if home != device:
            raise ValueError(f"model is on {home} but pruning was asked on {device}: move it or use offload")
        self.device = device

    def enter(self, layer: nn.Module) -> torch.device:
        return self.device

    def leave(self, layer: nn.Module) -> None:
        pass

    def input_device(self, model: nn.Module) -> torch.device:
        """Where the model's input ids go."""
        return self.device

    @contextmanager
    def active(self) -> Iterator[None]:
        """What the whole pruning needs for its duration (nothing here)."""
        yield

    @contextmanager
    def around_model(self, layers: nn.ModuleList) -> Iterator[None]:
        """What a whole-model forward needs for its duration (nothing here)."""
        yield

    def tensors(self, model: nn.Module) -> Iterator[torch.Tensor]:
        """Every parameter as a real tensor, one module's at a time."""
        yield from (p.data for p in model.parameters())


class Offloaded(Resident):
    """The model lives on the CPU; everything but the decoder layers visits `device` for the duration of the
    pruning (embeddings, rotary tables, final norm), and each decoder layer while it is processed."""

    mode = "offload"

    def __init__(self, model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
        self.device, self.home = device, next(model.parameters()).device
        keep = {id(p) for p in layers.parameters()} | {id(b) for b in layers.buffers()}
        self.moved = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in keep]

    @contextmanager
    def active(self) -> Iterator[None]:
        for t in self.moved:
            t.data = t.data.to(self.device)
        try:
            yield
        finally:
            for t in self.moved:
                t.data = t.data.to(self.home)

    def enter(self, layer: nn.Module) -> torch.device:
        layer.to(self.device)
        return self.device

    def leave(self, layer: nn.Module) -> None:
        layer.to(self.home)

    @contextmanager
    def around_model(self, layers: nn.ModuleList) -> Iterator[None]:
        def onload(layer, _args):
            self.enter(layer)

        def offload(layer, _args, _out):
            self.leave(layer)

        handles = [h for layer in layers for h in (layer.register_forward_pre_hook(onload),
                                                   layer.register_forward_hook(offload))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class Dispatched(Resident):
    """A model placed by accelerate: each decoder layer is computed on its hook's execution device; weights that
    accelerate keeps offloaded are materialized there while the layer is processed (its hooks told not to swap
    them) and written back, pruned, to accelerate's store when it leaves."""

    mode = "dispatched"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.entered: dict[int, list[nn.Module]] = {}

    @staticmethod
    def offloading(layer: nn.Module) -> list[nn.Module]:
        return [m for m in layer.modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]

    @staticmethod
    def execution_device(layer: nn.Module) -> torch.device:
        for m in layer.modules():
            device = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
            if device is not None:
                return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
        return next(layer.parameters()).device

    def enter(self, layer: nn.Module) -> torch.device:
        from accelerate.utils import named_module_tensors, set_module_tensor_to_device

        device = self.execution_device(layer)
        modules = self.offloading(layer)
        for m in modules:
            hook = m._hf_hook
            for name, _ in named_module_tensors(m, include_buffers=hook.offload_buffers, recurse=hook.place_submodules,
                                                remove_non_persistent=True):
                set_module_tensor_to_device(m, name, hook.execution_device, value=hook.weights_map[name])
            hook.offload = False
        self.entered[id(layer)] = modules
        return device

    def leave(self, layer: nn.Module) -> None:
        from accelerate.utils import named_module_tensors, set_module_tensor_to_device

        for m in self.entered.pop(id(layer), []):
            hook = m._hf_hook
            for name, tensor in named_module_tensors(m, include_buffers=hook.offload_buffers,
                                                     recurse=hook.place_submodules, remove_non_persistent=True):
                write_back(hook.weights_map, name, tensor.detach())
                set_module_tensor_to_device(m, name, "meta")
            hook.offload = True

    def input_device(self, model: nn.Module) -> torch.device:
        return self.execution_device(model.get_input_embeddings())

    def tensors(self, model: nn.Module, chunk: int = 1 << 24) -> Iterator[torch.Tensor]:
        """Every parameter, an offloaded one read from its checkpoint in slices of about `chunk` elements where it
        still lies there (a large embedding or lm_head is never whole in memory), else from accelerate's store."""
        from safetensors import safe_open

        for m in model.modules():
            hook = getattr(m, "_hf_hook", None)
            weights = getattr(hook, "weights_map", None)
            for name, p in m.named_parameters(recurse=False):
                if not p.is_meta or weights is None:
                    yield p.data
                    continue
                store, key = getattr(weights, "dataset", weights), getattr(weights, "prefix", "") + name
                info = getattr(store, "index", {}).get(key, {}) if key not in getattr(store, "state_dict", {}) else {}
                if not info.get("safetensors_file") or p.dim() == 0:
                    yield weights[name]
                    continue
                step = max(1, chunk // max(1, p[0].numel()))
                for start in range(0, p.shape[0], step):  # a file opened per slice: its mapped pages go with it
                    with safe_open(info["safetensors_file"], framework="pt") as f:
                        yield f.get_slice(info.get("weight_name", key))[start:start + step]


def write_back(weights_map, name: str, tensor: torch.Tensor) -> None:
    """Store a pruned weight where accelerate will load it from next: its CPU state dict, or a file of its own in
    accelerate's offload folder (the index then points there instead of the model's checkpoint)."""
    from accelerate.utils import offload_weight

    store, key = getattr(weights_map, "dataset", weights_map), getattr(weights_map, "prefix", "") + name
    if key in store.state_dict:
        store.state_dict[key] = tensor.to(store.state_dict[key].device)
        return
    if store.save_folder is None:
        raise RuntimeError(f"{key} is offloaded without a folder to write its pruned values into")
    offload_weight(tensor.cpu(), key, store.save_folder, store.index)


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed the model (hooks move inputs and load offloaded weights)."""
    return any(hasattr(m, "_hf_hook") for m in model.modules())


def residency(model: nn.Module, layers: nn.ModuleList, device: torch.device, offload: bool):
    """The residency that fits how `model` was loaded: dispatched when accelerate placed it, offload when asked,
    else resident on `device`."""
    if is_dispatched(model):
        if offload:
            raise ValueError("the model was placed by accelerate (device_map): it moves its own layers, so offload "
                             "does not apply; load it without device_map to use offload")
        return Dispatched(model)
    return Offloaded(model, layers, device) if offload else Resident(model, device)
