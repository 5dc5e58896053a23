"""uint8 image tensors: resizing and channel conversion, padded crops; the data layer's errors.

``dataset.image_size=16 dataset.channels=3`` and ``dataset.crop_padding=4`` end up here, for images
held in memory and for those decoded by the streaming workers alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# Images are processed in chunks of this many so that 60k-image datasets stay small in memory.
CHUNK = 4096
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


class DataError(Exception):
    """One-line, user-facing problem with data (missing files, bad subset option...)."""


def convert(
    x: torch.Tensor, image_size: int | None = None, channels: int | None = None
) -> torch.Tensor:
    """Resizes uint8 NCHW images to a square size and converts between 1 and 3 channels.

    Lets grey 28x28, grey 16x16 and RGB 32x32 datasets feed the same model. None keeps as is.
    """
    if channels is not None and channels not in (x.shape[1], 1, 3):
        raise DataError(f"dataset.channels={channels} is not supported; valid: 1, 3")
    if not isinstance(x, torch.Tensor):  # streaming.ImageFiles convert each batch they decode
        return x.converted(image_size, channels)
    reduce_first = channels is not None and channels < x.shape[1]
    if reduce_first:  # fewer channels to resize
        x = _to_channels(x, channels)
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        x = _chunked(x, lambda c: _resize(c, image_size))
    if channels is not None and not reduce_first:
        x = _to_channels(x, channels)
    return x


def _chunked(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Applies fn to consecutive chunks of images and concatenates the results."""
    return torch.cat([fn(chunk) for chunk in x.split(CHUNK)]) if len(x) else fn(x)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return _to_uint8(F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True))


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)


def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1 and channels == 3:
        return x.repeat(1, 3, 1, 1)
    if x.shape[1] == 3 and channels == 1:
        weights = torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)
        return _chunked(x, lambda c: _to_uint8((c.float() * weights).sum(1, keepdim=True)))
    raise DataError(f"cannot convert {x.shape[1]} channels to {channels}; supported: 1 <-> 3")


def random_crop(images: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pads each image by `padding` and crops it back at a random per-image offset."""
    offsets = torch.randint(0, 2 * padding + 1, (2, len(images)), generator=gen)
    return crop_at(images, padding, offsets.to(images.device))


def crop_at(images: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Zero-pads each image by `padding` and crops it back at (row, column) ``offsets`` (2, B)."""
    b, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    rows = offsets[0, :, None] + torch.arange(h, device=images.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=images.device)  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    # Advanced indices around a slice put their dims first: the result is (B, H, W, C).
    cropped = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return cropped.permute(0, 3, 1, 2).contiguous()
