"""Models: one timm-style interface, a registry by name, one module per architecture family.

    distill-cli pretrain model=resnet8x4      # build_model("resnet8x4", num_classes=..., ...)

``interface`` defines ``DistillModel``; ``registry`` maps names to builders; ``resnets``,
``convnets``, ``sequence``, ``torchvision_models`` and ``timm_models`` (with ``timm_weights``)
hold the families; ``fold`` prepares a frozen teacher. Nothing here reads the config or the data.
"""

from distill_cli.models.interface import DistillModel
from distill_cli.models.registry import MODELS, build_model, count_params, display_name
from distill_cli.models.torchvision_models import TORCHVISION_MODELS

__all__ = [
    "MODELS",
    "TORCHVISION_MODELS",
    "DistillModel",
    "build_model",
    "count_params",
    "display_name",
]
