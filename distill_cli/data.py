r"""Datasets by name as uint8 tensors, class and sample subsets, and a tensor-resident loader.

The stage layer turns the ``dataset`` config group into plain calls to this module::

    distill-cli finetune dataset=usps dataset.root=../shared/data dataset.download=false \
        dataset.shots=10

which amounts to::

    train = load_split("usps", "../shared/data", train=True, download=False)
    train_idx, val_idx = split_indices(train.y, len(train.class_names), shots=10)
    mean, std = channel_stats(train.x[train_idx])
    loader = BatchLoader(train.x[train_idx], train.y[train_idx], 128, mean=mean, std=std,
                         shuffle=True, crop_padding=2, device="cuda")
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from distill_cli.datacache import SOURCES, cached_read, reader_variant
from distill_cli.datasets import DATASETS, DOWNLOADABLE, LAYOUT, UnreadableImage, read_imagefolder

if TYPE_CHECKING:
    from distill_cli.streaming import ImageFiles

__all__ = [
    "DATASETS",
    "BatchLoader",
    "DataError",
    "Split",
    "TransferLoader",
    "channel_stats",
    "convert",
    "labels_per_class",
    "load_split",
    "select_classes",
    "split_indices",
    "unlabeled_indices",
]

# Images are processed in chunks of this many so that 60k-image datasets stay small in memory.
_CHUNK = 4096
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601
log = logging.getLogger("distill_cli")


class DataError(Exception):
    """One-line, user-facing problem with data (missing files, bad subset option...)."""


@dataclass
class Split:
    """One split of a dataset, kept whole in memory.

    Attributes:
        x: Images, uint8, shape (N, C, H, W); or, for a streamed image folder, the
            ``streaming.ImageFiles`` that stand for them.
        y: Labels, int64, shape (N,).
        class_names: Name of each class, indexed by label.
    """

    x: torch.Tensor | ImageFiles
    y: torch.Tensor
    class_names: list[str]


def load_split(
    name: str,
    root: str,
    train: bool,
    download: bool = True,
    bad_images: str = "error",
    *,
    cache: bool = False,
    cache_fallback: str | None = None,
    stream: bool | None = False,
    max_memory_gb: float | None = None,
    workers: int = 2,
) -> Split:
    """Loads the train or test split of a dataset by name.

    Args:
        name: One of DATASETS.
        root: Folder holding the dataset files, laid out as torchvision expects.
        train: Whether to load the training split (else the test split).
        download: Whether torchvision may download missing files.
        bad_images: For image folders: "error" stops at an unreadable file, "skip" counts and
            skips it.
        cache: Keep the decoded split in an on-disk cache beside the data (see datacache);
            generated datasets are never cached.
        cache_fallback: The cache folder when ``root`` is read-only; None skips caching then.
        stream: Image folders: leave the images on disk as ``streaming.ImageFiles`` (True),
            decode them into memory (False), or stream above ``max_memory_gb`` (None).
        max_memory_gb: Decoded size in GiB above which an image folder streams; None: never.
        workers: Worker processes that decode a streamed image folder.

    Raises:
        DataError: Unknown name, files missing, unreadable images, or download failed.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; valid: {', '.join(DATASETS)}")
    try:
        if name == "imagefolder" and stream is not False:
            from distill_cli.streaming import stream_split

            streamed = stream_split(root, train, bad_images, stream, max_memory_gb, workers)
            if streamed is not None:
                return Split(*streamed)
        if name == "imagefolder":
            read = partial(read_imagefolder, root, train, bad_images)
        else:
            read = partial(DATASETS[name], root, train, download)
        if cache and name in SOURCES:
            variant = reader_variant(name, bad_images)
            return Split(*cached_read(name, root, train, read, cache_fallback, variant))
        return Split(*read())
    except UnreadableImage as exc:
        raise DataError(str(exc)) from None
    # torchvision reports missing files and failed downloads as RuntimeError or OSError
    # (FileNotFoundError, URLError), some with multi-line messages; users get one line.
    except (RuntimeError, OSError) as exc:
        raise DataError(_load_failure(name, root, download, exc)) from exc


def _load_failure(name: str, root: str, download: bool, exc: Exception) -> str:
    """Builds the one-line message for a dataset that could not be read or downloaded."""
    where = os.path.join(root, LAYOUT[name])
    if name not in DOWNLOADABLE:
        return f"dataset '{name}': no images found, expected {where}; set dataset.root=DIR"
    if download:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(":")
        return (
            f"dataset '{name}': could not download or read it into {where} ({reason}); "
            "check the network, or copy the files there and set dataset.download=false"
        )
    # torchvision's own text here suggests download=True, which is not our option's spelling.
    return (
        f"dataset '{name}': files not found or corrupt, expected in {where}; run with "
        "dataset.download=true on a machine with internet, or set dataset.root=DIR"
    )


# ---------------------------------------------------------------------------------------------
# Conversions and subsets.


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
    return torch.cat([fn(chunk) for chunk in x.split(_CHUNK)]) if len(x) else fn(x)


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


def select_classes(split: Split, classes: list[int | str]) -> Split:
    """Keeps only the listed classes (by index or name), relabelled 0..k-1 in the listed order."""
    indices = [_class_index(c, split.class_names) for c in classes]
    if len(set(indices)) != len(indices):
        raise DataError(f"dataset.classes lists a class twice: {list(classes)}")
    lookup = torch.full((len(split.class_names),), -1, dtype=torch.int64, device=split.y.device)
    lookup[indices] = torch.arange(len(indices), device=split.y.device)
    new_y = lookup[split.y]
    keep = new_y >= 0
    return Split(split.x[keep], new_y[keep], [split.class_names[i] for i in indices])


def _class_index(cls: int | str, names: list[str]) -> int:
    """Resolves a class given by name, index, or index written as a string."""
    if isinstance(cls, str) and cls in names:
        return names.index(cls)
    if isinstance(cls, int) or (isinstance(cls, str) and cls.isdigit()):
        if 0 <= int(cls) < len(names):
            return int(cls)
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    raise DataError(
        f"dataset.classes: no class {cls!r}; valid: indices 0..{len(names) - 1} or names {shown}"
    )


def unlabeled_indices(
    n: int, exclude: torch.Tensor, limit: int | None = None, seed: int = 0
) -> torch.Tensor:
    """Indices in ``0..n-1`` outside ``exclude``; a seeded random ``limit`` of them if given.

    Used for the transfer set: the target's training images that are neither labelled nor held
    out for validation, whose labels distillation never reads.

    Returns:
        Sorted int64 indices.
    """
    keep = torch.ones(n, dtype=torch.bool)
    keep[exclude] = False
    pool = keep.nonzero().flatten()
    if limit is not None and limit < len(pool):
        gen = torch.Generator().manual_seed(seed)
        pool = pool[torch.randperm(len(pool), generator=gen)[:limit]].sort().values
    return pool


def split_indices(
    y: torch.Tensor,
    num_classes: int,
    *,
    val_fraction: float = 0.1,
    val_per_class: int | None = None,
    shots: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws a class-stratified training subset and a disjoint validation set.

    Each class is shuffled once with a generator seeded by ``seed``; training samples are taken
    from the front of that order, validation samples from its end. So a K-shot training set
    contains every smaller-shot set of the same seed, and a validation set of a given size does
    not depend on shots or fraction.

    The few-shot protocol: with ``shots=K`` and no ``val_per_class``, validation holds K images
    per class, so selection never uses more labels than training (``val_per_class=0`` holds out
    none; the caller then keeps the last epoch). ``val_fraction`` applies without ``shots``.

    Args:
        y: Labels, int64, shape (N,).
        num_classes: Number of classes; labels outside 0..num_classes-1 are ignored.
        val_fraction: Fraction of each class held out when neither ``val_per_class`` nor
            ``shots`` is set, in [0, 1).
        val_per_class: Exact number held out per class; overrides both defaults.
        shots: Training samples per class (class-balanced subset).
        fraction: Fraction of each class's remainder used for training, in (0, 1].
        seed: Seed of the shuffle.

    Returns:
        (train_idx, val_idx): sorted, disjoint int64 indices into y.
    """
    _check_split_options(val_fraction, val_per_class, shots, fraction)
    if val_per_class is None and shots is not None:
        val_per_class = shots
    gen = torch.Generator().manual_seed(seed)
    per_class = [_shuffled_class(y, c, gen) for c in range(num_classes)]
    vals, rests = [], []
    for members in per_class:
        n_val = _val_count(len(members), val_fraction, val_per_class)
        vals.append(members[len(members) - n_val :])
        rests.append(members[: len(members) - n_val])
    if shots is not None:
        _check_shots(shots, rests, vals)
        trains = [rest[:shots] for rest in rests]
    elif fraction is not None:
        trains = [rest[: max(1, round(fraction * len(rest)))] for rest in rests]
    else:
        trains = rests
    return _sorted_cat(trains), _sorted_cat(vals)


def labels_per_class(n_images: int, num_classes: int) -> int | float:
    """Labelled images per class of a subset: whole for a balanced one, else the mean to 0.1."""
    per_class = n_images / max(1, num_classes)
    return int(per_class) if per_class == int(per_class) else round(per_class, 1)


def _check_split_options(
    val_fraction: float, val_per_class: int | None, shots: int | None, fraction: float | None
) -> None:
    if not 0 <= val_fraction < 1:
        raise DataError(f"dataset.val_fraction={val_fraction} must be in [0, 1)")
    if val_per_class is not None and val_per_class < 0:
        raise DataError(f"dataset.val_per_class={val_per_class} must be >= 0")
    if shots is not None and shots < 1:
        raise DataError(f"dataset.shots={shots} must be >= 1")
    if fraction is not None and not 0 < fraction <= 1:
        raise DataError(f"dataset.fraction={fraction} must be in (0, 1]")
    if shots is not None and fraction is not None:
        raise DataError("set only one of dataset.shots and dataset.fraction")


def _shuffled_class(y: torch.Tensor, cls: int, gen: torch.Generator) -> torch.Tensor:
    members = (y == cls).nonzero().flatten()
    return members[torch.randperm(len(members), generator=gen)]


def _val_count(n: int, val_fraction: float, val_per_class: int | None) -> int:
    if val_per_class is not None:
        return min(val_per_class, n)
    if val_fraction == 0 or n < 2:
        return 0
    # At least one for validation, at least one left for training.
    return min(max(1, round(val_fraction * n)), n - 1)


def _check_shots(shots: int, rests: list[torch.Tensor], vals: list[torch.Tensor]) -> None:
    """Every class that has images must keep ``shots`` of them after its validation share."""
    for cls, (rest, val) in enumerate(zip(rests, vals, strict=True)):
        if len(rest) + len(val) and len(rest) < shots:
            raise DataError(
                f"dataset.shots={shots} is more than the {len(rest)} images class {cls} has left "
                f"after holding out {len(val)} for validation; lower dataset.shots or "
                "dataset.val_per_class"
            )


def _sorted_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    if not parts:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(parts).sort().values


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 NCHW images, in [0, 1] units."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    count = 0
    # streaming.ImageFiles decode their files in chunks, with their workers
    for chunk in x.split(_CHUNK) if isinstance(x, torch.Tensor) else x.chunks():
        values = chunk.to(torch.float64) / 255
        total += values.sum((0, 2, 3))
        squares += values.square().sum((0, 2, 3))
        count += chunk.numel() // max(1, x.shape[1])
    count = max(1, count)
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
    return mean.tolist(), std.tolist()


# ---------------------------------------------------------------------------------------------
# Loader.


class Batching:
    """What every loader here shares: batch count, epoch, shuffle order and normalisation.

    :class:`BatchLoader` and ``streaming.StreamLoader`` call :meth:`_setup` with their common
    arguments, so that both draw the same order and normalise alike for the same seed and epoch.
    """

    def _setup(
        self, n_images: int, n_labels: int, batch_size: int, mean: list[float], std: list[float],
        shuffle: bool, drop_last: bool, crop_padding: int, flip: bool, seed: int,
        device: str | torch.device, channels_last: bool,
    ) -> None:  # fmt: skip
        if n_images != n_labels:
            raise DataError(f"{n_images} images but {n_labels} labels")
        self.device = torch.device(device)
        self.n_images, self.batch_size = n_images, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.crop_padding, self.flip = crop_padding, flip
        self.seed, self.epoch = seed, 0
        self.channels_last = channels_last
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        # (x / 255 - mean) / std as one multiply-add per pixel.
        self._scale = 1 / (255 * std_t)
        self._shift = mean_t / std_t

    def __len__(self) -> int:
        if self.drop_last:
            return self.n_images // self.batch_size
        return math.ceil(self.n_images / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose shuffle order and augmentation the next iteration uses."""
        self.epoch = epoch

    def _epoch_order(self) -> tuple[torch.Generator, torch.Tensor]:
        """The epoch's generator (its augmentation draws follow) and its image order, on the CPU."""
        # Hashes of int tuples do not depend on PYTHONHASHSEED, so this is stable across runs.
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch)) & (2**63 - 1))
        n = self.n_images
        return gen, torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)

    def _normalised(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 batch on the device as normalised floats, in the configured memory format."""
        images = images.float() * self._scale - self._shift
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images


class BatchLoader(Batching):
    """Yields normalised, augmented float batches from uint8 images kept on the device.

    Augmentation (random crop after zero padding, horizontal flip) runs on the whole batch at
    once. Its randomness and the shuffle order come from a CPU generator seeded by (seed, epoch),
    so an epoch gives the same batches on every run and on CPU and GPU alike.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        mean: list[float],
        std: list[float],
        shuffle: bool = False,
        drop_last: bool = False,
        crop_padding: int = 0,
        flip: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        aug_seed: int | None = None,
        aug_views: int | None = None,
    ) -> None:
        self._setup(len(x), len(y), batch_size, mean, std, shuffle, drop_last, crop_padding, flip,
                    seed, device, channels_last)  # fmt: skip
        self.x = x.to(self.device)
        self.y = y.to(self.device, torch.int64)
        self.last_index = torch.empty(0, dtype=torch.int64)  # rows of x in the latest batch
        # Per-image augmentation (a teacher cache needs it): image i in view v is augmented by
        # parameters drawn from (aug_seed, v) alone, whatever the batch order.
        self.aug_seed, self.aug_views = aug_seed, aug_views
        self.last_view = torch.empty(0, dtype=torch.int64)  # view of each image of the batch

    @property
    def num_samples(self) -> int:
        """Images in the loader: the range of ``last_index``."""
        return len(self.x)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches()

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from number ``start`` on (per-image augmentation only)."""
        if start and self.aug_seed is None and (self.crop_padding or self.flip):
            raise ValueError("starting inside an epoch needs per-image augmentation (aug_seed)")
        gen, order = self._epoch_order()
        order = order.to(self.device)
        view = self.view(self.epoch)
        table = self._view_table(view) if self.aug_seed is not None else None
        for i in range(start, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            if table is None:
                images = self._augment(self.x[idx], gen)
            else:
                images = self._augment_view(self.x[idx], *(t[..., idx] for t in table))
            self.last_view = torch.full_like(idx, view)
            images = self._normalised(images)
            self.last_index = idx  # per-sample state of a loss (CRD's memory bank) reads it
            yield images, self.y[idx]

    def view(self, epoch: int) -> int:
        """Which augmentation view an epoch uses: one per epoch, cycling through ``aug_views``.

        Without augmentation every epoch shows the same images: view 0.
        """
        if not (self.crop_padding or self.flip):
            return 0
        return epoch % self.aug_views if self.aug_views else epoch

    def _view_table(self, view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop offsets (2, N) and flips (N,) of every image in ``view``."""
        gen = torch.Generator().manual_seed(hash((self.aug_seed, view)) & (2**63 - 1))
        offsets = torch.randint(0, 2 * self.crop_padding + 1, (2, len(self.x)), generator=gen)
        flips = torch.rand(len(self.x), generator=gen) < 0.5
        return offsets.to(self.device), flips.to(self.device)

    def _augment_view(
        self, images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor
    ) -> torch.Tensor:
        if self.crop_padding > 0:
            images = crop_at(images, self.crop_padding, offsets)
        if self.flip:
            images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
        return images

    def _augment(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # Augmenting the uint8 batch moves a quarter of the bytes of the float batch.
        if self.crop_padding > 0:
            images = _random_crop(images, self.crop_padding, gen)
        if self.flip:
            flipped = torch.rand(len(images), generator=gen).to(images.device) < 0.5
            images = torch.where(flipped.view(-1, 1, 1, 1), images.flip(-1), images)
        return images


def _random_crop(images: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
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


class TransferLoader:
    """Labelled batches, each joined by a batch of unlabelled images (label -1).

    An epoch is one pass over the labelled loader, so ``stage.epochs`` means the same number of
    optimisation steps with or without unlabelled images. The unlabelled loader runs as one
    endless sequence of passes (pass ``p`` shuffled and augmented by its own seed) that the
    epochs take their batches from in turn: epoch ``e`` takes batches ``(e-1)*L`` to ``e*L-1``,
    so a resumed epoch repeats exactly. ``last_index`` numbers labelled images first, then
    unlabelled ones. The unlabelled loader needs per-image augmentation (``aug_seed``).
    """

    def __init__(self, labeled: BatchLoader, unlabeled: BatchLoader) -> None:
        self.labeled, self.unlabeled = labeled, unlabeled
        self.epoch = 0
        self.last_index = torch.empty(0, dtype=torch.int64)
        self.last_view = torch.empty(0, dtype=torch.int64)

    @property
    def num_samples(self) -> int:
        """Labelled plus unlabelled images: the range of ``last_index``."""
        return self.labeled.num_samples + self.unlabeled.num_samples

    @property
    def batch_size(self) -> int:
        """Images per step, labelled and unlabelled together."""
        return self.labeled.batch_size + self.unlabeled.batch_size

    def __len__(self) -> int:
        return len(self.labeled)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch of the labelled loader and the unlabelled batches it is joined with."""
        self.epoch = epoch
        self.labeled.set_epoch(epoch)

    def _unlabeled_batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        passes, start = divmod(max(self.epoch - 1, 0) * len(self.labeled), len(self.unlabeled))
        while True:
            self.unlabeled.set_epoch(passes)
            for x, y in self.unlabeled.batches(start):
                yield x, y, self.unlabeled.last_index, self.unlabeled.last_view
            passes, start = passes + 1, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        extra = self._unlabeled_batches()
        offset = self.labeled.num_samples
        for x, y in self.labeled:
            xu, yu, iu, vu = next(extra)
            self.last_index = torch.cat([self.labeled.last_index, iu + offset])
            # views of the two streams are told apart by sign: unlabelled ones are negative
            self.last_view = torch.cat([self.labeled.last_view, -1 - vu])
            yield torch.cat([x, xu]), torch.cat([y, yu])
