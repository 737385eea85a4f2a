"""Pluggable losses for the shared tasks.

A loss takes the model's `ModelOutput` and the target and returns a `LossOutput`: the scalar to minimise and the
logits that the metrics should score, (B, C) for classification or (B, C, *positions) for per-position targets.
Losses read only `ModelOutput` fields: `.logits`, and for the tick losses (`ctm`, `ctm_maze`, `ctm_ctc`,
`ctm_qamnist`) `.per_tick()`, which reads a model without ticks as one tick, so an MLP, an LSTM and a CTM train
with the same loss. Called with `target=None` (prediction), a loss returns a zero loss and the logits.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F

from biozoo._core import BiozooError, ModelOutput, UnknownNameError, as_output, suggest


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
def cross_entropy(output: ModelOutput, target: torch.Tensor, label_smoothing: float = 0.0,
                  ignore_index: int = -100, class_weights: list[float] | None = None, **_: Any) -> LossOutput:
    """Classification, (B, C) vs (B,), or per position, (B, C, *P) vs (B, *P). Steps labelled `ignore_index` are
    masked; `class_weights` weigh each step by its label (e.g. NeuroGym's fixation steps down), the mean is over
    the weights."""
    output = as_output(output).logits
    if target is None:
        return LossOutput(output.new_zeros(()), output)
    weight = label_weights(class_weights, output)
    return LossOutput(F.cross_entropy(output, target, weight=weight, label_smoothing=label_smoothing,
                                      ignore_index=ignore_index), output)


def label_weights(class_weights: list[float] | None, logits: torch.Tensor) -> torch.Tensor | None:
    """`class_weights` as a tensor of one weight per class (None stays None), checked against the logits."""
    if class_weights is None:
        return None
    if len(class_weights) != logits.shape[1]:
        raise BiozooError(f"class_weights has {len(class_weights)} weights for {logits.shape[1]} classes")
    return torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)


@register_loss("mse")
def mse(output: ModelOutput, target: torch.Tensor, **_: Any) -> LossOutput:
    output = as_output(output).logits
    if target is None:
        return LossOutput(output.new_zeros(()), output)
    if target.shape != output.shape and target.dim() == output.dim() > 2:  # (B, *P, D) targets, (B, D, *P) logits
        target = target.movedim(-1, 1)
    return LossOutput(F.mse_loss(output, target.to(output.dtype)), output)


# --- the tick losses' shared parts (the CTM's; a model without ticks reads as one tick) ---------------------------


def at_ticks(ticks_logits: torch.Tensor, ticks: torch.Tensor) -> torch.Tensor:
    """(B, C, *P, T) at one tick per sample (B,) -> (B, C, *P)."""
    return ticks_logits[torch.arange(len(ticks), device=ticks.device), ..., ticks]


def tick_losses(ticks_logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy per sample and tick (B, T), averaged over the positions that count: (B, C, *P, T) vs
    (B, *P). Positions labelled `ignore_index` are left out of the mean (not averaged in as zeros); `weight` (C,)
    weighs each position by its label."""
    if target.shape[1:] != ticks_logits.shape[2:-1]:
        raise BiozooError(f"targets {tuple(target.shape)} do not match the model's per-tick logits "
                          f"{tuple(ticks_logits.shape)} (B, C, *positions, T)")
    ticks = ticks_logits.shape[-1]
    ce = F.cross_entropy(ticks_logits, target.unsqueeze(-1).expand(*target.shape, ticks), weight=weight,
                         ignore_index=ignore_index, reduction="none")  # (B, *P, T), weighted, 0 where ignored
    if ce.dim() == 2:
        return ce
    valid = target != ignore_index
    w = valid.to(ce.dtype) if weight is None else torch.where(valid, weight[target.clamp(min=0)], 0).to(ce.dtype)
    w = w.flatten(1)  # (B, P)
    return ce.flatten(1, -2).sum(1) / w.sum(1, keepdim=True).clamp(min=torch.finfo(ce.dtype).tiny)


def chosen_ticks(certainties: torch.Tensor, use_most_certain: bool = True) -> torch.Tensor:
    """(B,) the most certain tick per sample, or the last."""
    certain = certainties[:, 1].argmax(-1)
    return certain if use_most_certain else torch.full_like(certain, certainties.shape[-1] - 1)


def min_and_certain(losses: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The official CTM objective: the mean of the loss at each sample's min-loss tick and at its chosen tick."""
    rows = torch.arange(losses.shape[0], device=losses.device)
    return ((losses[rows, losses.argmin(1)] + losses[rows, chosen]) / 2).mean()
