"""Non-ResNet CIFAR conv nets of the KD literature: VGG, MobileNetV2, ShuffleNetV2.

Layouts follow RepDistiller/CRD (``models/vgg.py``, ``mobilenetv2.py``, ``ShuffleNetv2.py``),
with adaptive average pooling so every input size works. Built by name, e.g.
``distill-cli distill model=mobilenetv2``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill_cli.models.interface import DistillModel, init_conv_bn


def _global_pool() -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten()]


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=False)
    return [conv, nn.BatchNorm2d(out_ch), nn.ReLU()]


class VGG(DistillModel):
    """CIFAR VGG with BatchNorm: five stages of 3x3 convs (64, 128, 256, 512, 512 channels).

    Stages 1-3 start with a 2x2 max-pool; stage 4 only from 64x64 inputs up, as in vgg.py.
    Convs keep their bias, as there.

    Args:
        num_classes: Classifier outputs.
        in_channels: Image channels.
        image_size: At least 8; from 64 up, stage 4 max-pools too.
        convs: Convs per stage: 1 gives VGG8, 2 gives VGG13.
    """

    def __init__(
        self, num_classes: int, in_channels: int = 3, image_size: int = 32, convs: int = 1
    ):
        if image_size < 8:
            raise ValueError(f"VGG needs image_size >= 8 for its three max-pools, got {image_size}")
        stages: dict[str, nn.Module] = {}
        names = ("stem", "layer1", "layer2", "layer3", "layer4")
        prev = in_channels
        for i, (name, width) in enumerate(zip(names, (64, 128, 256, 512, 512), strict=True)):
            layers: list[nn.Module] = []
            if i in (1, 2, 3) or (i == 4 and image_size >= 64):
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs):
                layers += [nn.Conv2d(prev, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
                prev = width
            stages[name] = nn.Sequential(*layers)
        stages["pooled"] = nn.Sequential(*_global_pool())
        super().__init__(stages, num_features=prev, num_classes=num_classes)
        init_conv_bn(self.stages)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, linear 1x1 project; residual if shapes fit."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int):
        super().__init__()
        hidden = in_channels * expand
        self.residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            *_conv_bn_relu(in_channels, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Returns the projected block output, plus ``x`` when shapes allow."""
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2(DistillModel):
    """RepDistiller's CIFAR MobileNetV2 (``mobile_half``: expansion 6, width 0.5).

    Stride-2 stem, seven block groups (strides 1, 1, 2, 2, 1, 2, 1), a 1x1 conv to 1280
    channels, global average pooling. Stages group the blocks as RepDistiller's features do.

    Args:
        num_classes: Classifier outputs.
        in_channels: Image channels.
        image_size: Unused: global average pooling accepts any size.
        expand: Expansion ratio of the inverted residual blocks after the first.
        width: Width multiplier of the stem and blocks (the final 1280 stays).
    """

    # (expansion, channels, blocks, stride); expansion None means ``expand``.
    SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
               (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))  # fmt: skip
    GROUPS = {"layer1": (0, 1), "layer2": (2,), "layer3": (3, 4), "layer4": (5, 6)}

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        expand: int = 6,
        width: float = 0.5,
    ):
        prev = int(32 * width)
        stages: dict[str, nn.Module] = {
            "stem": nn.Sequential(*_conv_bn_relu(in_channels, prev, 3, 2))
        }
        groups = []
        for t, c, n, s in self.SETTING:
            out = int(c * width)
            blocks = []
            for stride in [s] + [1] * (n - 1):
                blocks.append(InvertedResidual(prev, out, stride, t or expand))
                prev = out
            groups.append(blocks)
        for name, idx in self.GROUPS.items():
            stages[name] = nn.Sequential(*(b for i in idx for b in groups[i]))
        stages["pooled"] = nn.Sequential(*_conv_bn_relu(prev, 1280, 1), *_global_pool())
        super().__init__(stages, num_features=1280, num_classes=num_classes)
        init_conv_bn(self.stages)


def _channel_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: half the channels pass, half go 1x1, 3x3 depthwise, 1x1; then shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            *_conv_bn_relu(half, half, 1),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            *_conv_bn_relu(half, half, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Returns the shuffled concatenation of the kept half and the branch output."""
        keep, rest = x.chunk(2, dim=1)
        return _channel_shuffle(torch.cat([keep, self.branch(rest)], dim=1))


class ShuffleDown(nn.Module):
    """ShuffleNetV2 downsampling unit: two stride-2 branches, concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.left = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, 2, padding=1, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            *_conv_bn_relu(in_channels, mid, 1),
        )
        self.right = nn.Sequential(
            *_conv_bn_relu(in_channels, mid, 1),
            nn.Conv2d(mid, mid, 3, 2, padding=1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            *_conv_bn_relu(mid, mid, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Returns the shuffled concatenation of both branches, half the spatial size."""
        return _channel_shuffle(torch.cat([self.left(x), self.right(x)], dim=1))


class ShuffleNetV2(DistillModel):
    """RepDistiller's CIFAR ShuffleNetV2 (net size 1): 1x1 stem, three downsampling stages.

    Args:
        num_classes: Classifier outputs.
        in_channels: Image channels.
        image_size: Unused: global average pooling accepts any size.
        widths: Channels of the three stages and of the final 1x1 conv.
        units: Non-downsampling units per stage.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        widths: tuple[int, int, int, int] = (116, 232, 464, 1024),
        units: tuple[int, int, int] = (3, 7, 3),
    ):
        *stage_widths, last = widths
        stages: dict[str, nn.Module] = {"stem": nn.Sequential(*_conv_bn_relu(in_channels, 24, 1))}
        prev = 24
        for i, (width, n) in enumerate(zip(stage_widths, units, strict=True), start=1):
            blocks = [ShuffleDown(prev, width)] + [ShuffleUnit(width) for _ in range(n)]
            stages[f"layer{i}"] = nn.Sequential(*blocks)
            prev = width
        stages["pooled"] = nn.Sequential(*_conv_bn_relu(prev, last, 1), *_global_pool())
        super().__init__(stages, num_features=last, num_classes=num_classes)
        init_conv_bn(self.stages)
