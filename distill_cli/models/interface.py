"""The one interface every model shares: named stages feeding a linear ``head``.

Architectures live in their own modules and subclass :class:`DistillModel`; the stage layer
only ever sees it through ``distill_cli.models.build_model``, e.g.
``distill-cli distill model=wrn_16_2``.
"""

from __future__ import annotations

from collections.abc import Callable

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
        self.config: dict = {}  # build_model adds name, classes, channels and size to its own

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

    def fx_leaves(self) -> tuple[tuple[type[nn.Module], ...], tuple[Callable, ...]]:
        """Module types and functions that ``torch.fx`` must not trace into (``fold``): none."""
        return (), ()

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces ``head`` with a freshly initialised one for ``num_classes`` classes."""
        old = self.head.weight
        self.head = nn.Linear(self.num_features, num_classes, device=old.device, dtype=old.dtype)
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes


def init_conv_bn(module: nn.Module) -> None:
    """He-normal convs (fan out) and unit BatchNorms, as in the CIFAR KD reference code."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
