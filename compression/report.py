"""What a pruning run reports: a row per pruned matrix, what stayed dense, per-stage seconds, memory, the final
check, and the progress events sent while it runs."""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch


@dataclass
class MatrixReport:
    """What pruning did to one weight matrix (a Linear, or one expert's slice of a fused experts tensor)."""

    name: str
    layer: int
    module: str
    shape: tuple[int, int]
    sparsity: float
    rel_error: float
    seconds: float
    tokens: int
    note: str = ""
    target: float = float("nan")


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
    layers: list[MatrixReport] = field(default_factory=list)
    kept: list[dict] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    peak_device_mb: float | None = None
    residency: str = "resident"
    model_sparsity: float = float("nan")
    model_parameters: int = 0
    check: dict = field(default_factory=dict)
    allocation: dict = field(default_factory=dict)

    @property
    def pruned_sparsity(self) -> float:
        """Zeros over the matrices that were pruned."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers) / max(total, 1)

    @property
    def overall_sparsity(self) -> float:
        """Zeros over every matrix in scope, the ones kept dense included."""
        pruned = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = self.pruned_sparsity * pruned + sum(k["zeros"] for k in self.kept)
        return zeros / max(pruned + sum(k["numel"] for k in self.kept), 1)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["overall_sparsity"] = self.overall_sparsity
        data["pruned_sparsity"] = self.pruned_sparsity
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


def peak_device_mb() -> float | None:
    """The most memory torch held at once on any accelerator in this process (None without one)."""
    if not torch.cuda.is_available():
        return None
    return max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2 ** 20
