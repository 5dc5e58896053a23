"""Any timm architecture behind the shared interface, randomly initialised or with weights.

    distill-cli pretrain model=timm model.arch=resnet18d model.weights=pretrained
    distill-cli pretrain model=timm model.arch=vit_tiny_patch16_224 '+model.kwargs.img_size=32'

``model.weights`` is read by ``timm_weights`` and handed to ``timm.create_model(pretrained=True)``,
which adapts it (input channels, position embeddings for another ``img_size``); every backbone
tensor must load. timm's own classifier is dropped: our ``head`` reads timm's pre-logits vector.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from distill_cli.models.interface import DistillModel
from distill_cli.models.timm_weights import backbone_state, mismatch, one_line, sha256_file

log = logging.getLogger("distill_cli")

# create_model arguments that distill-cli sets itself
RESERVED = ("num_classes", "in_chans", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
            "features_only", "checkpoint_path", "out_indices")  # fmt: skip


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ValueError(
            "model=timm needs the timm package: pip install 'distill-cli[timm]'"
        ) from None
    return timm


def check_arch(arch: str) -> None:
    """Refuses a name timm does not know, suggesting close ones found by timm's own search.

    Raises:
        ValueError: One line with up to five suggestions.
    """
    timm = _timm()
    if timm.is_model(arch):
        return
    import difflib

    base = arch.split(".")[0]
    near = timm.list_models(f"*{base}*")[:5] or difflib.get_close_matches(
        base, timm.list_models(), n=5, cutoff=0.6
    )
    hint = f"did you mean {', '.join(near)}? " if near else ""
    raise ValueError(
        f"model.arch={arch} is not a timm architecture; {hint}"
        "`python -c \"import timm; print(timm.list_models('*NAME*'))\"` lists them"
    )


def _plain_kwargs(kwargs: dict | None) -> dict:
    """``model.kwargs`` as plain JSON values (they go into checkpoints), minus reserved keys."""
    try:
        plain = json.loads(json.dumps(dict(kwargs or {})))
    except (TypeError, ValueError) as err:
        raise ValueError(f"model.kwargs must hold plain values ({one_line(err)})") from None
    taken = [k for k in plain if k in RESERVED]
    if taken:
        raise ValueError(
            f"model.kwargs.{taken[0]} is set by distill-cli (classes and channels come from the "
            "dataset, weights from model.weights); remove it"
        )
    return plain


def _create(arch: str, in_channels: int, kwargs: dict, **extra: Any) -> nn.Module:
    """``timm.create_model`` without timm's classifier; one-line errors."""
    timm = _timm()
    try:
        return timm.create_model(arch, num_classes=0, in_chans=in_channels, **kwargs, **extra)
    except TypeError as err:  # an argument the architecture does not take
        raise ValueError(f"model.kwargs do not fit timm's {arch} ({one_line(err)})") from None
    except RuntimeError as err:  # e.g. an unknown pretrained tag
        if "size mismatch" in str(err) or "key(s)" in str(err):
            raise  # a weights file that does not fit: the caller names the file
        raise ValueError(f"model.arch={arch}: {one_line(err)}") from None


def create_timm(
    arch: str, in_channels: int, weights: str | None = None, kwargs: dict | None = None
) -> tuple[nn.Module, dict]:
    """Builds timm's ``arch`` without its classifier, randomly initialised or with weights.

    Args:
        arch: A timm model name, optionally with a pretrained tag (``resnet18d.a1_in1k``).
        in_channels: Image channels (timm adapts a three-channel stem's weights).
        weights: None, ``"pretrained"`` (timm's published weights) or a path to a local file.
        kwargs: Passed to ``timm.create_model`` (e.g. ``drop_path_rate``, ``img_size``).

    Returns:
        (the model, where its weights came from: ``timm``, ``weights``, ``source``, ``sha256``).

    Raises:
        ValueError: One line, naming the fix.
    """
    check_arch(arch)
    kwargs = _plain_kwargs(kwargs)
    net = _create(arch, in_channels, kwargs)
    origin = {"timm": _timm().__version__, "weights": None, "source": None, "sha256": None}
    if weights is None:
        return net, origin
    if weights in ("imagenet", "DEFAULT"):
        raise ValueError("model=timm takes model.weights=pretrained (timm's published weights), "
                         f"a file path, or null; not {weights}")  # fmt: skip
    path, state = backbone_state(arch, net.pretrained_cfg, weights)
    # num_classes=0 in the overlay keeps timm's load strict: every backbone key must load.
    overlay = {"state_dict": state, "num_classes": 0, "source": "", "custom_load": False}
    try:
        net = _create(arch, in_channels, kwargs, pretrained=True, pretrained_cfg_overlay=overlay)
    except RuntimeError as err:
        raise mismatch(err, arch, path) from None
    net.pretrained_cfg.pop("state_dict", None)  # the tensors now live in the model
    origin.update(weights="pretrained" if weights == "pretrained" else "file",
                  source=os.path.abspath(path), sha256=sha256_file(path))  # fmt: skip
    return net, origin


class TimmNet(DistillModel):
    """A timm model as one stage, ``body``, with named features and our ``head``.

    Features: one per entry of timm's ``feature_info``, named after its module (``act1``,
    ``layer1`` ... for ResNets; ``blocks.0`` ... for EfficientNets and ViTs, whose token maps come
    back as (C, H, W) grids), taken from ``forward_intermediates``; then ``pooled``, timm's
    pre-logits vector. A model without ``forward_intermediates`` gives ``pooled`` alone.

    Args:
        num_classes: Classifier outputs.
        in_channels: Image channels.
        image_size: Image side in pixels; the model must run at this size.
        arch: A timm model name.
        weights: None, ``"pretrained"`` or a path to a local checkpoint.
        kwargs: Passed to ``timm.create_model``.
        origin: Recorded only: where a rebuilt model's weights first came from (from its
            checkpoint's ``config``); nothing is loaded for it.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        arch: str | None = None,
        weights: str | None = None,
        kwargs: dict | None = None,
        origin: dict | None = None,
    ):
        if not arch:
            raise ValueError("model=timm needs model.arch, a timm architecture name "
                             "(e.g. model.arch=resnet18d)")  # fmt: skip
        kwargs = _plain_kwargs(kwargs)
        net, built = create_timm(arch, in_channels, weights, kwargs)
        maps, width = _probe(net, arch, in_channels, image_size)
        super().__init__({"body": net}, num_features=width, num_classes=num_classes)
        self.maps = maps
        if origin is not None and origin.get("timm") != built["timm"]:
            log.warning("the %s checkpoint was built with timm %s; running timm %s", arch,
                        origin.get("timm"), built["timm"])  # fmt: skip
        self.config = {"arch": arch, "kwargs": kwargs, "origin": dict(origin or built)}

    @property
    def body(self) -> nn.Module:
        """The timm model."""
        return self.stages["body"]

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Keys of ``forward_with_features``, in forward order."""
        return (*self.maps, "pooled")

    def forward_features(self, x: Tensor) -> Tensor:
        """Returns timm's pre-logits vector, shape (B, num_features)."""
        return self.body.forward_head(self.body.forward_features(x), pre_logits=True)

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns logits, the feature maps of ``feature_info`` and ``pooled``."""
        if not self.maps:
            pooled = self.forward_features(x)
            return self.head(pooled), {"pooled": pooled}
        final, maps = self.body.forward_intermediates(x)
        pooled = self.body.forward_head(final, pre_logits=True)
        return self.head(pooled), {**dict(zip(self.maps, maps, strict=True)), "pooled": pooled}

    def fx_leaves(self) -> tuple[tuple[type[nn.Module], ...], tuple[Callable, ...]]:
        """The modules and functions timm itself tells ``torch.fx`` not to trace into."""
        import inspect

        from timm.layers import get_notrace_functions, get_notrace_modules

        functions = tuple(f for f in get_notrace_functions() if inspect.isfunction(f))
        return tuple(get_notrace_modules()), functions


def _probe(net: nn.Module, arch: str, in_channels: int, size: int) -> tuple[list[str], int]:
    """Runs ``net`` once on a blank image: its feature names and pre-logits width.

    Raises:
        ValueError: One line, if the model does not run at this image size.
    """
    names = [str(f["module"]) for f in getattr(net, "feature_info", None) or ()]
    training = net.training
    net.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(1, in_channels, size, size)
            try:
                final, maps = net.forward_intermediates(x)
            except (AttributeError, NotImplementedError):
                log.info("timm's %s has no forward_intermediates: its only feature is pooled", arch)
                final, maps, names = net.forward_features(x), [], []
            pooled = net.forward_head(final, pre_logits=True)
    except (RuntimeError, AssertionError, ValueError) as err:
        raise ValueError(_too_small(net, arch, in_channels, size, err)) from None
    finally:
        net.train(training)
    if len(names) != len(maps):
        names = [f"features.{i}" for i in range(len(maps))]
    return names, int(pooled.flatten(1).shape[1])


def _too_small(net: nn.Module, arch: str, in_channels: int, size: int, err: Exception) -> str:
    """The refusal of a model that does not run on ``size``-pixel images, with the fix."""
    why = one_line(err)[:140]
    head = f"timm's {arch} does not run on {size}x{size} images ({why}); "
    if hasattr(net, "patch_embed"):  # ViT-style: the input size is fixed at build time
        return head + f"pass +model.kwargs.img_size={size} (a ViT-style model fixes its input size)"
    for side in (2 * size, 4 * size, 8 * size, 16 * size):
        try:
            with torch.no_grad():
                net.forward_features(torch.zeros(1, in_channels, side, side))
        except (RuntimeError, AssertionError, ValueError):
            continue
        return head + (f"it downsamples too much for them: set dataset.image_size={side} or more, "
                       "or choose a model that downsamples less")  # fmt: skip
    return head + "choose a model that downsamples less, or larger images (dataset.image_size)"
