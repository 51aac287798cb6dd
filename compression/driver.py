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

import time
from contextlib import ExitStack
from dataclasses import asdict, replace
from functools import partial

import torch
from torch import nn

from compression.experts import ExpertsTap, projections
from compression.layers import (
    StopForward,
    call_layer,
    capture_layer_inputs,
    decoder_layers,
)
from compression.lockstep import Lockstep
from compression.memory import dimensions, free_bytes
from compression.methods.base import Method, Statistics
from compression.orders import check_order
from compression.report import (
    MatrixReport,
    Progress,
    ProgressFn,
    PruneReport,
    peak_device_mb,
    peak_rss_mb,
)
from compression.residency import Resident, move, residency
from compression.scope import LayerScope, check_scope, layer_scope
from compression.targets import Targets, matches, owl_sparsities
from compression.timing import Stopwatch


def activation_bytes_per_token(model: nn.Module, seqlen: int, dtype: torch.dtype) -> int:
    """Rough peak activation bytes per token while one decoder layer runs (inputs, outputs, MLP, attention)."""
    dims = dimensions(model.config)
    size = torch.finfo(dtype).bits // 8
    return size * (8 * dims.hidden + 3 * dims.intermediate + 2 * dims.heads * seqlen) + 4 * 2 * dims.hidden


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


def first_sample(args: tuple, kwargs: dict, batch: int) -> tuple[tuple, dict]:
    """A layer's arguments cut to the first sample of a mini-batch of `batch` samples."""
    one = lambda t: t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch else t
    return tuple(map(one, args)), {k: one(v) for k, v in kwargs.items()}


def input_groups(layer: nn.Module, modules: dict[str, nn.Module], hidden: torch.Tensor, args: tuple,
                 kwargs: dict) -> list[list[str]]:
    """Group Linears that read the very same input tensor, in call order, by running the layer on one sample; a
    Linear the probe did not call is a group of its own, last."""
    return with_uncalled(called_groups(layer, modules, hidden, args, kwargs), modules)


def with_uncalled(called: list[list[str]], modules: dict[str, nn.Module]) -> list[list[str]]:
    """The probed groups followed by each Linear the probe did not call, as a group of its own."""
    return called + [[n] for n in modules if all(n not in g for g in called)]


def input_key(x: torch.Tensor) -> tuple:
    """What tells one input tensor from another while both are alive: address, shape, strides and dtype."""
    return x.data_ptr(), tuple(x.shape), x.stride(), x.dtype


def called_groups(layer: nn.Module, modules: dict[str, nn.Module], hidden: torch.Tensor, args: tuple,
                  kwargs: dict) -> list[list[str]]:
    """The Linears a probe of the layer on one sample calls, grouped by the input tensor they read, in call order.
    The inputs are kept alive during the probe, so a freed tensor's address cannot be reused by a later input."""
    seen: list[tuple[torch.Tensor, str]] = []
    handles = [m.register_forward_pre_hook(lambda _m, inputs, name=name: seen.append((inputs[0], name)))
               for name, m in modules.items()]
    try:
        with torch.no_grad():
            call_layer(layer, hidden[:1], *first_sample(args, kwargs, hidden.shape[0]))
    finally:
        for h in handles:
            h.remove()
    groups: dict[tuple, list[str]] = {}
    for x, name in seen:
        if all(name not in g for g in groups.values()):
            groups.setdefault(input_key(x), []).append(name)
    return list(groups.values())


class GroupingDiffers(RuntimeError):
    """A Linear grouped with another by a probe reads another input than it in the layer's real forward."""


def probed_groups(probed: dict[tuple, list[list[str]]], layer: nn.Module, modules: dict[str, nn.Module],
                  hidden: torch.Tensor, args: tuple, kwargs: dict) -> tuple[list[list[str]], bool]:
    """`input_groups` of a layer and whether they were reused: on a CPU the probe runs once per layer class and set of
    Linear names, and a later layer of the same kind reuses the groups of the first one whose probe called every
    Linear (a probe costs 1/nsamples of the layer's calibration forward; the caller keeps a copy of the layer's
    weights, cheap in host memory, to redo the layer should its members' hooks find the grouping does not hold). On
    an accelerator each layer is probed: a probe is cheaper there than such a copy."""
    key = (type(layer), tuple(modules))
    if key in probed and hidden.device.type == "cpu":
        return probed[key], True
    called = called_groups(layer, modules, hidden, args, kwargs)
    groups = with_uncalled(called, modules)
    if sum(map(len, called)) == len(modules):
        probed[key] = groups
    return groups, False


def error_rows(total_tokens: int, error_tokens: int) -> torch.Tensor:
    """Evenly spaced global token indices used to measure each matrix's reconstruction error."""
    count = min(total_tokens, error_tokens)
    return torch.linspace(0, total_tokens - 1, count).round().long().unique()


class GroupState:
    """Statistics and the error-measurement sample of matrices that read the same input, while they wait to be
    pruned; `arrived` holds the mini-batches that have contributed."""

    def __init__(self, names: list[str], weights: list[torch.Tensor], method: Method, device: torch.device) -> None:
        self.names = names
        self.weights = weights
        self.stats: Statistics | None = method.statistics(weights[0].shape[1], device) if method.needs_calibration else None
        self.sample: list[torch.Tensor] = []
        self.arrived: set[int] = set()
        self.called: dict[str, set[int]] = {name: set() for name in names}
        self.read: dict[int, tuple] = {}
        self.done = False
        self.note = ""

    def add(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        """Accumulate [tokens, in] inputs; `rows` are the indices of x's rows in the error sample."""
        if self.stats is not None:
            self.stats.add(x)
        if len(rows):
            self.sample.append(x[rows.to(x.device)].float())


def prune_model(model: nn.Module, calibration: torch.Tensor, method: Method, *, order: str = "sequential",
                targets: Targets | None = None, batch_size: int | None = None, error_tokens: int = 256,
                device: torch.device | None = None, offload: bool = False,
                progress: ProgressFn | None = None) -> PruneReport:
    """Prune every matrix in scope inside the decoder layers in place and report what happened to each one.

    calibration: [nsamples, seqlen] token ids. `targets` chooses the matrices and each one's sparsity (default: all,
    at the method's sparsity). With `offload`, the model stays on the CPU and each decoder layer visits `device`
    only while it is processed, so models larger than the accelerator can be pruned. The run ends by checking that
    its last layer's outputs equal the pruned model's own forward pass on one calibration sample.
    """
    check_order(order)
    targets = targets or Targets()
    targets.check(method.sparsity, method.pattern.structured)
    if calibration.dim() != 2 or calibration.numel() == 0:
        raise ValueError(f"calibration must be a non-empty [nsamples, seqlen] tensor, got shape {tuple(calibration.shape)}")
    prefix, layers = decoder_layers(model)
    where = residency(model, layers, device or next(model.parameters()).device, offload)
    device = where.input_device(model)
    dtype = next(model.parameters()).dtype
    scopes = [layer_scope(layer, targets.include, targets.exclude, f"{prefix}.{i}") for i, layer in enumerate(layers)]
    check_scope(prefix, scopes, method.pattern)
    goals = explicit_goals(prefix, scopes, targets, method.sparsity)
    if not method.needs_calibration and targets.allocation == "uniform":
        calibration = calibration[:min(calibration.shape[0], max(1, -(-error_tokens // calibration.shape[1])))]
    nsamples, seqlen = calibration.shape
    batch_size = min(batch_size or auto_batch_size(model, nsamples, seqlen, device, dtype), nsamples)
    if order == "sequential" and batch_size < nsamples:
        check_sequential_fits(model, nsamples, seqlen, device, dtype)
    report = PruneReport(method.name, method.sparsity, str(method.pattern), order, nsamples, seqlen, batch_size,
                         error_tokens)
    numels = [{n: w.numel() for n, w in s.targets.items()} for s in scopes]
    sizes = [sum(n.values()) for n in numels]
    del scopes
    clock = Stopwatch(report.stages)
    notify = progress or (lambda _event: None)
    batches = list(calibration.split(batch_size))
    batch_rows = split_rows(error_rows(nsamples * seqlen, error_tokens), [b.numel() for b in batches])

    with torch.no_grad(), where.active():
        with clock("capture"):
            where.enter(layers[0])  # the capture calls layer 0 once for real, to learn its output's container
            inputs = capture_layer_inputs(model, layers, batches, device)
            where.leave(layers[0])
        ratios: list[float] = []
        if targets.allocation == "owl":
            with clock("allocation pass"):
                ratios = outlier_ratios(layers, prefix, inputs, targets, where, notify)
            owl = owl_sparsities(ratios, sizes, method.sparsity, targets.owl_lambda)
            goals = [{name: owl[i] for name in layer_goals} for i, layer_goals in enumerate(goals)]
        report.allocation = {**targets.to_dict(), "outlier_ratios": ratios,
                             "layer_targets": [weighted(g, n) for g, n in zip(goals, numels)],
                             "layer_parameters": sizes}
        hidden = inputs.hidden
        probed: dict[tuple, list[list[str]]] = {}
        for index, layer in enumerate(layers):
            started = time.perf_counter()
            at = where.enter(layer)
            scope = layer_scope(layer, targets.include, targets.exclude, f"{prefix}.{index}")
            report.kept += [{**asdict(k), "name": f"{prefix}.{index}.{k.name}", "layer": index, "module": k.name}
                            for k in scope.kept]
            hidden = move(hidden, at)
            args, kwargs = move(inputs.args[index], at), move(inputs.kwargs[index], at)
            groups, reused = probed_groups(probed, layer, scope.linears, hidden[0], args[0], kwargs[0])
            kept = {name: w.clone() for name, w in scope.targets.items()} if reused else {}
            run = partial(LayerRun, index, layer, scope, method, at, report, clock, notify, len(layers), prefix)
            try:
                outputs = run(groups, goals[index]).execute(hidden, args, kwargs, batch_rows, order)
            except GroupingDiffers:
                if not reused:
                    raise
                for name, w in scope.targets.items():
                    w.copy_(kept[name])
                report.layers = [r for r in report.layers if r.layer != index]
                groups = input_groups(layer, scope.linears, hidden[0], args[0], kwargs[0])
                outputs = run(groups, goals[index]).execute(hidden, args, kwargs, batch_rows, order)
            hidden = outputs
            del kept
            done = {r.module for r in report.layers if r.layer == index}
            if done != set(scope.targets):
                raise RuntimeError(f"decoder layer {index}: {sorted(set(scope.targets) - done)[:5]} were never pruned")
            inputs.args[index] = inputs.kwargs[index] = None
            where.leave(layer)
            notify(Progress("layer", index + 1, len(layers), seconds=time.perf_counter() - started))
        with clock("check"):
            report.check = check_against_model(model, layers, calibration[:1], hidden[0][:1], where)
        report.model_parameters = sum(p.numel() for p in model.parameters())
        report.model_sparsity = sum(map(zeros, where.tensors(model))) / max(report.model_parameters, 1)
    report.residency = where.mode
    report.peak_rss_mb = peak_rss_mb()
    report.peak_device_mb = peak_device_mb()
    return report


def zeros(t: torch.Tensor, chunk: int = 1 << 22) -> int:
    """The zeros of a tensor, counted a slice at a time (no mask as large as an embedding matrix)."""
    return sum(int(torch.count_nonzero(part == 0)) for part in t.reshape(-1).split(chunk))


def explicit_goals(prefix: str, scopes: list[LayerScope], targets: Targets, sparsity: float) -> list[dict[str, float]]:
    """Each decoder layer's {matrix name inside the layer: target sparsity} before any allocation pass."""
    if targets.layers and len(targets.layers) != len(scopes):
        raise ValueError(f"--layer-sparsity gives {len(targets.layers)} sparsities but the model has {len(scopes)} "
                         f"decoder layers: give one per layer, or a JSON file of name patterns")
    unused = [p for p, _ in targets.patterns if not any(matches(f"{prefix}.{i}.{name}", name, (p,))
                                                         for i, scope in enumerate(scopes) for name in scope.targets)]
    if unused:
        raise ValueError(f"--layer-sparsity pattern(s) {', '.join(unused)} name no pruned matrix (full names look like "
                         f"{prefix}.0.{next(iter(scopes[0].targets), 'mlp.down_proj')}): a typo would leave those "
                         f"matrices at --sparsity")
    return [{name: targets.for_layer(i, f"{prefix}.{i}.{name}", name, sparsity) for name in scope.targets}
            for i, scope in enumerate(scopes)]


def weighted(goals: dict[str, float], numels: dict[str, int]) -> float | None:
    """A layer's parameter-weighted target sparsity (None when nothing in it is pruned)."""
    total = sum(numels[n] for n in goals)
    return sum(goals[n] * numels[n] for n in goals) / total if total else None


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """OWL's layerwise outlier ratio: the share of all the scores above m times their mean."""
    count = max(sum(x.numel() for x in scores), 1)
    mean = sum(float(x.sum()) for x in scores) / count
    return sum(int(torch.count_nonzero(x > m * mean)) for x in scores) / count


def outlier_ratios(layers: nn.ModuleList, prefix: str, inputs, targets: Targets, where: Resident,
                   notify: ProgressFn) -> list[float]:
    """One pass of the calibration through the dense layers (OWL's allocation needs every layer's ratio before the
    first is pruned): per layer, Wanda's scores |W_ij| * ||X_j||_2 of every matrix in scope, experts included."""
    from compression.methods.wanda import Wanda

    scratch = PruneReport("owl", 0.0, "unstructured", "reference", 0, 0, 0, 0)
    hidden, ratios = inputs.hidden, []
    for index, layer in enumerate(layers):
        at = where.enter(layer)
        scope = layer_scope(layer, targets.include, targets.exclude, f"{prefix}.{index}")
        hidden = move(hidden, at)
        args, kwargs = move(inputs.args[index], at), move(inputs.kwargs[index], at)
        groups = input_groups(layer, scope.linears, hidden[0], args[0], kwargs[0])
        run = LayerRun(index, layer, scope, Wanda(), at, scratch, Stopwatch(scratch.stages), notify, len(layers),
                       prefix, groups, {})
        run.batches, run.rows = len(hidden), [torch.empty(0, dtype=torch.long)] * len(hidden)
        hidden = run.forward(hidden, args, kwargs, hooks=True, sequential=False)
        ratios.append(outlier_ratio([w.abs().float() * s.stats.sq.sqrt().to(w.device)
                                     for s in run.all_states for w in s.weights], targets.owl_m))
        where.leave(layer)
        notify(Progress("allocation", index + 1, len(layers), "(OWL allocation pass)"))
    return ratios


def check_against_model(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, propagated: torch.Tensor,
                        where: Resident) -> dict:
    """The layer-by-layer pass must end where the pruned model's own forward ends: any layer given the wrong
    arguments, or a weight changed after its outputs were propagated (or not written back where the model loads it
    from), shows here, and the run fails loudly."""
    seen: list[torch.Tensor] = []

    def last(_m, _args, out):
        seen.append(out[0] if isinstance(out, (tuple, list)) else out)
        raise StopForward

    handle = layers[-1].register_forward_hook(last)
    try:
        with where.around_model(layers):
            model(input_ids=ids.to(where.input_device(model)), use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    own = seen[0].float()
    diff = float((own - propagated.float().to(own.device)).norm() / own.norm().clamp_min(1e-30))
    tolerance = 1e-3 if propagated.dtype == torch.float32 else 5e-2
    if not diff <= tolerance:
        raise RuntimeError(f"the layer-by-layer pass does not reproduce the pruned model's own forward (relative "
                           f"difference {diff:.2e} > {tolerance:g} at the last decoder layer): its layers were not "
                           f"given the inputs the model gives them, so the pruning cannot be trusted")
    return {"tokens": int(ids.numel()), "relative_difference": diff, "tolerance": tolerance}


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


class LayerRun:
    """Prunes one decoder layer, from hooks on its Linears and taps on its experts, and returns its outputs."""

    def __init__(self, index: int, layer: nn.Module, scope: LayerScope, method: Method, device: torch.device,
                 report: PruneReport, clock: Stopwatch, notify: ProgressFn, total_layers: int, prefix: str,
                 groups: list[list[str]], goals: dict[str, float]) -> None:
        self.index, self.layer, self.scope, self.method, self.goals = index, layer, scope, method, goals
        self.report, self.clock, self.notify, self.total_layers, self.prefix = report, clock, notify, total_layers, prefix
        self.states = [GroupState(g, [scope.targets[n] for n in g], method, device) for g in groups]
        self.expert_states: dict[tuple[str, str], list[GroupState | None]] = {}
        for path, experts in scope.experts.items():
            for projection in projections(experts):
                names = [scope.expert_name(path, e, projection) for e in range(experts.num_experts)]
                self.expert_states[path, projection] = [
                    GroupState([n], [scope.targets[n]], method, device) if n in scope.targets else None for n in names]
        self.all_states = self.states + [s for group in self.expert_states.values() for s in group if s is not None]
        self.lockstep = Lockstep()
        self.sequential = False
        self.batches = 0
        self.rows: list[torch.Tensor] = []

    def execute(self, hidden: list[torch.Tensor], args: list[tuple], kwargs: list[dict], batch_rows: list[torch.Tensor],
                order: str) -> list[torch.Tensor]:
        self.batches, self.rows = len(hidden), batch_rows
        if order == "reference":
            self.forward(hidden, args, kwargs, hooks=True, sequential=False)
            self.check_groups()
            for state in self.all_states:
                self.prune(state)
            return self.forward(hidden, args, kwargs, hooks=False, sequential=False)
        outputs = self.forward(hidden, args, kwargs, hooks=True, sequential=True)
        self.check_groups()
        late = [s for s in self.all_states if not s.done]
        for state in late:
            state.note = "not reached by every mini-batch: pruned after the pass, outputs recomputed"
            self.prune(state)
        return self.forward(hidden, args, kwargs, hooks=False, sequential=False) if late else outputs

    def check_groups(self) -> None:
        """Linears grouped by one probe share statistics; each must then have been called by exactly the
        mini-batches that brought the group's input, else its statistics would not be its own."""
        for state in self.states:
            for name, batches in state.called.items():
                if batches != state.arrived:
                    raise RuntimeError(f"decoder layer {self.index}: {name} reads the same input as {state.names[0]} "
                                       f"but was called by mini-batches {sorted(batches)} instead of "
                                       f"{sorted(state.arrived)}; its statistics cannot be shared: exclude it")

    def arrive(self, items: list[tuple[GroupState, torch.Tensor, torch.Tensor]]) -> None:
        """Mini-batch `lockstep.index()` brings inputs for some groups. Sequential: the last mini-batch to bring them
        prunes the groups; the others pause until then, so everything after is computed with pruned weights."""
        batch = self.lockstep.index()
        pending = []
        for state, x, rows in items:
            if state.done:
                continue
            with self.clock("statistics"):
                state.add(x, rows)
            state.arrived.add(batch)
            pending.append(state)
        if not self.sequential or not pending:
            return
        if all(len(s.arrived) == self.batches for s in pending):
            for state in pending:
                self.prune(state)
        else:
            self.lockstep.wait()

    def linear_hook(self, state: GroupState):
        def hook(_module, args):
            state.called[state.names[0]].add(self.lockstep.index())
            state.read[self.lockstep.index()] = input_key(args[0])
            x = args[0].reshape(-1, args[0].shape[-1])
            self.arrive([(state, x, self.rows[self.lockstep.index()])])
        return hook

    def member_hook(self, state: GroupState, name: str):
        def hook(_module, args):
            batch = self.lockstep.index()
            state.called[name].add(batch)
            if batch in state.read and state.read[batch] != input_key(args[0]):
                raise GroupingDiffers(f"decoder layer {self.index}: {name} read the same input as {state.names[0]} "
                                      f"in a probe but reads another one here: their statistics cannot be shared; "
                                      f"exclude {name}")
        return hook

    def experts_observer(self, path: str):
        def observe(projection: str, xs: list[torch.Tensor], tokens: list[torch.Tensor]) -> None:
            rows = self.rows[self.lockstep.index()].to(tokens[0].device)
            states = self.expert_states[path, projection]
            self.arrive([(s, x, torch.isin(t, rows).nonzero()[:, 0])
                         for s, x, t in zip(states, xs, tokens) if s is not None])
        return observe

    def forward(self, hidden: list[torch.Tensor], args: list[tuple], kwargs: list[dict], hooks: bool,
                sequential: bool) -> list[torch.Tensor]:
        """Run the layer on every mini-batch; with hooks, in-scope matrices gather statistics from their inputs.
        Sequential: the mini-batches run in lockstep and pause at each group until all have contributed."""
        self.sequential = sequential
        handles = [self.scope.linears[s.names[0]].register_forward_pre_hook(self.linear_hook(s))
                   for s in self.states] if hooks else []
        handles += [self.scope.linears[n].register_forward_pre_hook(self.member_hook(s, n))
                    for s in self.states for n in s.names[1:]] if hooks else []
        taps = [ExpertsTap(m, f"{self.prefix}.{self.index}.{path}", self.experts_observer(path))
                for path, m in self.scope.experts.items()] if hooks else []
        tasks = [lambda h=h, a=a, k=k: call_layer(self.layer, h, a, k) for h, a, k in zip(hidden, args, kwargs)]
        forward_start, hook_before = time.perf_counter(), self.hook_seconds()
        try:
            with ExitStack() as stack:
                for tap in taps:
                    stack.enter_context(tap)
                outputs = self.lockstep.run(tasks, interleave=sequential and len(tasks) > 1)
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
        method, note = self.method, state.note
        goals = [self.goals.get(name, method.sparsity) for name in state.names]
        start = time.perf_counter()
        with self.clock("pruning"):
            if state.stats is not None and state.stats.tokens == 0:
                from compression.methods.magnitude import Magnitude
                method = Magnitude(pattern=method.pattern, sparsity=method.sparsity)
                note = "; ".join(filter(None, [note, "no calibration token reached it: magnitude used"]))
            for goal in sorted(set(goals)):
                members = [w for w, g in zip(state.weights, goals) if g == goal]
                (method if goal == method.sparsity else replace(method, sparsity=goal)).prune(members, state.stats)
        seconds = time.perf_counter() - start
        tokens = state.stats.tokens if state.stats is not None else 0
        total_rows = sum(w.shape[0] for w in state.weights)
        for i, (name, w) in enumerate(zip(state.names, state.weights)):
            with self.clock("report"):
                rel = relative_error(dense[i], sample, w) if sample is not None else float("nan")
            share = seconds * w.shape[0] / total_rows
            self.report.layers.append(MatrixReport(
                name=f"{self.prefix}.{self.index}.{name}", layer=self.index, module=name, shape=tuple(w.shape),
                sparsity=float((w == 0).sum()) / w.numel(), rel_error=rel, seconds=share, tokens=tokens, note=note,
                target=goals[i]))
            self.notify(Progress("module", self.index + 1, self.total_layers, name, share))
