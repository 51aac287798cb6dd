"""Pruning methods, found by name through the registry."""

from compression.methods import magnitude, sparsegpt, wanda  # noqa: F401  (registers the methods)
from compression.methods.base import REGISTRY, Method, create, method_names

__all__ = ["REGISTRY", "Method", "create", "method_names"]
