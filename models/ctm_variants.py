"""Task variants of the Continuous Thought Machine (arXiv 2505.05522): QA-MNIST and reinforcement learning.

Both reuse the blocks of `biozoo.models.ctm` (synapses, neuron-level models, synchronisation pairs, attention with
K/V computed once per input) and follow the official subclasses at commit aecfb63.

`ctm_qamnist` (official `ContinuousThoughtMachineQAMNIST`, section 7): per-tick input switching. With
Td = digit frames, Tq = question tokens and A = `iterations_for_answering`, the forward runs Td + Tq + A ticks:
- digit ticks attend (query from the action synchronisation) over the tokens of a small CNN on the current digit
  (`backbone_digit`: two conv-BN-ReLU-maxpool blocks, then `kv_proj`); the K/V are recomputed only when the
  frame changes, as the official code caches them;
- question ticks feed an embedding straight into the synapses, no attention: a fixed sinusoidal embedding of the
  digit index (`index_backbone`), or a learned embedding of the operator (`operator_backbone`, tokens -1 = '+',
  -2 = '-'); which one follows the tick's position in the question, parts of `iterations_per_question_part`;
- answer ticks feed zeros. The loss reads the last A ticks (`CTMOutput.answer_ticks`).

`ctm_rl` (official `ContinuousThoughtMachineRL`, section 8): no attention and no action synchronisation; the
observation goes through `backbone` and is fed every tick: two Linear-GLU-LayerNorm blocks for classic control, or
for MiniGrid's symbolic view (`navigation-backbone`: a (grid, grid, 3) grid of object, colour and state ids, read
flat as the registered `biozoo/MiniGrid-*` envs give it) an embedding per id and per cell position projected to
d_input per cell by the same two blocks, all cells fed;
the synapses are two GLU blocks at depth 1. The recurrent state carried across environment steps is
(pre-activation trace (B, D, M), post-activation window (B, D, M)): the window of the last M post-activations
slides over ticks *and* environment steps, starting from the learned `start_activated_trace`. The output
synchronisation is computed from that window explicitly (first-last: the last `n_synch_out` neurons, dense upper
triangle), S_ij = sum_k w_k z_i^k z_j^k / sqrt(sum_k w_k) with w_k = exp(-clamp(decay, 0, 4) * age_k). There is no
output projector: actor and critic heads read the synchronisation (`CTMActorCritic`, the official PPO agent's
64-64 MLPs with orthogonal init).

Differences from the official code: no lazy layers (input widths are arguments: `in_channels` for the digit
images, `obs_dim` for the observations); `ctm_qamnist` has no adaptive halting (the answer ticks are fixed);
`track=True` returns tensors.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from biozoo._core import DataSpec, ModelOutput

from ._hub import PretrainedMixin
from ._registry import register_model
from .ctm import ContinuousThoughtMachine, CTMOutput, TickRecorder, attend, attention_memory
from .ctm.blocks import make_synapses
from .errors import BiozooError, check_choice, check_shape


# --- QA-MNIST blocks -------------------------------------------------------------------------------------------

class MNISTBackbone(nn.Module):
    """Official `MNISTBackbone`: [conv3x3 -> BN -> ReLU -> maxpool 2] x 2, d_input channels; 32x32 -> 8x8 tokens."""

    def __init__(self, d_input: int, in_channels: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, d_input, 3, 1, 1), nn.BatchNorm2d(d_input), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(d_input, d_input, 3, 1, 1), nn.BatchNorm2d(d_input), nn.ReLU(), nn.MaxPool2d(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class QAMNISTIndexEmbeddings(nn.Module):
    """Fixed sinusoidal embedding of a digit index (the transformer's positional code), max 50 indices."""

    def __init__(self, max_seq_length: int, embedding_dim: int):
        super().__init__()
        position = torch.arange(max_seq_length, dtype=torch.float32).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, embedding_dim, 2).float() * (-math.log(10000.0) / embedding_dim))
        embedding = torch.zeros(max_seq_length, embedding_dim)
        embedding[:, 0::2] = torch.sin(position * div_term)
        embedding[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("embedding", embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding[x]


class QAMNISTOperatorEmbeddings(nn.Module):
    """Learned embedding of an operator token: -1 ('+') -> row 0, -2 ('-') -> row 1."""

    def __init__(self, num_operator_types: int, d_projection: int):
        super().__init__()
        self.embedding = nn.Embedding(num_operator_types, d_projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(-x - 1)


def synch_step(model: ContinuousThoughtMachine, features: torch.Tensor, z: torch.Tensor, trace: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One tick of synapses -> pre-activation FIFO -> NLMs: returns (pre (B, D), new trace (D, B, M), z (B, D))."""
    pre = model.synapse_output(model.synapses(torch.cat((features, z), -1)))
    trace = torch.cat((trace[:, :, 1:], pre.t().unsqueeze(-1)), -1)
    return pre, trace, model.neurons(model.trace_processor.forward_neuron_major(trace).t())


@register_model(name="ctm_qamnist")
class ContinuousThoughtMachineQAMNIST(ContinuousThoughtMachine):
    """The CTM with per-tick input switching for QA-MNIST (see the module docstring).

    Takes the official constructor arguments plus `in_channels` (digit image channels). `forward((digits,
    question))` or `forward(digits, question)`: digits (B, Td, C, H, W), question (B, Tq) int64.
    """

    reads, streams, predicts = ("tokens",), ("qamnist",), ("classes",)

    @classmethod
    def spec_kwargs(cls, spec: DataSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**spec.builder_kwargs(), "out_dims": spec.classes, **kwargs}

    def __init__(self, iterations: int = 1, d_model: int = 1024, d_input: int = 64, heads: int = 4,
                 n_synch_out: int = 32, n_synch_action: int = 32, synapse_depth: int = 1, memory_length: int = 3,
                 deep_nlms: bool = True, memory_hidden_dims: int = 16, do_layernorm_nlm: bool = False,
                 out_dims: int = 10, iterations_per_digit: int = 1, iterations_per_question_part: int = 1,
                 iterations_for_answering: int = 1, prediction_reshaper: Sequence[int] = (-1,), dropout: float = 0.0,
                 neuron_select_type: str = "first-last", n_random_pairing_self: int = 0, in_channels: int = 1):
        if not heads:
            raise BiozooError("ctm_qamnist attends over the digits: heads must be >= 1")
        super().__init__(iterations=iterations, d_model=d_model, d_input=d_input, heads=heads,
                         n_synch_out=n_synch_out, n_synch_action=n_synch_action, synapse_depth=synapse_depth,
                         memory_length=memory_length, deep_nlms=deep_nlms, memory_hidden_dims=memory_hidden_dims,
                         do_layernorm_nlm=do_layernorm_nlm, backbone_type="none", positional_embedding_type="none",
                         out_dims=out_dims, prediction_reshaper=prediction_reshaper, dropout=dropout,
                         neuron_select_type=neuron_select_type, n_random_pairing_self=n_random_pairing_self,
                         in_channels=d_input)  # kv_proj reads the digit CNN's d_input channels
        self.iterations_per_digit = iterations_per_digit
        self.iterations_per_question_part = iterations_per_question_part
        self.iterations_for_answering = iterations_for_answering
        self.image_channels = in_channels
        self.backbone_digit = MNISTBackbone(d_input, in_channels)
        self.index_backbone = QAMNISTIndexEmbeddings(50, d_input)
        self.operator_backbone = QAMNISTOperatorEmbeddings(2, d_input)

    def is_index_tick(self, question_tick: int) -> bool:
        return question_tick % (2 * self.iterations_per_question_part) < self.iterations_per_question_part

    def digit_tokens(self, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        features = self.backbone_digit(frame)
        keys, values = attention_memory(self.attention, self.kv_proj(features.flatten(2).transpose(1, 2)))
        return keys, values, tuple(features.shape[2:])

    def forward(self, x: Any, z: torch.Tensor | None = None, track: bool = False) -> CTMOutput:
        if z is None:
            if not isinstance(x, (tuple, list)) or len(x) != 2:
                raise BiozooError("ctm_qamnist takes (digits, question): digits (B, Td, C, H, W), question (B, Tq)")
            x, z = x
        name = type(self).__name__
        check_shape(name, x, f"digits (B, Td, {self.image_channels}, H, W)",
                    x.dim() == 5 and x.size(2) == self.image_channels)
        check_shape(name, z, f"question tokens (B, Tq) for {x.size(0)} samples", z.dim() == 2 and len(z) == len(x))
        B, Td, Tq, D = x.size(0), x.size(1), z.size(1), self.d_model
        T = Td + Tq + self.iterations_for_answering
        S_out = self.synch_representation_size_out

        pair_left, pair_right, r = self._synch_setup()
        state = self.start_activated_state.unsqueeze(0).expand(B, D)
        trace = self.start_trace.unsqueeze(1).expand(D, B, self.memory_length)
        alpha = state[:, pair_left] * state[:, pair_right]
        beta = torch.ones_like(r)
        synch_action = alpha[:, S_out:]
        recorder = TickRecorder(B, T, track)
        synchs_out, frame, token_shape = [], None, None
        for t in range(T):
            if t < Td:
                if frame is None or not torch.equal(x[:, t], frame):  # a new digit: new keys and values
                    frame = x[:, t]
                    keys, values, token_shape = self.digit_tokens(frame)
                features, weights = attend(self.attention, self.q_proj(synch_action), keys, values)
                if track:
                    recorder.record("attention", t, slice(None), weights)
            elif t < Td + Tq:
                token = z[:, t - Td]
                embed = self.index_backbone if self.is_index_tick(t - Td) else self.operator_backbone
                features = embed(token)
            else:
                features = state.new_zeros(B, self.d_input)
            pre, trace, state = synch_step(self, features, state, trace)
            alpha = r * alpha + state[:, pair_left] * state[:, pair_right]
            beta = r * beta + 1
            synch = alpha / torch.sqrt(beta)
            synch_out, synch_action = synch[:, :S_out], synch[:, S_out:]
            synchs_out.append(synch_out)
            if track:
                for key, value in (("pre_activations", pre), ("post_activations", state), ("synch_out", synch_out)):
                    recorder.record(key, t, slice(None), value)

        predictions = self.output_projector(torch.stack(synchs_out)).float()  # (T, B, out)
        certainties = self.certainty(predictions.flatten(0, 1)).view(T, B, 2)
        out = CTMOutput(predictions.permute(1, 2, 0), certainties.permute(1, 2, 0), synchs_out[-1],
                        token_shape=token_shape, prediction_reshaper=self.prediction_reshaper)
        out.answer_ticks = self.iterations_for_answering
        for key, value in recorder.buffers.items():
            setattr(out, key, value)
        return out


# --- Reinforcement learning ------------------------------------------------------------------------------------

class MiniGridBackbone(nn.Module):
    """Official navigation-backbone: MiniGrid's (B, grid, grid, 3) ids (object, colour, state), or the same read
    flat (B, grid * grid * 3), -> embeddings of each id and of the cell position (8 dims each, concatenated) ->
    [Linear(2 d_input) -> GLU -> LayerNorm] x 2 per cell -> (B, grid * grid * d_input)."""

    def __init__(self, d_input: int, grid_size: int = 7, num_objects: int = 11, num_colors: int = 6,
                 num_states: int = 3, embedding_dim: int = 8):
        super().__init__()
        self.grid_size = grid_size
        self.object_embedding = nn.Embedding(num_objects, embedding_dim)
        self.color_embedding = nn.Embedding(num_colors, embedding_dim)
        self.state_embedding = nn.Embedding(num_states, embedding_dim)
        self.position_embedding = nn.Embedding(grid_size * grid_size, embedding_dim)
        self.project_to_d_projection = nn.Sequential(nn.Linear(4 * embedding_dim, 2 * d_input), nn.GLU(),
                                                     nn.LayerNorm(d_input), nn.Linear(d_input, 2 * d_input), nn.GLU(),
                                                     nn.LayerNorm(d_input))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, g = x.size(0), self.grid_size
        ids = x.reshape(B, g * g, 3).long()
        cells = torch.arange(g * g, device=x.device).expand(B, -1)
        embedded = torch.cat([self.object_embedding(ids[..., 0]), self.color_embedding(ids[..., 1]),
                              self.state_embedding(ids[..., 2]), self.position_embedding(cells)], -1)
        return self.project_to_d_projection(embedded).flatten(1)


RL_BACKBONES = ("classic-control-backbone", "navigation-backbone")


class ClassicControlBackbone(nn.Module):
    """Official classic-control featuriser: Flatten, [Linear(2 d_input) -> GLU -> LayerNorm] x 2."""

    def __init__(self, obs_dim: int, d_input: int):
        super().__init__()
        self.input_projector = nn.Sequential(nn.Flatten(), nn.Linear(obs_dim, 2 * d_input), nn.GLU(),
                                             nn.LayerNorm(d_input), nn.Linear(d_input, 2 * d_input), nn.GLU(),
                                             nn.LayerNorm(d_input))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_projector(x)


def window_decay(length: int, params: torch.Tensor, limits: tuple[float, float] = (0.0, 4.0)) -> torch.Tensor:
    """(length, P) weights exp(-age * clamp(decay)), age = length-1 .. 0 (the newest entry weighs 1)."""
    age = torch.arange(length - 1, -1, -1, device=params.device, dtype=params.dtype).unsqueeze(1)
    return torch.exp(-age * params.clamp(*limits).unsqueeze(0))


@register_model(name="ctm_rl")
class ContinuousThoughtMachineRL(ContinuousThoughtMachine):
    """The CTM as a recurrent core for RL: `forward(obs, state)` -> ModelOutput (synchronisation (B, S), state).

    `state` = (pre-activation trace (B, D, M), post-activation window (B, D, M)); `initial_state(B)` gives the
    learned start. Official constructor arguments, plus `obs_dim` (observation size, linked from the env).
    A core without a readout: as a task's model use `ctm_rl_agent`, which adds the official actor and critic.
    `backbone_type="navigation-backbone"` reads MiniGrid's symbolic view of `grid_size` cells a side instead.
    """

    reads = ("observation",)
    predicts = ()  # synchronisation features only

    def __init__(self, iterations: int = 1, d_model: int = 128, d_input: int = 128, n_synch_out: int = 16,
                 synapse_depth: int = 1, memory_length: int = 10, deep_nlms: bool = True,
                 memory_hidden_dims: int = 4, do_layernorm_nlm: bool = False,
                 backbone_type: str = "classic-control-backbone", prediction_reshaper: Sequence[int] = (-1,),
                 dropout: float = 0.0, neuron_select_type: str = "first-last", obs_dim: int = 4,
                 grid_size: int = 7):
        check_choice("backbone_type", backbone_type, RL_BACKBONES)
        if neuron_select_type != "first-last":
            raise BiozooError(f"ctm_rl supports neuron_select_type 'first-last' only (as the official), "
                              f"got {neuron_select_type!r}")
        if d_model < n_synch_out:
            raise BiozooError(f"ctm_rl needs d_model >= n_synch_out, got {d_model} < {n_synch_out}")
        super().__init__(iterations=iterations, d_model=d_model, d_input=d_input, heads=0, n_synch_out=n_synch_out,
                         n_synch_action=0, synapse_depth=synapse_depth, memory_length=memory_length,
                         deep_nlms=deep_nlms, memory_hidden_dims=memory_hidden_dims,
                         do_layernorm_nlm=do_layernorm_nlm, backbone_type="none", positional_embedding_type="none",
                         out_dims=1, prediction_reshaper=prediction_reshaper, dropout=dropout,
                         neuron_select_type="first-last", in_channels=d_input)
        self.backbone_type, self.grid_size = backbone_type, grid_size
        if backbone_type == "navigation-backbone":
            self.obs_dim, features = grid_size * grid_size * 3, grid_size * grid_size * d_input
            self.backbone = MiniGridBackbone(d_input, grid_size)
        else:
            self.obs_dim, features = obs_dim, d_input
            self.backbone = ClassicControlBackbone(obs_dim, d_input)
        if synapse_depth == 1:  # the official RL synapses: two GLU blocks
            self.synapses = nn.Sequential(nn.Dropout(dropout), nn.Linear(features + d_model, 2 * d_model), nn.GLU(),
                                          nn.LayerNorm(d_model), nn.Linear(d_model, 2 * d_model), nn.GLU(),
                                          nn.LayerNorm(d_model))
        elif features != d_input:
            self.synapses = make_synapses(synapse_depth, features + d_model, d_model, dropout)
        self.output_projector = None
        del self.start_activated_state
        self.start_activated_state = None
        bound = math.sqrt(1 / (d_model + memory_length))
        self.start_activated_trace = nn.Parameter(torch.empty(d_model, memory_length).uniform_(-bound, bound))
        self.register_buffer("diagonal_mask_out", torch.triu(torch.ones(n_synch_out, n_synch_out, dtype=torch.bool)))

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-activation trace, post-activation window), each (B, D, M): the learned start."""
        return (self.start_trace.to(device).unsqueeze(0).expand(batch_size, -1, -1),
                self.start_activated_trace.to(device).unsqueeze(0).expand(batch_size, -1, -1))

    def synchronisation(self, window: torch.Tensor) -> torch.Tensor:
        """(B, D, M) post-activation window -> (B, n(n+1)/2) decayed synchronisation of the last n neurons."""
        last = window[:, -self.n_synch_out:]  # (B, n, M)
        i, j = torch.nonzero(self.diagonal_mask_out, as_tuple=True)
        decay = window_decay(window.size(-1), self.decay_params_out)  # (M, P)
        products = last.index_select(1, i) * last.index_select(1, j)  # (B, P, M)
        return (products * decay.t().unsqueeze(0)).sum(-1) / torch.sqrt(decay.sum(0)).unsqueeze(0)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None,
                track: bool = False) -> ModelOutput:
        """`.logits`: the output synchronisation (B, S) (features for a head, not classes); `.state` the next
        state; with `track`, extras "pre_activations" / "post_activations" (ticks, B, D)."""
        if self.backbone_type == "navigation-backbone":
            g = self.grid_size
            check_shape(type(self).__name__, x, f"(B, {g}, {g}, 3) or (B, {self.obs_dim}) MiniGrid ids",
                        x.shape[1:] in ((g, g, 3), (self.obs_dim,)))
        else:
            check_shape(type(self).__name__, x, f"(B, {self.obs_dim})", x.dim() == 2 and x.size(1) == self.obs_dim)
        trace, window = state if state is not None else self.initial_state(x.size(0), x.device)
        features = self.backbone(x)
        trace = trace.transpose(0, 1)  # neuron-major (D, B, M) for the NLMs
        pre_track, post_track = [], []
        for _ in range(self.iterations):
            pre, trace, z = synch_step(self, features, window[:, :, -1], trace)
            window = torch.cat((window[:, :, 1:], z.unsqueeze(-1)), -1)
            if track:
                pre_track.append(pre.detach())
                post_track.append(z.detach())
        extras = {"pre_activations": torch.stack(pre_track), "post_activations": torch.stack(post_track)} if track else {}
        return ModelOutput(self.synchronisation(window), state=(trace.transpose(0, 1), window), extras=extras)


def layer_init(layer: nn.Linear, std: float = float(np.sqrt(2)), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


def mlp_head(in_dims: int, out_dims: int, hidden: int = 64) -> nn.Sequential:
    """The official agent's heads: Linear-ReLU-Linear-ReLU-Linear, orthogonal init with gain 1."""
    return nn.Sequential(layer_init(nn.Linear(in_dims, hidden), 1.0), nn.ReLU(),
                         layer_init(nn.Linear(hidden, hidden), 1.0), nn.ReLU(),
                         layer_init(nn.Linear(hidden, out_dims), 1.0))


@register_model(name="ctm_rl_agent")
class CTMActorCritic(PretrainedMixin, nn.Module):
    """The official PPO agent around `ctm_rl`: actor (action logits) and critic (value) MLPs on the output
    synchronisation. Submodule names follow the official `Agent` (`recurrent_model`, `actor`, `critic`).

    `forward(obs, state=None)` -> ModelOutput: `.logits` the action logits (B, A), `.value` (B,), `.state`. The
    harness resets a row's state to the learned start (`initial_state`) when its episode begins.
    """

    reads = ("observation",)
    predicts = ("discrete_actions", "continuous_actions")
    has_value = True  # the critic is part of the agent: the harness adds none

    @classmethod
    def spec_kwargs(cls, spec: DataSpec, kwargs: dict) -> dict:
        grid = spec.extras.get("minigrid_view")  # (g, g, 3): MiniGrid's symbolic view, read flat
        if grid is not None:
            kwargs = {"backbone_type": "navigation-backbone", "grid_size": int(grid[0]), **kwargs}
        return {"obs_dim": spec.in_features, "num_actions": spec.classes, **kwargs}

    def __init__(self, obs_dim: int = 4, num_actions: int = 2, iterations: int = 1, d_model: int = 128,
                 d_input: int = 128, n_synch_out: int = 16, synapse_depth: int = 1, memory_length: int = 10,
                 deep_nlms: bool = True, memory_hidden_dims: int = 4, do_layernorm_nlm: bool = False,
                 dropout: float = 0.0, head_hidden: int = 64, backbone_type: str = "classic-control-backbone",
                 grid_size: int = 7):
        super().__init__()
        self.num_actions = num_actions
        self.recurrent_model = ContinuousThoughtMachineRL(
            iterations=iterations, d_model=d_model, d_input=d_input, n_synch_out=n_synch_out,
            synapse_depth=synapse_depth, memory_length=memory_length, deep_nlms=deep_nlms,
            memory_hidden_dims=memory_hidden_dims, do_layernorm_nlm=do_layernorm_nlm, dropout=dropout,
            obs_dim=obs_dim, backbone_type=backbone_type, grid_size=grid_size)
        size = self.recurrent_model.synch_representation_size_out
        self.actor = mlp_head(size, num_actions, head_hidden)
        self.critic = mlp_head(size, 1, head_hidden)

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return self.recurrent_model.initial_state(batch_size, device)

    def forward(self, obs: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModelOutput:
        core = self.recurrent_model(obs, state)
        synch = core.logits
        return ModelOutput(self.actor(synch), value=self.critic(synch).squeeze(-1), state=core.state)
