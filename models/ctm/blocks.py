"""CTM blocks: synapses, neuron-level models, synchronisation pairs, backbones, positional embeddings and the
input stack with its attention (see biozoo.models.ctm for the paper and the equations)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from biozoo._core import DataSpec, SpecError

from .._fused import is_plain
from .._hub import PretrainedMixin
from ..errors import BiozooError, check_choice, check_shape


NEURON_SELECT_TYPES = ("first-last", "random", "random-pairing")
HALT_ON = ("min", "mean")
RESNET_BACKBONES = tuple(f"resnet{depth}-{stage}" for depth in (18, 34, 50, 101, 152) for stage in (1, 2, 3, 4))
BACKBONES = RESNET_BACKBONES + ("shallow-wide", "parity_backbone", "sequence", "none")
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


class FusedNLM(torch.autograd.Function):
    """The deep NLM, SuperLinear(M -> 2H), GLU, SuperLinear(H -> 2), GLU, as one function of the neuron-major trace
    (D, B, M) -> z (D, B), with its backward written out: two batched matmuls forward, four backward, and only the
    trace and the two layers' pre-activations saved (autograd would keep every intermediate of the GLUs, and
    route the gradients through a dozen small operators). Weights: `NeuronLevelModels.fused_weights()`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                b2: torch.Tensor) -> torch.Tensor:
        pre1 = torch.baddbmm(b1, x, w1)  # (D, B, 2H): value | gate
        half = pre1.size(-1) // 2
        hidden = pre1[..., :half] * torch.sigmoid(pre1[..., half:])
        pre2 = torch.baddbmm(b2, hidden, w2)  # (D, B, 2)
        ctx.save_for_backward(x, w1, w2, pre1, pre2)
        return pre2[..., 0] * torch.sigmoid(pre2[..., 1])

    @staticmethod
    def backward(ctx, dz: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, w1, w2, pre1, pre2 = ctx.saved_tensors
        half = pre1.size(-1) // 2
        value1, sig1 = pre1[..., :half], torch.sigmoid(pre1[..., half:])
        hidden = value1 * sig1
        value2, sig2 = pre2[..., 0], torch.sigmoid(pre2[..., 1])
        dz = dz.contiguous()  # it arrives transposed from the (B, D) post-activations
        dvalue2 = dz * sig2
        dpre2 = torch.stack((dvalue2, dvalue2 * value2 * (1 - sig2)), -1)
        dhidden = torch.bmm(dpre2, w2.transpose(1, 2))
        dvalue1 = dhidden * sig1
        dpre1 = torch.cat((dvalue1, dvalue1 * value1 * (1 - sig1)), -1)
        return (torch.bmm(dpre1, w1.transpose(1, 2)), torch.bmm(x.transpose(1, 2), dpre1), dpre1.sum(1, True),
                torch.bmm(hidden.transpose(1, 2), dpre2), dpre2.sum(1, True))


class _WeightGradOnce(torch.autograd.Function):
    """Identity on (weight, bias) whose backward computes their gradient from every (input, output gradient) pair
    that `_TickLinear` collected: one (T*B)-row matmul per backward instead of a small matmul and an accumulation
    into .grad per tick. It runs after all the ticks' backward, since every tick's linear map reads its output."""

    @staticmethod
    def forward(ctx, store: tuple[list, list], weight: torch.Tensor, bias: torch.Tensor):
        ctx.store = store
        ctx.set_materialize_grads(False)
        return weight.view_as(weight), bias.view_as(bias)

    @staticmethod
    def backward(ctx, grad_weight: torch.Tensor | None, grad_bias: torch.Tensor | None):
        inputs, grads = ctx.store
        if not grads:
            return None, grad_weight, grad_bias
        x, g = torch.cat(inputs), torch.cat(grads)
        inputs.clear()
        grads.clear()
        dw, db = g.t() @ x, g.sum(0)
        return None, dw if grad_weight is None else dw + grad_weight, db if grad_bias is None else db + grad_bias


class _TickLinear(torch.autograd.Function):
    """F.linear(x, weight, bias) whose backward gives x its gradient and leaves the weight's to `_WeightGradOnce`
    (it keeps x, saved here as autograd would, and the output gradient for it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, store: tuple[list, list]):
        ctx.save_for_backward(x, weight)
        ctx.store = store
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        ctx.store[0].append(x)
        ctx.store[1].append(grad)
        return grad @ weight if ctx.needs_input_grad[0] else None, None, None, None


def tick_linear(layer: nn.Linear):
    """The Linear `layer` as a function for the tick loop of one forward: its weight gradient is computed once per
    backward over all ticks (`_WeightGradOnce`). The layer itself where it must be called (dendrites, LoRA, hooks),
    without gradients, or without a bias."""
    if must_call(layer) or layer.bias is None or not torch.is_grad_enabled():
        return layer
    return deferred_linear(layer.weight, layer.bias)


def deferred_linear(weight: torch.Tensor, bias: torch.Tensor):
    """x -> F.linear(x, weight, bias) for the tick loop, the weight gradient once per backward (`tick_linear`)."""
    if not torch.is_grad_enabled() or not (weight.requires_grad or bias.requires_grad):
        return lambda x: F.linear(x, weight, bias)
    store: tuple[list, list] = ([], [])
    weight, bias = _WeightGradOnce.apply(store, weight, bias)
    return lambda x: _TickLinear.apply(x, weight, bias, store)


def has_hooks(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


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

    def fused_weights(self) -> tuple[torch.Tensor, ...] | None:
        """(w1 (D, M, 2H), b1 (D, 1, 2H), w2 (D, H, 2), b2 (D, 1, 2)) for `FusedNLM`, the temperatures folded in
        once per forward; None where it does not apply (shallow or H = 1, LayerNorm or dropout in the NLM)."""
        layers = [layer for layer in self[0] if isinstance(layer, SuperLinear)]
        if len(layers) != 2 or layers[0].out_dims < 4 or any(
                not isinstance(layer.layernorm, nn.Identity) or not isinstance(layer.dropout, nn.Identity)
                for layer in layers):
            return None
        return tuple(t for layer in layers for t in ((layer.w1 / layer.T).permute(2, 0, 1).contiguous(),
                                                        (layer.b1 / layer.T).transpose(0, 1)))


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

    def per_tick(self):
        """`forward` for the tick loop of one forward pass: the Linear layers' weight gradients computed once per
        backward (`tick_linear`). `forward` itself where a sub-module carries hooks."""
        if has_hooks(self) or any(type(m) is not nn.Sequential for m in (self.first_projection,
                                                                          *self.down_projections, *self.up_projections)):
            return self
        first = tick_linear(self.first_projection[0])
        downs = [tick_linear(layer[1]) for layer in self.down_projections]
        ups = [tick_linear(layer[1]) for layer in self.up_projections]

        def forward(x: torch.Tensor) -> torch.Tensor:
            outs = [self.first_projection[2](self.first_projection[1](first(x)))]
            for layer, linear in zip(self.down_projections, downs):
                outs.append(layer[3](layer[2](linear(layer[0](outs[-1])))))
            out = outs[-1]
            for level in reversed(range(len(ups))):
                layer = self.up_projections[level]
                out = self.skip_lns[level](layer[3](layer[2](ups[level](layer[0](out)))) + outs[level])
            return out
        return forward

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

    def per_tick(self):
        """`forward` for the tick loop of one forward pass: the Linear's weight gradient computed once per backward
        (`tick_linear`). `forward` itself where the Linear must be called or a sub-module carries hooks."""
        linear = tick_linear(self[1])
        if linear is self[1] or has_hooks(self):
            return self
        half = self[1].out_features // 2

        def forward(x: torch.Tensor) -> torch.Tensor:
            out = linear(self[0](x))
            return self[3](out[:, :half] * torch.sigmoid(out[:, half:]))
        return forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self[0](x)
        if must_call(self[1]):  # dendrites or LoRA on the Linear: call it
            value, gate = self[1](x).chunk(2, -1)
        else:
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


class SequenceTokens(nn.Module):
    """biozoo's `sequence` backbone (not in the official code): a (B, L) or (B, L, F) sequence as L tokens of
    width F, channel-first (B, F, L), so any sequence task reaches the attention without an embedding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) if x.dim() == 2 else x.transpose(1, 2)


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
                 152: (ResNetBottleneck, [3, 4, 36, 3])}  # as the official models/resnet.py (torchvision: [3, 8, 36, 3])


class Neurons(nn.Identity):
    """The neurons' post-activations z (B, D), every tick: the identity, named so that augmenters can act on the
    neurons themselves (TauGate gates each neuron with one threshold and gain shared over the ticks)."""

    taugate_site = True


class SynapseOutput(Neurons):
    """The synapse model's output a^t (B, D), every tick, before it enters the pre-activation history: the
    identity. TauGate gates it only when asked (`include=["synapse_output", ...]`); the neurons are its default."""

    taugate_default = False


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
        # channels-last: the CPU (oneDNN) convolutions run without reordering, and the features come out in the
        # token layout (B, H*W, C) the attention reads, so flattening them copies nothing
        x = x.contiguous(memory_format=torch.channels_last)
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
    if backbone_type == "sequence":
        return nn.Identity(), SequenceTokens(), in_channels or 1
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

    reads = ("image", "sequence")
    predicts = ("classes",)  # the certainty is an entropy over classes

    @classmethod
    def spec_kwargs(cls, spec: DataSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Images go through a ResNet backbone (`backbone_type`, default the class's), +-1 sequences through the
        official parity embedding, other sequences as tokens (`sequence` backbone); flat features and observations
        enter the synapses directly every tick (no attention, as the official sorting CTM). A task that needs a
        tick per output (`min_ticks`: CTC sorting emits one index per tick) raises `iterations` to that."""
        derived: dict[str, Any] = {"out_dims": spec.out_dims, "prediction_reshaper": spec.prediction_reshaper or [-1]}
        if "min_ticks" in spec.extras:
            kwargs = {**kwargs, "iterations": max(int(kwargs.get("iterations", 0)), int(spec.extras["min_ticks"]))}
        derived.update({k: v for k, v in spec.extras.items() if k in ("out_dims", "prediction_reshaper")})
        if spec.input == "image":
            return {**derived, "in_channels": spec.in_channels, **kwargs}
        if spec.input == "sequence":
            if spec.extras.get("binary_tokens"):
                tokens = {"backbone_type": "parity_backbone", "positional_embedding_type": "custom-rotational-1d"}
            else:  # the 1-D rotational positions: without them attention over the steps is blind to their order
                tokens = {"backbone_type": "sequence", "positional_embedding_type": "custom-rotational-1d",
                          "in_channels": spec.sequence_shape[1]}
            return {**derived, **tokens, **kwargs}  # the user's settings are honoured
        # flat inputs have no tokens to attend over: a generic config's heads and action synchronisation are unused
        direct = {"heads": 0, "n_synch_action": 0, "backbone_type": "none", "positional_embedding_type": "none"}
        clash = sorted(k for k in ("backbone_type", "positional_embedding_type") if kwargs.get(k, "none") != "none")
        if clash:
            raise SpecError(f"{getattr(cls, 'registry_name', cls.__name__)} feeds {spec.describe_input()} straight into its synapses (no attention): "
                            f"it cannot take {', '.join(f'{k}={kwargs[k]!r}' for k in clash)}")
        return {**derived, **kwargs, **direct, "d_input": spec.in_features}

    def check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if self.backbone_type == "parity_backbone":
            check_shape(name, x, "(B, L) of +-1 values", x.dim() == 2)
        elif self.backbone_type == "sequence":
            check_shape(name, x, "(B, L) or (B, L, F)", x.dim() in (2, 3))
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


def must_call(module: nn.Module) -> bool:
    """A layer a fused path must call instead of reading its weights: something is attached to it (dendrites, a
    user's probe), or it is no longer a plain nn.Linear (a peft LoRA layer in its place)."""
    return not is_plain(module)


def folded_query(q_proj: nn.Linear, attention: nn.MultiheadAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """The query map synch -> q_proj -> attention's W_q -> 1/sqrt(head dim) as one (weight, bias), computed once
    per forward instead of two linear maps and a scaling per tick."""
    E = attention.embed_dim
    scale = math.sqrt(1.0 / (E // attention.num_heads))
    w_q, b_q = attention.in_proj_weight[:E] * scale, attention.in_proj_bias[:E] * scale
    return w_q @ q_proj.weight, F.linear(q_proj.bias, w_q, b_q)


def query_projection(q_proj: nn.Linear, attention: nn.MultiheadAttention):
    """synch -> the scaled attention query (B, E): the folded map, or, where q_proj must be called (dendrites,
    LoRA), q_proj called each tick followed by the attention's scaled W_q. A wrapped attention is refused: its
    weights are read here and by `attention_memory`."""
    if type(attention) is not nn.MultiheadAttention:
        raise BiozooError(f"the CTM's attention reads nn.MultiheadAttention's weights, but it is a "
                          f"{type(attention).__name__} (peft LoRA on 'attention'?): adapt q_proj, kv_proj.0, "
                          "synapses.* or output_projector.0 instead")
    if not must_call(q_proj):
        return deferred_linear(*folded_query(q_proj, attention))
    E = attention.embed_dim
    scale = math.sqrt(1.0 / (E // attention.num_heads))
    w_q, b_q = attention.in_proj_weight[:E] * scale, attention.in_proj_bias[:E] * scale
    return lambda synch: F.linear(q_proj(synch), w_q, b_q)


def out_projection(attention: nn.MultiheadAttention):
    """The attention's output map for the tick loop (`tick_linear`), or the layer where it must be called."""
    out_proj = attention.out_proj
    if type(out_proj) is not nn.modules.linear.NonDynamicallyQuantizableLinear or has_hooks(out_proj) \
            or not torch.is_grad_enabled():
        return out_proj
    return deferred_linear(out_proj.weight, out_proj.bias)


def attend_projected(attention: nn.MultiheadAttention, q: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, out_proj=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend` for a query already projected and scaled (B, E); `out_proj`: the output map (default the
    attention's own)."""
    B, E = q.shape
    h = attention.num_heads
    weights = torch.softmax(q.view(B, h, 1, E // h) @ keys, -1)
    if attention.dropout > 0 and attention.training:
        weights = F.dropout(weights, attention.dropout)
    return (out_proj or attention.out_proj)((weights @ values).reshape(B, E)), weights


__all__ = ["NEURON_SELECT_TYPES", "HALT_ON", "RESNET_BACKBONES", "BACKBONES", "POSITIONAL_EMBEDDINGS", "Squeeze", "ContiguousGrad", "FusedNLM", "SuperLinear", "NeuronLevelModels", "SynapseUNET", "SynapseGLU", "make_synapses", "synch_representation_size", "sample_synch_neurons", "synch_pairs", "normalised_entropy", "ParityBackbone", "SequenceTokens", "Neurons", "ResNetBasicBlock", "ResNetBottleneck", "RESNET_LAYERS", "TruncatedResNet", "ShallowWide", "make_backbone", "coordinate_grid", "LearnableFourierPositionalEncoding", "MultiLearnableFourierPositionalEncoding", "rotated_unit_vectors", "CustomRotationalEmbedding", "CustomRotationalEmbedding1D", "NoPositionalEmbedding", "make_positional_embedding", "TickedModelBase", "attention_memory", "attend", "must_call", "tick_linear", "deferred_linear", "out_projection", "folded_query", "query_projection", "attend_projected"]
