"""Models that read an image as a sequence: a small ViT (patches) and an LSTM (rows).

Built by name, e.g. ``distill-cli pretrain model=vit_tiny`` or ``model=lstm_rows``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill_cli.models.interface import DistillModel


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


class RowLSTM(nn.Module):
    """Runs an LSTM over image rows: each row (width x channels values) is one timestep."""

    def __init__(self, row_features: int, hidden: int, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(row_features, hidden, num_layers=layers, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        """Maps (B, C, H, W) images to the top layer's outputs, shape (B, H, hidden)."""
        rows = x.permute(0, 2, 3, 1).flatten(2)  # (B, H, W * C), channels interleaved per pixel
        return self.lstm(rows)[0]


class LastStep(nn.Module):
    """The last timestep of a sequence: for an LSTM, its final hidden state."""

    def forward(self, x: Tensor) -> Tensor:
        """Returns x[:, -1], shape (B, features)."""
        return x[:, -1]


class LSTMRows(DistillModel):
    """Row-by-row LSTM classifier (features ``rows`` (B, H, hidden) and ``pooled``).

    Args:
        num_classes: Classifier outputs.
        in_channels: Image channels.
        image_size: Image width, which fixes the size of a timestep.
        hidden: LSTM hidden size.
        layers: Stacked LSTM layers.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        hidden: int = 128,
        layers: int = 2,
    ):
        stages = {"rows": RowLSTM(image_size * in_channels, hidden, layers), "pooled": LastStep()}
        super().__init__(stages, num_features=hidden, num_classes=num_classes)
