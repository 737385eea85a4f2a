"""Registered CTM variants with the official tasks' defaults: parity and sorting."""

from __future__ import annotations

from typing import Any


from biozoo._core import DataSpec

from .._registry import register_model
from ..errors import SpecError
from .model import ContinuousThoughtMachine


# --- Registered variants -------------------------------------------------------------------------------------------

@register_model
def ctm_parity(seq_len: int = 16, iterations: int = 20, d_model: int = 128, d_input: int = 64, heads: int = 4,
               n_synch_out: int = 32, n_synch_action: int = 32, synapse_depth: int = 1, memory_length: int = 8,
               deep_nlms: bool = True, memory_hidden_dims: int = 8, dropout: float = 0.0,
               neuron_select_type: str = "random-pairing", n_random_pairing_self: int = 0) -> ContinuousThoughtMachine:
    """The parity CTM (official parity task): +-1 token embeddings, 1-D rotational positions, one (L, 2) output.
    Defaults are the small model of configs/ctm/parity16.yaml; the paper's parity-64 used d_model 1024, d_input
    512, 8 heads, 75 ticks, memory 25, `random` pairing (configs/ctm/parity64.yaml)."""
    return ContinuousThoughtMachine(iterations, d_model, d_input, heads, n_synch_out, n_synch_action, synapse_depth,
                                    memory_length, deep_nlms, memory_hidden_dims, False, "parity_backbone",
                                    "custom-rotational-1d", 2 * seq_len, [seq_len, 2], dropout, None,
                                    neuron_select_type, n_random_pairing_self)


@register_model
def ctm_sort(d_input: int = 30, out_dims: int | None = None, iterations: int = 50, d_model: int = 512,
             n_synch_out: int = 32, synapse_depth: int = 4, memory_length: int = 25, deep_nlms: bool = True,
             memory_hidden_dims: int = 4, dropout: float = 0.0, neuron_select_type: str = "random-pairing",
             n_random_pairing_self: int = 0) -> ContinuousThoughtMachine:
    """The sorting CTM (official `ContinuousThoughtMachineSORT`, argparse defaults): no attention and no action
    synchronisation; the raw N values (`d_input`) enter the synapses every tick; N + 1 outputs, the last the CTC
    blank. Train with `loss: ctm_ctc`."""
    return ContinuousThoughtMachine(iterations, d_model, d_input, 0, n_synch_out, 0, synapse_depth, memory_length,
                                    deep_nlms, memory_hidden_dims, False, "none", "none",
                                    out_dims or d_input + 1, [-1], dropout, None, neuron_select_type,
                                    n_random_pairing_self)


def _parity_spec(spec: DataSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
    if not spec.extras.get("binary_tokens"):
        raise SpecError(f"ctm_parity cannot take {spec.describe_input()}: it reads +-1 tokens (L,) through the "
                        "parity embedding")
    if spec.classes != 2 or spec.positions != spec.shape[:1]:
        raise SpecError(f"ctm_parity cannot predict {spec.describe_target()}: it predicts 2 classes at every position")
    return {"seq_len": spec.shape[0], **kwargs}


def _sort_spec(spec: DataSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"d_input": spec.in_features, "out_dims": spec.extras.get("out_dims", spec.out_dims), **kwargs}


ctm_parity.reads, ctm_parity.spec_kwargs = ("sequence",), _parity_spec
ctm_sort.reads, ctm_sort.spec_kwargs = ("features",), _sort_spec


__all__ = ["ctm_parity", "ctm_sort"]
