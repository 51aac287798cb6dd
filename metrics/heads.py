"""The output head applied to captured hidden states, so callers compute logits only where and when they need them."""

from __future__ import annotations

import weakref

import torch

_MATCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> whether its head can be run apart


class _Stop(Exception):
    """Ends a forward pass at the output head once its input is captured."""


def head_inputs(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """The hidden states the output head would read, without computing the full-vocabulary logits."""
    seen: list[torch.Tensor] = []

    def grab(_module, args):
        seen.append(args[0])
        raise _Stop

    handle = model.get_output_embeddings().register_forward_pre_hook(grab)
    try:
        model(input_ids=ids, **{"use_cache": False, **kwargs})
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


class HeadTap:
    """While entered, keeps in `last` the output head's input at the last position of the model's latest forward
    pass, so a caller that runs the model for its logits also gets the hidden states behind them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.head, self.last, self._handle = model.get_output_embeddings(), None, None

    def _grab(self, _module, args) -> None:
        self.last = args[0][:, -1].clone()

    def __enter__(self) -> "HeadTap":
        self._handle = self.head.register_forward_pre_hook(self._grab)
        return self

    def __exit__(self, *_exc) -> None:
        self._handle.remove()


def chunked_head_matches(model: torch.nn.Module, ids: torch.Tensor) -> bool:
    """Whether applying the output head to captured hidden states reproduces the model's own logits (false for
    models that post-process logits, e.g. soft-capping); checked once per model on a few tokens (a property of its
    forward code, not of its weights)."""
    known = _MATCHES.get(model)
    if known is None:
        probe = ids[:1, :8]
        expected = model(input_ids=probe, use_cache=False).logits.float()
        ours = model.get_output_embeddings()(head_inputs(model, probe)).float()
        known = _MATCHES[model] = ours.shape == expected.shape and torch.allclose(ours, expected, rtol=1e-4,
                                                                                   atol=1e-4)
    return known
