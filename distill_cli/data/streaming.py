"""Image folders too large for memory: image files decoded per batch by DataLoader workers.

    distill-cli pretrain dataset=imagefolder dataset.root=/data/big dataset.workers=4

``subsets.load_split`` returns a folder's images as :class:`ImageFiles` (paths, not pixels)
with ``dataset.stream=true``, or with ``dataset.stream=null`` when the decoded images would take
more than ``dataset.max_memory_gb``. The stage layer subsets, converts and measures it like the
uint8 tensor it stands for, and ``loaders.StreamLoader`` yields what ``loaders.BatchLoader``
yields for that tensor: the same shuffle order, crops and flips for a seed and epoch, the same
normalisation. Workers decode, convert and augment uint8 batches; the main process normalises
them on the device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from distill_cli.data.images import DataError, convert, crop_at
from distill_cli.data.readers import UnreadableImage, decode_image, list_imagefolder

log = logging.getLogger("distill_cli")

# Images per chunk when a pass decodes every file (channel statistics).
_CHUNK = 256
# One batch's image indices, crop offsets (2, B) or None, flip flags (B,) or None.
Plan = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


@dataclass
class ImageFiles:
    """A uint8 (N, C, H, W) image tensor left on disk: its image files, decoded on demand.

    Attributes:
        paths: One file per image.
        size: (width, height) that every image is resized to when decoded: the first one's.
        conversions: (image_size, channels) pairs applied after decoding, as ``data.convert``.
        skip_bad: Whether an unreadable file is skipped (else it stops the load).
        workers: DataLoader worker processes that decode.
        unreadable: Files found unreadable so far (shared with subsets, to warn once each).
    """

    paths: list[str]
    size: tuple[int, int]
    conversions: tuple[tuple[int | None, int | None], ...] = ()
    skip_bad: bool = False
    workers: int = 2
    unreadable: set[str] = field(default_factory=set, compare=False)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> torch.Size:
        """The shape of the tensor these files stand for."""
        channels, side = 3, None
        for image_size, to_channels in self.conversions:
            channels, side = to_channels or channels, image_size or side
        height, width = (side, side) if side else (self.size[1], self.size[0])
        return torch.Size((len(self.paths), channels, height, width))

    @property
    def nbytes(self) -> int:
        """Bytes the decoded images would take in memory."""
        return math.prod(self.shape)

    def __getitem__(self, index: torch.Tensor) -> ImageFiles:
        """The images at int64 indices or where a bool mask is true, in that order."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        return replace(self, paths=[self.paths[i] for i in index.tolist()])

    def converted(self, image_size: int | None, channels: int | None) -> ImageFiles:
        """These files with a further ``data.convert(x, image_size, channels)`` on decoding."""
        return replace(self, conversions=(*self.conversions, (image_size, channels)))

    def decode(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Images at ``indices`` as uint8 (B, C, H, W), whether each was readable, the errors.

        An unreadable file gives a black image, False, and its message; the caller decides.
        """
        blank = np.zeros((self.size[1], self.size[0], 3), np.uint8)
        images, ok, errors = [], [], []
        for i in indices:
            try:
                images.append(decode_image(self.paths[i], self.size))
                ok.append(True)
            except UnreadableImage as exc:
                images.append(blank)
                ok.append(False)
                errors.append(str(exc))
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        for image_size, channels in self.conversions:
            x = convert(x, image_size, channels)
        return x, torch.tensor(ok, dtype=torch.bool), errors

    def check(self, ok: torch.Tensor, errors: list[str], indices: torch.Tensor) -> None:
        """Raise DataError for an unreadable file, or warn once per file when they are skipped."""
        if not errors:
            return
        if not self.skip_bad:
            raise DataError(errors[0])
        new = {self.paths[i] for i in indices[~ok].tolist()} - self.unreadable
        if new:
            self.unreadable |= new
            log.warning("skipped %d unreadable image(s), e.g. %s", len(new), sorted(new)[0])

    def chunks(self) -> Iterator[torch.Tensor]:
        """Every readable image in order, in decoded uint8 chunks (for statistics)."""
        plans = [(torch.arange(i, min(i + _CHUNK, len(self))), None, None)
                 for i in range(0, len(self), _CHUNK)]  # fmt: skip
        batches = decoder(self, Plans(plans), 0)
        for (images, ok, errors), (idx, _, _) in zip(batches, plans, strict=True):
            self.check(ok, errors, idx)
            yield images[ok]


def list_image_files(root: str, train: bool, bad_images: str = "error",
                     workers: int = 2) -> tuple[ImageFiles, torch.Tensor, list[str]]:  # fmt: skip
    """An image folder's files, labels and class names, sized by its first readable image."""
    paths, labels, classes = list_imagefolder(root, train)
    for path in paths:
        try:
            first = decode_image(path)
            break
        except UnreadableImage:
            if bad_images != "skip":
                raise
    else:
        raise UnreadableImage(f"no readable image among the {len(paths)} files under {root}")
    size = (first.shape[1], first.shape[0])
    files = ImageFiles(paths, size, skip_bad=bad_images == "skip", workers=workers)
    return files, torch.tensor(labels, dtype=torch.int64), classes


def stream_split(
    root: str, train: bool, bad_images: str, stream: bool | None, max_memory_gb: float | None,
    workers: int,
) -> tuple[ImageFiles, torch.Tensor, list[str]] | None:  # fmt: skip
    """An image folder's files when asked to stream or too large for memory; else None."""
    files, labels, names = list_image_files(root, train, bad_images, workers)
    gib = files.nbytes / 2**30
    if not stream and (max_memory_gb is None or gib <= max_memory_gb):
        return None
    why = "dataset.stream=true" if stream else f"over dataset.max_memory_gb={max_memory_gb}"
    log.info("imagefolder %s: %d images, %.2f GiB decoded (%s): streaming them from the files "
             "with %d worker(s)", "train" if train else "test", len(files), gib, why,
             workers)  # fmt: skip
    return files, labels, names


class _Decoder(Dataset):
    """Decodes, converts and augments the batch a plan describes (in a worker process)."""

    def __init__(self, files: ImageFiles, padding: int) -> None:
        self.files, self.padding = files, padding

    def __getitem__(self, plan: Plan) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        idx, offsets, flips = plan
        images, ok, errors = self.files.decode(idx.tolist())
        if offsets is not None:
            images = crop_at(images, self.padding, offsets)
        if flips is not None:
            images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
        return images, ok, errors


class Plans:
    """The plans of the next pass: the sampler of a DataLoader, which hands them to workers."""

    def __init__(self, plans: list[Plan] | None = None) -> None:
        self.plans = plans or []

    def __iter__(self) -> Iterator[Plan]:
        return iter(self.plans)

    def __len__(self) -> int:
        return len(self.plans)


def decoder(files: ImageFiles, plans: Plans, padding: int, pin: bool = False,
             persistent: bool = False) -> DataLoader:  # fmt: skip
    """A DataLoader whose workers decode the batches that ``plans`` lays out, in order."""
    # Its own generator: a DataLoader otherwise draws its workers' seed from the global one,
    # which would change the weights the stage initialises next.
    return DataLoader(_Decoder(files, padding), batch_size=None, sampler=plans,
                      num_workers=files.workers, pin_memory=pin,
                      persistent_workers=persistent and files.workers > 0,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
