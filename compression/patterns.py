"""Sparsity patterns (unstructured, N:M) and their validation; torch-free so run specs can check them cheaply."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Pattern:
    """Unstructured (n = m = 0) or N:M (remove n of every m consecutive input weights of a row)."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"


def parse_pattern(text: str) -> Pattern:
    """'unstructured', or 'N:M' with 0 < N < M."""
    if text == "unstructured":
        return Pattern()
    match = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if not match:
        raise ValueError(f"pattern {text!r} is not allowed: use unstructured or N:M such as 2:4 or 4:8")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise ValueError(f"pattern {text!r} is not allowed: N:M needs 0 < N < M (for example 2:4)")
    return Pattern(n, m)


def check_sparsity(sparsity: float, pattern: Pattern) -> float:
    """Sparsity in [0, 1); for N:M it must equal N/M."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} is not allowed: use a fraction in [0, 1), such as 0.5")
    if pattern.structured and abs(sparsity - pattern.n / pattern.m) > 1e-9:
        raise ValueError(f"sparsity {sparsity} does not match pattern {pattern}, which removes "
                         f"{pattern.n / pattern.m:g} of the weights")
    return sparsity
