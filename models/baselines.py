"""Baselines that the bio-inspired models are compared against: an MLP, an LSTM and a CIFAR-style ResNet.

- MLP: Linear -> activation -> (Dropout) blocks, then a linear head. Reads anything flat-able.
- LSTM: reads a sequence (B, T, F) -- (B, T) as (B, T, 1), an image (B, C, H, W) one row per step, (B, H, C*W) --
  and classifies from the last hidden state, or per step with `per_step=True`. An observation (B, F) is one
  step: with `state` (see `initial_state`) it runs as a recurrent policy across env steps.
- mlp_policy: an MLP (tanh) behind its own `RunningNorm`, whose statistics are saved with the weights (the
  control harness updates them after each rollout); mlp_policy_256 is the NCAP paper's 256x256 one.
- Transformer: a small pre-norm encoder (Vaswani et al. 2017, arXiv 1706.03762) over tokens read as the LSTM
  reads steps (an image one row per token), learned positions, mean pooling and a linear head; per token with
  `per_step=True`. Its feed-forward activation is `nn.TransformerEncoderLayer`'s (a string, so `F.gelu`). PyTorch's
  fused inference path reads the layers' weights directly, so it is switched off while any layer of the encoder
  is replaced or hooked (a peft LoRA layer, dendrites), which would otherwise be skipped in eval.
- ResNet: He et al. 2016 (arXiv 1512.03385), the CIFAR variant of section 4.2: a 3x3 stem, three stages of
  basic blocks with 16/32/64 channels (times `width`/16), depth = 6n + 2, global average pooling.

Every forward returns a `ModelOutput`; with `positions` (e.g. parity's [16], a maze route's [100]) the head emits
`num_classes` logits per position, `.logits` (B, C, *positions).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from biozoo._core import DataSpec, ModelOutput, classes_first

from ._fused import is_plain
from ._hub import PretrainedMixin
from ._registry import register_model
from .errors import check_shape


def head_output(logits: torch.Tensor, num_classes: int, positions: list[int] | None) -> ModelOutput:
    return ModelOutput(classes_first(logits, num_classes, positions or []))

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def make_activation(name: str) -> nn.Module:
    from ._registry import suggest
    from .errors import UnknownNameError

    if name not in ACTIVATIONS:
        raise UnknownNameError(f"unknown activation {name!r}.{suggest(name, list(ACTIVATIONS))}")
    return ACTIVATIONS[name]()


@register_model(name="mlp")
class MLP(PretrainedMixin, nn.Module):
    reads = ("image", "sequence", "features", "observation")

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: list[int] = (256, 256),
                 activation: str = "relu", dropout: float = 0.0, positions: list[int] | None = None):
        super().__init__()
        self.in_features, self.num_classes = in_features, num_classes
        self.positions = list(positions) if positions else None
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), make_activation(activation)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes * math.prod(self.positions or []))

    @classmethod
    def spec_kwargs(cls, spec: DataSpec, kwargs: dict) -> dict:
        return {"in_features": spec.in_features, "num_classes": spec.classes,
                "positions": list(spec.positions) or None, **kwargs}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_shape("mlp", x, f"(B, {self.in_features}) or (B, ...) with {self.in_features} values per sample",
                    x.dim() >= 2 and math.prod(x.shape[1:]) == self.in_features)
        return self.features(x.flatten(1))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return head_output(self.head(self.forward_features(x)), self.num_classes, self.positions)


@register_model(name="lstm")
class LSTMClassifier(PretrainedMixin, nn.Module):
    reads = ("sequence", "image", "observation")
    online = True  # per step, the answer at t reads steps <= t

    def __init__(self, input_size: int = 8, num_classes: int = 10, hidden_size: int = 128, num_layers: int = 1,
                 dropout: float = 0.0, per_step: bool = False, positions: list[int] | None = None):
        super().__init__()
        self.input_size, self.per_step, self.num_classes = input_size, per_step, num_classes
        self.positions = list(positions) if positions and not per_step else None
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.head = nn.Linear(hidden_size, num_classes * math.prod(self.positions or []))

    @classmethod
    def spec_kwargs(cls, spec: DataSpec, kwargs: dict) -> dict:
        if spec.input == "observation":
            return {"input_size": spec.in_features, "num_classes": spec.classes, **kwargs}
        length, features = spec.sequence_shape
        per_step = spec.positions == (length,)  # one answer per input step (parity): read every step
        if spec.online and kwargs.get("per_step") is False:
            from biozoo._core import SpecError

            raise SpecError(f"lstm cannot take {spec.describe_input()} with per_step=False: it would answer every "
                            "step from the last")
        return {"input_size": features, "num_classes": spec.classes, "per_step": per_step,
                "positions": None if per_step else (list(spec.positions) or None), **kwargs}

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(h, c), each (B, layers, hidden): zeros, batch first (the recurrent protocol of `biozoo._core`)."""
        zeros = torch.zeros(batch_size, self.num_layers, self.hidden_size, device=device)
        return zeros, zeros.clone()

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModelOutput:
        x = as_steps(x, self.input_size)
        if x.dim() == 2:  # one observation step (B, F)
            x = x.unsqueeze(1)
        check_shape("lstm", x, f"(B, T, {self.input_size}), (B, T) for input_size 1, (B, {self.input_size}) for one "
                    f"step, or an image (B, C, H, W) with C*W = {self.input_size}",
                    x.dim() == 3 and x.shape[-1] == self.input_size)
        hc = None if state is None else tuple(s.transpose(0, 1).contiguous() for s in state)
        out, (h, c) = self.lstm(x, hc)
        next_state = (h.transpose(0, 1), c.transpose(0, 1))
        if self.per_step:
            return ModelOutput(self.head(out).transpose(1, 2), state=next_state)  # (B, classes, T)
        return ModelOutput(classes_first(self.head(out[:, -1]), self.num_classes, self.positions or []),
                           state=next_state)


def as_steps(x: torch.Tensor, input_size: int) -> torch.Tensor:
    """(B, T, F) as the sequence models read it: an image (B, C, H, W) one row per step, (B, T) scalars as (B, T, 1)."""
    if x.dim() == 4:
        return x.permute(0, 2, 1, 3).flatten(2)
    if x.dim() == 2 and input_size == 1:
        return x.unsqueeze(-1)
    return x


@register_model(name="transformer")
class TransformerClassifier(PretrainedMixin, nn.Module):
    reads = ("sequence", "image")
    online = True  # on an online task it is built causal: token t attends to tokens <= t

    def __init__(self, input_size: int = 8, seq_len: int = 8, num_classes: int = 10, d_model: int = 64,
                 heads: int = 4, layers: int = 2, dim_feedforward: int = 128, activation: str = "gelu",
                 dropout: float = 0.0, per_step: bool = False, positions: list[int] | None = None,
                 causal: bool = False):
        super().__init__()
        if causal and not per_step:
            from .errors import BiozooError

            raise BiozooError("a causal transformer answers per step (per_step=True); a pooled answer reads every step")
        self.input_size, self.seq_len, self.num_classes, self.per_step = input_size, seq_len, num_classes, per_step
        self.causal = causal
        self.positions = list(positions) if positions and not per_step else None
        self.embed = nn.Linear(input_size, d_model)
        self.pos = nn.Parameter(torch.randn(1, seq_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward, dropout, activation=activation,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes * math.prod(self.positions or []))

    @classmethod
    def spec_kwargs(cls, spec: DataSpec, kwargs: dict) -> dict:
        length, features = spec.sequence_shape
        per_step = spec.positions == (length,)
        if spec.online and kwargs.get("causal") is False:
            from biozoo._core import SpecError

            raise SpecError(f"transformer cannot take {spec.describe_input()} with causal=False: its answer at step t "
                            "would see later steps")
        return {"input_size": features, "seq_len": length, "num_classes": spec.classes, "per_step": per_step,
                "positions": None if per_step else (list(spec.positions) or None), "causal": spec.online, **kwargs}

    def fused_path_is_exact(self) -> bool:
        """True while every layer of the encoder is the plain module PyTorch's fused path reads."""
        plain = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention, nn.Dropout, nn.TransformerEncoderLayer,
                 nn.ModuleList, nn.TransformerEncoder, nn.modules.linear.NonDynamicallyQuantizableLinear)
        return all(is_plain(m, *plain) for m in self.encoder.modules())

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(h.size(1), h.device, h.dtype) if self.causal else None
        if self.training or self.fused_path_is_exact():
            return self.encoder(h, mask=mask, is_causal=self.causal)
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return self.encoder(h, mask=mask, is_causal=self.causal)
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        x = as_steps(x, self.input_size)
        check_shape("transformer", x, f"(B, {self.seq_len}, {self.input_size}), or an image (B, C, H, W) with "
                    f"H = {self.seq_len} rows of C*W = {self.input_size}",
                    x.dim() == 3 and x.shape[1:] == (self.seq_len, self.input_size))
        h = self.encode(self.embed(x) + self.pos)
        if self.per_step:
            return ModelOutput(self.head(h).transpose(1, 2))  # (B, classes, T)
        return head_output(self.head(h.mean(1)), self.num_classes, self.positions)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@register_model(name="resnet")
class ResNet(PretrainedMixin, nn.Module):
    reads = ("image",)

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16,
                 positions: list[int] | None = None):
        super().__init__()
        self.num_classes, self.positions = num_classes, (list(positions) if positions else None)
        if (depth - 2) % 6:
            from .errors import BiozooError

            raise BiozooError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.in_channels = in_channels
        widths = [width, 2 * width, 4 * width]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, cin = [], width
        for stage, cout in enumerate(widths):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes * math.prod(self.positions or []))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_shape("resnet", x, f"(B, {self.in_channels}, H, W)", x.dim() == 4 and x.shape[1] == self.in_channels)
        return self.blocks(self.stem(x)).mean((2, 3))

    @classmethod
    def spec_kwargs(cls, spec: DataSpec, kwargs: dict) -> dict:
        return {"in_channels": spec.in_channels, "num_classes": spec.classes,
                "positions": list(spec.positions) or None, **kwargs}

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return head_output(self.head(self.forward_features(x)), self.num_classes, self.positions)


@register_model
def resnet8(num_classes: int = 10, in_channels: int = 3, width: int = 16, positions: list[int] | None = None) -> ResNet:
    return ResNet(8, num_classes, in_channels, width, positions)


@register_model
def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16,
             positions: list[int] | None = None) -> ResNet:
    return ResNet(20, num_classes, in_channels, width, positions)


# Policies: an MLP behind its own observation normaliser ---------------------------------------------------------

class RunningNorm(nn.Module):
    """Observation normalisation with running mean and variance (parallel Welford update), clipped to +-clip.
    The statistics are buffers: they are saved and loaded with the policy's weights."""

    def __init__(self, size: int, clip: float = 10.0, eps: float = 1e-8):
        super().__init__()
        self.clip, self.eps = clip, eps
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("var", torch.ones(size))
        self.register_buffer("count", torch.tensor(0.0))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.mean.numel()).to(self.mean.dtype)
        n = x.shape[0]
        if n == 0:
            return
        mean, var = x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta.square() * self.count * n / total
        self.mean += delta * n / total
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / torch.sqrt(self.var + self.eps)).clamp(-self.clip, self.clip)


@register_model(name="mlp_policy")
class MLPPolicy(PretrainedMixin, nn.Module):
    """The MLP baseline policy: RunningNorm -> MLP (tanh) -> action mean. Orthogonal init (gain sqrt 2, last
    layer 0.01), as in CleanRL/SB3 PPO. `in_features` = observation size, `num_classes` = action size."""

    reads = ("observation", "features")
    predicts = ("continuous_actions", "discrete_actions")

    def __init__(self, in_features: int = 24, num_classes: int = 5, hidden: list[int] = (64, 64),
                 activation: str = "tanh"):
        super().__init__()
        self.in_features = in_features
        self.obs_norm = RunningNorm(in_features)
        self.net = MLP(in_features, num_classes, list(hidden), activation)
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.orthogonal_(m.weight, 0.01 if m is self.net.head else math.sqrt(2))
                nn.init.zeros_(m.bias)

    def forward(self, obs: torch.Tensor) -> ModelOutput:
        check_shape("mlp_policy", obs, f"(B, {self.in_features})", obs.dim() == 2 and obs.shape[1] == self.in_features)
        return self.net(self.obs_norm(obs))


@register_model
def mlp_policy_256(in_features: int = 24, num_classes: int = 5) -> MLPPolicy:
    """The 256x256 MLP of the NCAP paper's videos (mlp256_ppo / mlp256_ddpg)."""
    return MLPPolicy(in_features, num_classes, [256, 256], "tanh")
