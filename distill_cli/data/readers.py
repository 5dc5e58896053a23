"""Dataset readers by name: torchvision's in-memory arrays straight to uint8 NCHW tensors.

``distill_cli.data.load_split`` picks a reader from DATASETS and turns its failures into
one-line errors; use that rather than calling a reader directly::

    distill-cli pretrain dataset=cifar10 dataset.root=~/data dataset.download=true

Every reader takes (root, train, download) and returns (images uint8 (N, C, H, W),
labels int64 (N,), class names). torchvision is imported inside the readers so that importing
this module stays cheap.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

Arrays = tuple[torch.Tensor, torch.Tensor, list[str]]
_DIGITS = [str(i) for i in range(10)]


def _arrays(data: Any, labels: Any, classes: list[str] | None) -> Arrays:
    """Converts NCHW image data and labels (numpy or torch) to tensors; names default to digits."""
    x = torch.as_tensor(np.ascontiguousarray(data), dtype=torch.uint8)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    return x, y, list(classes) if classes else list(_DIGITS)


def _cifar10(root: str, train: bool, download: bool) -> Arrays:
    from torchvision.datasets import CIFAR10

    ds = CIFAR10(root, train=train, download=download)
    return _arrays(ds.data.transpose(0, 3, 1, 2), ds.targets, ds.classes)  # NHWC -> NCHW


def _cifar100(root: str, train: bool, download: bool) -> Arrays:
    from torchvision.datasets import CIFAR100

    ds = CIFAR100(root, train=train, download=download)
    return _arrays(ds.data.transpose(0, 3, 1, 2), ds.targets, ds.classes)


def _mnist(root: str, train: bool, download: bool) -> Arrays:
    from torchvision.datasets import MNIST

    ds = MNIST(root, train=train, download=download)
    return _arrays(ds.data.unsqueeze(1).numpy(), ds.targets.numpy(), ds.classes)


def _fashion_mnist(root: str, train: bool, download: bool) -> Arrays:
    from torchvision.datasets import FashionMNIST

    ds = FashionMNIST(root, train=train, download=download)
    return _arrays(ds.data.unsqueeze(1).numpy(), ds.targets.numpy(), ds.classes)


def _svhn(root: str, train: bool, download: bool) -> Arrays:
    from torchvision.datasets import SVHN

    ds = SVHN(root, split="train" if train else "test", download=download)
    return _arrays(ds.data, ds.labels, None)  # already NCHW, and digit 0 already labelled 0


def _usps(root: str, train: bool, download: bool) -> Arrays:
    from torchvision.datasets import USPS

    ds = USPS(os.path.join(root, "usps"), train=train, download=download)
    return _arrays(ds.data[:, None], ds.targets, None)


def _stl10(root: str, train: bool, download: bool) -> Arrays:
    from torchvision.datasets import STL10

    ds = STL10(root, split="train" if train else "test", download=download)
    # torchvision sets `classes` only when class_names.txt is present.
    return _arrays(ds.data, ds.labels, getattr(ds, "classes", None))


class UnreadableImage(ValueError):
    """An image file in an image folder that cannot be decoded."""


def list_imagefolder(root: str, train: bool) -> tuple[list[str], list[int], list[str]]:
    """The image paths, labels and class names of a ``train/<class>/`` or ``test/<class>/`` tree."""
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(os.path.join(root, "train" if train else "test"))
    return [path for path, _ in ds.samples], [label for _, label in ds.samples], ds.classes


def decode_image(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """One image file as RGB uint8 (H, W, 3), resized to ``size`` (width, height) if it differs.

    Raises:
        UnreadableImage: PIL cannot decode the file.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UnreadableImage(
            f"cannot read image '{path}' ({type(exc).__name__}); remove it, or pass "
            "dataset.bad_images=skip to skip unreadable images"
        ) from None
    return np.asarray(img if size is None or img.size == size else img.resize(size))


def read_imagefolder(root: str, train: bool, bad_images: str = "error") -> Arrays:
    """A ``train/<class>/`` or ``test/<class>/`` tree; unreadable files stop it or are skipped."""
    paths, labels, classes = list_imagefolder(root, train)
    size = None
    images, kept, skipped = [], [], []
    for path, label in zip(paths, labels, strict=True):
        try:
            image = decode_image(path, size)  # every image is resized to the first one's size
        except UnreadableImage:
            if bad_images != "skip":
                raise
            skipped.append(path)
            continue
        size = size or (image.shape[1], image.shape[0])
        images.append(image)
        kept.append(label)
    if skipped:
        logging.getLogger("distill_cli").warning(
            "skipped %d unreadable image(s) in %s, e.g. %s", len(skipped),
            os.path.join(root, "train" if train else "test"), skipped[0],
        )  # fmt: skip
    return _arrays(np.stack(images).transpose(0, 3, 1, 2), kept, classes)


def _imagefolder(root: str, train: bool, download: bool) -> Arrays:
    return read_imagefolder(root, train)


def _glyphs(domain: str) -> Callable[[str, bool, bool], Arrays]:
    """Returns a reader for the built-in synthetic glyphs; root and download are ignored."""

    def read(root: str, train: bool, download: bool) -> Arrays:
        from distill_cli.data.glyphs import make_glyphs

        x, y, names = make_glyphs(domain, train)
        return x, y, list(names)

    return read


DATASETS: dict[str, Callable[[str, bool, bool], Arrays]] = {
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "mnist": _mnist,
    "fashion_mnist": _fashion_mnist,
    "svhn": _svhn,
    "usps": _usps,
    "stl10": _stl10,
    "imagefolder": _imagefolder,
    "glyphs_source": _glyphs("source"),
    "glyphs_target": _glyphs("target"),
}

# Where each reader expects its files under root, for error messages.
LAYOUT = {
    "cifar10": "cifar-10-batches-py/",
    "cifar100": "cifar-100-python/",
    "mnist": "MNIST/raw/",
    "fashion_mnist": "FashionMNIST/raw/",
    "svhn": "{train,test}_32x32.mat",
    "usps": "usps/usps{,.t}.bz2",
    "stl10": "stl10_binary/",
    "imagefolder": "{train,test}/<class>/<image>",
    "glyphs_source": "",
    "glyphs_target": "",
}

DOWNLOADABLE = {"cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "usps", "stl10"}
