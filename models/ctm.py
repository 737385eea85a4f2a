"""Continuous Thought Machine (CTM): Darlow, Regan, Risi, Seely, Jones, arXiv 2505.05522 (NeurIPS 2025).

An internal recurrence over "ticks" t = 1..T, decoupled from the data. Per tick (paper section 3, official
`ContinuousThoughtMachine.forward` at commit aecfb63):

    S_action^t = synch(z^1..z^t)                      attention query q^t = W_q S_action^t
    o^t        = Attention(q^t, KV(backbone(x)))      one query token per tick, over the data's tokens
    a^t        = f_synapse([o^t, z^t])                Eq. 1 (GLU + LayerNorm at depth 1, a U-Net at depth > 1)
    A^t        = [a^{t-M+1}, ..., a^t]                 FIFO of the last M pre-activations (the "trace")
    z^{t+1}_d  = g_d(A^t_d)                           Eq. 3: a private MLP per neuron d (neuron-level models)
    S_out^t    = synch(z^1..z^{t+1})                  prediction y^t = W_out S_out^t
    certainty  = 1 - H(softmax(y^t)) / log(C)         (averaged over positions when the output is reshaped)

Synchronisation of a neuron pair (i, j) is kept by the decayed recurrence of the official code,
alpha_t = r alpha_{t-1} + z_i z_j, beta_t = r beta_{t-1} + 1, S = alpha_t / sqrt(beta_t), r = exp(-clamp(decay, 0, 15)),
starting from the learned start state z^0. Pairs come from `neuron_select_type`: `first-last` (dense upper
triangle over the first / last n neurons), `random` (dense upper triangle between two random n-sets) and
`random-pairing` (n random pairs, the first `n_random_pairing_self` of them i-i).

Faithful to the official code (not the paper where they differ): the parameter and buffer names are the
official ones, so an official state dict loads strictly (`load_official_checkpoint`, the "sakana-ctm" format for
`biozoo.load_pretrained` / `biozoo convert`); the decay parameters are clamped in place at every forward (the fix
for issue #5); the random pairs are drawn with numpy's global RNG as the official code does; the backbones are
the official truncated ResNets (3x3 stem, trained from scratch). Differences, none of which change the outputs
beyond float rounding:

- No lazy layers: every input width is computed from the arguments (`in_channels` gives the image channels).
- Speed (same outputs to float rounding): the attention's K/V projections are computed once per forward and
  the query's two linear maps are folded into one; the neuron-level models run neuron-major (a batched matmul
  with contiguous operands and gradients, a multiply-and-sum for the 2-wide last layer) with their weights
  prepared once per forward; every GLU is computed as value * sigmoid(gate) on contiguous halves; both
  synchronisations share one gather and one recurrence; the output projection and certainty run once over
  all ticks.
- Adaptive compute (`halt_threshold`): a sample stops once its certainty reaches the threshold (after
  `min_ticks`), its prediction is frozen for the remaining ticks, it leaves the batch, and the forward ends
  when every sample has halted. `CTMOutput.ticks` says how many ticks each sample used. For outputs with
  several positions (parity, mazes) `halt_on="min"` (the default) halts when the least certain position is
  sure; `halt_on="mean"` uses the official certainty, the mean over positions, which halts while a few
  positions are still unresolved.
- `track=True` returns tensors (not numpy arrays) of pre-/post-activations, attention and synchronisations.

The blocks (`SuperLinear`, `NeuronLevelModels`, `SynapseUNET`, `make_synapses`, `synch_pairs`, backbones,
positional embeddings, `attention_memory` / `attend`) are importable on their own for other CTM variants.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._hub import PretrainedMixin, register_checkpoint_format, safe_torch_load
from ._registry import register_model
from .errors import BiozooError, CheckpointError, check_choice, check_shape

NEURON_SELECT_TYPES = ("first-last", "random", "random-pairing")
HALT_ON = ("min", "mean")
RESNET_BACKBONES = tuple(f"resnet{depth}-{stage}" for depth in (18, 34, 50, 101, 152) for stage in (1, 2, 3, 4))
BACKBONES = RESNET_BACKBONES + ("shallow-wide", "parity_backbone", "none")
POSITIONAL_EMBEDDINGS = ("none", "learnable-fourier", "multi-learnable-fourier", "custom-rotational",
                         "custom-rotational-1d")


# --- Core blocks ------------------------------------------------------------------------------------------------

class Squeeze(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.squeeze(self.dim)


class ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous. Gradients reach the neuron-major NLMs transposed
    (from the (B, D) post-activations); CPU bmm would then fall back to a slow per-neuron loop."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class SuperLinear(nn.Module):
    """N private linear maps, one per neuron: out[b, n] = (x[b, n] @ w1[:, :, n] + b1[0, n]) / T.

    Official layout: `w1` (in, out, N) ~ U(+-1/sqrt(in + out)), `b1` (1, N, out) = 0, a learnable scalar
    temperature `T`; optional dropout and LayerNorm over the input (the official `do_norm`).
    """

    def __init__(self, in_dims: int, out_dims: int, N: int, T: float = 1.0, do_norm: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.in_dims, self.out_dims = in_dims, out_dims
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.layernorm = nn.LayerNorm(in_dims) if do_norm else nn.Identity()
        bound = 1 / math.sqrt(in_dims + out_dims)
        self.w1 = nn.Parameter(torch.empty(in_dims, out_dims, N).uniform_(-bound, bound))
        self.b1 = nn.Parameter(torch.zeros(1, N, out_dims))
        self.T = nn.Parameter(torch.tensor([float(T)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, in) -> (B, N, out), the official layout."""
        return self.forward_neuron_major(x.transpose(0, 1)).transpose(0, 1)

    def forward_neuron_major(self, x: torch.Tensor) -> torch.Tensor:
        """(N, B, in) -> (N, B, out), as a batched matmul over neurons."""
        x = self.layernorm(self.dropout(x))
        w = (self.w1 / self.T).permute(2, 0, 1).contiguous()  # contiguous: CPU bmm stays on its batched kernel
        return torch.bmm(x.contiguous(), w) + (self.b1 / self.T).transpose(0, 1)

    def glu_weights(self) -> tuple[torch.Tensor, ...]:
        """(value weights, gate weights, value bias, gate bias) of GLU(this layer), prepared once per forward.
        (x w + b) / T = x (w / T) + b / T: the temperature scales the small weights, not the output. Two outputs
        (value, gate): (N, 1, in) each, for a multiply-and-sum; wider: (N, in, out/2) contiguous, for bmm."""
        half = self.out_dims // 2
        w, b = (self.w1 / self.T).permute(2, 0, 1), (self.b1 / self.T).transpose(0, 1)  # (N, in, out), (N, 1, out)
        if half == 1:
            w = w.transpose(1, 2)  # (N, 2, in)
            return w[:, :1], w[:, 1:], b[..., 0], b[..., 1]
        return w[..., :half].contiguous(), w[..., half:].contiguous(), b[..., :half], b[..., half:]

    def glu_neuron_major(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """GLU(forward_neuron_major(x)), (N, B, in) -> (N, B, out/2), or (N, B) for two outputs. Value and gate are
        computed apart: nn.GLU on CPU is several times slower than value * sigmoid(gate) on contiguous halves."""
        x = self.layernorm(self.dropout(x))
        w_value, w_gate, b_value, b_gate = weights if weights is not None else self.glu_weights()
        if self.out_dims == 2:
            value, gate = (x * w_value).sum(-1) + b_value, (x * w_gate).sum(-1) + b_gate
        else:
            x = x.contiguous()
            value = ContiguousGrad.apply(torch.bmm(x, w_value)) + b_value
            gate = ContiguousGrad.apply(torch.bmm(x, w_gate)) + b_gate
        return value * torch.sigmoid(gate)


class NeuronLevelModels(nn.Sequential):
    """g_theta_d of Eq. 3: post-activation z_d = MLP_d(trace of neuron d's last M pre-activations).

    Deep: SuperLinear(M -> 2H), GLU, SuperLinear(H -> 2), GLU. Shallow: SuperLinear(M -> 2), GLU. Kept as the
    official nested Sequential so the state-dict keys (`trace_processor.0.0.w1`, ...) match.
    """

    def __init__(self, d_model: int, memory_length: int, deep: bool = True, hidden: int = 16,
                 do_layernorm: bool = False, dropout: float = 0.0):
        if deep:
            layers = [SuperLinear(memory_length, 2 * hidden, d_model, do_norm=do_layernorm, dropout=dropout),
                      nn.GLU(), SuperLinear(hidden, 2, d_model, do_norm=do_layernorm, dropout=dropout), nn.GLU()]
        else:
            layers = [SuperLinear(memory_length, 2, d_model, do_norm=do_layernorm, dropout=dropout), nn.GLU()]
        super().__init__(nn.Sequential(*layers, Squeeze(-1)))

    def forward(self, trace: torch.Tensor) -> torch.Tensor:
        """(B, D, M) -> (B, D)."""
        return self.forward_neuron_major(trace.transpose(0, 1)).transpose(0, 1)

    def forward_neuron_major(self, trace: torch.Tensor, weights: list | None = None) -> torch.Tensor:
        """(D, B, M) -> (D, B). Every SuperLinear here is followed by a GLU; each pair runs fused. `weights`:
        `neuron_major_weights()`, prepared once per forward."""
        layers = [layer for layer in self[0] if isinstance(layer, SuperLinear)]
        out = trace
        for layer, w in zip(layers, weights if weights is not None else self.neuron_major_weights()):
            out = layer.glu_neuron_major(out, w)
        return out

    def neuron_major_weights(self) -> list[tuple[torch.Tensor, ...]]:
        return [layer.glu_weights() for layer in self[0] if isinstance(layer, SuperLinear)]


class SynapseUNET(nn.Module):
    """The synapse model at depth > 1 (official `SynapseUNET`): widths linspace(out_dims, minimum_width, depth);
    a first projection, depth-1 down blocks, up blocks in reverse, each up output + skip -> LayerNorm."""

    def __init__(self, in_dims: int, out_dims: int, depth: int, minimum_width: int = 16, dropout: float = 0.0):
        super().__init__()
        widths = [int(w) for w in np.linspace(out_dims, minimum_width, depth)]
        self.first_projection = nn.Sequential(nn.Linear(in_dims, widths[0]), nn.LayerNorm(widths[0]), nn.SiLU())
        self.down_projections, self.up_projections, self.skip_lns = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for wide, narrow in zip(widths[:-1], widths[1:]):
            self.down_projections.append(nn.Sequential(nn.Dropout(dropout), nn.Linear(wide, narrow),
                                                       nn.LayerNorm(narrow), nn.SiLU()))
            self.up_projections.append(nn.Sequential(nn.Dropout(dropout), nn.Linear(narrow, wide),
                                                     nn.LayerNorm(wide), nn.SiLU()))
            self.skip_lns.append(nn.LayerNorm(wide))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        downs = [self.first_projection(x)]
        for layer in self.down_projections:
            downs.append(layer(downs[-1]))
        out = downs[-1]
        for level in reversed(range(len(self.up_projections))):
            out = self.skip_lns[level](self.up_projections[level](out) + downs[level])
        return out


class SynapseGLU(nn.Sequential):
    """The synapse model at depth 1: Dropout -> Linear(in, 2D) -> GLU -> LayerNorm(D) (the official Sequential,
    same keys), with the GLU computed as value * sigmoid(gate) on two contiguous halves (faster on CPU)."""

    def __init__(self, in_dims: int, d_model: int, dropout: float = 0.0):
        super().__init__(nn.Dropout(dropout), nn.Linear(in_dims, 2 * d_model), nn.GLU(), nn.LayerNorm(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self[0](x)
        weight, bias = self[1].weight, self[1].bias
        half = weight.size(0) // 2
        value, gate = F.linear(x, weight[:half], bias[:half]), F.linear(x, weight[half:], bias[half:])
        return self[3](value * torch.sigmoid(gate))


def make_synapses(depth: int, in_dims: int, d_model: int, dropout: float = 0.0) -> nn.Module:
    """f_synapse: Dropout -> Linear(in, 2D) -> GLU -> LayerNorm(D) at depth 1, else the U-Net."""
    if depth == 1:
        return SynapseGLU(in_dims, d_model, dropout)
    return SynapseUNET(in_dims, d_model, depth, 16, dropout)


def synch_representation_size(neuron_select_type: str, n_synch: int) -> int:
    return n_synch if neuron_select_type == "random-pairing" else n_synch * (n_synch + 1) // 2


def sample_synch_neurons(neuron_select_type: str, kind: str, d_model: int, n_synch: int,
                         n_self: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The official left/right neuron indices (drawn with numpy's global RNG, as the official code does)."""
    if neuron_select_type == "first-last":
        start = 0 if kind == "out" else d_model - n_synch
        left = right = torch.arange(start, start + n_synch)
    elif neuron_select_type == "random":
        left = torch.from_numpy(np.random.choice(np.arange(d_model), size=n_synch))
        right = torch.from_numpy(np.random.choice(np.arange(d_model), size=n_synch))
    else:
        if n_synch <= n_self:
            raise BiozooError(f"random-pairing needs n_synch ({n_synch}) > n_random_pairing_self ({n_self})")
        left = torch.from_numpy(np.random.choice(np.arange(d_model), size=n_synch))
        right = torch.cat((left[:n_self], torch.from_numpy(np.random.choice(np.arange(d_model), size=n_synch - n_self))))
    return left.long(), right.long()


def synch_pairs(neuron_select_type: str, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand the neuron sets into one (i, j) index pair per synchronisation entry, in the official order
    (the upper triangle, row by row, for the dense modes)."""
    if neuron_select_type == "random-pairing":
        return left, right
    i, j = torch.triu_indices(len(left), len(left), device=left.device)
    return left[i], right[j]


def normalised_entropy(logits: torch.Tensor, reshaper: Sequence[int], reduce: str = "mean") -> torch.Tensor:
    """(N, out) -> (N,): entropy of softmax over the last reshaped axis / log(classes), averaged over positions
    (the official certainty), or their maximum with `reduce="max"` (the least certain position)."""
    logits = logits.float().reshape([logits.size(0)] + list(reshaper))
    log_p = torch.log_softmax(logits, -1)
    ne = -(log_p.exp() * log_p).sum(-1) / math.log(logits.size(-1))
    if ne.dim() == 1:
        return ne
    return ne.flatten(1).amax(-1) if reduce == "max" else ne.flatten(1).mean(-1)


# --- Backbones ---------------------------------------------------------------------------------------------------

class ParityBackbone(nn.Module):
    """Embedding(2, d) of the +-1 tokens ((x == 1) -> 1), returned channel-first (B, d, L)."""

    def __init__(self, n_embeddings: int, d_embedding: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embeddings, d_embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding((x == 1).long()).transpose(1, 2)


class ResNetBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


RESNET_LAYERS = {18: (ResNetBasicBlock, [2, 2, 2, 2]), 34: (ResNetBasicBlock, [3, 4, 6, 3]),
                 50: (ResNetBottleneck, [3, 4, 6, 3]), 101: (ResNetBottleneck, [3, 4, 23, 3]),
                 152: (ResNetBottleneck, [3, 8, 36, 3])}


class TruncatedResNet(nn.Module):
    """The official CTM ResNet: a 3x3 stride-1 stem (a small receptive field, so the CTM must "look around"),
    max-pool, then stages 1..`stages` of ResNet-`depth` (stride 2 from stage 2). No pooling, no head."""

    def __init__(self, depth: int = 18, stages: int = 4, in_channels: int = 3):
        super().__init__()
        block, layers = RESNET_LAYERS[depth]
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes = 64
        for stage in range(1, stages + 1):
            planes = 64 * 2 ** (stage - 1)
            setattr(self, f"layer{stage}", self._make_layer(block, planes, layers[stage - 1], 1 if stage == 1 else 2))
        self.stages = stages
        self.out_channels = self.inplanes

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        out = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        out += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for stage in range(1, self.stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return x


class ShallowWide(nn.Module):
    """The official `shallow-wide` backbone: two wide (grouped) 3x3 convolutions with GLUs, 2048 channels out."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_channels, 4096, 3, 2, 1), nn.GLU(dim=1), nn.BatchNorm2d(2048),
                                    nn.Conv2d(2048, 4096, 3, 1, 1, groups=32), nn.GLU(dim=1), nn.BatchNorm2d(2048))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def make_backbone(backbone_type: str, d_input: int, in_channels: int | None) -> tuple[nn.Module, nn.Module, int | None]:
    """(initial_rgb, backbone, feature channels). ResNets read 3 channels through a 1x1 `initial_rgb` conv
    from `in_channels` (the official LazyConv2d(3, 1)); `none` passes the input through (its channels are the
    tokens' width)."""
    check_choice("backbone_type", backbone_type, BACKBONES)
    if backbone_type in RESNET_BACKBONES:
        depth, stages = backbone_type[len("resnet"):].split("-")
        backbone = TruncatedResNet(int(depth), int(stages), 3)
        return nn.Conv2d(in_channels or 3, 3, 1, 1), backbone, backbone.out_channels
    if backbone_type == "shallow-wide":
        return nn.Identity(), ShallowWide(in_channels or 3), 2048
    if backbone_type == "parity_backbone":
        return nn.Identity(), ParityBackbone(2, d_input), d_input
    return nn.Identity(), nn.Identity(), in_channels


# --- Positional embeddings ---------------------------------------------------------------------------------------

def coordinate_grid(batch: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 2) of (x / (W-1), y / (H-1)), the official `add_coord_dim`."""
    xs = torch.arange(width, device=like.device, dtype=like.dtype).repeat(height, 1) / (width - 1)
    ys = torch.arange(height, device=like.device, dtype=like.dtype).unsqueeze(-1).repeat(1, width) / (height - 1)
    return torch.stack((xs, ys), -1).unsqueeze(0).repeat(batch, 1, 1, 1)


class LearnableFourierPositionalEncoding(nn.Module):
    """Li et al. 2021 (arXiv 2106.02795), Algorithm 1: Fourier features of (x, y) with learned frequencies
    (init N(0, gamma^-2)), then an MLP with a GLU and a LayerNorm. (B, C, H, W) -> (B, D, H, W)."""

    def __init__(self, d_model: int, G: int = 1, M: int = 2, F_dim: int = 256, H_dim: int = 128, gamma: float = 1 / 2.5):
        super().__init__()
        self.F_dim = F_dim
        self.Wr = nn.Linear(M, F_dim // 2, bias=False)
        self.mlp = nn.Sequential(nn.Linear(F_dim, H_dim), nn.GLU(), nn.Linear(H_dim // 2, d_model // G),
                                 nn.LayerNorm(d_model // G))
        nn.init.normal_(self.Wr.weight, mean=0, std=gamma ** -2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        projected = self.Wr(coordinate_grid(B, H, W, x))
        features = torch.cat([torch.cos(projected), torch.sin(projected)], -1) / math.sqrt(self.F_dim)
        return self.mlp(features).permute(0, 3, 1, 2)


class MultiLearnableFourierPositionalEncoding(nn.Module):
    """N learnable-Fourier encodings with gammas linspace(1, 0.1, N), mixed by softmax(`combination`)."""

    def __init__(self, d_model: int, G: int = 1, M: int = 2, F_dim: int = 256, H_dim: int = 128,
                 gamma_range: Sequence[float] = (1.0, 0.1), N: int = 10):
        super().__init__()
        self.embedders = nn.ModuleList(LearnableFourierPositionalEncoding(d_model, G, M, F_dim, H_dim, float(g))
                                       for g in np.linspace(gamma_range[0], gamma_range[1], N))
        self.combination = nn.Parameter(torch.ones(N))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embeddings = torch.stack([e(x) for e in self.embedders])
        return (embeddings * F.softmax(self.combination, -1).view(-1, 1, 1, 1, 1)).sum(0)


def rotated_unit_vectors(n: int, like: torch.Tensor) -> torch.Tensor:
    """(n, 2): [0, 1] rotated by angles linspace(0, 180 deg, n), i.e. (-sin, cos)."""
    theta = torch.deg2rad(torch.linspace(0, 180, n, device=like.device))
    return torch.stack((-torch.sin(theta), torch.cos(theta)), -1)


class CustomRotationalEmbedding(nn.Module):
    """Official 2-D `custom-rotational`: a learned start vector rotated per column; the key of cell (i, j) is
    [v_i, v_j] (angles from the width only) -> Linear(4, D). Returns (1, D, W, W); needs square feature maps."""

    def __init__(self, d_model: int):
        super().__init__()
        self.start_vector = nn.Parameter(torch.tensor([0.0, 1.0]))
        self.projection = nn.Sequential(nn.Linear(4, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = x.size(-1)
        check_shape("custom-rotational embedding", x, "square feature maps (B, C, W, W)", x.size(-2) == W)
        theta = torch.deg2rad(torch.linspace(0, 180, W, device=x.device))
        cos, sin = torch.cos(theta), torch.sin(theta)
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)  # (W, 2, 2)
        vectors = torch.einsum("wij,j->wi", rotation, self.start_vector)
        key = torch.cat((vectors.unsqueeze(1).expand(W, W, 2), vectors.unsqueeze(0).expand(W, W, 2)), -1)
        return self.projection(key).permute(2, 0, 1).unsqueeze(0)


class CustomRotationalEmbedding1D(nn.Module):
    """Official `custom-rotational-1d` (parity): Linear(2, D) of [0, 1] rotated by linspace(0, 180 deg, L).
    (B, C, L) -> (B, D, L)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.projection = nn.Linear(2, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pe = self.projection(rotated_unit_vectors(x.size(2), x))
        return pe.t().unsqueeze(0).expand(x.size(0), -1, -1)


class NoPositionalEmbedding(nn.Module):
    def forward(self, x: torch.Tensor) -> int:
        return 0


def make_positional_embedding(kind: str, d_backbone: int | None) -> nn.Module:
    check_choice("positional_embedding_type", kind, POSITIONAL_EMBEDDINGS)
    if kind == "none":
        return NoPositionalEmbedding()
    if d_backbone is None:
        raise BiozooError(f"positional_embedding_type {kind!r} needs a backbone; use 'none' with backbone_type 'none'")
    return {"learnable-fourier": lambda d: LearnableFourierPositionalEncoding(d, gamma=1 / 2.5),
            "multi-learnable-fourier": MultiLearnableFourierPositionalEncoding,
            "custom-rotational": CustomRotationalEmbedding,
            "custom-rotational-1d": CustomRotationalEmbedding1D}[kind](d_backbone)


# --- Shared input stack and attention ----------------------------------------------------------------------------

class TickedModelBase(PretrainedMixin, nn.Module):
    """What the CTM and its tick-driven LSTM baseline share: backbone -> positional embedding -> kv tokens, the
    attention with its K/V computed once per forward, and the certainty of a prediction."""

    d_input: int
    heads: int
    backbone_type: str
    prediction_reshaper: list[int]

    def build_input_stack(self, backbone_type: str, positional_embedding_type: str, in_channels: int | None) -> None:
        if backbone_type == "none" and positional_embedding_type != "none":
            raise BiozooError("backbone_type 'none' takes no positional embedding (set positional_embedding_type: none)")
        self.initial_rgb, self.backbone, d_backbone = make_backbone(backbone_type, self.d_input, in_channels)
        self.positional_embedding = make_positional_embedding(positional_embedding_type, d_backbone)
        self.kv_proj = self.q_proj = self.attention = None
        if self.heads:
            if d_backbone is None:
                raise BiozooError("backbone_type 'none' with attention needs in_channels (the width of each input token)")
            self.kv_proj = nn.Sequential(nn.Linear(d_backbone, self.d_input), nn.LayerNorm(self.d_input))

    def check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if self.backbone_type == "parity_backbone":
            check_shape(name, x, "(B, L) of +-1 values", x.dim() == 2)
        elif self.backbone_type == "none" and not self.heads:
            check_shape(name, x, f"(B, {self.d_input})", x.dim() == 2 and x.size(1) == self.d_input)
        elif self.backbone_type != "none":
            channels = self.initial_rgb.in_channels if isinstance(self.initial_rgb, nn.Conv2d) else None
            check_shape(name, x, f"(B, {channels or 'C'}, H, W)", x.dim() == 4 and channels in (None, x.size(1)))

    def compute_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """kv tokens (B, L, d_input) = LayerNorm(Linear(backbone(x) + pos)), and the feature map's spatial shape."""
        features = self.backbone(self.initial_rgb(x))
        combined = features + self.positional_embedding(features)
        return self.kv_proj(combined.flatten(2).transpose(1, 2)), tuple(features.shape[2:])

    def certainty(self, predictions: torch.Tensor) -> torch.Tensor:
        """(N, out) -> (N, 2): [normalised entropy, 1 - normalised entropy]."""
        ne = normalised_entropy(predictions, self.prediction_reshaper)
        return torch.stack((ne, 1 - ne), -1)

    def halting_certainty(self, predictions: torch.Tensor, certainty: torch.Tensor, halt_on: str) -> torch.Tensor:
        """(N,) certainty that adaptive compute compares with the threshold: the official one (`mean` over
        positions) or that of the least certain position (`min`)."""
        if halt_on == "mean":
            return certainty[:, 1]
        return 1 - normalised_entropy(predictions, self.prediction_reshaper, reduce="max")


def attention_memory(attention: nn.MultiheadAttention, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys (B, h, hd, L) and values (B, h, L, hd) of nn.MultiheadAttention for a constant kv: computed once
    per forward instead of once per tick."""
    B, L, E = kv.shape
    h = attention.num_heads
    _, w_k, w_v = attention.in_proj_weight.chunk(3)
    _, b_k, b_v = attention.in_proj_bias.chunk(3)
    k = F.linear(kv, w_k, b_k).view(B, L, h, E // h).permute(0, 2, 3, 1)
    v = F.linear(kv, w_v, b_v).view(B, L, h, E // h).transpose(1, 2)
    return k.contiguous(), v.contiguous()  # contiguous batches keep the per-tick matmuls off a per-batch loop


def attend(attention: nn.MultiheadAttention, query: torch.Tensor, keys: torch.Tensor,
           values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per sample (B, E) -> (output (B, E), per-head weights (B, h, 1, L)), exactly what
    nn.MultiheadAttention(query, kv, kv, need_weights=True, average_attn_weights=False) returns."""
    E = query.size(1)
    scale = math.sqrt(1.0 / (E // attention.num_heads))
    q = F.linear(query, attention.in_proj_weight[:E], attention.in_proj_bias[:E]) * scale
    return attend_projected(attention, q, keys, values)


def folded_query(q_proj: nn.Linear, attention: nn.MultiheadAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """The query map synch -> q_proj -> attention's W_q -> 1/sqrt(head dim) as one (weight, bias), computed once
    per forward instead of two linear maps and a scaling per tick."""
    E = attention.embed_dim
    scale = math.sqrt(1.0 / (E // attention.num_heads))
    w_q, b_q = attention.in_proj_weight[:E] * scale, attention.in_proj_bias[:E] * scale
    return w_q @ q_proj.weight, F.linear(q_proj.bias, w_q, b_q)


def attend_projected(attention: nn.MultiheadAttention, q: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend` for a query already projected and scaled (B, E)."""
    B, E = q.shape
    h = attention.num_heads
    weights = torch.softmax(q.view(B, h, 1, E // h) @ keys, -1)
    if attention.dropout > 0 and attention.training:
        weights = F.dropout(weights, attention.dropout)
    return attention.out_proj((weights @ values).reshape(B, E)), weights


# --- The model ---------------------------------------------------------------------------------------------------

@dataclass
class CTMOutput:
    """`predictions` (B, out_dims, T), `certainties` (B, 2, T) = [normalised entropy, 1 - it] per tick,
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

    Extra arguments: `in_channels` (image channels read by the ResNet's 1x1 `initial_rgb`, or the token width
    for backbone 'none'), `num_classes` (used as `out_dims` when that is None; filled in from the data).
    `halt_threshold` / `min_ticks` / `halt_on` set the default adaptive compute of `forward`.
    """

    def __init__(self, iterations: int = 50, d_model: int = 512, d_input: int = 128, heads: int = 4,
                 n_synch_out: int = 64, n_synch_action: int = 64, synapse_depth: int = 1, memory_length: int = 10,
                 deep_nlms: bool = True, memory_hidden_dims: int = 16, do_layernorm_nlm: bool = False,
                 backbone_type: str = "resnet18-1", positional_embedding_type: str = "none",
                 out_dims: int | None = None, prediction_reshaper: Sequence[int] = (-1,), dropout: float = 0.0,
                 dropout_nlm: float | None = None, neuron_select_type: str = "random-pairing",
                 n_random_pairing_self: int = 0, in_channels: int | None = None, num_classes: int | None = None,
                 halt_threshold: float | None = None, min_ticks: int = 1, halt_on: str = "min"):
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
        dropout_nlm = dropout if dropout_nlm is None else dropout_nlm

        self.build_input_stack(backbone_type, positional_embedding_type, in_channels)
        self.synch_representation_size_action = synch_representation_size(neuron_select_type, n_synch_action)
        self.synch_representation_size_out = synch_representation_size(neuron_select_type, n_synch_out)
        if heads:
            self.q_proj = nn.Linear(self.synch_representation_size_action, d_input)
            self.attention = nn.MultiheadAttention(d_input, heads, dropout, batch_first=True)
        self.synapses = make_synapses(synapse_depth, d_input + d_model, d_model, dropout)
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

    def forward(self, x: torch.Tensor, track: bool = False, halt_threshold: float | None = None,
                min_ticks: int | None = None, halt_on: str | None = None) -> CTMOutput:
        """Run the ticks. `halt_threshold` (default: the model's): per-sample early exit once the certainty
        (`halt_on`: "min" or "mean" over positions) reaches it and at least `min_ticks` ticks ran."""
        self.check_input(x)
        halt_threshold = self.halt_threshold if halt_threshold is None else halt_threshold
        min_ticks = self.min_ticks if min_ticks is None else min_ticks
        halt_on = self.halt_on if halt_on is None else halt_on
        check_choice("halt_on", halt_on, HALT_ON)
        B, T, D = x.size(0), self.iterations, self.d_model
        S_out = self.synch_representation_size_out
        halting = halt_threshold is not None

        token_shape = None
        if self.heads:
            kv, token_shape = self.compute_features(x)
            keys, values = attention_memory(self.attention, kv)
            query_map = folded_query(self.q_proj, self.attention)
        else:
            inputs = x.flatten(1)
        pair_left, pair_right, r = self._synch_setup()
        nlm_weights = self.trace_processor.neuron_major_weights()
        z = self.start_activated_state.unsqueeze(0).expand(B, D)
        trace = self.start_trace.unsqueeze(1).expand(D, B, self.memory_length)  # neuron-major (D, B, M)
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
                features, attn_weights = attend_projected(self.attention, F.linear(synch_action, *query_map), keys,
                                                          values)
            else:
                features = inputs
            pre = self.synapses(torch.cat((features, z), -1))
            trace = torch.cat((trace[:, :, 1:], pre.t().unsqueeze(-1)), -1)
            z = self.trace_processor.forward_neuron_major(trace, nlm_weights).t()
            alpha = r * alpha + z[:, pair_left] * z[:, pair_right]
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
                        prediction_reshaper=self.prediction_reshaper)
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


# --- The official checkpoints ------------------------------------------------------------------------------------

OFFICIAL_ARG_NAMES = {"deep_memory": "deep_nlms", "do_normalisation": "do_layernorm_nlm"}
CTM_ARGS = ("iterations", "d_model", "d_input", "heads", "n_synch_out", "n_synch_action", "synapse_depth",
            "memory_length", "deep_nlms", "memory_hidden_dims", "do_layernorm_nlm", "backbone_type",
            "positional_embedding_type", "out_dims", "prediction_reshaper", "dropout", "dropout_nlm",
            "neuron_select_type", "n_random_pairing_self")


def kwargs_from_official_args(args: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Constructor arguments from a training script's argparse flags (and the widths the state dict implies)."""
    args = {OFFICIAL_ARG_NAMES.get(k, k): v for k, v in args.items()}
    if "prediction_reshaper" not in args:
        if args.get("parity_sequence_length"):
            args["prediction_reshaper"] = [int(args["parity_sequence_length"]), 2]
        elif args.get("maze_route_length"):
            args["prediction_reshaper"] = [int(args["maze_route_length"]), 5]
        else:
            args["prediction_reshaper"] = [-1]
    if args.get("N_to_sort"):  # the sort task's CTM: no attention, no action synchronisation, raw input
        args.update(heads=0, n_synch_action=0, backbone_type="none", positional_embedding_type="none",
                    d_input=int(args["out_dims"]) - 1)
    kwargs = {k: args[k] for k in CTM_ARGS if k in args}
    if "initial_rgb.weight" in state_dict:
        kwargs["in_channels"] = int(state_dict["initial_rgb.weight"].shape[1])
    elif "backbone.layers.0.weight" in state_dict:
        kwargs["in_channels"] = int(state_dict["backbone.layers.0.weight"].shape[1])
    elif kwargs.get("backbone_type") == "none" and "kv_proj.0.weight" in state_dict:
        kwargs["in_channels"] = int(state_dict["kv_proj.0.weight"].shape[1])
    optional = ("prediction_reshaper", "dropout", "dropout_nlm", "neuron_select_type", "n_random_pairing_self")
    missing = [k for k in CTM_ARGS if k not in kwargs and k not in optional]  # the official defaults apply
    if missing:
        raise CheckpointError(f"the official CTM arguments lack {', '.join(missing)}")
    return kwargs


def lstm_kwargs_from_official_args(args: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The official LSTM baseline's arguments (its layer count from the state dict)."""
    ctm = kwargs_from_official_args({**args, "n_synch_out": 0, "n_synch_action": 0, "synapse_depth": 1,
                                     "memory_length": 1, "deep_nlms": False, "memory_hidden_dims": 1,
                                     "do_layernorm_nlm": False, "neuron_select_type": "random-pairing",
                                     "n_random_pairing_self": 0}, state_dict)
    names = ("iterations", "d_model", "d_input", "heads", "backbone_type", "positional_embedding_type", "out_dims",
             "prediction_reshaper", "dropout", "in_channels")
    kwargs = {k: ctm[k] for k in names if k in ctm}
    kwargs["num_layers"] = int(state_dict["start_hidden_state"].shape[0])
    return kwargs


def build_from_official(kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor], source: Path,
                        model_name: str = "ctm") -> nn.Module:
    from ._hub import check_state_dict
    from ._registry import create_model

    model = create_model(model_name, **kwargs)
    check_state_dict(model, {k: tuple(v.shape) for k, v in state_dict.items()}, source)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the CTM: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def is_official_checkpoint_file(path: Path) -> bool:
    """A training-script checkpoint.pt: a torch zip whose pickle names model_state_dict and CTM parameters."""
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return False
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if not pickles:
            return False
        data = archive.read(pickles[0])
    return b"model_state_dict" in data and (b"start_activated_state" in data or b"start_hidden_state" in data)


def is_official_hf_folder(path: Path) -> bool:
    """The Hugging Face layout: config.json with the constructor arguments (no biozoo "format") + model.safetensors."""
    folder = path if path.is_dir() else path.parent
    config = folder / "config.json"
    if not (config.is_file() and (folder / "model.safetensors").is_file()):
        return False
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, OSError):
        return False
    return isinstance(data, dict) and "format" not in data and {"d_model", "iterations", "memory_length"} <= set(data)


def load_official_checkpoint(path: str | Path) -> nn.Module:
    """An official CTM checkpoint (either layout; training checkpoints of the LSTM baseline too) as a biozoo model
    with the same weights, in eval mode."""
    import argparse

    from safetensors.torch import load_file

    path = Path(path)
    if is_official_hf_folder(path):
        folder = path if path.is_dir() else path.parent
        args = json.loads((folder / "config.json").read_text())
        state_dict = load_file(str(folder / "model.safetensors"))
    elif is_official_checkpoint_file(path):
        ckpt = safe_torch_load(path, allowed=[argparse.Namespace])
        if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt or "args" not in ckpt:
            raise CheckpointError(f"{path} has no model_state_dict and args: not an official CTM training checkpoint")
        args = vars(ckpt["args"]) if isinstance(ckpt["args"], argparse.Namespace) else dict(ckpt["args"])
        kind = args.get("model", args.get("model_type", "ctm"))
        if kind not in ("ctm", "lstm"):
            raise CheckpointError(f"{path} holds an official {kind!r} model; the CTM and its LSTM baseline convert")
        state_dict = ckpt["model_state_dict"]
    else:
        raise CheckpointError(f"{path} is neither an official CTM checkpoint.pt nor a config.json + model.safetensors folder")
    state_dict = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    if "start_hidden_state" in state_dict:
        return build_from_official(lstm_kwargs_from_official_args(args, state_dict), state_dict, path, "ctm_lstm").eval()
    return build_from_official(kwargs_from_official_args(args, state_dict), state_dict, path).eval()


register_checkpoint_format("sakana-ctm", lambda p: is_official_checkpoint_file(p) or is_official_hf_folder(p),
                           load_official_checkpoint,
                           "official SakanaAI CTM: a training checkpoint.pt or a Hugging Face config.json + model.safetensors")
