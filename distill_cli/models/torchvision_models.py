"""torchvision's ImageNet models behind the shared interface, optionally with ImageNet weights.

``distill-cli finetune model=resnet18 model.weights=imagenet`` downloads torchvision's published
weights; ``model.weights=/path/to/resnet18.pth`` reads a torchvision ``state_dict`` saved
elsewhere. Only the backbone is loaded: torchvision's last Linear is replaced by our ``head``.

The architectures stay as torchvision defines them, whatever the image size: a 16x16 input
reaches layer3/layer4 (resnets) and the last blocks (mobilenet_v3_small) at 1x1, since a
stride-2 3x3 conv with padding 1 maps 1x1 to 1x1, and adaptive pooling takes any size.
"""

from __future__ import annotations

import os
import pickle

import torch
from torch import Tensor, nn

from distill_cli.models.interface import DistillModel

TORCHVISION_MODELS = ("resnet18", "resnet50", "mobilenet_v3_small")
# The classifier parameters of each torchvision model that our head replaces.
_CLASSIFIER = {"resnet18": "fc.", "resnet50": "fc.", "mobilenet_v3_small": "classifier.3."}


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:200]


class ToRGB(nn.Module):
    """Repeats a one-channel image to the three channels torchvision's stems expect."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:
        """Returns a (B, 3, H, W) view of the input."""
        return x.repeat(1, 3, 1, 1) if self.in_channels == 1 else x


def _download(arch: str) -> nn.Module:
    import torchvision

    try:
        return getattr(torchvision.models, arch)(weights="DEFAULT")
    except (OSError, RuntimeError) as err:  # URLError is an OSError; RuntimeError: bad hash
        raise ValueError(
            f"model {arch}: could not download torchvision's ImageNet weights ({_one_line(err)}); "
            "download them where there is internet and pass model.weights=/path/to/file.pth "
            "(a torchvision state_dict, e.g. from ~/.cache/torch/hub/checkpoints)"
        ) from err


def _load_file(net: nn.Module, arch: str, path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"model.weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"model.weights {path}: cannot be read ({_one_line(err)})") from err
    if not isinstance(state, dict):
        raise ValueError(f"model.weights {path}: holds a {type(state).__name__}, not a state_dict")
    skip = _CLASSIFIER[arch]
    try:
        missing, unexpected = net.load_state_dict(
            {k: v for k, v in state.items() if not k.startswith(skip)}, strict=False
        )
    except RuntimeError as err:  # shape mismatches raise even when strict=False
        raise ValueError(f"model.weights {path}: does not fit {arch} ({_one_line(err)})") from err
    missing = [k for k in missing if not k.startswith(skip)]
    if missing or unexpected:
        raise ValueError(
            f"model.weights {path}: not a torchvision {arch} state_dict "
            f"({len(missing)} keys missing, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )


def load_torchvision(arch: str, weights: str | None = None) -> nn.Module:
    """Builds torchvision's ``arch``, randomly initialised or with backbone weights.

    Args:
        arch: One of ``TORCHVISION_MODELS``.
        weights: None, ``"imagenet"`` (download) or a path to a torchvision state_dict.

    Raises:
        ValueError: One line, if the weights cannot be downloaded, read or fitted.
    """
    if weights == "imagenet":
        return _download(arch)
    import torchvision

    net = getattr(torchvision.models, arch)()
    if weights is not None:
        _load_file(net, arch, weights)
    return net


def _resnet_stages(net: nn.Module, rgb: nn.Module) -> tuple[dict[str, nn.Module], int]:
    stages = {
        "stem": nn.Sequential(rgb, net.conv1, net.bn1, net.relu, net.maxpool),
        "layer1": net.layer1,
        "layer2": net.layer2,
        "layer3": net.layer3,
        "layer4": net.layer4,
        "pooled": nn.Sequential(net.avgpool, nn.Flatten()),
    }
    return stages, net.fc.in_features


def _mobilenet_v3_stages(net: nn.Module, rgb: nn.Module) -> tuple[dict[str, nn.Module], int]:
    f = net.features
    stages = {
        "stem": nn.Sequential(rgb, f[0]),  # stride 2
        "layer1": f[1],  # stride 4
        "layer2": f[2:4],  # stride 8
        "layer3": f[4:9],  # stride 16
        "layer4": f[9:],  # stride 32, ends with the 1x1 conv to 576 channels
        # torchvision's pre-logit Linear(576, 1024) + Hardswish + Dropout stay in the backbone.
        "pooled": nn.Sequential(net.avgpool, nn.Flatten(), *net.classifier[:3]),
    }
    return stages, net.classifier[3].in_features


_SPLIT = {
    "resnet18": _resnet_stages,
    "resnet50": _resnet_stages,
    "mobilenet_v3_small": _mobilenet_v3_stages,
}


class TorchvisionNet(DistillModel):
    """A torchvision ImageNet model split into named stages, with our ``head`` as classifier.

    Features: ``stem``, ``layer1`` ... ``layer4`` (strides 4, 4, 8, 16, 32 for resnets; 2, 4, 8,
    16, 32 for mobilenet_v3_small), ``pooled``.

    Args:
        num_classes: Classifier outputs.
        in_channels: 1 or 3; a grey image is repeated to three channels in the stem.
        image_size: Unused: the architecture is torchvision's at every size.
        arch: One of ``TORCHVISION_MODELS``.
        weights: None, ``"imagenet"`` or a path to a torchvision state_dict.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        arch: str = "resnet18",
        weights: str | None = None,
    ):
        if in_channels not in (1, 3):
            raise ValueError(f"{arch} takes 1 or 3 input channels, got {in_channels}")
        stages, num_features = _SPLIT[arch](load_torchvision(arch, weights), ToRGB(in_channels))
        super().__init__(stages, num_features=num_features, num_classes=num_classes)
