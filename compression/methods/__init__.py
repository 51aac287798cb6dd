"""Pruning methods by name. The catalog is torch-free, so specs and forms can list and check names without loading
torch; `create` imports a method's module only when it is built."""

from __future__ import annotations

from importlib import import_module

CATALOG: dict[str, str] = {
    "magnitude": "compression.methods.magnitude:Magnitude",
    "wanda": "compression.methods.wanda:Wanda",
    "sparsegpt": "compression.methods.sparsegpt:SparseGPT",
    "ria": "compression.methods.ria:RIA",
}
METHOD_NAMES: tuple[str, ...] = tuple(CATALOG)


def method_class(name: str):
    """The Method subclass registered under `name`."""
    if name not in CATALOG:
        raise ValueError(f"method {name!r} is not known: use one of {', '.join(METHOD_NAMES)}")
    module, _, attr = CATALOG[name].partition(":")
    return getattr(import_module(module), attr)


def create(name: str, **options):
    """Build a method by name with its options; unknown names and options are clear errors."""
    cls = method_class(name)
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(f"method {name!r}: {err}") from err
