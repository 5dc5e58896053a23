"""Residual networks for CIFAR-sized images, in the layouts of the KD literature.

RepDistiller/CRD ``models/resnet.py`` (``resnet8`` ... ``resnet32x4``) and ``models/wrn.py``
(``wrn_16_2``, ``wrn_40_2``), built by name: ``distill-cli distill model=wrn_16_2``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distill_cli.models.interface import DistillModel, init_conv_bn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (1x1 conv-BN when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Returns relu(residual + shortcut)."""
        # Out-of-place ReLUs: forward_with_features keeps references to stage outputs.
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Wide ResNet block: BN-ReLU before each 3x3 conv, no activation after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Returns residual + shortcut."""
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        # As in wrn.py: a width-changing shortcut reads the activated input, identity the raw one.
        return out + (x if self.shortcut is None else self.shortcut(pre))


def _stage(block: type[nn.Module], in_ch: int, out_ch: int, n: int, stride: int) -> nn.Sequential:
    """``n`` blocks; only the first one changes stride and width."""
    layers = [block(in_ch, out_ch, stride)]
    layers += [block(out_ch, out_ch) for _ in range(n - 1)]
    return nn.Sequential(*layers)


class CifarResNet(DistillModel):
    """CIFAR ResNet of the KD literature (RepDistiller/CRD ``models/resnet.py`` layout).

    Args:
        num_classes: Classifier outputs.
        in_channels: Image channels.
        image_size: Unused: global average pooling accepts any size.
        depth: 6n + 2, giving n BasicBlocks per stage.
        widths: Channels of the stem and of the three stages.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        depth: int = 20,
        widths: tuple[int, int, int, int] = (16, 16, 32, 64),
    ):
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        stem, *stage_widths = widths
        stages: dict[str, nn.Module] = {
            "stem": nn.Sequential(
                nn.Conv2d(in_channels, stem, 3, padding=1, bias=False),
                nn.BatchNorm2d(stem),
                nn.ReLU(),
            )
        }
        prev = stem
        for i, (width, stride) in enumerate(zip(stage_widths, (1, 2, 2), strict=True), start=1):
            stages[f"layer{i}"] = _stage(BasicBlock, prev, width, blocks, stride)
            prev = width
        stages["pooled"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        super().__init__(stages, num_features=prev, num_classes=num_classes)
        init_conv_bn(self.stages)


class WideResNet(DistillModel):
    """Wide ResNet WRN-depth-widen (RepDistiller/CRD ``models/wrn.py``, dropout 0).

    The stage outputs are pre-activation sums, as wrn.py's features; ``pooled`` applies the
    final BN-ReLU before global average pooling.

    Args:
        num_classes: Classifier outputs.
        in_channels: Image channels.
        image_size: Unused: global average pooling accepts any size.
        depth: 6n + 4, giving n pre-activation blocks per stage.
        widen: Width multiplier of the three stages (16, 32, 64 channels times ``widen``).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        depth: int = 16,
        widen: int = 2,
    ):
        if (depth - 4) % 6:
            raise ValueError(f"Wide ResNet depth must be 6n+4, got {depth}")
        blocks = (depth - 4) // 6
        stages: dict[str, nn.Module] = {
            "stem": nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        }
        prev = 16
        for i, (width, stride) in enumerate(zip((16, 32, 64), (1, 2, 2), strict=True), start=1):
            stages[f"layer{i}"] = _stage(PreActBlock, prev, width * widen, blocks, stride)
            prev = width * widen
        stages["pooled"] = nn.Sequential(
            nn.BatchNorm2d(prev), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        super().__init__(stages, num_features=prev, num_classes=num_classes)
        init_conv_bn(self.stages)
