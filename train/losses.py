"""Pluggable losses for the shared tasks.

A loss takes the model's output and the target and returns a `LossOutput`: the scalar to minimise and the
logits that the metrics should score, (B, C) for classification or (B, C, L) for per-position targets. Models
that return richer results (the CTM's per-tick predictions and certainties) register a loss that picks the
logits to score, so one SupervisedTask serves every model. Called with `target=None` (prediction), a loss returns a zero
loss and the logits.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F

from biozoo.models._registry import suggest
from biozoo.models.errors import BiozooError, UnknownNameError


class LossOutput(NamedTuple):
    loss: torch.Tensor
    logits: torch.Tensor  # what the metrics score: class logits, or the prediction for regression
    extras: dict[str, torch.Tensor] = {}


LossFn = Callable[..., LossOutput]
_losses: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    def wrap(fn: LossFn) -> LossFn:
        if name in _losses:
            raise BiozooError(f"loss {name!r} is already registered")
        _losses[name] = fn
        return fn

    return wrap


def get_loss(name: str) -> LossFn:
    if name not in _losses:
        raise UnknownNameError(f"unknown loss {name!r}.{suggest(name, list(_losses))} Known: {', '.join(sorted(_losses))}")
    return _losses[name]


def list_losses() -> list[str]:
    return sorted(_losses)


@register_loss("cross_entropy")
def cross_entropy(output: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
                  ignore_index: int = -100, **_: Any) -> LossOutput:
    """Classification, (B, C) vs (B,), or per position, (B, C, L) vs (B, L)."""
    if target is None:
        return LossOutput(output.new_zeros(()), output)
    return LossOutput(F.cross_entropy(output, target, label_smoothing=label_smoothing, ignore_index=ignore_index), output)


@register_loss("mse")
def mse(output: torch.Tensor, target: torch.Tensor, **_: Any) -> LossOutput:
    if target is None:
        return LossOutput(output.new_zeros(()), output)
    return LossOutput(F.mse_loss(output, target.to(output.dtype)), output)
