"""Prune a causal LM decoder layer by decoder layer, with generic hooks and one layer's activations at a time.

Two orders are offered:
- ``sequential`` (default): inside each decoder layer, Linears that read the same input are pruned as a group,
  in the order the layer calls them, from statistics of the inputs the already-pruned part of the layer produces
  (q/k/v from the layer input; o_proj from attention computed with the pruned q/k/v; and so on). This needs ONE
  forward pass per layer: the mini-batches run in lockstep (see lockstep.py), pause at each group until all have
  contributed its statistics, and go on with the pruned group. All mini-batches' activations inside the layer are
  alive at once.
- ``reference``: as SparseGPT and Wanda do it: one pass through the dense layer collects statistics for every
  Linear, then the whole layer is pruned, then a second pass through the pruned layer propagates. Only one
  mini-batch's activations inside the layer are alive at a time.
In both orders, later layers see the errors of earlier ones.
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from compression.layers import (call_layer, capture_first_layer_inputs, decoder_layers,
                                linear_modules, select, weight_matrix)
from compression.lockstep import Lockstep
from compression.methods.base import Method, Statistics

ORDERS = ("sequential", "reference")


@dataclass
class LinearReport:
    """What pruning did to one Linear."""

    name: str
    layer: int
    module: str
    shape: tuple[int, int]
    sparsity: float
    rel_error: float
    seconds: float
    tokens: int
    note: str = ""


@dataclass
class PruneReport:
    """Per-Linear results, per-stage seconds and peak memory of one pruning run."""

    method: str
    sparsity: float
    pattern: str
    order: str
    nsamples: int
    seqlen: int
    batch_size: int
    error_tokens: int
    layers: list[LinearReport] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    peak_device_mb: float | None = None

    @property
    def overall_sparsity(self) -> float:
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers) / max(total, 1)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["overall_sparsity"] = self.overall_sparsity
        return data


@dataclass(frozen=True)
class Progress:
    """One progress event: stage, decoder layer i of n, the module just done and the seconds it took."""

    stage: str
    layer: int
    layers: int
    module: str = ""
    seconds: float = 0.0


ProgressFn = Callable[[Progress], None]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def activation_bytes_per_token(model: nn.Module, seqlen: int, dtype: torch.dtype) -> int:
    """Rough peak activation bytes per token while one decoder layer runs (inputs, outputs, MLP, attention)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "d_model", 1024)
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * hidden
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
    size = torch.finfo(dtype).bits // 8
    return size * (8 * hidden + 3 * inter + 2 * heads * seqlen) + 4 * 2 * hidden


def free_bytes(device: torch.device) -> int:
    """Free memory where activations will live."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil
    return psutil.virtual_memory().available


def auto_batch_size(model: nn.Module, nsamples: int, seqlen: int, device: torch.device, dtype: torch.dtype,
                    fraction: float = 0.25) -> int:
    """Samples per mini-batch: about 1k tokens on a CPU (activations stay in cache, measured fastest), 16k on an
    accelerator, and never more than `fraction` of free memory."""
    tokens = 16384 if device.type == "cuda" else 1024
    per_sample = activation_bytes_per_token(model, seqlen, dtype) * seqlen
    return max(1, min(nsamples, tokens // seqlen, int(free_bytes(device) * fraction // per_sample)))


def check_sequential_fits(model: nn.Module, nsamples: int, seqlen: int, device: torch.device, dtype: torch.dtype,
                          fraction: float = 0.6) -> None:
    """The sequential order keeps every mini-batch's in-layer activations alive at once: refuse, with the numbers,
    rather than run out of memory mid-way."""
    need = activation_bytes_per_token(model, seqlen, dtype) * nsamples * seqlen
    free = free_bytes(device)
    if need > free * fraction:
        raise ValueError(f"--order sequential holds the in-layer activations of all {nsamples} x {seqlen} calibration "
                         f"tokens at once (~{need / 2 ** 30:.1f} GiB) but {free / 2 ** 30:.1f} GiB is free on {device}: "
                         f"use --order reference (one mini-batch at a time) or fewer --nsamples")


class Stopwatch:
    """Accumulates seconds per stage into a dict."""

    def __init__(self, stages: dict[str, float]) -> None:
        self.stages = stages

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - start


def input_groups(layer: nn.Module, names: list[str], hidden: torch.Tensor, args: tuple, kwargs: dict) -> list[list[str]]:
    """Group Linears that read the very same input tensor, in call order, by running the layer on one sample.
    The inputs are kept alive during the probe, so a freed tensor's address cannot be reused by a later input."""
    modules = linear_modules(layer)
    seen: list[tuple[torch.Tensor, str]] = []
    handles = [modules[name].register_forward_pre_hook(lambda _m, inputs, name=name: seen.append((inputs[0], name)))
               for name in names]
    one = lambda t: t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == hidden.shape[0] else t
    try:
        with torch.no_grad():
            call_layer(layer, hidden[:1], tuple(map(one, args)), {k: one(v) for k, v in kwargs.items()})
    finally:
        for h in handles:
            h.remove()
    groups: dict[tuple, list[str]] = {}
    for x, name in seen:
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)
        if all(name not in g for g in groups.values()):
            groups.setdefault(key, []).append(name)
    called = list(groups.values())
    return called + [[n] for n in names if all(n not in g for g in called)]


def error_rows(total_tokens: int, error_tokens: int) -> torch.Tensor:
    """Evenly spaced global token indices used to measure each Linear's reconstruction error."""
    count = min(total_tokens, error_tokens)
    return torch.linspace(0, total_tokens - 1, count).round().long().unique()


class GroupState:
    """Statistics and the error-measurement sample of one input-sharing group while it waits to be pruned."""

    def __init__(self, names: list[str], modules: dict[str, nn.Module], method: Method, device: torch.device) -> None:
        self.names = names
        self.weights = [weight_matrix(modules[n]) for n in names]
        d_in = self.weights[0].shape[1]
        self.stats: Statistics | None = method.statistics(d_in, device) if method.needs_calibration else None
        self.sample: list[torch.Tensor] = []
        self.arrived = 0
        self.done = False

    def add(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        if self.stats is not None:
            self.stats.add(x)
        if len(rows):
            self.sample.append(x[rows.to(x.device)].float())


def prune_model(model: nn.Module, calibration: torch.Tensor, method: Method, *, order: str = "sequential",
                include: list[str] | None = None, exclude: list[str] | None = None, batch_size: int | None = None,
                error_tokens: int = 256, device: torch.device | None = None, offload: bool = False,
                progress: ProgressFn | None = None) -> PruneReport:
    """Prune every selected Linear inside the decoder layers in place and report what happened.

    calibration: [nsamples, seqlen] token ids. With `offload`, the model stays on the CPU and each decoder layer
    visits `device` only while it is processed, so models larger than the accelerator can be pruned.
    """
    if order not in ORDERS:
        raise ValueError(f"order {order!r} is not allowed: use one of {', '.join(ORDERS)}")
    if calibration.dim() != 2 or calibration.numel() == 0:
        raise ValueError(f"calibration must be a non-empty [nsamples, seqlen] tensor, got shape {tuple(calibration.shape)}")
    home = next(model.parameters()).device
    device = device or home
    dtype = next(model.parameters()).dtype
    nsamples, seqlen = calibration.shape
    prefix, layers = decoder_layers(model)
    if not method.needs_calibration:
        keep = min(nsamples, max(1, -(-error_tokens // seqlen)))
        calibration = calibration[:keep]
        nsamples = keep
    batch_size = min(batch_size or auto_batch_size(model, nsamples, seqlen, device, dtype), nsamples)
    if order == "sequential" and batch_size < nsamples:
        check_sequential_fits(model, nsamples, seqlen, device, dtype)
    report = PruneReport(method.name, method.sparsity, str(method.pattern), order, nsamples, seqlen, batch_size,
                         error_tokens)
    clock = Stopwatch(report.stages)
    notify = progress or (lambda _event: None)
    batches = list(calibration.split(batch_size))
    batch_rows = split_rows(error_rows(nsamples * seqlen, error_tokens), [b.numel() for b in batches])

    with torch.no_grad(), on_device(model, layers, device, offload):
        with clock("capture"):
            inputs = capture_first_layer_inputs(model, layers, batches, device)
        hidden = inputs.hidden
        groups: list[list[str]] | None = None
        for index, layer in enumerate(layers):
            started = time.perf_counter()
            if offload:
                layer.to(device)
            modules = linear_modules(layer)
            names = select(list(modules), include, exclude)
            if groups is None or any(n not in modules for g in groups for n in g):
                groups = input_groups(layer, names, hidden[0], inputs.args[0], inputs.kwargs[0])
            layer_groups = [[n for n in g if n in names] for g in groups]
            states = [GroupState(g, modules, method, device) for g in layer_groups if g]
            run = LayerRun(index, layer, states, modules, method, report, clock, notify, len(layers), prefix)
            hidden = run.execute(hidden, inputs, batch_rows, order)
            if offload:
                layer.to(home)
            notify(Progress("layer", index + 1, len(layers), seconds=time.perf_counter() - started))
    report.peak_rss_mb = peak_rss_mb()
    if device.type == "cuda":
        report.peak_device_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return report


def relative_error(dense: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """||WX - W'X||^2 / ||WX||^2 on a sample of calibration inputs x [tokens, in]."""
    return float((dense - x @ w.float().t()).square().sum() / dense.square().sum().clamp_min(1e-30))


def split_rows(rows: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Global token indices split into per-batch local indices."""
    out, start = [], 0
    for size in sizes:
        local = rows[(rows >= start) & (rows < start + size)] - start
        out.append(local)
        start += size
    return out


@contextmanager
def on_device(model: nn.Module, layers: nn.ModuleList, device: torch.device, offload: bool) -> Iterator[None]:
    """Without offload the model must already be on `device`; with it, everything but the decoder layers moves
    there for the duration (embeddings, rotary tables, final norm), and moves back afterwards."""
    home = next(model.parameters()).device
    if not offload:
        if home != device:
            raise ValueError(f"model is on {home} but pruning was asked on {device}: move it or use offload")
        yield
        return
    keep = {id(p) for p in layers.parameters()} | {id(b) for b in layers.buffers()}
    moved = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in keep]
    for t in moved:
        t.data = t.data.to(device)
    try:
        yield
    finally:
        for t in moved:
            t.data = t.data.to(home)


@dataclass
class LayerRun:
    """Prunes one decoder layer with hooks on its Linear modules and returns the layer's outputs."""

    index: int
    layer: nn.Module
    states: list[GroupState]
    modules: dict[str, nn.Module]
    method: Method
    report: PruneReport
    clock: Stopwatch
    notify: ProgressFn
    total_layers: int
    prefix: str

    def execute(self, hidden: list[torch.Tensor], inputs, batch_rows: list[torch.Tensor], order: str) -> list[torch.Tensor]:
        if order == "reference":
            self.forward(hidden, inputs, batch_rows, hooks=True, sequential=False)
            for state in self.states:
                self.prune(state)
            return self.forward(hidden, inputs, batch_rows, hooks=False, sequential=False)
        return self.forward(hidden, inputs, batch_rows, hooks=True, sequential=True)

    def forward(self, hidden, inputs, batch_rows, hooks: bool, sequential: bool) -> list[torch.Tensor]:
        """Run the layer on every mini-batch. With hooks, each group's first Linear accumulates statistics from its
        input. Sequential: the mini-batches run in lockstep, pausing at each group until all have contributed;
        the last to arrive prunes the group, so everything after it is computed with the pruned weights."""
        lockstep = Lockstep()
        handles = []
        for state in self.states if hooks else []:
            def hook(_m, args, state=state):
                if state.done:
                    return
                x = args[0].reshape(-1, args[0].shape[-1])
                with self.clock("statistics"):
                    state.add(x, batch_rows[lockstep.index()])
                state.arrived += 1
                if sequential and state.arrived == len(hidden):
                    self.prune(state)
                elif sequential:
                    lockstep.wait()
            handles.append(self.modules[state.names[0]].register_forward_pre_hook(hook))
        tasks = [lambda h=h, a=a, k=k: call_layer(self.layer, h, a, k)
                 for h, a, k in zip(hidden, inputs.args, inputs.kwargs)]
        forward_start, hook_before = time.perf_counter(), self.hook_seconds()
        try:
            if sequential and len(tasks) > 1:
                outputs = lockstep.run(tasks)
            else:
                outputs = [task() for task in tasks]
        finally:
            for handle in handles:
                handle.remove()
        spent = time.perf_counter() - forward_start - (self.hook_seconds() - hook_before)
        self.report.stages["propagation"] = self.report.stages.get("propagation", 0.0) + spent
        return outputs

    def hook_seconds(self) -> float:
        return sum(self.report.stages.get(s, 0.0) for s in ("statistics", "pruning", "report"))

    def prune(self, state: GroupState) -> None:
        """Prune one group in place and record sparsity, reconstruction error and seconds for each member."""
        if state.done:
            return
        state.done = True
        sample = torch.cat(state.sample) if state.sample else None
        with self.clock("report"):
            dense = [sample @ w.float().t() for w in state.weights] if sample is not None else None
        note = ""
        method = self.method
        start = time.perf_counter()
        with self.clock("pruning"):
            if state.stats is not None and state.stats.tokens == 0:
                from compression.methods.magnitude import Magnitude
                method, note = Magnitude(pattern=method.pattern, sparsity=method.sparsity), "no tokens reached it: magnitude used"
            method.prune(state.weights, state.stats)
        seconds = time.perf_counter() - start
        tokens = state.stats.tokens if state.stats is not None else 0
        total_rows = sum(w.shape[0] for w in state.weights)
        for i, (name, w) in enumerate(zip(state.names, state.weights)):
            with self.clock("report"):
                rel = relative_error(dense[i], sample, w) if sample is not None else float("nan")
            self.report.layers.append(LinearReport(
                name=f"{self.prefix}.{self.index}.{name}", layer=self.index, module=name, shape=tuple(w.shape),
                sparsity=float((w == 0).sum()) / w.numel(), rel_error=rel,
                seconds=seconds * w.shape[0] / total_rows, tokens=tokens, note=note))
            self.notify(Progress("module", self.index + 1, self.total_layers, name, seconds * w.shape[0] / total_rows))
