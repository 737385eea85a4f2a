"""The CTM (`ctm`) and its tick-driven LSTM baseline (`ctm_lstm`): the recurrence over ticks of Darlow et al. 2025,
section 3 (see biozoo.models.ctm for the equations and the differences from the official code)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from biozoo._core import DataSpec, ModelOutput, classes_first

from .._registry import register_model
from ..errors import BiozooError, check_choice
from .blocks import (HALT_ON, NEURON_SELECT_TYPES, FusedNLM, NeuronLevelModels, Neurons, SynapseOutput,
                     TickedModelBase, attend, attend_projected, attention_memory, make_synapses, out_projection,
                     query_projection, sample_synch_neurons, synch_pairs, synch_representation_size)


# --- The model ---------------------------------------------------------------------------------------------------

@dataclass(repr=False)
class CTMOutput(ModelOutput):
    """A `ModelOutput` with the official fields. `predictions` (B, out_dims, T) flat as the official forward returns
    them; `logits` (B, C, *positions) at each sample's most certain (or halting) tick and `ticks_logits`
    (B, C, *positions, T) are the same numbers in the shared layout (positions from `prediction_reshaper`).
    `certainties` (B, 2, T), `certainties` (B, 2, T) = [normalised entropy, 1 - it] per tick,
    `synchronisation` (B, S_out) (the last tick's, or at the halting tick). Iterating yields these three, like
    the official forward. `ticks` (B,): ticks each sample used (set when halting). With track=True: per-tick
    tensors (T, B, ...) of pre-/post-activations, attention weights (T, B, heads, 1, L), both synchronisations,
    and `token_shape`, the spatial shape of the attended feature map. Halted samples read NaN in the tracking."""

    predictions: torch.Tensor
    certainties: torch.Tensor
    synchronisation: torch.Tensor
    ticks: torch.Tensor | None = None
    pre_activations: torch.Tensor | None = None
    post_activations: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    synch_out: torch.Tensor | None = None
    synch_action: torch.Tensor | None = None
    token_shape: tuple[int, ...] | None = None
    prediction_reshaper: list[int] | None = None
    readout: str = "certain"  # which tick `.logits` reads: the most certain (the official answer) or the last

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.predictions, self.certainties, self.synchronisation))

    def most_certain_tick(self) -> torch.Tensor:
        """(B,) index of the tick each answer is read at: the most certain tick (the official choice), or, for a
        sample that halted before the last tick, its halting tick."""
        certain = self.certainties[:, 1].argmax(-1)
        if self.ticks is None:
            return certain
        return torch.where(self.ticks < self.predictions.size(-1), self.ticks - 1, certain)

    def most_certain(self) -> torch.Tensor:
        """(B, out_dims) predictions at each sample's most certain (or halting) tick."""
        idx = self.most_certain_tick()
        return self.predictions[torch.arange(len(idx), device=idx.device), :, idx]

    def _positions(self) -> list[int]:
        r = self.prediction_reshaper
        if r and len(r) >= 2 and -1 not in r and math.prod(r) == self.predictions.size(1):
            return list(r[:-1])
        return []

    @property
    def ticks_logits(self) -> torch.Tensor:
        positions = self._positions()
        return classes_first(self.predictions, self.prediction_reshaper[-1], positions) if positions \
            else self.predictions

    @property
    def logits(self) -> torch.Tensor:
        positions = self._positions()
        flat = self.most_certain() if self.readout == "certain" else self.predictions[..., -1]
        return classes_first(flat, self.prediction_reshaper[-1], positions) if positions else flat

    @property
    def ticks_used(self) -> torch.Tensor | None:
        return self.ticks

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The official forward's (predictions, certainties, synchronisation)."""
        return self.predictions, self.certainties, self.synchronisation

    def tracked(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in ("pre_activations", "post_activations", "attention", "synch_out", "synch_action")
                and getattr(self, f.name) is not None}


class TickRecorder:
    """Per-tick outputs of the samples still running; halted samples keep their last (frozen) values."""

    def __init__(self, batch: int, ticks: int, track: bool):
        self.batch, self.ticks, self.track = batch, ticks, track
        self.buffers: dict[str, torch.Tensor] = {}

    def record(self, name: str, t: int, rows, value: torch.Tensor) -> None:
        if name not in self.buffers:
            self.buffers[name] = value.new_full((self.ticks, self.batch) + tuple(value.shape[1:]), float("nan"))
        self.buffers[name][t, rows] = value.detach()


@register_model(name="ctm")
class ContinuousThoughtMachine(TickedModelBase):
    """The CTM with the official constructor arguments (see the module docstring).

    Reads images, sequences, flat features and observation vectors (`spec_kwargs`). Extra arguments:
    `in_channels` (image channels read by the ResNet's 1x1 `initial_rgb`, or the token width for backbone
    'none'), `num_classes` (used as `out_dims` when that is None; filled in from the data). `halt_threshold` /
    `min_ticks` / `halt_on` set the default adaptive compute of `forward`; `readout` the tick `.logits` reads
    ("certain": the most certain, the official answer; "last": a policy's). `expand_range` records the input
    range the weights were trained on (the official maze flag: True [-1, 1], False [0, 1] as the legacy maze
    checkpoints); the forward does not read it, the maze data and evaluation do.
    """

    reads = ("image", "sequence", "features", "observation")
    predicts = ("classes", "discrete_actions", "continuous_actions")

    @classmethod
    def spec_kwargs(cls, spec: DataSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
        """TickedModelBase's, and as a policy (actions) the CTM answers at its last tick (`readout="last"`, as
        the official RL agent reads its last synchronisation): an action has no class entropy to be sure of."""
        derived = super().spec_kwargs(spec, kwargs)
        if spec.target in ("discrete_actions", "continuous_actions"):
            derived = {"readout": "last", **derived}
        return derived

    def __init__(self, iterations: int = 50, d_model: int = 512, d_input: int = 128, heads: int = 4,
                 n_synch_out: int = 64, n_synch_action: int = 64, synapse_depth: int = 1, memory_length: int = 10,
                 deep_nlms: bool = True, memory_hidden_dims: int = 16, do_layernorm_nlm: bool = False,
                 backbone_type: str = "resnet18-1", positional_embedding_type: str = "none",
                 out_dims: int | None = None, prediction_reshaper: Sequence[int] = (-1,), dropout: float = 0.0,
                 dropout_nlm: float | None = None, neuron_select_type: str = "random-pairing",
                 n_random_pairing_self: int = 0, in_channels: int | None = None, num_classes: int | None = None,
                 halt_threshold: float | None = None, min_ticks: int = 1, halt_on: str = "min",
                 readout: str = "certain", expand_range: bool = True):
        super().__init__()
        check_choice("neuron_select_type", neuron_select_type, NEURON_SELECT_TYPES)
        check_choice("halt_on", halt_on, HALT_ON)
        out_dims = out_dims if out_dims is not None else num_classes
        if out_dims is None:
            raise BiozooError("ctm needs out_dims (or num_classes)")
        if neuron_select_type == "first-last" and d_model < n_synch_out + n_synch_action:
            raise BiozooError(f"first-last needs d_model >= n_synch_out + n_synch_action, got {d_model} < "
                              f"{n_synch_out} + {n_synch_action}")
        if heads == 0 and backbone_type != "none":
            raise BiozooError("heads=0 (no attention: the input vector is fed every tick) needs backbone_type 'none'")
        self.iterations, self.d_model, self.d_input, self.heads = iterations, d_model, d_input, heads
        self.memory_length, self.out_dims = memory_length, out_dims
        self.n_synch_out, self.n_synch_action = n_synch_out, n_synch_action
        self.prediction_reshaper = list(prediction_reshaper)
        self.backbone_type, self.positional_embedding_type = backbone_type, positional_embedding_type
        self.neuron_select_type = neuron_select_type
        self.halt_threshold, self.min_ticks, self.halt_on = halt_threshold, min_ticks, halt_on
        check_choice("readout", readout, ("certain", "last"))
        self.readout, self.expand_range = readout, expand_range
        dropout_nlm = dropout if dropout_nlm is None else dropout_nlm

        self.build_input_stack(backbone_type, positional_embedding_type, in_channels)
        self.synch_representation_size_action = synch_representation_size(neuron_select_type, n_synch_action)
        self.synch_representation_size_out = synch_representation_size(neuron_select_type, n_synch_out)
        if heads:
            self.q_proj = nn.Linear(self.synch_representation_size_action, d_input)
            self.attention = nn.MultiheadAttention(d_input, heads, dropout, batch_first=True)
        self.synapses = make_synapses(synapse_depth, d_input + d_model, d_model, dropout)
        self.neurons = Neurons()  # z each tick: where augmenters act on the neurons themselves
        self.synapse_output = SynapseOutput()  # a each tick (TauGate's optional synapse-output gate)
        self.trace_processor = NeuronLevelModels(d_model, memory_length, deep_nlms, memory_hidden_dims,
                                                 do_layernorm_nlm, dropout_nlm)
        bound_z, bound_trace = math.sqrt(1 / d_model), math.sqrt(1 / (d_model + memory_length))
        self.start_activated_state = nn.Parameter(torch.empty(d_model).uniform_(-bound_z, bound_z))
        self.start_trace = nn.Parameter(torch.empty(d_model, memory_length).uniform_(-bound_trace, bound_trace))
        synch_types = (("action", n_synch_action), ("out", n_synch_out)) if self.synch_representation_size_action \
            else (("out", n_synch_out),)
        for kind, n in synch_types:
            left, right = sample_synch_neurons(neuron_select_type, kind, d_model, n, n_random_pairing_self)
            self.register_buffer(f"{kind}_neuron_indices_left", left)
            self.register_buffer(f"{kind}_neuron_indices_right", right)
            size = synch_representation_size(neuron_select_type, n)
            self.register_parameter(f"decay_params_{kind}", nn.Parameter(torch.zeros(size)))
        self.output_projector = nn.Sequential(nn.Linear(self.synch_representation_size_out, out_dims))

    # The synchronisation of both kinds as one recurrence over concatenated pairs: out first, then action.
    def _synch_setup(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kinds = ["out"] + (["action"] if self.synch_representation_size_action else [])
        with torch.no_grad():  # the official in-place clamp: keeps the decays in [0, 15] and their gradients alive
            for kind in kinds:
                getattr(self, f"decay_params_{kind}").clamp_(0, 15)
        lefts, rights, decays = [], [], []
        for kind in kinds:
            left, right = synch_pairs(self.neuron_select_type, getattr(self, f"{kind}_neuron_indices_left"),
                                      getattr(self, f"{kind}_neuron_indices_right"))
            lefts.append(left)
            rights.append(right)
            decays.append(getattr(self, f"decay_params_{kind}"))
        return torch.cat(lefts), torch.cat(rights), torch.exp(-torch.cat(decays))

    def forward_reference(self, x: torch.Tensor) -> CTMOutput:
        """The paper's equations tick by tick (section 3; the module docstring's block), with none of `forward`'s
        fusions: plain nn.MultiheadAttention, one recurrence per synchronisation kind, the output projection and
        certainty inside the loop. For reading; `forward` is tested equal to it."""
        if not self.heads and x.dim() > 2:
            x = x.flatten(1)
        B, T = x.size(0), self.iterations
        kv = self.compute_features(x)[0] if self.heads else None  # KV(backbone(x)): (B, L, d_input)
        z = self.start_activated_state.expand(B, -1)  # z^0
        A = self.start_trace.expand(B, -1, -1)  # the last M pre-activations (B, D, M)
        synch = {}
        for kind in ("action", "out") if self.heads else ("out",):
            i, j = synch_pairs(self.neuron_select_type, getattr(self, f"{kind}_neuron_indices_left"),
                               getattr(self, f"{kind}_neuron_indices_right"))
            r = torch.exp(-getattr(self, f"decay_params_{kind}").clamp(0, 15))
            synch[kind] = [i, j, r, z[:, i] * z[:, j], torch.ones_like(r)]  # pairs, decay, alpha, beta
        predictions, certainties = [], []
        for _ in range(T):
            if self.heads:
                _, _, _, alpha, beta = synch["action"]
                q = self.q_proj(alpha / torch.sqrt(beta))  # q^t = W_q S_action^t
                o = self.attention(q.unsqueeze(1), kv, kv, need_weights=False)[0][:, 0]  # o^t
            else:
                o = x  # no attention: the input vector every tick
            a = self.synapse_output(self.synapses(torch.cat([o, z], -1)))  # Eq. 1: a^t = f_synapse([o^t, z^t])
            A = torch.cat([A[:, :, 1:], a.unsqueeze(-1)], -1)  # A^t: FIFO of the last M
            z = self.neurons(self.trace_processor(A))  # Eq. 3: z^{t+1}_d = g_d(A^t_d)
            for entry in synch.values():  # alpha = r alpha + z_i z_j, beta = r beta + 1
                i, j, r, alpha, beta = entry
                entry[3], entry[4] = r * alpha + z[:, i] * z[:, j], r * beta + 1
            _, _, _, alpha, beta = synch["out"]
            y = self.output_projector(alpha / torch.sqrt(beta)).float()  # y^t = W_out S_out^t
            predictions.append(y)
            certainties.append(self.certainty(y))
        return CTMOutput(torch.stack(predictions, -1), torch.stack(certainties, -1), alpha / torch.sqrt(beta),
                         prediction_reshaper=self.prediction_reshaper)

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The learned start (z^0 (B, D), trace (B, D, M)): the recurrent protocol of `biozoo._core`, so a CTM
        policy thinks on from where the previous env step left it."""
        z = self.start_activated_state.to(device).unsqueeze(0).expand(batch_size, -1)
        return z, self.start_trace.to(device).unsqueeze(0).expand(batch_size, -1, -1)

    def forward(self, x: torch.Tensor, track: bool = False, halt_threshold: float | None = None,
                min_ticks: int | None = None, halt_on: str | None = None,
                state: tuple[torch.Tensor, torch.Tensor] | None = None) -> CTMOutput:
        """Run the ticks. `halt_threshold` (default: the model's): per-sample early exit once the certainty
        (`halt_on`: "min" or "mean" over positions) reaches it and at least `min_ticks` ticks ran. `state`: start
        from (z, trace) of an earlier call (`.state` of its output) instead of the learned start; the
        synchronisation restarts from that z, as it does from the start state."""
        if not self.heads and x.dim() > 2:  # flat features that arrive with a shape (an image's pixels)
            x = x.flatten(1)
        self.check_input(x)
        halt_threshold = self.halt_threshold if halt_threshold is None else halt_threshold
        min_ticks = self.min_ticks if min_ticks is None else min_ticks
        halt_on = self.halt_on if halt_on is None else halt_on
        check_choice("halt_on", halt_on, HALT_ON)
        if state is not None and halt_threshold is not None:
            raise BiozooError("a carried state and adaptive halting do not combine (halted samples stop early)")
        B, T, D = x.size(0), self.iterations, self.d_model
        S_out = self.synch_representation_size_out
        halting = halt_threshold is not None

        token_shape = None
        if self.heads:
            kv, token_shape = self.compute_features(x)
            keys, values = attention_memory(self.attention, kv)
            query = query_projection(self.q_proj, self.attention)
            out_proj = out_projection(self.attention)
        else:
            inputs = x.flatten(1)
        pair_left, pair_right, r = self._synch_setup()
        pair_both, n_pairs = torch.cat((pair_left, pair_right)), len(pair_left)
        synapses = self.synapses.per_tick() if hasattr(self.synapses, "per_tick") else self.synapses
        nlm_fused = self.trace_processor.fused_weights()  # FusedNLM where it applies
        nlm_weights = self.trace_processor.neuron_major_weights() if nlm_fused is None else None
        if state is None:
            z = self.start_activated_state.unsqueeze(0).expand(B, D)
            trace = self.start_trace.unsqueeze(1).expand(D, B, self.memory_length)  # neuron-major (D, B, M)
        else:
            z, trace = state[0], state[1].transpose(0, 1)
        alpha = z[:, pair_left] * z[:, pair_right]  # the start state opens both synchronisations
        beta = torch.ones_like(r)
        synch_action = alpha[:, S_out:] / torch.sqrt(beta[S_out:])

        rows = slice(None)  # the samples still thinking (all of them unless halting)
        active = torch.arange(B, device=x.device)
        recorder = TickRecorder(B, T, track)
        synchs_out: list[torch.Tensor] = []
        ticks = torch.full((B,), T, dtype=torch.long, device=x.device)
        if halting:
            predictions = x.new_zeros(B, self.out_dims, T, dtype=torch.float32)
            certainties = x.new_zeros(B, 2, T, dtype=torch.float32)
            synch_final = x.new_zeros(B, S_out, dtype=torch.float32)

        for t in range(T):
            if self.heads:
                if track:
                    recorder.record("synch_action", t, rows, synch_action)
                features, attn_weights = attend_projected(self.attention, query(synch_action), keys, values,
                                                          out_proj)
            else:
                features = inputs
            pre = self.synapse_output(synapses(torch.cat((features, z), -1)))
            trace = torch.cat((trace[:, :, 1:], pre.t().unsqueeze(-1)), -1)
            z = FusedNLM.apply(trace, *nlm_fused) if nlm_fused is not None else \
                self.trace_processor.forward_neuron_major(trace, nlm_weights)
            z = self.neurons(z.t())
            pairs = z.index_select(1, pair_both)  # one gather (and one index_add backward) for both sides
            alpha = r * alpha + pairs[:, :n_pairs] * pairs[:, n_pairs:]
            beta = r * beta + 1
            synch = alpha / torch.sqrt(beta)
            synch_out, synch_action = synch[:, :S_out], synch[:, S_out:]
            if track:
                recorder.record("pre_activations", t, rows, pre)
                recorder.record("post_activations", t, rows, z)
                recorder.record("synch_out", t, rows, synch_out)
                if self.heads:
                    recorder.record("attention", t, rows, attn_weights)
            if not halting:
                synchs_out.append(synch_out)
                continue
            prediction = self.output_projector(synch_out).float()
            certainty = self.certainty(prediction)
            predictions[active, :, t:] = prediction.unsqueeze(-1)  # frozen for later ticks unless overwritten
            certainties[active, :, t:] = certainty.unsqueeze(-1)
            synch_final[active] = synch_out.float()
            done = self.halting_certainty(prediction, certainty, halt_on) >= halt_threshold
            if t + 1 < min_ticks or not bool(done.any()):
                continue
            ticks[active[done]] = t + 1
            keep = ~done
            if not bool(keep.any()):
                break
            active, rows = active[keep], active[keep]
            z, trace, alpha = z[keep], trace[:, keep], alpha[keep]
            synch_action = synch_action[keep]
            if self.heads:
                keys, values = keys[keep], values[keep]
            else:
                inputs = inputs[keep]

        if not halting:
            stacked = torch.stack(synchs_out)  # (T, B, S)
            flat_predictions = self.output_projector(stacked).float()
            certainty = self.certainty(flat_predictions.flatten(0, 1)).view(T, B, 2)
            predictions, certainties = flat_predictions.permute(1, 2, 0), certainty.permute(1, 2, 0)
            synch_final = synchs_out[-1]
        out = CTMOutput(predictions, certainties, synch_final, ticks if halting else None, token_shape=token_shape,
                        prediction_reshaper=self.prediction_reshaper, readout=self.readout)
        if not halting:
            out.state = (z, trace.transpose(0, 1))
        for name, value in recorder.buffers.items():
            setattr(out, name, value)
        return out


@register_model(name="ctm_lstm")
class LSTMBaseline(TickedModelBase):
    """The official tick-driven LSTM baseline: the same backbone, kv tokens and attention as the CTM, but the query
    comes from the LSTM's last hidden state and the attention output is the LSTM's input at every tick; the
    prediction is a linear read-out of the hidden state. Returns a `CTMOutput` (its `synchronisation` is the last
    hidden state; with track=True `post_activations` are the hidden states). Train it with `loss: ctm` and
    `loss_kwargs: {use_most_certain: false}` (the last tick, as the official baselines)."""

    def __init__(self, iterations: int = 50, d_model: int = 512, d_input: int = 128, heads: int = 4,
                 backbone_type: str = "resnet18-1", num_layers: int = 1, positional_embedding_type: str = "none",
                 out_dims: int | None = None, prediction_reshaper: Sequence[int] = (-1,), dropout: float = 0.0,
                 in_channels: int | None = None, num_classes: int | None = None):
        super().__init__()
        out_dims = out_dims if out_dims is not None else num_classes
        if out_dims is None:
            raise BiozooError("ctm_lstm needs out_dims (or num_classes)")
        if heads < 1:
            raise BiozooError("ctm_lstm attends over the input: heads must be >= 1")
        self.iterations, self.d_model, self.d_input, self.heads = iterations, d_model, d_input, heads
        self.out_dims, self.prediction_reshaper = out_dims, list(prediction_reshaper)
        self.backbone_type = backbone_type
        self.build_input_stack(backbone_type, positional_embedding_type, in_channels)
        self.lstm = nn.LSTM(d_input, d_model, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0)
        self.q_proj = nn.Linear(d_model, d_input)
        self.attention = nn.MultiheadAttention(d_input, heads, dropout, batch_first=True)
        self.output_projector = nn.Sequential(nn.Linear(d_model, out_dims))
        bound = math.sqrt(1 / d_model)
        self.start_hidden_state = nn.Parameter(torch.empty(num_layers, d_model).uniform_(-bound, bound))
        self.start_cell_state = nn.Parameter(torch.empty(num_layers, d_model).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, track: bool = False, **_: Any) -> CTMOutput:
        self.check_input(x)
        B, T = x.size(0), self.iterations
        kv, token_shape = self.compute_features(x)
        keys, values = attention_memory(self.attention, kv)
        h = self.start_hidden_state.unsqueeze(1).expand(-1, B, -1).contiguous()
        c = self.start_cell_state.unsqueeze(1).expand(-1, B, -1).contiguous()
        recorder = TickRecorder(B, T, track)
        hiddens = []
        for t in range(T):
            attn_out, weights = attend(self.attention, self.q_proj(h[-1]), keys, values)
            out, (h, c) = self.lstm(attn_out.unsqueeze(1), (h, c))
            hiddens.append(out[:, 0])
            if track:
                recorder.record("post_activations", t, slice(None), out[:, 0])
                recorder.record("attention", t, slice(None), weights)
        predictions = self.output_projector(torch.stack(hiddens)).float()  # (T, B, out)
        certainties = self.certainty(predictions.flatten(0, 1)).view(T, B, 2)
        result = CTMOutput(predictions.permute(1, 2, 0), certainties.permute(1, 2, 0), hiddens[-1],
                           token_shape=token_shape, prediction_reshaper=self.prediction_reshaper)
        for name, value in recorder.buffers.items():
            setattr(result, name, value)
        return result


__all__ = ["CTMOutput", "TickRecorder", "ContinuousThoughtMachine", "LSTMBaseline"]
