"""The improved ResNet (iResNet) backbone with the module tree that MagFace's checkpoints use.

Module names and order match MagFace's release so that its checkpoints load
tensor for tensor: stem ``conv1``/``bn1``/``prelu``, stages ``layer1..layer4``
of :class:`IBasicBlock` (each stage starts with a stride-2 block and a
``downsample``), then ``bn2``, Dropout2d on the 4-D map, flatten, ``fc`` and
the BatchNorm1d ``features``. The L2 norm of the raw output is MagFace's
quality score (the magnitude).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

STANDARD_WIDTHS = (64, 128, 256, 512)

# MagFace builds every BatchNorm with eps 2e-5 and passes momentum 0.9 to
# PyTorch, which weights the new batch statistics by 0.9 in training mode.
MAGFACE_BN_EPS = 2e-5
MAGFACE_BN_MOMENTUM = 0.9


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation residual block: bn1, conv1, bn2, prelu, conv2 (strided), bn3, plus the shortcut."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        bn_eps: float = MAGFACE_BN_EPS,
        bn_momentum: float = MAGFACE_BN_MOMENTUM,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=bn_eps, momentum=bn_momentum)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=bn_eps, momentum=bn_momentum)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels, eps=bn_eps, momentum=bn_momentum)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        return out + shortcut  # no activation after the addition


class IResNet(nn.Module):
    """iResNet backbone returning the raw embedding (N, embedding_size).

    Args:
        layers: blocks per stage, e.g. ``[3, 4, 14, 3]`` for iresnet50.
        widths: channels of the four stages; the stem uses ``widths[0]``.
        embedding_size: output dimension of ``fc`` and ``features``.
        input_size: (height, width) of the input, which sets the ``fc`` input size.
        dropout: Dropout2d probability on the last feature map (training only).
        bn_eps: BatchNorm eps (MagFace 2e-5, InsightFace arcface_torch 1e-5).
        bn_momentum: BatchNorm momentum in PyTorch's convention.
    """

    def __init__(
        self,
        layers: Sequence[int],
        *,
        widths: Sequence[int] = STANDARD_WIDTHS,
        embedding_size: int = 512,
        input_size: Sequence[int] = (112, 112),
        dropout: float = 0.4,
        bn_eps: float = MAGFACE_BN_EPS,
        bn_momentum: float = MAGFACE_BN_MOMENTUM,
    ) -> None:
        super().__init__()
        layers = [int(n) for n in layers]
        widths = [int(w) for w in widths]
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"invalid iResNet layers {layers}: expected 4 stages of at least one block each")
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"invalid iResNet widths {widths}: expected 4 positive channel counts")
        height, width = (int(v) for v in input_size)
        self.layer_counts = layers
        self.widths = widths
        self._bn = {"eps": bn_eps, "momentum": bn_momentum}

        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], **self._bn)
        self.prelu = nn.PReLU(widths[0])
        in_channels = widths[0]
        stages = []
        for channels, blocks in zip(widths, layers):
            stages.append(self._make_stage(in_channels, channels, blocks))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        # Each stage halves the map (3x3 conv, stride 2, padding 1): 112 -> 56 -> 28 -> 14 -> 7.
        for _ in range(4):
            height, width = (height + 1) // 2, (width + 1) // 2
        self.feature_map_size = (height, width)
        self.bn2 = nn.BatchNorm2d(widths[-1], **self._bn)
        self.dropout = nn.Dropout2d(p=dropout, inplace=True)
        self.fc = nn.Linear(widths[-1] * height * width, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, **self._bn)
        self._init_weights()

    def _make_stage(self, in_channels: int, channels: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(channels, **self._bn),
        )
        bn_options = {"bn_eps": self._bn["eps"], "bn_momentum": self._bn["momentum"]}
        stage = [IBasicBlock(in_channels, channels, 2, downsample, **bn_options)]
        for _ in range(1, blocks):
            stage.append(IBasicBlock(channels, channels, **bn_options))
        return nn.Sequential(*stage)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (N, 3, H, W) to the normalized last feature map (N, C, H/16, W/16)."""
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.prelu(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return self.bn2(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Map the last feature map to the raw embedding (N, embedding_size)."""
        x = self.dropout(x)
        x = torch.flatten(x, 1)  # (N, C * h * w), 25088 for the standard 112x112 model
        x = self.fc(x)
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def iresnet(
    layers: Sequence[int],
    *,
    embedding_size: int = 512,
    input_size: Sequence[int] = (112, 112),
    widths: Sequence[int] | None = None,
    width_multiplier: float | None = None,
    dropout: float = 0.4,
    bn_eps: float = MAGFACE_BN_EPS,
    bn_momentum: float = MAGFACE_BN_MOMENTUM,
) -> IResNet:
    """Build an iResNet; ``widths`` or ``width_multiplier`` (times 64/128/256/512) shrink it.

    Raises:
        ValueError: if both ``widths`` and ``width_multiplier`` are given.
    """
    if widths is not None and width_multiplier is not None:
        raise ValueError("pass either widths or width_multiplier for an iResNet, not both")
    if width_multiplier is not None:
        if width_multiplier <= 0:
            raise ValueError(f"invalid width_multiplier {width_multiplier}: expected a positive number")
        widths = [max(1, round(w * width_multiplier)) for w in STANDARD_WIDTHS]
    return IResNet(
        layers,
        widths=STANDARD_WIDTHS if widths is None else widths,
        embedding_size=embedding_size,
        input_size=input_size,
        dropout=dropout,
        bn_eps=bn_eps,
        bn_momentum=bn_momentum,
    )
