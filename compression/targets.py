"""Where the sparsity goes: which matrices are pruned (include/exclude on full names) and how much each gets
(uniform, OWL's outlier-weighted allocation, or explicit per-layer / per-pattern sparsities).

Torch-free, so run specs and forms check targets without loading a model. OWL (Yin et al. 2024, luuyin/OWL):
a decoder layer's outlier ratio is the share of its |W_ij| * ||X_j||_2 scores above M times their mean; layers
with more outliers are pruned less.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

ALLOCATIONS: tuple[str, ...] = ("uniform", "owl")


def matches(full: str, inner: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """Whether a matrix is named by any fnmatch pattern, given as its full module name
    ('model.layers.3.mlp.down_proj') or, as before full names existed, its name inside the layer ('mlp.down_proj')."""
    return any(fnmatch.fnmatchcase(full, p) or fnmatch.fnmatchcase(inner, p) for p in patterns)


def _fraction(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{what} {value!r} is not allowed: use a fraction in [0, 1), such as 0.5")
    return float(value)


@dataclass(frozen=True)
class Targets:
    """Which matrices are pruned and the sparsity each gets. `layers` gives one sparsity per decoder layer;
    `patterns` maps full-name patterns to sparsities (a matrix no pattern names gets the run's sparsity)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    allocation: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    layers: tuple[float, ...] = ()
    patterns: tuple[tuple[str, float], ...] = ()

    @property
    def explicit(self) -> bool:
        return bool(self.layers or self.patterns)

    @property
    def uniform(self) -> bool:
        """Every pruned matrix gets the run's sparsity."""
        return self.allocation == "uniform" and not self.explicit

    def check(self, sparsity: float, structured: bool) -> None:
        """Refuse bad or contradictory settings, naming the value and what is allowed."""
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation {self.allocation!r} is not allowed: use one of {', '.join(ALLOCATIONS)}")
        for name in ("owl_m", "owl_lambda"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name.replace('_', '-')} {value!r} is not allowed: use a positive number "
                                 f"(OWL's defaults: owl-m 5, owl-lambda 0.08)")
        for p in (*self.include, *self.exclude, *(p for p, _ in self.patterns)):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"target pattern {p!r} is empty: use an fnmatch pattern such as 'model.layers.0.*'")
        for i, s in enumerate(self.layers):
            _fraction(s, f"layer-sparsity of decoder layer {i}")
        for p, s in self.patterns:
            _fraction(s, f"layer-sparsity of {p!r}")
        if self.explicit and self.allocation != "uniform":
            raise ValueError(f"--layer-sparsity and --allocation {self.allocation} both set per-layer sparsities: "
                             f"give one of them")
        if self.layers and self.patterns:
            raise ValueError("give --layer-sparsity as one list or as one JSON file of patterns, not both")
        if structured and not self.uniform:
            what = "--layer-sparsity" if self.explicit else f"--allocation {self.allocation}"
            raise ValueError(f"{what} gives layers different sparsities, but an N:M pattern fixes every matrix at "
                             f"N/M: use --pattern unstructured (mixed N:M per layer is not supported)")
        if self.allocation == "owl" and not (self.owl_lambda <= sparsity and sparsity + self.owl_lambda < 1):
            raise ValueError(f"owl-lambda {self.owl_lambda:g} with sparsity {sparsity:g} would ask for sparsities "
                             f"outside [0, 1): keep lambda at most {sparsity:g} and below {1 - sparsity:g}")

    def for_layer(self, index: int, full: str, inner: str, sparsity: float) -> float:
        """The explicit target of one matrix (the run's sparsity when none is set); two patterns that name it with
        different sparsities are refused rather than one silently winning."""
        if self.layers:
            return float(self.layers[index])
        named = {s for p, s in self.patterns if matches(full, inner, (p,))}
        if len(named) > 1:
            which = [p for p, _ in self.patterns if matches(full, inner, (p,))]
            raise ValueError(f"{full} is named by several --layer-sparsity patterns with different sparsities "
                             f"({', '.join(which)}): make them disjoint")
        return float(named.pop()) if named else sparsity

    def describe(self) -> str:
        """A short label: 'uniform', 'owl (M 5, lambda 0.08)', 'explicit per layer', with include/exclude."""
        text = ("explicit per layer" if self.layers else "explicit by pattern" if self.patterns else
                f"owl (M {self.owl_m:g}, lambda {self.owl_lambda:g})" if self.allocation == "owl" else "uniform")
        if self.include:
            text += f", only {' '.join(self.include)}"
        if self.exclude:
            text += f", not {' '.join(self.exclude)}"
        return text

    @classmethod
    def from_dict(cls, data: dict) -> Targets:
        """Targets from their dict form (patterns as a mapping or as pairs); unknown keys are an error naming them."""
        allowed = {"include", "exclude", "allocation", "owl_m", "owl_lambda", "layers", "patterns"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown target field(s) {', '.join(unknown)}: allowed are {', '.join(sorted(allowed))}")
        patterns = data.get("patterns") or ()
        pairs = patterns.items() if isinstance(patterns, dict) else patterns
        return cls(include=tuple(data.get("include") or ()), exclude=tuple(data.get("exclude") or ()),
                   allocation=data.get("allocation", cls.allocation), owl_m=data.get("owl_m", cls.owl_m),
                   owl_lambda=data.get("owl_lambda", cls.owl_lambda), layers=tuple(data.get("layers") or ()),
                   patterns=tuple((str(p), v) for p, v in pairs))

    def to_dict(self) -> dict:
        return {"include": list(self.include), "exclude": list(self.exclude), "allocation": self.allocation,
                "owl_m": self.owl_m, "owl_lambda": self.owl_lambda, "layers": list(self.layers),
                "patterns": {p: s for p, s in self.patterns}}


def parse_layer_sparsity(text: str | None) -> tuple[tuple[float, ...], tuple[tuple[str, float], ...]]:
    """`--layer-sparsity`: '0.3,0.4,...' (one per decoder layer), or a JSON object of {full-name pattern: sparsity}
    given inline or as a file. A file's contents are read now, so a run's identity follows them, not the path."""
    if not text or not text.strip():
        return (), ()
    text = text.strip()
    if text.startswith("{"):
        return (), _patterns(text, "--layer-sparsity")
    if text.endswith(".json") or Path(text).expanduser().is_file():
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"--layer-sparsity file {text!r} does not exist: give a JSON file of "
                             f'{{"pattern": sparsity}} or a comma-separated list such as 0.4,0.5,0.6')
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--layer-sparsity file {text!r} cannot be read ({err})") from None
        return (), _patterns(content, f"--layer-sparsity file {text!r}")
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--layer-sparsity {text!r} is neither a comma-separated list of fractions (one per "
                         f"decoder layer, such as 0.4,0.5,0.6) nor a JSON file") from None
    for i, v in enumerate(values):
        _fraction(v, f"layer-sparsity of decoder layer {i}")
    return values, ()


def _patterns(content: str, what: str) -> tuple[tuple[str, float], ...]:
    """A JSON object of {full-name pattern: sparsity} as ordered pairs."""
    try:
        data = json.loads(content)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f'{what} must hold a non-empty JSON object of {{"full-name pattern": sparsity}}, such as '
                         f'{{"model.layers.0.*": 0.3}}')
    return tuple((str(p), _fraction(s, f"layer-sparsity of {p!r}")) for p, s in data.items())


def layer_sparsity_text(targets: Targets) -> str:
    """The --layer-sparsity text that gives these targets' explicit sparsities ('' when there are none)."""
    if targets.layers:
        return ",".join(f"{v:g}" for v in targets.layers)
    return json.dumps(dict(targets.patterns)) if targets.patterns else ""


def owl_sparsities(ratios: list[float], sizes: list[int], sparsity: float, lam: float) -> list[float]:
    """OWL's per-layer sparsities: a decreasing linear function of the layers' outlier ratios whose
    parameter-weighted mean is exactly `sparsity` and whose values stay in [sparsity - lam, sparsity + lam].

    OWL min-max normalises the ratios to [0, 2 lam] and shifts them to mean zero; when the ratios are skewed that
    leaves the band on one side. Here the ratios are centred on their weighted mean and scaled so the farther side
    touches the band's edge: the same map when the ratios are symmetric, and the band always holds."""
    if len(ratios) != len(sizes) or not ratios:
        raise ValueError(f"OWL needs one outlier ratio per layer: got {len(ratios)} ratios for {len(sizes)} layers")
    total = sum(sizes)
    if total == 0:
        return [sparsity] * len(ratios)
    mean = sum(r * n for r, n in zip(ratios, sizes)) / total
    centred = [r - mean for r in ratios]
    spread = max(abs(c) for c, n in zip(centred, sizes) if n)
    if spread <= 1e-12:
        return [sparsity] * len(ratios)
    return [sparsity - lam * c / spread for c in centred]
