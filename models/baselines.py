"""Baselines that the bio-inspired models are compared against: an MLP, an LSTM and a CIFAR-style ResNet.

- MLP: Linear -> activation -> (Dropout) blocks, then a linear head.
- LSTM: reads a sequence (B, T, F) -- an image (B, C, H, W) is read one row per step, (B, H, C*W) --
  and classifies from the last hidden state, or per step with `per_step=True`.
- ResNet: He et al. 2016 (arXiv 1512.03385), the CIFAR variant of section 4.2: a 3x3 stem, three stages of
  basic blocks with 16/32/64 channels (times `width`/16), depth = 6n + 2, global average pooling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._hub import PretrainedMixin
from ._registry import register_model
from .errors import check_shape

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def make_activation(name: str) -> nn.Module:
    from ._registry import suggest
    from .errors import UnknownNameError

    if name not in ACTIVATIONS:
        raise UnknownNameError(f"unknown activation {name!r}.{suggest(name, list(ACTIVATIONS))}")
    return ACTIVATIONS[name]()


@register_model(name="mlp")
class MLP(PretrainedMixin, nn.Module):
    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: list[int] = (256, 256),
                 activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        self.in_features = in_features
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), make_activation(activation)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_shape("mlp", x, f"(B, {self.in_features}) or (B, ...) with {self.in_features} values per sample",
                    x.dim() >= 2 and math.prod(x.shape[1:]) == self.in_features)
        return self.features(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


@register_model(name="lstm")
class LSTMClassifier(PretrainedMixin, nn.Module):
    def __init__(self, input_size: int = 8, num_classes: int = 10, hidden_size: int = 128, num_layers: int = 1,
                 dropout: float = 0.0, per_step: bool = False):
        super().__init__()
        self.input_size, self.per_step = input_size, per_step
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # image: one row per step
            x = x.permute(0, 2, 1, 3).flatten(2)
        check_shape("lstm", x, f"(B, T, {self.input_size}) or an image (B, C, H, W) with C*W = {self.input_size}",
                    x.dim() == 3 and x.shape[-1] == self.input_size)
        out, _ = self.lstm(x)
        if self.per_step:
            return self.head(out).transpose(1, 2)  # (B, classes, T), the layout cross-entropy takes
        return self.head(out[:, -1])


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
    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
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
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_shape("resnet", x, f"(B, {self.in_channels}, H, W)", x.dim() == 4 and x.shape[1] == self.in_channels)
        return self.blocks(self.stem(x)).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


@register_model
def resnet8(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> ResNet:
    return ResNet(8, num_classes, in_channels, width)


@register_model
def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> ResNet:
    return ResNet(20, num_classes, in_channels, width)
