"""Loaders: batches on the device, from images in memory or decoded from their files.

    distill-cli pretrain stage.batch_size=64 dataset.crop_padding=4 dataset.flip=true

:class:`BatchLoader` serves a uint8 tensor, :class:`StreamLoader` the same batches for
``streaming.ImageFiles``, both on :class:`Batching`, their one shared base (shuffle order,
epoch, normalisation); :class:`TransferLoader` adds an unlabelled stream beside a labelled one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import astuple, dataclass

import torch

from distill_cli.data.images import DataError, crop_at, random_crop
from distill_cli.data.streaming import ImageFiles, Plan, Plans, decoder


@dataclass(frozen=True)
class Normalise:
    """How a loader turns uint8 images into the model's input.

    Attributes:
        mean: Per-channel mean of ``x / 255`` to subtract.
        std: Per-channel standard deviation to divide by.
        channels_last: Give the batches in the NHWC memory format.
    """

    mean: list[float]
    std: list[float]
    channels_last: bool = False


@dataclass(frozen=True)
class Order:
    """Which images each batch holds.

    Attributes:
        shuffle: A new order every epoch, drawn from (seed, epoch).
        drop_last: Drop the last, incomplete batch.
        seed: Seeds the order and the per-batch augmentation draws.
    """

    shuffle: bool = False
    drop_last: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Augment:
    """Batch augmentation: a random crop after zero padding and a horizontal flip.

    Attributes:
        crop_padding: Zero padding before the crop, in pixels (0: no crop).
        flip: Flip half of the images left-right.
        per_image_seed: Draw each image's augmentation from (this seed, view) alone, whatever
            the batch order (a teacher cache needs it); None draws per batch.
        views: With ``per_image_seed``: distinct views per image, cycled over the epochs;
            None: a new view every epoch.
    """

    crop_padding: int = 0
    flip: bool = False
    per_image_seed: int | None = None
    views: int | None = None


class Batching:
    """What every loader here shares: batch count, epoch, shuffle order and normalisation.

    :class:`BatchLoader` and ``streaming.StreamLoader`` call :meth:`_setup` with their common
    arguments, so that both draw the same order and normalise alike for the same seed and epoch.
    """

    def _setup(self, n_images: int, n_labels: int, batch_size: int, norm: Normalise,
               order: Order, augment: Augment, device: str | torch.device) -> None:  # fmt: skip
        if n_images != n_labels:
            raise DataError(f"{n_images} images but {n_labels} labels")
        self.device = torch.device(device)
        self.n_images, self.batch_size = n_images, batch_size
        self.shuffle, self.drop_last, self.seed, self.epoch = *astuple(order), 0
        self.crop_padding, self.flip = augment.crop_padding, augment.flip
        self.channels_last = norm.channels_last
        std_t = torch.tensor(norm.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(norm.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
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

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, norm: Normalise, *,
                 order: Order = Order(), augment: Augment = Augment(),
                 device: str | torch.device = "cpu") -> None:  # fmt: skip
        self._setup(len(x), len(y), batch_size, norm, order, augment, device)
        self.x = x.to(self.device)
        self.y = y.to(self.device, torch.int64)
        self.last_index = torch.empty(0, dtype=torch.int64)  # rows of x in the latest batch
        # Per-image augmentation (a teacher cache needs it): image i in view v is augmented by
        # parameters drawn from (aug_seed, v) alone, whatever the batch order.
        self.aug_seed, self.aug_views = augment.per_image_seed, augment.views
        self.last_view = torch.empty(0, dtype=torch.int64)  # view of each image of the batch

    @property
    def num_samples(self) -> int:
        """Images in the loader: the range of ``last_index``."""
        return len(self.x)

    @property
    def labels(self) -> torch.Tensor:
        """The label of every image, by ``last_index`` row (-1: unlabelled)."""
        return self.y

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
            images = random_crop(images, self.crop_padding, gen)
        if self.flip:
            flipped = torch.rand(len(images), generator=gen).to(images.device) < 0.5
            images = torch.where(flipped.view(-1, 1, 1, 1), images.flip(-1), images)
        return images


class TransferLoader:
    """Labelled batches, each joined by a batch of unlabelled images (label -1).

    By default an epoch is one pass over the labelled loader, so ``stage.epochs`` means the same
    number of optimisation steps with or without unlabelled images. With ``steps`` set (from
    ``stage.transfer_epochs``) an epoch is that many steps instead, whatever the labelled
    subset's size, and the labelled loader cycles too. A stream that cycles runs as one endless
    sequence of passes (pass ``p`` shuffled and augmented by its own seed) that the epochs take
    their batches from in turn: epoch ``e`` takes batches ``(e-1)*L`` to ``e*L-1`` (``L`` steps
    per epoch), so a resumed epoch repeats exactly; such a stream needs per-image augmentation
    (``aug_seed``). ``last_index`` numbers labelled images first, then unlabelled ones.
    """

    def __init__(self, labeled: BatchLoader, unlabeled: BatchLoader,
                 steps: int | None = None) -> None:  # fmt: skip
        self.labeled, self.unlabeled, self.steps = labeled, unlabeled, steps
        self.epoch = 0
        self.last_index = torch.empty(0, dtype=torch.int64)
        self.last_view = torch.empty(0, dtype=torch.int64)

    @property
    def num_samples(self) -> int:
        """Labelled plus unlabelled images: the range of ``last_index``."""
        return self.labeled.num_samples + self.unlabeled.num_samples

    @property
    def labels(self) -> torch.Tensor:
        """The label of every image, by ``last_index`` row: the unlabelled ones' are -1."""
        return torch.cat([self.labeled.labels, self.unlabeled.labels])

    @property
    def batch_size(self) -> int:
        """Images per step, labelled and unlabelled together."""
        return self.labeled.batch_size + self.unlabeled.batch_size

    def __len__(self) -> int:
        return self.steps or len(self.labeled)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch of the labelled loader and the unlabelled batches it is joined with."""
        self.epoch = epoch
        self.labeled.set_epoch(epoch)

    def _cycled(self, loader: BatchLoader) -> Iterator[tuple[torch.Tensor, ...]]:
        """``loader``'s batches as one endless sequence of passes, from this epoch's first."""
        passes, start = divmod(max(self.epoch - 1, 0) * len(self), len(loader))
        while True:
            loader.set_epoch(passes)
            for x, y in loader.batches(start):
                yield x, y, loader.last_index, loader.last_view
            passes, start = passes + 1, 0

    def _labeled_batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.steps is not None:
            yield from self._cycled(self.labeled)
            return
        for x, y in self.labeled:
            yield x, y, self.labeled.last_index, self.labeled.last_view

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        extra = self._cycled(self.unlabeled)
        offset = self.labeled.num_samples
        labelled = self._labeled_batches()
        for _ in range(len(self)):
            x, y, il, vl = next(labelled)
            xu, yu, iu, vu = next(extra)
            self.last_index = torch.cat([il, iu + offset])
            # views of the two streams are told apart by sign: unlabelled ones are negative
            self.last_view = torch.cat([vl, -1 - vu])
            yield torch.cat([x, xu]), torch.cat([y, yu])


class StreamLoader(Batching):
    """``BatchLoader``'s batches for images that stay on disk, decoded by worker processes.

    Takes BatchLoader's arguments with ``x`` an :class:`ImageFiles`. The shuffle order, crop
    offsets and flips are drawn in the main process from the generator BatchLoader uses, in the
    same order, so both loaders give the same batches for the same images, seed and epoch.
    """

    def __init__(self, x: ImageFiles, y: torch.Tensor, batch_size: int, norm: Normalise, *,
                 order: Order = Order(), augment: Augment = Augment(),
                 device: str | torch.device = "cpu") -> None:  # fmt: skip
        if augment.per_image_seed is not None:
            raise DataError("a streamed image folder draws augmentation per batch, not per image")
        self._setup(len(x), len(y), batch_size, norm, order, augment, device)
        self.x, self.y = x, y.to(torch.int64).cpu()
        # The workers start on the first pass and stay for the next ones.
        self._plans = Plans()
        cuda = self.device.type == "cuda"
        self._batches = decoder(x, self._plans, augment.crop_padding, cuda, True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen, order = self._epoch_order()
        plans = [self._plan(order[i * self.batch_size : (i + 1) * self.batch_size], gen)
                 for i in range(len(self))]  # fmt: skip
        self._plans.plans = plans
        for (images, ok, errors), (idx, _, _) in zip(self._batches, plans, strict=True):
            self.x.check(ok, errors, idx)
            labels = self.y[idx]
            if errors:
                images, labels = images[ok], labels[ok]
            images = self._normalised(images.to(self.device, non_blocking=True))
            yield images, labels.to(self.device, non_blocking=True)

    def _plan(self, idx: torch.Tensor, gen: torch.Generator) -> Plan:
        """Draws a batch's augmentation exactly as BatchLoader does: crop offsets, then flips."""
        offsets = flips = None
        if self.crop_padding > 0:
            offsets = torch.randint(0, 2 * self.crop_padding + 1, (2, len(idx)), generator=gen)
        if self.flip:
            flips = torch.rand(len(idx), generator=gen) < 0.5
        return idx, offsets, flips
