"""Models by name, all with one timm-style interface.

The stage layer picks a model from the config, e.g. ``distill-cli pretrain model=resnet8x4``;
everything below it builds one from plain arguments::

    model = build_model("resnet8x4", num_classes=100, in_channels=3, image_size=32)
    logits = model(x)                               # (B, 100)
    logits, feats = model.forward_with_features(x)  # feats["layer3"], feats["pooled"], ...
    model.reset_classifier(10)                      # fresh head before finetuning
    twin = build_model(**model.config)              # the config is what a checkpoint stores

Parameters whose name starts with ``head.`` are the classifier; all others are the backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DistillModel(nn.Module):
    """Named stages feeding a linear classifier ``head``.

    Each stage's output is one named feature. The last stage is always ``"pooled"``: the
    ``(B, num_features)`` vector that ``head`` reads.
    """

    def __init__(self, stages: dict[str, nn.Module], num_features: int, num_classes: int):
        super().__init__()
        self.stages = nn.ModuleDict(stages)
        self.num_features = num_features
        self.num_classes = num_classes
        self.head = nn.Linear(num_features, num_classes)
        self.config: dict = {}  # filled by build_model

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Keys of ``forward_with_features``, in forward order."""
        return tuple(self.stages.keys())

    def forward_features(self, x: Tensor) -> Tensor:
        """Returns the pooled feature vector, shape (B, num_features)."""
        for stage in self.stages.values():
            x = stage(x)
        return x

    def forward_head(self, features: Tensor) -> Tensor:
        """Maps pooled features to logits."""
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        """Returns logits, shape (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns logits and the output of every stage, keyed by ``feature_names``."""
        features = {}
        for name, stage in self.stages.items():
            x = stage(x)
            features[name] = x
        return self.forward_head(x), features

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces ``head`` with a freshly initialised one for ``num_classes`` classes."""
        old = self.head.weight
        self.head = nn.Linear(self.num_features, num_classes, device=old.device, dtype=old.dtype)
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes


class SmallCNN(DistillModel):
    """The seed's two-conv CNN; its flatten size follows the image size."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32):
        side = image_size // 4  # two 2x2 max-pools, each rounding down
        stages = {
            "layer1": nn.Sequential(
                nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
            ),
            "layer2": nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
            "pooled": nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU()),
        }
        super().__init__(stages, num_features=128, num_classes=num_classes)


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


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    """A stage of BasicBlocks; only the first one changes stride and width."""
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
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
            stages[f"layer{i}"] = _stage(prev, width, blocks, stride)
            prev = width
        stages["pooled"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        super().__init__(stages, num_features=prev, num_classes=num_classes)
        for m in self.stages.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class PatchEmbed(nn.Module):
    """Image to tokens: patch conv, a class token in front, learned positions added."""

    def __init__(self, in_channels: int, image_size: int, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        num_patches = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """Returns tokens, shape (B, 1 + num_patches, dim)."""
        x = self.proj(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed


class Attention(nn.Module):
    """Multi-head self-attention over fused q, k, v projections."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Returns attended tokens, same shape as ``x``."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm Transformer block: attention then MLP, each residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = dim * mlp_ratio
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        """Returns updated tokens."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClassTokenPool(nn.Module):
    """Final LayerNorm applied to the class token, which is the pooled feature."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """Returns the normalised class token, shape (B, dim)."""
        return self.norm(x[:, 0])


class ViT(DistillModel):
    """Small vision Transformer; patch size is the largest of 4, 2, 1 dividing the image."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 2,
    ):
        patch_size = next(p for p in (4, 2, 1) if image_size % p == 0)
        stages: dict[str, nn.Module] = {
            "tokens": PatchEmbed(in_channels, image_size, patch_size, dim)
        }
        for i in range(1, depth + 1):
            stages[f"block{i}"] = Block(dim, heads, mlp_ratio)
        stages["pooled"] = ClassTokenPool(dim)
        super().__init__(stages, num_features=dim, num_classes=num_classes)
        # timm's ViT init; the default Linear init is too wide for stable Transformer training.
        for m in self.stages.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": SmallCNN,
    "resnet8": partial(CifarResNet, depth=8),
    "resnet20": partial(CifarResNet, depth=20),
    "resnet56": partial(CifarResNet, depth=56),
    "resnet110": partial(CifarResNet, depth=110),
    "resnet8x4": partial(CifarResNet, depth=8, widths=(32, 64, 128, 256)),
    "resnet32x4": partial(CifarResNet, depth=32, widths=(32, 64, 128, 256)),
    "vit_tiny": ViT,
}


def build_model(
    name: str, num_classes: int, in_channels: int = 3, image_size: int = 32
) -> DistillModel:
    """Builds a model by name and records the arguments that rebuild it in ``model.config``.

    Raises:
        ValueError: If the name is unknown or a size is too small.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    if num_classes < 1 or in_channels < 1 or image_size < 4:
        raise ValueError(
            f"need num_classes >= 1, in_channels >= 1, image_size >= 4; got "
            f"{num_classes}, {in_channels}, {image_size}"
        )
    model = MODELS[name](num_classes, in_channels, image_size)
    # Plain ints (not e.g. OmegaConf or numpy values) so checkpoints load with weights_only=True.
    model.config = {
        "name": name,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "image_size": int(image_size),
    }
    return model


def count_params(model: nn.Module) -> int:
    """Counts all parameters, trainable and frozen."""
    return sum(p.numel() for p in model.parameters())
