"""MobileFaceNet (Chen et al. 2018, "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face
Verification on Mobile Devices", Table 1) for a 112x96 input and a 128-d embedding.

Module names follow the public CASIA-WebFace checkpoint: ``conv1``, ``dw_conv1``,
``conv2``, ``linear7`` and ``linear1`` hold ``.conv``, ``.bn`` and, where
activated, ``.prelu``; each bottleneck's ``conv`` is a Sequential of
1x1 expand, BN, PReLU, depthwise 3x3, BN, PReLU, 1x1 project, BN.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s), Table 1 of the paper.
BOTTLENECK_SETTINGS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class ConvBlock(nn.Module):
    """Convolution, BatchNorm and an optional per-channel PReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        activation: bool = True,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.prelu = nn.PReLU(out_channels) if activation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return x if self.prelu is None else self.prelu(x)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand, depthwise 3x3 (carries the stride), linear 1x1 project.

    The shortcut is added only where the block keeps the shape (stride 1 and
    as many output as input channels).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int, *, bn_eps: float = 1e-5):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden, eps=bn_eps),
            nn.PReLU(hidden),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden, eps=bn_eps),
            nn.PReLU(hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels, eps=bn_eps),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet returning the raw embedding (N, embedding_size).

    Args:
        embedding_size: output dimension of ``linear1``.
        input_size: (height, width) of the input; the global depthwise
            ``linear7`` kernel covers the whole last map (7x6 for 112x96).
        bn_eps: BatchNorm eps.
    """

    def __init__(
        self, *, embedding_size: int = 128, input_size: Sequence[int] = (112, 96), bn_eps: float = 1e-5
    ) -> None:
        super().__init__()
        height, width = (int(v) for v in input_size)
        self.conv1 = ConvBlock(3, 64, 3, stride=2, padding=1, bn_eps=bn_eps)
        self.dw_conv1 = ConvBlock(64, 64, 3, padding=1, groups=64, bn_eps=bn_eps)
        blocks = []
        in_channels = 64
        for expansion, channels, repeats, stride in BOTTLENECK_SETTINGS:
            for index in range(repeats):
                blocks.append(Bottleneck(in_channels, channels, stride if index == 0 else 1, expansion, bn_eps=bn_eps))
                in_channels = channels
        self.blocks = nn.Sequential(*blocks)
        self.conv2 = ConvBlock(in_channels, 512, 1, bn_eps=bn_eps)

        # conv1 and two bottleneck stages halve the map: 112x96 -> 7x6.
        for _ in range(4):
            height, width = (height + 1) // 2, (width + 1) // 2
        self.linear7 = ConvBlock(512, 512, (height, width), groups=512, activation=False, bn_eps=bn_eps)
        self.linear1 = ConvBlock(512, embedding_size, 1, activation=False, bn_eps=bn_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (N, 3, 112, 96) to the last feature map (N, 512, 7, 6)."""
        x = self.conv1(x)
        x = self.dw_conv1(x)
        x = self.blocks(x)
        return self.conv2(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Map the last feature map to the raw embedding (N, embedding_size)."""
        x = self.linear7(x)  # global depthwise conv: (N, 512, 1, 1)
        x = self.linear1(x)
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
