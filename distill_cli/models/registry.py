"""Models by name, all with one timm-style interface.

The stage layer picks a model from the config, e.g. ``distill-cli pretrain model=resnet8x4``;
everything below it builds one from plain arguments::

    model = build_model("resnet8x4", num_classes=100, in_channels=3, image_size=32)
    logits = model(x)                               # (B, 100)
    logits, feats = model.forward_with_features(x)  # feats["layer3"], feats["pooled"], ...
    model.reset_classifier(10)                      # fresh head before finetuning
    twin = build_model(**model.config)              # the config is what a checkpoint stores
    build_model("timm", 10, arch="resnet18d", weights="pretrained")  # any timm architecture

Parameters whose name starts with ``head.`` are the classifier; all others are the backbone.
The interface lives in ``interface``; the architectures in ``resnets`` (CIFAR ResNets,
Wide ResNets), ``convnets`` (VGG, MobileNetV2, ShuffleNetV2), ``sequence`` (ViT, row
LSTM), ``torchvision_models`` (ImageNet models, optionally pretrained through ``weights``) and
``timm_models`` (any timm architecture, ``model=timm model.arch=NAME``; timm is imported only
when one is built).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from distill_cli.models.convnets import VGG, MobileNetV2, ShuffleNetV2
from distill_cli.models.interface import DistillModel
from distill_cli.models.resnets import CifarResNet, WideResNet
from distill_cli.models.sequence import LSTMRows, ViT
from distill_cli.models.timm_models import TimmNet
from distill_cli.models.torchvision_models import TORCHVISION_MODELS, TorchvisionNet


class SmallCNN(DistillModel):
    """The seed's CNN: two 3x3 convs (32, 64 channels) with 2x2 max-pools, then 128 features.

    The seed's convs are unpadded (64*6*6 features into the first linear layer at 32x32), so the
    image needs at least 10 pixels a side; ``padding=1`` (``cnn_padded``) keeps the size through
    each conv (64*8*8 at 32x32) and works from 4 pixels up.

    Args:
        num_classes: Classifier outputs.
        in_channels: Image channels.
        image_size: Image side in pixels; the flatten size follows it.
        padding: Zero padding of both convs: 0 as in the seed, or 1.
    """

    def __init__(
        self, num_classes: int, in_channels: int = 3, image_size: int = 32, padding: int = 0
    ):
        shrink = 2 - 2 * padding  # pixels each conv takes off
        side = ((image_size - shrink) // 2 - shrink) // 2
        if side < 1:
            smallest = 10 if padding == 0 else 4
            name = "cnn" if padding == 0 else "cnn_padded"
            raise ValueError(
                f"{name} needs images of at least {smallest} pixels a side, got {image_size} "
                "(set dataset.image_size, or use a model with global pooling, e.g. model=resnet8)"
            )
        stages = {
            "layer1": nn.Sequential(
                nn.Conv2d(in_channels, 32, 3, padding=padding), nn.ReLU(), nn.MaxPool2d(2)
            ),
            "layer2": nn.Sequential(
                nn.Conv2d(32, 64, 3, padding=padding), nn.ReLU(), nn.MaxPool2d(2)
            ),
            "pooled": nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU()),
        }
        super().__init__(stages, num_features=128, num_classes=num_classes)


MODELS: dict[str, Callable[..., DistillModel]] = {
    "cnn": SmallCNN,
    "cnn_padded": partial(SmallCNN, padding=1),
    "resnet8": partial(CifarResNet, depth=8),
    "resnet20": partial(CifarResNet, depth=20),
    "resnet56": partial(CifarResNet, depth=56),
    "resnet110": partial(CifarResNet, depth=110),
    "resnet8x4": partial(CifarResNet, depth=8, widths=(32, 64, 128, 256)),
    "resnet32x4": partial(CifarResNet, depth=32, widths=(32, 64, 128, 256)),
    "wrn_16_2": partial(WideResNet, depth=16, widen=2),
    "wrn_40_2": partial(WideResNet, depth=40, widen=2),
    "vgg8": partial(VGG, convs=1),
    "vgg13": partial(VGG, convs=2),
    "mobilenetv2": MobileNetV2,
    "shufflenetv2": ShuffleNetV2,
    "vit_tiny": ViT,
    "lstm_rows": LSTMRows,
    **{arch: partial(TorchvisionNet, arch=arch) for arch in TORCHVISION_MODELS},
    "timm": TimmNet,  # any timm architecture: needs arch
}
WEIGHTED = (*TORCHVISION_MODELS, "timm")  # the models that take weights


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    weights: str | None = None,
    arch: str | None = None,
    kwargs: dict | None = None,
    origin: dict | None = None,
) -> DistillModel:
    """Builds a model by name and records the arguments that rebuild it in ``model.config``.

    Args:
        name: A key of ``MODELS``.
        num_classes: Classifier outputs.
        in_channels: Image channels.
        image_size: Image height and width, in pixels.
        weights: Torchvision models: None (random init), ``"imagenet"`` (download torchvision's
            published weights) or a path to a torchvision state_dict file. ``timm``: None,
            ``"pretrained"`` (timm's published weights, from the local Hugging Face cache) or a
            path to a checkpoint. The head is always fresh. Not recorded in ``config``: a
            checkpoint rebuilds the model and loads its own weights, so it never downloads again
            (a timm model records where its weights came from in ``config["origin"]``).
        arch: ``timm`` only: the timm architecture name.
        kwargs: ``timm`` only: keyword arguments for ``timm.create_model``.
        origin: ``timm`` only, recorded: ``config["origin"]`` of the model being rebuilt.

    Raises:
        ValueError: If the name is unknown, a size is too small, or the weights do not apply
            or cannot be loaded.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    if num_classes < 1 or in_channels < 1 or image_size < 4:
        raise ValueError(
            f"need num_classes >= 1, in_channels >= 1, image_size >= 4; got "
            f"{num_classes}, {in_channels}, {image_size}"
        )
    if weights is not None and name not in WEIGHTED:
        raise ValueError(f"model.weights applies to {', '.join(WEIGHTED)}, not to {name}")
    timm_only = {"arch": arch, "kwargs": kwargs, "origin": origin}
    given = {k: v for k, v in timm_only.items() if v is not None}
    if given and name != "timm":
        raise ValueError(f"model.{next(iter(given))} applies to model=timm, not to {name}")
    extra = {"weights": weights} if weights is not None else {}
    model = MODELS[name](num_classes, in_channels, image_size, **extra, **given)
    # Plain ints (not e.g. OmegaConf or numpy values) so checkpoints load with weights_only=True.
    model.config = {
        "name": name,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "image_size": int(image_size),
        **model.config,  # a model's own build arguments (timm: arch, kwargs, origin)
    }
    return model


def display_name(config: dict) -> str:
    """A model's name for tables: ``timm:<arch>`` for a timm model, else the zoo name."""
    name = config.get("name", "?")
    return f"{name}:{config['arch']}" if name == "timm" and config.get("arch") else name


def count_params(model: nn.Module) -> int:
    """Counts all parameters, trainable and frozen."""
    return sum(p.numel() for p in model.parameters())
